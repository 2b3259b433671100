"""A kubelet stand-in for DRA plugins: the plugin watcher and the DRA plugin manager.

The DRA tests and benchmarks drive the driver through it, the way
``demo/kubelet.py`` plays the kubelet for the device-plugin API.  What it does,
and where the real kubelet does it (reference dra.md §1-2, §7):

* watches ``<root>/plugins_registry`` with inotify (creating it if missing),
  ignoring names that start with ``.`` and files that are not sockets; sockets
  present at start are handled too (``pluginwatcher/plugin_watcher.go``);
* for a created socket: dials it, calls GetInfo with a 1 s deadline, checks
  type ``DRAPlugin``, picks the first entry of ``supported_versions`` it knows,
  refuses an empty endpoint-less or already registered endpoint, then sends
  NotifyRegistrationStatus with the outcome (``operation_generator.go``,
  ``dra_plugin_manager.go``); an injected ``refuse`` error plays a failing
  Validate/Register;
* a deleted registration socket deregisters the driver (its connection closes);
* ``prepare``/``unprepare`` call the driver's chosen DRAPlugin version with the
  kubelet's 45 s timeout; ``watch_health`` opens NodeWatchResources on the same
  connection and keeps the latest list.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from device_plugin.dra import api
from plugin_runtime import inotify

KNOWN_VERSIONS = (api.V1_VERSION, api.V1BETA1_VERSION)


@dataclass
class RegisteredPlugin:
    name: str
    endpoint: str
    version: str
    registration_socket: str
    versions: tuple[str, ...]
    channel: grpc.Channel = field(repr=False)


@dataclass
class HealthWatch:
    """The latest NodeWatchResources list and how many lists arrived."""

    lists: int = 0
    devices: list[Any] = field(default_factory=list)
    ended: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    call: Any = None

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("health list did not arrive in time")
                self.cond.wait(remaining)
            return list(self.devices)

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


class PluginWatcherStandIn:
    def __init__(self, kubelet_root: str, known_versions: Iterable[str] = KNOWN_VERSIONS) -> None:
        self.registry_dir = os.path.join(kubelet_root, api.REGISTRY_DIR)
        self.known_versions = tuple(known_versions)
        self._cond = threading.Condition()
        self._plugins: dict[str, RegisteredPlugin] = {}
        self.refuse: list[str] = []  # errors for the next registrations
        self.notifications: list[tuple[str, bool, str]] = []  # (socket, registered, error)
        self.deregistrations: list[str] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        os.makedirs(self.registry_dir, exist_ok=True)
        watch = inotify.DirectoryWatch(self.registry_dir)
        for name in sorted(os.listdir(self.registry_dir)):
            self._created(name)
        self._thread = threading.Thread(target=self._run, args=(watch,), daemon=True,
                                        name="plugin-watcher")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        with self._cond:
            plugins, self._plugins = list(self._plugins.values()), {}
        for plugin in plugins:
            plugin.channel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self, watch: inotify.DirectoryWatch) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([watch.fileno(), self._wake_r], [], [], 5.0)
                if self._stop.is_set() or watch.fileno() not in ready:
                    continue
                for event in watch.read(0):
                    if event.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                        self._created(event.name)
                    elif event.mask & (inotify.IN_DELETE | inotify.IN_MOVED_FROM):
                        self._deleted(event.name)
        finally:
            watch.close()

    def _deleted(self, name: str) -> None:
        path = os.path.join(self.registry_dir, name)
        with self._cond:
            gone = [k for k, p in self._plugins.items() if p.registration_socket == path]
            for key in gone:
                self._plugins.pop(key).channel.close()
                self.deregistrations.append(key)
            self._cond.notify_all()

    def _created(self, name: str) -> None:
        path = os.path.join(self.registry_dir, name)
        if name.startswith("."):
            return
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                return
        except FileNotFoundError:
            return
        self._deleted(name)  # a re-created socket: deregister the old entry first
        with grpc.insecure_channel(f"unix://{path}") as channel:
            stub = api.registration_stub(channel)
            try:
                grpc.channel_ready_future(channel).result(timeout=10.0)
                info = stub.GetInfo(api.InfoRequest(), timeout=api.GET_INFO_TIMEOUT_SECONDS)
            except (grpc.RpcError, grpc.FutureTimeoutError):
                return  # the real kubelet retries with backoff; tests re-create sockets
            error = self._validate(info, path)
            registered = not error
            if registered:
                endpoint = info.endpoint or path
                version = next(v for v in info.supported_versions if v in self.known_versions)
                plugin = RegisteredPlugin(info.name, endpoint, version, path,
                                          tuple(info.supported_versions),
                                          grpc.insecure_channel(f"unix://{endpoint}"))
            with contextlib.suppress(grpc.RpcError):
                stub.NotifyRegistrationStatus(
                    api.RegistrationStatus(plugin_registered=registered, error=error),
                    timeout=5.0)
        with self._cond:
            self.notifications.append((path, registered, error))
            if registered:
                self._plugins[info.name] = plugin
            self._cond.notify_all()

    def _validate(self, info: Any, path: str) -> str:
        if self.refuse:
            return self.refuse.pop(0)
        if info.type != api.PLUGIN_TYPE:
            return f"no handler registered for plugin type: {info.type}"
        if not any(v in self.known_versions for v in info.supported_versions):
            return (f"none of the versions supported by the plugin are supported by "
                    f"the kubelet: {list(info.supported_versions)}")
        endpoint = info.endpoint or path
        with self._cond:
            if any(p.endpoint == endpoint for p in self._plugins.values()):
                return f"endpoint {endpoint} already registered"
        return ""

    # --- what tests and benchmarks use ------------------------------------------------

    def plugin(self, driver: str) -> RegisteredPlugin | None:
        with self._cond:
            return self._plugins.get(driver)

    def wait_registered(self, driver: str, timeout: float = 10.0,
                        after: int = 0) -> RegisteredPlugin:
        """The registration of ``driver`` once at least ``after`` notifications were sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while driver not in self._plugins or len(self.notifications) < after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{driver} did not register within {timeout} s")
                self._cond.wait(remaining)
            return self._plugins[driver]

    def wait_notifications(self, count: int, timeout: float = 10.0) -> list[tuple[str, bool, str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.notifications) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{count} notifications did not come within {timeout} s")
                self._cond.wait(remaining)
            return list(self.notifications)

    def _stub(self, driver: str) -> tuple[Any, Any]:
        plugin = self.plugin(driver)
        if plugin is None:
            raise RuntimeError(f"DRA driver {driver} is not registered")
        return api.plugin_stub(plugin.version, plugin.channel), api.PLUGIN_MESSAGES[plugin.version]

    def prepare(self, driver: str, claims: Iterable[tuple[str, str, str]]) -> Any:
        """NodePrepareResources for (namespace, name, uid) claims."""
        stub, pb = self._stub(driver)
        request = pb.NodePrepareResourcesRequest(
            claims=[pb.Claim(namespace=n, name=m, uid=u) for n, m, u in claims])
        return stub.NodePrepareResources(request, timeout=api.CALL_TIMEOUT_SECONDS)

    def unprepare(self, driver: str, claims: Iterable[tuple[str, str, str]]) -> Any:
        stub, pb = self._stub(driver)
        request = pb.NodeUnprepareResourcesRequest(
            claims=[pb.Claim(namespace=n, name=m, uid=u) for n, m, u in claims])
        return stub.NodeUnprepareResources(request, timeout=api.CALL_TIMEOUT_SECONDS)

    def watch_health(self, driver: str) -> HealthWatch:
        plugin = self.plugin(driver)
        if plugin is None:
            raise RuntimeError(f"DRA driver {driver} is not registered")
        watch = HealthWatch()
        call = api.health_stub(plugin.channel).NodeWatchResources(
            api.NodeWatchResourcesRequest())
        watch.call = call

        def consume() -> None:
            try:
                for response in call:
                    with watch.cond:
                        watch.lists += 1
                        watch.devices = list(response.devices)
                        watch.cond.notify_all()
            except grpc.RpcError:
                pass
            finally:
                with watch.cond:
                    watch.ended = True
                    watch.cond.notify_all()

        threading.Thread(target=consume, daemon=True, name="health-watch").start()
        return watch
