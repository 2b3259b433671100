"""Keeping every resource registered with the kubelet, event-driven.

``PluginServer`` owns one resource's kubelet endpoint: a ``UnixSocketServer``
on a socket file with a fresh name per start (``hostkit-<slug>-<ts>.sock`` in
the kubelet's device-plugin directory), and the ``Registration/Register`` call
that tells the kubelet about it.  The order is the kubelet's contract
(reference §1.2): serve first, then Register from this server's own thread
while the gRPC workers answer the kubelet's dial-back ``GetDevicePluginOptions``;
the options in ``RegisterRequest`` are the ones the servicer returns.

It re-registers (stop the old server, new socket name, serve, Register) when

* ``kubelet.sock`` is created again (a kubelet restart),
* its own socket is deleted (the restarting kubelet wipes every socket),
* the ListAndWatch stream ends while the plugin keeps running (the kubelet
  never dials again by itself),

and waits quietly (one INFO line) while ``kubelet.sock`` does not exist.
``PluginManager`` runs one ``PluginServer`` per resource of the catalog, turns
inotify events on the directory into requests to the right server, follows the
catalog across config reloads, and on shutdown stops every server and removes
its socket.  Nothing polls: a slow safety-net check only repairs a missed event.
It runs every ``safety_interval`` (5 s) while a server is not registered (a
refused or unanswered Register is retried that often) and every
``idle_interval`` (30 s) once it is: inotify does not lose events short of a
queue overflow, which is handled, so a registered server has nothing to retry,
and the idle daemon (one lifecycle thread per resource, plus the directory
watch and the catalog follower) then wakes once in 30 s per thread instead of 5.
The lifecycle thread beats a liveness heartbeat (``PluginManager.healthy``)
before and after each wait, so its longest silence is one idle wait (30 s) or
one Register (bounded by ``register_timeout``, 15 s), well under the 60 s that
``/healthz`` allows (``cli.HEALTH_MAX_AGE_SECONDS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping

import grpc

from device_plugin import api, model
from device_plugin.metrics import REGISTERED, REGISTRATIONS, SNAPSHOT_BYTES, SNAPSHOTS_REFUSED
from device_plugin.servicer import DevicePluginServicer, EncodedSnapshot, SnapshotFeed, StreamEnd
from plugin_runtime import inotify
from plugin_runtime.server import MAX_SOCKET_PATH, UnixSocketServer

log = logging.getLogger(__name__)

# Why a server re-registers; logged and kept for tests.
KUBELET_RESTARTED = "kubelet.sock created"
SOCKET_DELETED = "own socket deleted"
STREAM_ENDED = "ListAndWatch stream ended"
RESOURCE_CHANGED = "resource changed after a refused snapshot"
SAFETY_CHECK = "safety check"
OPTIONS_CHANGED = "options changed"

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")
_SOCKET_PREFIX = "hostkit-"


def socket_name(resource: str, directory: str, now_ns: int | None = None) -> str:
    """A fresh socket file name for ``resource`` that fits the 107-byte path limit."""
    stamp = f"{(now_ns if now_ns is not None else time.time_ns()):x}"
    slug = _SLUG.sub("_", resource).strip("_") or "resource"
    room = MAX_SOCKET_PATH - len(os.fsencode(directory)) - 1 - len(
        f"{_SOCKET_PREFIX}--{stamp}.sock"
    )
    if len(slug) > room:
        digest = hashlib.sha1(resource.encode()).hexdigest()[:8]  # noqa: S324 - a name
        keep = room - len(digest) - 1
        if keep < 1:
            raise ValueError(
                f"kubelet directory {directory!r} is too long for a socket path "
                f"(the kernel allows {MAX_SOCKET_PATH} bytes)"
            )
        slug = f"{slug[:keep]}_{digest}"
    return f"{_SOCKET_PREFIX}{slug}-{stamp}.sock"


def _inode(path: str) -> tuple[int, int] | None:
    """Identity of the socket at ``path``: inode and ctime (an inode number alone can
    be reused by a re-created kubelet.sock on disk filesystems)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


