"""Identity service: who the driver is, what it offers, and whether it is ready.

Probe answers ready=false (not an error) until every pool has started or
failed, so the livenessprobe sidecar and the kubelet wait instead of
restarting the driver; then ready=true while at least one pool serves, and
FAILED_PRECONDITION naming each pool's problem when none can (``ready``
raises it: ``VolumeService.probe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver import DRIVER_NAME, __version__
from csi_driver.api import PLUGIN_CAPABILITIES, pb, pb_grpc
from plugin_runtime.rpc import RpcBoundary

rpc = RpcBoundary("csi.v1.Identity", quiet=frozenset({"Probe"}))


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    @rpc.unary
    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc.unary
    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.GetPluginCapabilitiesResponse(capabilities=PLUGIN_CAPABILITIES)

    @rpc.unary
    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ProbeResponse(ready=BoolValue(value=self._ready()))
