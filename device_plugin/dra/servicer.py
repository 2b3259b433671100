"""The DRA plugin's gRPC services: proto <-> domain translation only.

* ``DRAPluginV1`` / ``DRAPluginV1beta1``: NodePrepareResources and
  NodeUnprepareResources for both served versions, answered by one
  ``ClaimPreparer`` (v1beta1 has no ``share_id``).  Every requested claim gets
  an entry keyed by its UID; a claim's own problem is its ``error``; only a
  malformed request fails the call (INVALID_ARGUMENT, through the boundary).
* ``ResourceHealth``: NodeWatchResources, the complete health list at once,
  then on every change and every ``resend_seconds``; the stream ends when the
  kubelet cancels it or the server stops.
* ``Registration``: the plugin watcher's GetInfo (type DRAPlugin, the driver
  name, the DRA socket, the versions newest first) and
  NotifyRegistrationStatus, handed to the lifecycle's callback.  Both only read
  or set memory, so they run inline on the serving loop (the kubelet gives
  GetInfo 1 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import grpc

from device_plugin.dra import api
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.prepare import ClaimPreparer, ClaimRef
from plugin_runtime.rpc import RpcBoundary, StreamCall

_V1 = RpcBoundary(api.V1_VERSION)
_V1BETA1 = RpcBoundary(api.V1BETA1_VERSION)
# The kubelet cancels the health stream whenever it drops the connection
# (deregistration, re-registration, its own restart): not worth a WARNING.
_HEALTH = RpcBoundary(api.HEALTH_VERSION, quiet=frozenset({"NodeWatchResources"}))
_REGISTRATION = RpcBoundary(api.REGISTRATION_SERVICE)


def _refs(request: Any) -> list[ClaimRef]:
    return [ClaimRef(c.namespace, c.name, c.uid) for c in request.claims]


class _DRAPlugin:
    messages: ModuleType
    with_share_id: bool

    def __init__(self, preparer: ClaimPreparer) -> None:
        self._preparer = preparer

    def _prepare(self, request: Any) -> Any:
        pb = self.messages
        response = pb.NodePrepareResourcesResponse()
        for uid, outcome in self._preparer.prepare(_refs(request)).items():
            entry = response.claims[uid]
            if outcome.error:
                entry.error = outcome.error
                continue
            for device in outcome.devices:
                out = entry.devices.add(
                    request_names=list(device.request_names),
                    pool_name=device.pool,
                    device_name=device.device,
                    cdi_device_ids=list(device.cdi_device_ids),
                )
                if self.with_share_id and device.share_id:
                    out.share_id = device.share_id
        return response

    def _unprepare(self, request: Any) -> Any:
        pb = self.messages
        response = pb.NodeUnprepareResourcesResponse()
        for uid, error in self._preparer.unprepare(_refs(request)).items():
            entry = response.claims[uid]
            if error:
                entry.error = error
        return response


class DRAPluginV1(_DRAPlugin, api.DRAPluginServicerV1):  # type: ignore[misc]
    messages = api.PLUGIN_MESSAGES[api.V1_VERSION]
    with_share_id = True

    @_V1.unary
    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._prepare(request)

    @_V1.unary
    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unprepare(request)


class DRAPluginV1beta1(_DRAPlugin, api.DRAPluginServicerV1beta1):  # type: ignore[misc]
    messages = api.PLUGIN_MESSAGES[api.V1BETA1_VERSION]
    with_share_id = False

    @_V1BETA1.unary
    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._prepare(request)

    @_V1BETA1.unary
    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unprepare(request)


class ResourceHealth(api.DRAResourceHealthServicer):  # type: ignore[misc]
    def __init__(self, feed: HealthFeed) -> None:
        self._feed = feed

    def _message(self) -> Any:
        now = int(time.time())
        response = api.NodeWatchResourcesResponse()
        for report in self._feed.report():
            response.devices.add(
                device=api.DeviceIdentifier(pool_name=report.pool, device_name=report.device),
                health=api.HEALTHY if report.healthy else api.UNHEALTHY,
                last_updated_time=now,
                health_check_timeout_seconds=self._feed.timeout_seconds,
                message=report.reason[:1024],
            )
        return response

    @_HEALTH.stream
    def NodeWatchResources(self, request: Any, call: StreamCall) -> Iterator[Any]:
        ended = threading.Event()

        def end() -> None:
            ended.set()
            self._feed.wake()

        call.add_callback(end)
        seen = self._feed.generation
        yield self._message()
        while not ended.is_set():
            seen = self._feed.wait(seen, ended, self._feed.resend_seconds)
            if ended.is_set() or self._feed.closed:
                return
            yield self._message()


class Registration(api.RegistrationServicer):  # type: ignore[misc]
    """GetInfo and NotifyRegistrationStatus of one registration socket."""

    def __init__(
        self,
        driver: str,
        endpoint: str,
        versions: tuple[str, ...],
        on_status: Callable[[bool, str], None],
    ) -> None:
        self._info = api.PluginInfo(type=api.PLUGIN_TYPE, name=driver, endpoint=endpoint,
                                    supported_versions=list(versions))
        self._on_status = on_status

    @_REGISTRATION.inline
    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._info

    @_REGISTRATION.inline
    def NotifyRegistrationStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._on_status(request.plugin_registered, request.error)
        return api.RegistrationStatusResponse()
