"""The kubelet's DRA gRPC APIs as the rest of the DRA wire layer sees them.

The only module that imports the generated stubs of ``device_plugin.dra._proto``
(DRAPlugin v1 and v1beta1, DRAResourceHealth v1alpha1) and of the plugin
watcher's ``pluginregistration``.  It re-exports the message modules and the
constants of the kubelet's side (reference dra.md §0-1), so a schema bump
touches one file.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import grpc

from device_plugin.dra._proto.health import api_pb2 as health_pb
from device_plugin.dra._proto.health import api_pb2_grpc as _health_grpc
from device_plugin.dra._proto.v1 import api_pb2 as v1_pb
from device_plugin.dra._proto.v1 import api_pb2_grpc as _v1_grpc
from device_plugin.dra._proto.v1beta1 import api_pb2 as v1beta1_pb
from device_plugin.dra._proto.v1beta1 import api_pb2_grpc as _v1beta1_grpc
from plugin_runtime._proto.pluginregistration import api_pb2 as registration_pb
from plugin_runtime._proto.pluginregistration import api_pb2_grpc as _registration_grpc

# --- kubelet constants (pkg/apis/pluginregistration/v1/constants.go, dra/v1*/types.go) --
PLUGIN_TYPE = "DRAPlugin"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"
REGISTRY_DIR = "plugins_registry"  # watched by the kubelet's plugin watcher
PLUGINS_DIR = "plugins"  # <root>/plugins/<driver>/dra.sock
DRA_SOCKET = "dra.sock"

# Names in supported_versions, newest first: the kubelet takes the first it knows.
V1_VERSION = "v1.DRAPlugin"
V1BETA1_VERSION = "v1beta1.DRAPlugin"
HEALTH_VERSION = "v1alpha1.DRAResourceHealth"
SUPPORTED_VERSIONS = (V1_VERSION, V1BETA1_VERSION)

# Full gRPC service names (for the health service and logs).
V1_SERVICE = "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
V1BETA1_SERVICE = "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"
REGISTRATION_SERVICE = "pluginregistration.Registration"

# Kubelet-side timers the plugin has to fit in.
GET_INFO_TIMEOUT_SECONDS = 1.0
CALL_TIMEOUT_SECONDS = 45.0

# DRAPlugin message modules by served version (same message names in both).
PLUGIN_MESSAGES: dict[str, ModuleType] = {V1_VERSION: v1_pb, V1BETA1_VERSION: v1beta1_pb}

HEALTHY = health_pb.HEALTHY
UNHEALTHY = health_pb.UNHEALTHY
UNKNOWN = health_pb.UNKNOWN
NodeWatchResourcesRequest = health_pb.NodeWatchResourcesRequest
NodeWatchResourcesResponse = health_pb.NodeWatchResourcesResponse
DeviceHealth = health_pb.DeviceHealth
DeviceIdentifier = health_pb.DeviceIdentifier

PluginInfo = registration_pb.PluginInfo
InfoRequest = registration_pb.InfoRequest
RegistrationStatus = registration_pb.RegistrationStatus
RegistrationStatusResponse = registration_pb.RegistrationStatusResponse

DRAPluginServicerV1 = _v1_grpc.DRAPluginServicer
DRAPluginServicerV1beta1 = _v1beta1_grpc.DRAPluginServicer
DRAResourceHealthServicer = _health_grpc.DRAResourceHealthServicer
RegistrationServicer = _registration_grpc.RegistrationServicer


def add_plugin_servicer(version: str, servicer: Any, server: grpc.aio.Server) -> None:
    adder = {
        V1_VERSION: _v1_grpc.add_DRAPluginServicer_to_server,
        V1BETA1_VERSION: _v1beta1_grpc.add_DRAPluginServicer_to_server,
    }[version]
    adder(servicer, server)  # type: ignore[no-untyped-call]


def add_health_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    _health_grpc.add_DRAResourceHealthServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def add_registration_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    _registration_grpc.add_RegistrationServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def plugin_stub(version: str, channel: grpc.Channel) -> Any:
    """A client of a plugin's DRAPlugin service (the kubelet's side)."""
    stub = {V1_VERSION: _v1_grpc.DRAPluginStub, V1BETA1_VERSION: _v1beta1_grpc.DRAPluginStub}
    return stub[version](channel)  # type: ignore[no-untyped-call]


def health_stub(channel: grpc.Channel) -> Any:
    return _health_grpc.DRAResourceHealthStub(channel)  # type: ignore[no-untyped-call]


def registration_stub(channel: grpc.Channel) -> Any:
    """A client of a plugin's Registration service (the plugin watcher's side)."""
    return _registration_grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
