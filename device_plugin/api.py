"""The kubelet device-plugin API (v1beta1) as the rest of the plugin sees it.

This is the only module that imports the generated ``device_plugin._proto``
stubs.  It re-exports the messages, the servicer base class, the stubs and the
constants of the kubelet's ``pkg/apis/deviceplugin/v1beta1`` (``constants.go``),
so a schema regeneration or a proto rename (the kubelet renamed
``devicesIDs`` to ``devices_ids`` once) touches one file.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import grpc

from device_plugin._proto.deviceplugin import api_pb2 as _pb
from device_plugin._proto.deviceplugin import api_pb2_grpc as _grpc

# --- constants (kubelet pkg/apis/deviceplugin/v1beta1/constants.go) -------------------
VERSION = "v1beta1"
SUPPORTED_VERSIONS = (VERSION,)
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
# The kubelet's own file in the directory; its restart wipe keeps it.
KUBELET_CHECKPOINT = "kubelet_internal_checkpoint"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# The kubelet's gRPC client keeps grpc-go's default receive limit (k8s #109304).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Kubelet-side timers a plugin has to fit in.
KUBELET_DIAL_TIMEOUT_SECONDS = 10.0
PRE_START_CONTAINER_TIMEOUT_SECONDS = 30.0

# The kubelet's pod-resources API (which pod holds which device IDs).
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

# --- service names on the wire --------------------------------------------------------
DEVICE_PLUGIN_SERVICE = "v1beta1.DevicePlugin"
REGISTRATION_SERVICE = "v1beta1.Registration"

# --- messages -------------------------------------------------------------------------
Empty = _pb.Empty
DevicePluginOptions = _pb.DevicePluginOptions
RegisterRequest = _pb.RegisterRequest
ListAndWatchResponse = _pb.ListAndWatchResponse
Device = _pb.Device
TopologyInfo = _pb.TopologyInfo
NUMANode = _pb.NUMANode
PreStartContainerRequest = _pb.PreStartContainerRequest
PreStartContainerResponse = _pb.PreStartContainerResponse
PreferredAllocationRequest = _pb.PreferredAllocationRequest
ContainerPreferredAllocationRequest = _pb.ContainerPreferredAllocationRequest
PreferredAllocationResponse = _pb.PreferredAllocationResponse
ContainerPreferredAllocationResponse = _pb.ContainerPreferredAllocationResponse
AllocateRequest = _pb.AllocateRequest
ContainerAllocateRequest = _pb.ContainerAllocateRequest
AllocateResponse = _pb.AllocateResponse
ContainerAllocateResponse = _pb.ContainerAllocateResponse
CDIDevice = _pb.CDIDevice
Mount = _pb.Mount
DeviceSpec = _pb.DeviceSpec

# --- services -------------------------------------------------------------------------
DevicePluginServicer = _grpc.DevicePluginServicer
RegistrationServicer = _grpc.RegistrationServicer


def add_DevicePluginServicer_to_server(
    servicer: Any, server: grpc.Server | grpc.aio.Server
) -> None:
    _grpc.add_DevicePluginServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def add_RegistrationServicer_to_server(servicer: Any, server: grpc.Server) -> None:
    _grpc.add_RegistrationServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def DevicePluginStub(channel: grpc.Channel) -> Any:
    """A client of a plugin's DevicePlugin service (the kubelet's side)."""
    return _grpc.DevicePluginStub(channel)  # type: ignore[no-untyped-call]


def RegistrationStub(channel: grpc.Channel) -> Any:
    """A client of the kubelet's Registration service."""
    return _grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]

def pod_resources_api() -> tuple[ModuleType, ModuleType]:
    """The kubelet pod-resources v1 messages and stubs, imported on first use (the
    daemon itself does not need them)."""
    from device_plugin._proto.podresources import api_pb2, api_pb2_grpc

    return api_pb2, api_pb2_grpc


__all__ = [
    "DEFAULT_KUBELET_DIR",
    "DEVICE_PLUGIN_SERVICE",
    "HEALTHY",
    "KUBELET_CHECKPOINT",
    "KUBELET_DIAL_TIMEOUT_SECONDS",
    "KUBELET_SOCKET",
    "MAX_MESSAGE_BYTES",
    "POD_RESOURCES_SOCKET",
    "PRE_START_CONTAINER_TIMEOUT_SECONDS",
    "REGISTRATION_SERVICE",
    "SUPPORTED_VERSIONS",
    "UNHEALTHY",
    "VERSION",
    "AllocateRequest",
    "AllocateResponse",
    "CDIDevice",
    "ContainerAllocateRequest",
    "ContainerAllocateResponse",
    "ContainerPreferredAllocationRequest",
    "ContainerPreferredAllocationResponse",
    "Device",
    "DevicePluginOptions",
    "DevicePluginServicer",
    "DevicePluginStub",
    "DeviceSpec",
    "Empty",
    "ListAndWatchResponse",
    "Mount",
    "NUMANode",
    "PreStartContainerRequest",
    "PreStartContainerResponse",
    "PreferredAllocationRequest",
    "PreferredAllocationResponse",
    "RegisterRequest",
    "RegistrationServicer",
    "RegistrationStub",
    "TopologyInfo",
    "add_DevicePluginServicer_to_server",
    "add_RegistrationServicer_to_server",
    "pod_resources_api",
]
