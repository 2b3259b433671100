"""Serving the DRA plugin and keeping it registered with the kubelet's plugin watcher.

``DraPlugin`` owns two sockets:

* the DRA service socket ``<root>/plugins/<driver>/dra.sock`` serving
  DRAPlugin v1 and v1beta1 and DRAResourceHealth (the kubelet opens the health
  stream on the same connection);
* the registration socket ``<root>/plugins_registry/<driver>-reg.sock``
  serving ``pluginregistration.Registration``.  Its creation is what the
  kubelet's plugin watcher reacts to: it calls GetInfo (1 s deadline), checks
  and registers, and reports the outcome with NotifyRegistrationStatus.

The order is the kubelet's contract (dra.md §1): the DRA socket serves before
the registration socket appears, because the kubelet dials it at once.

Re-registration, like the device plugin's rules:

* a NotifyRegistrationStatus with ``plugin_registered: false`` is logged with
  the kubelet's error and the registration is offered again after
  ``retry_seconds`` (doubling up to ``max_retry_seconds``): the registration
  socket is re-created, which the plugin watcher sees as a new plugin;
* our registration socket deleted or replaced (an operator, a kubelet that
  cleans up) is re-created at once; the DRA socket deleted means a restart of
  the DRA server, then a new offer;
* a kubelet restart needs nothing: the plugin watcher registers the sockets it
  finds at start;
* a socket file left by a dead instance is removed before binding
  (``UnixSocketServer``); on stop both sockets go (only if still ours), the
  registration socket first, so the kubelet deregisters the driver;
* a socket replaced by another live instance (a rolling update that overlaps
  two pods) is left to it: this instance keeps serving its open connections
  until it is stopped, and never re-creates the path, so the two never fight.

inotify on both directories drives all of it; a slow safety check
(``idle_seconds``) repairs a missed event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

from device_plugin.dra import api
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.prepare import ClaimPreparer
from device_plugin.dra.servicer import DRAPluginV1, DRAPluginV1beta1, Registration, ResourceHealth
from plugin_runtime import inotify
from plugin_runtime.server import UnixSocketServer

log = logging.getLogger(__name__)

# Why the registration is offered again; logged and kept for tests.
REFUSED = "kubelet refused the registration"
REG_SOCKET_GONE = "registration socket deleted"
DRA_SOCKET_GONE = "DRA socket deleted"
SAFETY_CHECK = "safety check"

# How long a missing socket must stay missing before we serve it again.
SETTLE_SECONDS = 0.1

_MASK = (inotify.IN_DELETE | inotify.IN_MOVED_FROM | inotify.IN_CREATE | inotify.IN_MOVED_TO
         | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF)


def registration_socket_name(driver: str) -> str:
    return f"{driver}-reg.sock"


class DraPlugin:
    """The DRA kubelet plugin of one driver."""

    def __init__(
        self,
        driver: str,
        preparer: ClaimPreparer,
        feed: HealthFeed,
        kubelet_root: str = api.DEFAULT_KUBELET_ROOT,
        *,
        retry_seconds: float = 5.0,
        max_retry_seconds: float = 120.0,
        idle_seconds: float = 30.0,
        max_workers: int = 8,
        stop_grace: float = 1.0,
    ) -> None:
        self.driver = driver
        self.registry_dir = os.path.join(kubelet_root, api.REGISTRY_DIR)
        self.plugin_dir = os.path.join(kubelet_root, api.PLUGINS_DIR, driver)
        self.registration_socket = os.path.join(self.registry_dir,
                                                registration_socket_name(driver))
        self.dra_socket = os.path.join(self.plugin_dir, api.DRA_SOCKET)
        self._preparer = preparer
        self._feed = feed
        self._retry_seconds = retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._idle_seconds = idle_seconds
        self._max_workers = max_workers
        self._stop_grace = stop_grace
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._dra: UnixSocketServer | None = None
        self._registration: UnixSocketServer | None = None
        self._retry_at: float | None = None
        self._backoff = retry_seconds
        self._taken_over = False
        # Observable state (tests, status, metrics).
        self.registered: bool | None = None  # None: no word from the kubelet yet
        self.last_error = ""
        self.offers = 0
        self.reasons: list[str] = []
        self.heartbeat = time.monotonic()

    # --- control ------------------------------------------------------------------------

    def start(self) -> None:
        for directory in (self.registry_dir, self.plugin_dir):
            os.makedirs(directory, mode=0o750, exist_ok=True)
        watches = [inotify.DirectoryWatch(d, _MASK) for d in (self.registry_dir, self.plugin_dir)]
        try:
            self._start_dra()
            self._offer()
        except BaseException:
            for watch in watches:
                watch.close()
            self._stop_servers()
            raise
        self._thread = threading.Thread(target=self._run, args=(watches,),
                                        name=f"dra-plugin-{self.driver}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Remove the registration socket (the kubelet deregisters), then stop serving."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_servers()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _stop_servers(self) -> None:
        registration, self._registration = self._registration, None
        if registration is not None:
            registration.stop(self._stop_grace)
        dra, self._dra = self._dra, None
        if dra is not None:
            dra.stop(self._stop_grace)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # --- servers ------------------------------------------------------------------------

    def _start_dra(self) -> None:
        v1 = DRAPluginV1(self._preparer)
        v1beta1 = DRAPluginV1beta1(self._preparer)
        health = ResourceHealth(self._feed)

        def register(server: object) -> None:
            api.add_plugin_servicer(api.V1_VERSION, v1, server)  # type: ignore[arg-type]
            api.add_plugin_servicer(api.V1BETA1_VERSION, v1beta1, server)  # type: ignore[arg-type]
            api.add_health_servicer(health, server)  # type: ignore[arg-type]

        server = UnixSocketServer(
            self.dra_socket, register, max_workers=self._max_workers,
            health_services=(api.V1_SERVICE, api.V1BETA1_SERVICE, api.HEALTH_SERVICE),
        )
        server.start()
        self._dra = server

    def _offer(self) -> None:
        """(Re-)create the registration socket: the plugin watcher sees a new plugin."""
        old, self._registration = self._registration, None
        if old is not None:
            old.stop(self._stop_grace)
        servicer = Registration(
            self.driver, self.dra_socket,
            (*api.SUPPORTED_VERSIONS, api.HEALTH_VERSION), self._on_status,
        )
        server = UnixSocketServer(
            self.registration_socket,
            lambda s: api.add_registration_servicer(servicer, s),
            max_workers=2,
        )
        with self._lock:
            self.registered = None
        server.start()
        self._registration = server
        self.offers += 1
        log.info("offered DRA driver %s for registration at %s", self.driver,
                 self.registration_socket)

    def _on_status(self, registered: bool, error: str) -> None:
        """NotifyRegistrationStatus (runs on the serving loop: memory only)."""
        with self._lock:
            self.registered = registered
            if registered:
                self.last_error = ""
                self._backoff = self._retry_seconds
                self._retry_at = None
            else:
                self.last_error = error
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self._max_retry_seconds)
        if registered:
            log.info("DRA driver %s registered with the kubelet", self.driver)
        else:
            log.error("the kubelet refused DRA driver %s: %s; offering it again", self.driver,
                      error or "(no reason given)")
        self._wake()

    # --- the lifecycle thread -------------------------------------------------------------

    def _run(self, watches: list[inotify.DirectoryWatch]) -> None:
        try:
            while not self._stopping.is_set():
                self.heartbeat = time.monotonic()
                with self._lock:
                    retry_at = self._retry_at
                timeout = self._idle_seconds if retry_at is None else max(
                    0.0, retry_at - time.monotonic())
                fds = [w.fileno() for w in watches] + [self._wake_r]
                ready, _, _ = select.select(fds, [], [], timeout)
                if self._stopping.is_set():
                    break
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 512)
                reasons: list[str] = []
                for i, watch in enumerate(watches):
                    if watch.fileno() in ready:
                        reasons += self._reasons(watch.read(0), i == 0)
                        if not os.path.isdir(watch.directory):
                            watch.close()
                            rewatched = self._rewatch(watch.directory)
                            if rewatched is None:
                                return  # stopping
                            watches[i] = rewatched
                with self._lock:
                    if self._retry_at is not None and self._retry_at <= time.monotonic():
                        self._retry_at = None
                        reasons.append(REFUSED)
                if not ready:
                    reasons.append(SAFETY_CHECK)
                try:
                    self._act(reasons)
                except Exception:
                    log.exception("DRA plugin %s: lifecycle step failed", self.driver)
        finally:
            for watch in watches:
                watch.close()

    def _rewatch(self, directory: str) -> inotify.DirectoryWatch | None:
        """Watch ``directory`` again after it was removed (None once stopping)."""
        while not self._stopping.is_set():
            try:
                os.makedirs(directory, mode=0o750, exist_ok=True)
                return inotify.DirectoryWatch(directory, _MASK)
            except OSError as exc:
                log.warning("cannot watch %s: %s", directory, exc)
                self._stopping.wait(1.0)
        return None

    def _reasons(self, events: list[inotify.Event], registry: bool) -> list[str]:
        if any(e.overflow or e.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF)
               for e in events):
            return [SAFETY_CHECK]
        name = os.path.basename(self.registration_socket if registry else self.dra_socket)
        gone = any(e.name == name and e.mask & (inotify.IN_DELETE | inotify.IN_MOVED_FROM)
                   for e in events)
        replaced = any(e.name == name and e.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO)
                       for e in events)
        if gone or replaced:
            return [REG_SOCKET_GONE if registry else DRA_SOCKET_GONE]
        return []

    def _socket_state(self, server: UnixSocketServer | None, path: str) -> str:
        """"ours", "missing", or "other" (another live instance bound the path)."""
        if server is not None and server.socket_is_ours():
            return "ours"
        return "other" if os.path.exists(path) else "missing"

    def _act(self, reasons: list[str]) -> None:
        dra = self._socket_state(self._dra, self.dra_socket)
        reg = self._socket_state(self._registration, self.registration_socket)
        if "missing" in (dra, reg) and "other" not in (dra, reg):
            # A starting instance removes the path before it binds its own socket
            # there: give it a moment before concluding that the socket is gone.
            if self._stopping.wait(SETTLE_SECONDS):
                return
            dra = self._socket_state(self._dra, self.dra_socket)
            reg = self._socket_state(self._registration, self.registration_socket)
        if "other" in (dra, reg):
            # A newer instance (rolling update) took the path over: fighting over it
            # would make both re-register forever.  Keep serving what we have until
            # we are stopped.
            if not self._taken_over:
                self._taken_over = True
                log.warning("DRA driver %s: another instance now serves %s; leaving it",
                            self.driver,
                            self.dra_socket if dra == "other" else self.registration_socket)
            return
        if dra == "missing" and (DRA_SOCKET_GONE in reasons or SAFETY_CHECK in reasons):
            self.reasons.append(DRA_SOCKET_GONE)
            log.warning("DRA socket %s is gone; serving it again", self.dra_socket)
            server, self._dra = self._dra, None
            if server is not None:
                server.stop(self._stop_grace)
            self._start_dra()
            self._offer()
            return
        if reg == "missing" and (REG_SOCKET_GONE in reasons or SAFETY_CHECK in reasons):
            self.reasons.append(REG_SOCKET_GONE)
            log.warning("registration socket %s is gone; offering the driver again",
                        self.registration_socket)
            self._offer()
            return
        if REFUSED in reasons:
            self.reasons.append(REFUSED)
            self._offer()