def remove_dead_sockets(directory: str) -> list[str]:
    """Remove our sockets (``hostkit-*.sock``) that nobody listens on any more.

    A plugin process that was killed leaves its socket behind, and the kubelet
    never dials it again; only its next restart would wipe it.  A socket that
    still accepts belongs to a live instance (a rolling update overlaps two
    pods briefly) and stays.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith(_SOCKET_PREFIX) and name.endswith(".sock")):
            continue
        path = os.path.join(directory, name)
        if _inode(path) is None:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(name)
        except OSError:
            continue
        finally:
            probe.close()
    if removed:
        log.info("removed sockets of dead plugin instances: %s", ", ".join(removed))
    return removed


class RegistrationRefused(Exception):
    """The kubelet answered Register with an error (not a transport failure)."""


class RegistrationAbandoned(Exception):
    """Register was cancelled because the socket it names is gone (or we stop)."""


class PluginServer:
    """Serves one resource on its own socket and keeps it registered."""

    def __init__(
        self,
        resource: model.Resource,
        kubelet_dir: str = api.DEFAULT_KUBELET_DIR,
        *,
        safety_interval: float = 5.0,
        idle_interval: float = 30.0,
        register_timeout: float = api.KUBELET_DIAL_TIMEOUT_SECONDS + 5.0,
        max_workers: int = 4,
        stop_grace: float = 1.0,
        message_limit: int = api.MAX_MESSAGE_BYTES,
    ) -> None:
        self.resource = resource
        self.name = resource.name
        self.kubelet_dir = kubelet_dir
        self.kubelet_socket = os.path.join(kubelet_dir, api.KUBELET_SOCKET)
        self._safety_interval = safety_interval
        self._idle_interval = idle_interval
        self._register_timeout = register_timeout
        self._max_workers = max_workers
        self._stop_grace = stop_grace
        self._feed = SnapshotFeed(resource, limit=message_limit, on_change=self._snapshot_changed)
        self._cond = threading.Condition()
        self._reasons: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the server thread (read elsewhere only for reporting).
        self._server: UnixSocketServer | None = None
        self._servicer: DevicePluginServicer | None = None
        self._epoch = 0
        self._registered_inode: tuple[int, int] | None = None
        self._refused_generation: int | None = None
        self._waiting_logged = False
        self._failure_logged = False
        self._refusal_logged = ""
        self.registrations = 0
        self.reregister_reasons: list[str] = []
        self.socket_path: str | None = None
        self.served_options = resource.options
        self.heartbeat = time.monotonic()

    # --- control from other threads -------------------------------------------------------

    def start(self) -> None:
        self._feed.start()
        self._thread = threading.Thread(target=self._run, name=f"plugin-{self.name}", daemon=True)
        self._thread.start()

    def request(self, reason: str) -> None:
        """Ask the server thread to re-check (and usually re-register) for ``reason``."""
        with self._cond:
            self._reasons.append(reason)
            self._cond.notify_all()

    def owns_socket_name(self, name: str) -> bool:
        path = self.socket_path
        return path is not None and os.path.basename(path) == name

    @property
    def registered(self) -> bool:
        return self._registered_inode is not None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, remove the socket, and end the server thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        servicer = self._servicer
        if servicer is not None:
            servicer.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._feed.close()

    # --- callbacks from gRPC and the feed --------------------------------------------------

    def _snapshot_changed(self, encoded: EncodedSnapshot) -> None:
        SNAPSHOT_BYTES.labels(self.name).set(encoded.size)
        if encoded.refusal:
            SNAPSHOTS_REFUSED.labels(self.name).inc()
        refused = self._refused_generation
        if refused is not None and encoded.generation != refused:
            self.request(RESOURCE_CHANGED)

    def _stream_ended(self, epoch: int, end: StreamEnd) -> None:
        if epoch != self._epoch:
            return  # a stream of a server we already replaced
        if end.refused_generation is not None:
            self._refused_generation = end.refused_generation
            log.error(
                "%s: kubelet stream ended with a refused snapshot; re-registering once the "
                "resource changes",
                self.name,
                extra={"resource": self.name},
            )
            if self._feed.current.generation != end.refused_generation:
                self.request(RESOURCE_CHANGED)  # it already changed meanwhile
            return
        self.request(STREAM_ENDED)

    # --- the server thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._cycle_safely("start")
            while True:
                # A heartbeat before and after each wait: the longest silence is one
                # wait or one step, never both.
                self.heartbeat = time.monotonic()
                with self._cond:
                    if not self._reasons and not self._stopping:
                        self._cond.wait(self._next_check())
                    if self._stopping:
                        break
                    reasons, self._reasons = self._reasons, []
                self.heartbeat = time.monotonic()
                try:
                    reason = self._decide(reasons)
                    if reason is not None:
                        self._cycle_safely(reason)
                except Exception:
                    # Never leave a resource unserved for good: the next event or the
                    # safety check tries again.
                    log.exception(
                        "%s: lifecycle step failed", self.name, extra={"resource": self.name}
                    )
        finally:
            self._teardown()

    def _next_check(self) -> float:
        """Seconds to the next safety check: short while there is something to retry."""
        settled = self.registered and self._refused_generation is None
        return self._idle_interval if settled else self._safety_interval

    def _decide(self, reasons: list[str]) -> str | None:
        """Which restart, if any, the pending reasons (or the safety check) call for."""
        kubelet_inode = _inode(self.kubelet_socket)
        socket_ok = self._server is not None and self._server.socket_is_ours()
        if self._refused_generation is not None:
            if self._feed.current.generation == self._refused_generation:
                return None
            self._refused_generation = None
            return RESOURCE_CHANGED
        for reason in reasons:
            if reason == KUBELET_RESTARTED and kubelet_inode is not None:
                if self.registered and kubelet_inode == self._registered_inode and socket_ok:
                    continue  # the create we registered against
                return reason
            if reason == SOCKET_DELETED and not socket_ok:
                return reason
            if reason in (STREAM_ENDED, RESOURCE_CHANGED, OPTIONS_CHANGED):
                return reason
        # Safety net: repairs a missed inotify event.
        if not socket_ok:
            return SOCKET_DELETED
        if self.registered and kubelet_inode != self._registered_inode:
            return KUBELET_RESTARTED
        if not self.registered and kubelet_inode is not None:
            return SAFETY_CHECK
        return None

    def _cycle_safely(self, reason: str) -> None:
        """``_cycle``, retried a few times when the socket cannot be set up (a kubelet
        restart may wipe it, or the directory, while it is being bound); then the
        safety net retries.  The lifecycle thread never dies of a failed cycle."""
        for delay in (0.05, 0.2, 1.0, None):
            try:
                self._cycle(reason)
                return
            except Exception as exc:  # OSError, or grpc's RuntimeError on a failed bind
                self._stop_server()
                log.log(
                    logging.WARNING if delay is None else logging.INFO,
                    "%s: cannot serve on a new socket in %s: %s%s",
                    self.name,
                    self.kubelet_dir,
                    exc,
                    "" if delay is None else "; retrying",
                    extra={"resource": self.name},
                )
                if delay is None:
                    return
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(delay)

    def _cycle(self, reason: str) -> None:
        """Make sure a live server is on a fresh socket if needed, then Register."""
        socket_ok = self._server is not None and self._server.socket_is_ours()
        fresh = reason != SAFETY_CHECK or not socket_ok
        if reason != "start":
            self.reregister_reasons.append(reason)
            log.info(
                "%s: re-registering (%s)", self.name, reason, extra={"resource": self.name}
            )
        if fresh:
            self.served_options = self.resource.options
            self._restart_server()
        self._register()

    def _restart_server(self) -> None:
        self._stop_server()
        self._epoch += 1
        epoch = self._epoch
        servicer = DevicePluginServicer(
            self._feed, on_stream_end=lambda end: self._stream_ended(epoch, end)
        )
        path = os.path.join(self.kubelet_dir, socket_name(self.name, self.kubelet_dir))
        server = UnixSocketServer(
            path,
            lambda s: api.add_DevicePluginServicer_to_server(servicer, s),
            max_workers=self._max_workers,
            health_services=(api.DEVICE_PLUGIN_SERVICE,),
        )
        server.start()
        self._server, self._servicer, self.socket_path = server, servicer, path

    def _stop_server(self) -> None:
        server, servicer = self._server, self._servicer
        self._server = self._servicer = None
        self._set_registered(None)
        if servicer is not None:
            servicer.close()
        if server is not None:
            server.stop(self._stop_grace)

    def _set_registered(self, inode: tuple[int, int] | None) -> None:
        self._registered_inode = inode
        REGISTERED.labels(self.name).set(0 if inode is None else 1)

    def _register(self) -> None:
        server, servicer = self._server, self._servicer
        if server is None or servicer is None:
            return
        kubelet_inode = _inode(self.kubelet_socket)
        if kubelet_inode is None:
            if not self._waiting_logged:
                log.info(
                    "%s: waiting for %s to appear",
                    self.name,
                    self.kubelet_socket,
                    extra={"resource": self.name},
                )
                self._waiting_logged = True
            return
        request = api.RegisterRequest(
            version=api.VERSION,
            endpoint=os.path.basename(server.socket_path),
            resource_name=self.name,
            options=servicer.options_message(),
        )
        delays = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
        for attempt in range(len(delays) + 1):
            try:
                self._call_register(request, server)
            except RegistrationAbandoned:
                log.info(
                    "%s: socket removed while registering; starting over",
                    self.name,
                    extra={"resource": self.name},
                )
                return
            except RegistrationRefused as exc:
                REGISTRATIONS.labels(self.name, "error").inc()
                if not server.socket_is_ours():
                    # A restarting kubelet wiped our socket while it dialled back; the
                    # queued deletion event brings a fresh socket and a new Register.
                    log.info("%s: registration raced a kubelet restart: %s", self.name, exc)
                    return
                # ERROR once; the safety check retries every few seconds, quietly.
                level = logging.DEBUG if self._refusal_logged == str(exc) else logging.ERROR
                self._refusal_logged = str(exc)
                log.log(
                    level,
                    "%s: the kubelet refused registration: %s",
                    self.name,
                    exc,
                    extra={"resource": self.name},
                )
                return
            except grpc.RpcError as exc:
                if attempt < len(delays):
                    with self._cond:
                        if self._stopping:
                            return
                        self._cond.wait(delays[attempt])
                        if self._reasons:
                            return  # news (a wipe, a new kubelet.sock) decides what is next
                    continue
                REGISTRATIONS.labels(self.name, "unavailable").inc()
                level = logging.DEBUG if self._failure_logged else logging.WARNING
                self._failure_logged = True
                log.log(
                    level,
                    "%s: kubelet at %s not answering (%s); waiting for it",
                    self.name,
                    self.kubelet_socket,
                    exc.code().name if hasattr(exc, "code") else exc,
                    extra={"resource": self.name},
                )
                return
            else:
                break
        self._waiting_logged = self._failure_logged = False
        self._refusal_logged = ""
        self._set_registered(kubelet_inode)
        self.registrations += 1
        REGISTRATIONS.labels(self.name, "ok").inc()
        log.info(
            "%s: registered with the kubelet as %s",
            self.name,
            request.endpoint,
            extra={"resource": self.name},
        )

    def _call_register(self, request: api.RegisterRequest, server: UnixSocketServer) -> None:
        """Register, abandoning the call when our socket goes meanwhile (the kubelet's
        dial-back would then wait out its 10 s) or the server is stopping."""
        with grpc.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            stub = api.RegistrationStub(channel)
            future = stub.Register.future(request, timeout=self._register_timeout)
            future.add_done_callback(lambda _f: self._notify())
            with self._cond:
                while not future.done():
                    if self._stopping or (self._reasons and not server.socket_is_ours()):
                        future.cancel()
                        raise RegistrationAbandoned("our socket went while registering")
                    self._cond.wait()
            try:
                future.result()
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                details = exc.details() if hasattr(exc, "details") else str(exc)
                raise RegistrationRefused(
                    f"{code.name if code else 'error'}: {details}"
                ) from exc

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _teardown(self) -> None:
        self._stop_server()
        self.socket_path = None


class PluginManager:
    """One ``PluginServer`` per resource of the catalog, plus the directory watch."""

    def __init__(
        self,
        catalog: model.ResourceCatalog,
        kubelet_dir: str = api.DEFAULT_KUBELET_DIR,
        *,
        safety_interval: float = 5.0,
        idle_interval: float = 30.0,
        server_factory: Callable[[model.Resource], PluginServer] | None = None,
    ) -> None:
        self.catalog = catalog
        self.kubelet_dir = kubelet_dir
        self._safety_interval = safety_interval
        self._idle_interval = idle_interval
        self._factory = server_factory or (
            lambda resource: PluginServer(
                resource,
                kubelet_dir,
                safety_interval=safety_interval,
                idle_interval=idle_interval,
            )
        )
        self._servers: dict[str, PluginServer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self.heartbeat = time.monotonic()

    @property
    def servers(self) -> Mapping[str, PluginServer]:
        with self._lock:
            return dict(self._servers)

    def start(self) -> None:
        os.makedirs(self.kubelet_dir, mode=0o750, exist_ok=True)
        remove_dead_sockets(self.kubelet_dir)
        # Watch before the first registration so no kubelet restart falls in between.
        watch = inotify.DirectoryWatch(self.kubelet_dir, self._mask())
        self._reconcile()
        for target, name, args in (
            (self._watch_loop, "kubelet-dir-watch", (watch,)),
            (self._catalog_loop, "catalog-watch", ()),
        ):
            thread = threading.Thread(target=target, name=name, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _mask() -> int:
        return (
            inotify.IN_CREATE
            | inotify.IN_MOVED_TO
            | inotify.IN_DELETE
            | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE_SELF
            | inotify.IN_MOVE_SELF
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every server (their sockets go) and the watch threads; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        wake = getattr(self.catalog, "wake", None)  # the registry's Catalog has one
        if callable(wake):
            wake()
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server in servers:
            server.stop(timeout)
        for thread in self._threads:
            # The catalog thread may sit in the domain's wait until its own timeout;
            # it is a daemon and does nothing once stopped, so do not hold shutdown.
            thread.join(timeout if thread.name != "catalog-watch" else 0.2)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def healthy(self, max_age: float) -> tuple[bool, str]:
        """Liveness: every thread of ours woke up within ``max_age`` seconds."""
        now = time.monotonic()
        if self._stop.is_set():
            return False, "shutting down"
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead:
            return False, f"threads ended: {', '.join(dead)}"
        for name, server in self.servers.items():
            if now - server.heartbeat > max_age:
                return False, f"{name}: lifecycle thread silent for {now - server.heartbeat:.0f}s"
        return True, "ok"

    # --- catalog ------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        wanted = dict(self.catalog.resources())
        with self._lock:
            if self._stop.is_set():
                return
            current = dict(self._servers)
        for name, server in current.items():
            resource = wanted.get(name)
            if resource is None or resource is not server.resource:
                log.info("resource %s %s", name, "removed" if resource is None else "replaced")
                server.stop()
                with self._lock:
                    self._servers.pop(name, None)
            elif resource.options != server.served_options:
                # Options live in RegisterRequest and GetDevicePluginOptions: register anew.
                server.request(OPTIONS_CHANGED)
        for name, resource in wanted.items():
            with self._lock:
                if name in self._servers or self._stop.is_set():
                    continue
            server = self._factory(resource)
            server.start()
            with self._lock:
                self._servers[name] = server
            log.info("serving resource %s", name, extra={"resource": name})

    def _catalog_loop(self) -> None:
        generation = -1
        while not self._stop.is_set():
            try:
                # Woken by a change or by stop(); the timeout is only a heartbeat.
                new = self.catalog.wait_for_catalog_change(
                    generation, self._stop, timeout=self._idle_interval
                )
            except Exception:
                log.exception("following the resource catalog failed")
                self._stop.wait(self._safety_interval)
                continue
            self.heartbeat = time.monotonic()
            if self._stop.is_set():
                break
            if new != generation:
                if generation != -1:
                    log.info("resource catalog changed (generation %d)", new)
                generation = new
                self._reconcile()

    # --- directory watch ------------------------------------------------------------------

    def _watch_loop(self, watch: inotify.DirectoryWatch) -> None:
        try:
            while not self._stop.is_set():
                # Woken by an event or by stop()'s pipe; the timeout is only a heartbeat.
                ready, _, _ = select.select(
                    [watch.fileno(), self._wake_r], [], [], self._idle_interval
                )
                if self._stop.is_set():
                    break
                self.heartbeat = time.monotonic()
                if watch.fileno() not in ready:
                    continue
                events = watch.read(0)
                if any(e.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF) for e in events):
                    watch.close()
                    rewatched = self._rewatch()
                    if rewatched is None:
                        return
                    watch = rewatched
                    self._broadcast(SOCKET_DELETED)
                    continue
                self._dispatch(events)
        finally:
            watch.close()

    def _rewatch(self) -> inotify.DirectoryWatch | None:
        log.warning("%s was removed or moved; watching it again", self.kubelet_dir)
        while not self._stop.is_set():
            try:
                os.makedirs(self.kubelet_dir, mode=0o750, exist_ok=True)
                return inotify.DirectoryWatch(self.kubelet_dir, self._mask())
            except OSError as exc:
                log.warning("cannot watch %s: %s", self.kubelet_dir, exc)
                self._stop.wait(self._safety_interval)
        return None

    def _dispatch(self, events: list[inotify.Event]) -> None:
        if any(e.overflow for e in events):
            self._broadcast(SAFETY_CHECK)
            return
        servers = self.servers.values()
        for event in events:
            if event.name == api.KUBELET_SOCKET:
                if event.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                    log.info("kubelet.sock created: kubelet (re)started")
                    self._broadcast(KUBELET_RESTARTED)
                continue
            if event.mask & (inotify.IN_DELETE | inotify.IN_MOVED_FROM):
                for server in servers:
                    if server.owns_socket_name(event.name):
                        server.request(SOCKET_DELETED)

    def _broadcast(self, reason: str) -> None:
        for server in self.servers.values():
            server.request(reason)
