"""Serving gRPC on a unix socket, and stopping cleanly.

``UnixSocketServer`` owns one socket file for its lifetime: it removes a stale
socket left by a dead process (only if the path is a socket), binds, restricts
the file to mode 0600 (the kubelet and the sidecars run as root), serves the
standard gRPC health service next to the daemon's own services, and on stop
removes the file only if it is still the one it created (same inode), so a
newer instance's socket is never deleted by an older one.

Server model: every server's transport is a ``grpc.aio`` server on one
process-wide event loop (``ServingLoop``, a thread of its own), while the
handlers stay ordinary blocking functions run on the server's thread pool (aio's
``migration_thread_pool``).  The reason is idle cost: a sync ``grpc.server``
polls its completion queue every 200 ms, so a device plugin with one socket per
resource woke 5 times a second per resource doing nothing; the aio loop waits in
epoll until there is work, whatever the number of sockets.  No handler ever runs
on the loop, so a slow mount or udev call cannot stall another RPC.  Streaming
handlers are the one exception to "sync under aio": aio gives a blocked sync
generator no cancellation callback, so ``rpc.RpcBoundary.stream`` drives them
from a small async generator instead (see there).

``ShutdownSignals`` lets the CLIs' main thread wait for SIGTERM/SIGINT whichever
thread the kernel delivers it to.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import select
import signal
import stat
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def parse_unix_endpoint(endpoint: str) -> str:
    """Turn ``unix:///abs/path`` or ``/abs/path`` into a path; ValueError names the problem."""
    path = endpoint
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif "://" in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: only unix:// endpoints are supported")
    if not path.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r}: the socket path must be absolute")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"endpoint {endpoint!r}: socket path is {len(path.encode())} bytes, "
            f"the kernel allows {MAX_SOCKET_PATH}"
        )
    return path


def remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket; refuse to delete anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)
    log.info("removed stale socket %s", path)


T = TypeVar("T")


class ServingLoop:
    """The one asyncio loop, on a daemon thread, that every server's transport uses."""

    _lock = threading.Lock()
    _shared: ServingLoop | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="grpc-loop", daemon=True
        )
        self._thread.start()
        # grpc.aio counts its users and tears its engine down (the completion-queue
        # poller and the socket the loop watches for it) when the last server is
        # freed, on whatever thread frees it: racing the loop, that logged
        # "Bad file descriptor" from the poller's callback at some daemon exits, and
        # every re-registration of a lone resource rebuilt the engine.  The loop
        # holds one reference for its whole life and drops it on its own thread at
        # interpreter exit.
        self.run(self._hold_grpc_aio(), timeout=30.0)
        atexit.register(self._release_grpc_aio)

    @staticmethod
    async def _hold_grpc_aio() -> None:
        grpc.aio.init_grpc_aio()  # type: ignore[attr-defined]  # in grpc.aio.__all__, not in its stubs

    def _release_grpc_aio(self) -> None:
        async def release() -> None:
            grpc.aio.shutdown_grpc_aio()  # type: ignore[attr-defined]

        with contextlib.suppress(Exception):
            self.run(release(), timeout=5.0)

    @classmethod
    def shared(cls) -> ServingLoop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it; never call from the loop itself."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ServingLoop.run called from the serving loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class UnixSocketServer:
    """A started-on-demand gRPC server bound to one unix socket."""

    def __init__(
        self,
        socket_path: str,
        register: Callable[[grpc.aio.Server], None],
        *,
        max_workers: int = 8,
        health_services: Iterable[str] = (),
        options: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.socket_path = parse_unix_endpoint(socket_path)
        self._register = register
        self._max_workers = max_workers
        self._health_services = tuple(health_services)
        self._options = tuple(options)
        self._server: grpc.aio.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._inode: int | None = None
        self._loop = ServingLoop.shared()
        # The public alias of grpc_health's asyncio servicer; its stubs do not declare it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]

    @property
    def started(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, exist_ok=True)
        remove_stale_socket(self.socket_path)
        # Bind under a private name, then rename into place: gRPC unlinks the path it
        # bound when it shuts down, and this way that path is never the public one, so
        # an old server stopping late cannot delete a newer instance's socket.  The
        # restrictive umask keeps the socket from ever being world-accessible.
        tag = hashlib.sha1(self.socket_path.encode()).hexdigest()[:10]  # noqa: S324 - a name, not a MAC
        private = os.path.join(directory, f".{tag}.{os.getpid()}")
        remove_stale_socket(private)
        pool = futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="grpc-worker"
        )
        old_umask = os.umask(0o177)
        try:
            server = self._loop.run(self._serve(pool, private), timeout=30.0)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        finally:
            os.umask(old_umask)
        renamed = False
        try:
            os.chmod(private, 0o600)
            os.rename(private, self.socket_path)
            renamed = True
            self._inode = os.stat(self.socket_path).st_ino
        except OSError:
            # Someone removed the socket under us (a restarting kubelet wipes every
            # socket in its directory): leave nothing running or on disk.
            self._loop.run(server.stop(0), timeout=5.0)
            pool.shutdown(wait=False)
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path if renamed else private)
            raise
        self._server, self._pool = server, pool
        log.info("serving on unix://%s", self.socket_path)

    async def _serve(self, pool: futures.ThreadPoolExecutor, private: str) -> grpc.aio.Server:
        # Built on the loop: an aio server belongs to the loop it was created on.
        server = grpc.aio.server(migration_thread_pool=pool, options=list(self._options))
        self._register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_insecure_port(f"unix://{private}")
        await server.start()
        for name in ("", *self._health_services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server

    def socket_is_ours(self) -> bool:
        """True while the socket file on disk is the one this server bound."""
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return False
        return stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and remove our socket."""
        server, self._server = self._server, None
        if server is None:
            return
        pool, self._pool = self._pool, None
        self._loop.run(self._shutdown(server, grace), timeout=grace + 5.0)
        if pool is not None:
            pool.shutdown(wait=False)
        if self.socket_is_ours():
            os.unlink(self.socket_path)
        self._inode = None
        log.info("stopped serving on unix://%s", self.socket_path)


    async def _shutdown(self, server: grpc.aio.Server, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await server.stop(grace)


class ShutdownSignals:
    """SIGTERM and SIGINT, waited for by the main thread; install from the main thread.

    The kernel hands a signal sent to the process to any thread that does not
    block it, gRPC's own threads included.  CPython then runs the Python handler
    only when the main thread next executes bytecode, and a main thread blocked
    in a plain lock wait (``Event.wait()``) never does: the daemon ignored a
    SIGTERM that landed on another thread.  So the handler's signal number also
    goes to a wakeup pipe (``signal.set_wakeup_fd``, written by whichever thread
    took the signal), and ``wait`` sleeps in ``select`` on that pipe: it wakes for
    every signal, lets the handler run, and returns once SIGTERM or SIGINT came.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None
        self._wakeup: int | None = None

    def install(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._wakeup = read_end
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def wait(self) -> str:
        """Block until SIGTERM or SIGINT arrives (on any thread); its name."""
        if self._wakeup is None:
            raise RuntimeError("ShutdownSignals.wait before install")
        while not self.event.is_set():
            select.select([self._wakeup], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(self._wakeup, 512)
        return self.received or "a shutdown signal"

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        self.event.set()
