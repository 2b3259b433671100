"""The kubelet's device-manager side, as the demo plays it.

Serves ``v1beta1.Registration`` on ``<dir>/kubelet.sock`` and behaves like the
real kubelet (pkg/kubelet/cm/devicemanager): Register checks the version and the
extended-resource name, then dials the plugin back *inside* Register and asks
for its options before returning; afterwards it consumes ListAndWatch in a
thread, keeping the latest full snapshot per resource; Allocate is called with
exactly one container request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from device_plugin._proto.deviceplugin import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

VERSION = "v1beta1"


@dataclass
class Endpoint:
    resource: str
    socket: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.Channel
    stub: api_pb2_grpc.DevicePluginStub
    devices: list[api_pb2.Device] = field(default_factory=list)
    updates: int = 0


class DemoKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, "kubelet.sock")
        self.endpoints: dict[str, Endpoint] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(1).wait(2)
            self._server = None
        for endpoint in self.endpoints.values():
            endpoint.channel.close()
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        if request.version != VERSION:
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"requested API version {request.version!r} is not supported by kubelet",
            )
        if "/" not in request.resource_name:
            context.abort(
                grpc.StatusCode.UNKNOWN, f"the ResourceName {request.resource_name!r} is invalid"
            )
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = api_pb2_grpc.DevicePluginStub(channel)
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to dial device plugin: {exc}")
        endpoint = Endpoint(request.resource_name, path, options, channel, stub)
        with self._cond:
            old = self.endpoints.pop(request.resource_name, None)
            self.endpoints[request.resource_name] = endpoint
            self._cond.notify_all()
        if old is not None:
            old.channel.close()
        threading.Thread(
            target=self._watch, args=(endpoint,), name=f"law-{request.resource_name}", daemon=True
        ).start()
        return api_pb2.Empty()

    def _watch(self, endpoint: Endpoint) -> None:
        try:
            for response in endpoint.stub.ListAndWatch(api_pb2.Empty()):
                with self._cond:
                    endpoint.devices = list(response.devices)
                    endpoint.updates += 1
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            log.debug("ListAndWatch of %s ended: %s", endpoint.resource, exc)

    def wait_until_settled(self, timeout: float, quiet: float = 0.3) -> list[Endpoint]:
        """Wait until at least one plugin registered, every registered endpoint has
        sent its first snapshot, and no new registration came for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = -1
            stable_since = time.monotonic()
            while True:
                now = time.monotonic()
                endpoints = list(self.endpoints.values())
                if len(endpoints) != seen:
                    seen, stable_since = len(endpoints), now
                complete = bool(endpoints) and all(e.updates > 0 for e in endpoints)
                if complete and now - stable_since >= quiet:
                    return endpoints
                if now >= deadline:
                    return [e for e in endpoints if e.updates > 0]
                self._cond.wait(min(quiet / 3, deadline - now))

    def allocate(self, resource: str, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse:
        endpoint = self.endpoints[resource]
        request = api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
        )
        reply: api_pb2.AllocateResponse = endpoint.stub.Allocate(request, timeout=10)
        if not reply.container_responses:
            raise RuntimeError("Allocate returned no container response")
        return reply.container_responses[0]
