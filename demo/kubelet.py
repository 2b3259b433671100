"""A kubelet stand-in for the device-plugin API, faithful to the real one.

The first-run demo plays the kubelet with it, and the device-plugin tests and
benchmarks drive the plugin through it, so both see the same kubelet.

What it does, and where the real kubelet does it (reference §1.2-1.6):

* serves ``v1beta1.Registration`` on ``<dir>/kubelet.sock`` (server.go);
* ``Register`` checks, in the kubelet's order, the version ("requested API
  version %q is not supported by kubelet") and the resource name with the
  extended-resource rules ("the ResourceName %q is invalid"), then dials the
  plugin back *inside* Register (blocking dial, 10 s timeout, authority
  "localhost") and calls ``GetDevicePluginOptions`` before returning; the options
  it keeps are those, not ``RegisterRequest.options`` (handler.go, client.go);
  failures come back as status UNKNOWN, like a Go error returned by a handler;
* once connected, consumes ``ListAndWatch`` on a thread with gRPC's default
  4 MiB receive limit, keeping the latest full snapshot per resource with its
  receive time; a stream that ends disconnects the endpoint, which marks every
  device unhealthy, and the stand-in never dials again (client.go ``Run``);
* ``allocate`` sends exactly one container request and uses the first response;
  ``preferred_allocation`` is refused unless the plugin advertised it;
* ``restart`` stops, deletes every *socket* in the directory (not
  ``kubelet_internal_checkpoint``, not directories) and serves ``kubelet.sock``
  again (manager.go ``CleanupPluginDirectory``);
* ``recreate_socket`` re-creates only ``kubelet.sock`` (what every kubelet start
  does), keeping plugin sockets and streams, to test that one trigger alone.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from device_plugin import api

_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def go_quote(text: str) -> str:
    """Go's %q for the plain strings these messages carry."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_dns_subdomain(text: str) -> bool:
    return 0 < len(text) <= 253 and all(_DNS_LABEL.match(p) for p in text.split("."))


def _is_qualified_name(text: str) -> bool:
    prefix, slash, name = text.rpartition("/")
    if slash and not _is_dns_subdomain(prefix):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def socket_names(directory: str) -> set[str]:
    """Names of the socket files in ``directory`` (what a kubelet restart would wipe)."""
    return {
        n for n in os.listdir(directory)
        if stat.S_ISSOCK(os.lstat(os.path.join(directory, n)).st_mode)
    }


def is_extended_resource_name(name: str) -> bool:
    """v1helper.IsExtendedResourceName."""
    if "/" not in name:
        return False
    if name.startswith("kubernetes.io/") or name.split("/", 1)[0].endswith(".kubernetes.io"):
        return False
    if name.startswith("requests."):
        return False
    return _is_qualified_name("requests." + name)


@dataclass
class Snapshot:
    devices: dict[str, tuple[str, tuple[int, ...]]]  # ID -> (health, NUMA nodes)
    received: float  # time.monotonic() at receipt
    index: int  # how many snapshots this endpoint received before, plus one

    def healthy(self) -> set[str]:
        return {i for i, (h, _) in self.devices.items() if h == api.HEALTHY}

    def unhealthy(self) -> set[str]:
        return {i for i, (h, _) in self.devices.items() if h != api.HEALTHY}


@dataclass
class Endpoint:
    resource: str
    socket: str
    options: Any  # DevicePluginOptions from GetDevicePluginOptions
    request_options: Any  # RegisterRequest.options
    registered_at: float
    channel: grpc.Channel
    stub: Any
    snapshots: list[Snapshot] = field(default_factory=list)
    stream_error: str | None = None
    disconnected: bool = False
    stopped: bool = False


class KubeletStandIn:
    """Registration server plus one client per registered endpoint."""

    def __init__(self, directory: str, *, workers: int = 4) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, api.KUBELET_SOCKET)
        self._workers = workers
        self._server: grpc.Server | None = None
        self._cond = threading.Condition()
        self.endpoints: dict[str, Endpoint] = {}
        self.registrations: list[tuple[float, str, str]] = []  # (time, resource, endpoint)
        self.rejections: list[str] = []
        self._threads: list[threading.Thread] = []
        self.on_register: Callable[[str], None] | None = None

    # --- server side ----------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        # server.go listen(): a stale kubelet.sock of a dead kubelet is removed first.
        if os.path.exists(self.socket) and stat.S_ISSOCK(os.lstat(self.socket).st_mode):
            os.unlink(self.socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._workers))
        api.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop like a dying kubelet: every plugin stream and connection goes."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait(5)
        with self._cond:
            endpoints = list(self.endpoints.values())
        for endpoint in endpoints:
            endpoint.stopped = True
            endpoint.channel.close()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def recreate_socket(self) -> None:
        """Serve ``kubelet.sock`` anew (new inode) and change nothing else.

        Every real kubelet start re-creates ``kubelet.sock``; ``restart`` also
        drops the plugins' connections and wipes their sockets, and either of
        those alone makes a plugin re-register.  This isolates the one signal a
        plugin that only watches ``kubelet.sock`` relies on: the registration
        server goes and comes back, the endpoints and their streams stay.
        """
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait(5)
        self.start()

    def restart(self) -> None:
        self.stop()
        self.wipe_sockets()
        with self._cond:
            self.endpoints.clear()
        self.start()

    def wipe_sockets(self) -> list[str]:
        """CleanupPluginDirectory: remove socket files, keep the checkpoint and dirs."""
        removed = []
        for name in os.listdir(self.directory):
            if name == api.KUBELET_CHECKPOINT:
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or not stat.S_ISSOCK(st.st_mode):
                continue
            try:
                os.unlink(path)  # RemoveAll: a file that went meanwhile is fine
            except FileNotFoundError:
                continue
            removed.append(name)
        return removed

    def _register(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            self.registrations.append((time.monotonic(), request.resource_name, request.endpoint))
        if request.version not in api.SUPPORTED_VERSIONS:
            self._reject(
                context,
                f"requested API version {go_quote(request.version)} is not supported by kubelet",
            )
        if not is_extended_resource_name(request.resource_name):
            self._reject(
                context, f"the ResourceName {go_quote(request.resource_name)} is invalid"
            )
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(
            f"unix://{path}",
            options=[
                ("grpc.default_authority", "localhost"),
                ("grpc.max_receive_message_length", api.MAX_MESSAGE_BYTES),
            ],
        )
        try:
            timeout = api.KUBELET_DIAL_TIMEOUT_SECONDS
            grpc.channel_ready_future(channel).result(timeout=timeout)
            stub = api.DevicePluginStub(channel)
            options = stub.GetDevicePluginOptions(api.Empty(), timeout=timeout)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            self._reject(
                context,
                f"failed to dial device plugin: {type(exc).__name__} {exc}",
            )
        endpoint = Endpoint(
            resource=request.resource_name,
            socket=request.endpoint,
            options=options,
            request_options=request.options,
            registered_at=time.monotonic(),
            channel=channel,
            stub=stub,
        )
        with self._cond:
            old = self.endpoints.get(request.resource_name)
            self.endpoints[request.resource_name] = endpoint
            self._cond.notify_all()
        if old is not None:
            old.stopped = True
            old.channel.close()
        thread = threading.Thread(
            target=self._run_client, args=(endpoint,), name=f"kubelet-{endpoint.resource}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        if self.on_register is not None:
            self.on_register(request.resource_name)
        return api.Empty()

    def _reject(self, context: grpc.ServicerContext, message: str) -> None:
        with self._cond:
            self.rejections.append(message)
            self._cond.notify_all()
        context.abort(grpc.StatusCode.UNKNOWN, message)

    def _run_client(self, endpoint: Endpoint) -> None:
        try:
            for response in endpoint.stub.ListAndWatch(api.Empty()):
                now = time.monotonic()
                devices = {
                    d.ID: (d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                }
                with self._cond:
                    endpoint.snapshots.append(Snapshot(devices, now, len(endpoint.snapshots) + 1))
                    del endpoint.snapshots[:-50]
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            endpoint.stream_error = f"{exc.code().name}: {exc.details()}"
        with self._cond:
            # PluginDisconnected: every device of the resource turns unhealthy.
            endpoint.disconnected = True
            if endpoint.snapshots:
                last = endpoint.snapshots[-1]
                endpoint.snapshots.append(
                    Snapshot(
                        {i: (api.UNHEALTHY, n) for i, (_h, n) in last.devices.items()},
                        time.monotonic(),
                        last.index + 1,
                    )
                )
            self._cond.notify_all()

    # --- test-facing queries ------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"kubelet stand-in: timed out waiting for {what}")
                self._cond.wait(remaining)

    def wait_until_settled(self, timeout: float, quiet: float = 0.3) -> list[Endpoint]:
        """Wait until at least one plugin registered, every registered endpoint has
        sent its first snapshot, and no new registration came for ``quiet`` seconds;
        at ``timeout``, return the endpoints that have a snapshot so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = -1
            stable_since = time.monotonic()
            while True:
                now = time.monotonic()
                endpoints = list(self.endpoints.values())
                if len(endpoints) != seen:
                    seen, stable_since = len(endpoints), now
                complete = bool(endpoints) and all(e.snapshots for e in endpoints)
                if complete and now - stable_since >= quiet:
                    return endpoints
                if now >= deadline:
                    return [e for e in endpoints if e.snapshots]
                self._cond.wait(min(quiet / 3, deadline - now))

    def endpoint(self, resource: str) -> Endpoint | None:
        with self._cond:
            return self.endpoints.get(resource)

    def wait_registered(
        self, resource: str, timeout: float = 10.0, *, not_socket: str | None = None
    ) -> Endpoint:
        """The endpoint of ``resource`` once registered (on a socket other than ``not_socket``)
        and its first snapshot arrived."""

        def ready() -> Endpoint | None:
            ep = self.endpoints.get(resource)
            if ep is None or ep.stopped or ep.disconnected or not ep.snapshots:
                return None
            if not_socket is not None and ep.socket == not_socket:
                return None
            return ep

        result: Endpoint = self.wait_for(ready, timeout, f"{resource} to register")
        return result

    def wait_snapshot(
        self,
        resource: str,
        predicate: Callable[[Snapshot], bool],
        timeout: float = 10.0,
    ) -> Snapshot:
        def match() -> Snapshot | None:
            ep = self.endpoints.get(resource)
            if ep is None or not ep.snapshots:
                return None
            last = ep.snapshots[-1]
            return last if predicate(last) else None

        result: Snapshot = self.wait_for(match, timeout, f"a matching snapshot of {resource}")
        return result

    def latest(self, resource: str) -> Snapshot | None:
        with self._cond:
            ep = self.endpoints.get(resource)
            return ep.snapshots[-1] if ep is not None and ep.snapshots else None

    def allocate(self, resource: str, ids: list[str], timeout: float = 5.0) -> Any:
        """endpoint.go allocate: one container request; the first response is used."""
        ep = self._live(resource)
        request = api.AllocateRequest()
        request.container_requests.add(devices_ids=ids)
        response = ep.stub.Allocate(request, timeout=timeout)
        if not response.container_responses:
            raise AssertionError("Allocate returned no container responses")
        return response.container_responses[0]

    def preferred_allocation(
        self,
        resource: str,
        available: list[str],
        must_include: list[str],
        size: int,
        timeout: float = 5.0,
    ) -> list[str]:
        ep = self._live(resource)
        if not ep.options.get_preferred_allocation_available:
            raise AssertionError(f"{resource} does not advertise GetPreferredAllocation")
        request = api.PreferredAllocationRequest()
        request.container_requests.add(
            available_deviceIDs=available,
            must_include_deviceIDs=must_include,
            allocation_size=size,
        )
        response = ep.stub.GetPreferredAllocation(request, timeout=timeout)
        return list(response.container_responses[0].deviceIDs)

    def _live(self, resource: str) -> Endpoint:
        ep = self.endpoint(resource)
        if ep is None or ep.stopped:
            raise AssertionError(f"endpoint {resource} has been stopped or never registered")
        return ep


class _Registration(api.RegistrationServicer):  # type: ignore[misc]
    def __init__(self, kubelet: KubeletStandIn) -> None:
        self._kubelet = kubelet

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._kubelet._register(request, context)
