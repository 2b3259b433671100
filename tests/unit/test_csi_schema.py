"""The CSI v1.12.0 wire contract, checked from the generated descriptors.

The kubelet and the Kubernetes sidecars speak this schema on the wire, so
every service path, field number, field type and enum value below is a fact
of the published spec (container-storage-interface/spec, csi.proto v1.12.0).
A typo in ``protos/csi/v1/csi.proto`` fails here instead of in a cluster.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from csi_driver._proto import csi_pb2
from plugin_runtime.rpc import REDACTED, redacted_copy

FILE = csi_pb2.DESCRIPTOR

SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}

# Short type names used in the field table.
S, I64, I32, B, E, M = "string", "int64", "int32", "bool", "enum", "message"
MAP = "map"

_TYPE_NAMES = {
    FieldDescriptor.TYPE_STRING: S,
    FieldDescriptor.TYPE_INT64: I64,
    FieldDescriptor.TYPE_INT32: I32,
    FieldDescriptor.TYPE_BOOL: B,
    FieldDescriptor.TYPE_ENUM: E,
    FieldDescriptor.TYPE_MESSAGE: M,
}

# message full name (without "csi.v1.") -> [(field, number, type, repeated, message/enum type)]
# For maps the type is "map" (map<string, string> everywhere in CSI).
FIELDS: dict[str, list[tuple[str, int, str, bool, str | None]]] = {
    "GetPluginInfoResponse": [
        ("name", 1, S, False, None),
        ("vendor_version", 2, S, False, None),
        ("manifest", 3, MAP, True, None),
    ],
    "ProbeResponse": [("ready", 1, M, False, "google.protobuf.BoolValue")],
    "PluginCapability": [
        ("service", 1, M, False, "csi.v1.PluginCapability.Service"),
        ("volume_expansion", 2, M, False, "csi.v1.PluginCapability.VolumeExpansion"),
    ],
    "CreateVolumeRequest": [
        ("name", 1, S, False, None),
        ("capacity_range", 2, M, False, "csi.v1.CapacityRange"),
        ("volume_capabilities", 3, M, True, "csi.v1.VolumeCapability"),
        ("parameters", 4, MAP, True, None),
        ("secrets", 5, MAP, True, None),
        ("volume_content_source", 6, M, False, "csi.v1.VolumeContentSource"),
        ("accessibility_requirements", 7, M, False, "csi.v1.TopologyRequirement"),
        ("mutable_parameters", 8, MAP, True, None),
    ],
    "CreateVolumeResponse": [("volume", 1, M, False, "csi.v1.Volume")],
    "VolumeContentSource": [
        ("snapshot", 1, M, False, "csi.v1.VolumeContentSource.SnapshotSource"),
        ("volume", 2, M, False, "csi.v1.VolumeContentSource.VolumeSource"),
    ],
    "VolumeContentSource.SnapshotSource": [("snapshot_id", 1, S, False, None)],
    "VolumeContentSource.VolumeSource": [("volume_id", 1, S, False, None)],
    "VolumeCapability": [
        ("block", 1, M, False, "csi.v1.VolumeCapability.BlockVolume"),
        ("mount", 2, M, False, "csi.v1.VolumeCapability.MountVolume"),
        ("access_mode", 3, M, False, "csi.v1.VolumeCapability.AccessMode"),
    ],
    "VolumeCapability.BlockVolume": [],
    "VolumeCapability.MountVolume": [
        ("fs_type", 1, S, False, None),
        ("mount_flags", 2, S, True, None),
        ("volume_mount_group", 3, S, False, None),
    ],
    "VolumeCapability.AccessMode": [
        ("mode", 1, E, False, "csi.v1.VolumeCapability.AccessMode.Mode"),
    ],
    "CapacityRange": [
        ("required_bytes", 1, I64, False, None),
        ("limit_bytes", 2, I64, False, None),
    ],
    "Volume": [
        ("capacity_bytes", 1, I64, False, None),
        ("volume_id", 2, S, False, None),
        ("volume_context", 3, MAP, True, None),
        ("content_source", 4, M, False, "csi.v1.VolumeContentSource"),
        ("accessible_topology", 5, M, True, "csi.v1.Topology"),
    ],
    "TopologyRequirement": [
        ("requisite", 1, M, True, "csi.v1.Topology"),
        ("preferred", 2, M, True, "csi.v1.Topology"),
    ],
    "Topology": [("segments", 1, MAP, True, None)],
    "DeleteVolumeRequest": [("volume_id", 1, S, False, None), ("secrets", 2, MAP, True, None)],
    "ControllerPublishVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("node_id", 2, S, False, None),
        ("volume_capability", 3, M, False, "csi.v1.VolumeCapability"),
        ("readonly", 4, B, False, None),
        ("secrets", 5, MAP, True, None),
        ("volume_context", 6, MAP, True, None),
    ],
    "ControllerUnpublishVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("node_id", 2, S, False, None),
        ("secrets", 3, MAP, True, None),
    ],
    "ValidateVolumeCapabilitiesRequest": [
        ("volume_id", 1, S, False, None),
        ("volume_context", 2, MAP, True, None),
        ("volume_capabilities", 3, M, True, "csi.v1.VolumeCapability"),
        ("parameters", 4, MAP, True, None),
        ("secrets", 5, MAP, True, None),
        ("mutable_parameters", 6, MAP, True, None),
    ],
    "ValidateVolumeCapabilitiesResponse": [
        (
            "confirmed",
            1,
            M,
            False,
            "csi.v1.ValidateVolumeCapabilitiesResponse.Confirmed",
        ),
        ("message", 2, S, False, None),
    ],
    "ValidateVolumeCapabilitiesResponse.Confirmed": [
        ("volume_context", 1, MAP, True, None),
        ("volume_capabilities", 2, M, True, "csi.v1.VolumeCapability"),
        ("parameters", 3, MAP, True, None),
        ("mutable_parameters", 4, MAP, True, None),
    ],
    "ListVolumesRequest": [
        ("max_entries", 1, I32, False, None),
        ("starting_token", 2, S, False, None),
    ],
    "ListVolumesResponse": [
        ("entries", 1, M, True, "csi.v1.ListVolumesResponse.Entry"),
        ("next_token", 2, S, False, None),
    ],
    "ListVolumesResponse.Entry": [
        ("volume", 1, M, False, "csi.v1.Volume"),
        ("status", 2, M, False, "csi.v1.ListVolumesResponse.VolumeStatus"),
    ],
    "ListVolumesResponse.VolumeStatus": [
        ("published_node_ids", 1, S, True, None),
        ("volume_condition", 2, M, False, "csi.v1.VolumeCondition"),
    ],
    "ControllerGetVolumeRequest": [("volume_id", 1, S, False, None)],
    "ControllerGetVolumeResponse": [
        ("volume", 1, M, False, "csi.v1.Volume"),
        ("status", 2, M, False, "csi.v1.ControllerGetVolumeResponse.VolumeStatus"),
    ],
    "ControllerGetVolumeResponse.VolumeStatus": [
        ("published_node_ids", 1, S, True, None),
        ("volume_condition", 2, M, False, "csi.v1.VolumeCondition"),
    ],
    "ControllerModifyVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("secrets", 2, MAP, True, None),
        ("mutable_parameters", 3, MAP, True, None),
    ],
    "GetCapacityRequest": [
        ("volume_capabilities", 1, M, True, "csi.v1.VolumeCapability"),
        ("parameters", 2, MAP, True, None),
        ("accessible_topology", 3, M, False, "csi.v1.Topology"),
    ],
    "GetCapacityResponse": [
        ("available_capacity", 1, I64, False, None),
        ("maximum_volume_size", 2, M, False, "google.protobuf.Int64Value"),
        ("minimum_volume_size", 3, M, False, "google.protobuf.Int64Value"),
    ],
    "ControllerServiceCapability": [
        ("rpc", 1, M, False, "csi.v1.ControllerServiceCapability.RPC"),
    ],
    "CreateSnapshotRequest": [
        ("source_volume_id", 1, S, False, None),
        ("name", 2, S, False, None),
        ("secrets", 3, MAP, True, None),
        ("parameters", 4, MAP, True, None),
    ],
    "CreateSnapshotResponse": [("snapshot", 1, M, False, "csi.v1.Snapshot")],
    "Snapshot": [
        ("size_bytes", 1, I64, False, None),
        ("snapshot_id", 2, S, False, None),
        ("source_volume_id", 3, S, False, None),
        ("creation_time", 4, M, False, "google.protobuf.Timestamp"),
        ("ready_to_use", 5, B, False, None),
        ("group_snapshot_id", 6, S, False, None),
    ],
    "DeleteSnapshotRequest": [("snapshot_id", 1, S, False, None), ("secrets", 2, MAP, True, None)],
    "ListSnapshotsRequest": [
        ("max_entries", 1, I32, False, None),
        ("starting_token", 2, S, False, None),
        ("source_volume_id", 3, S, False, None),
        ("snapshot_id", 4, S, False, None),
        ("secrets", 5, MAP, True, None),
    ],
    "ListSnapshotsResponse": [
        ("entries", 1, M, True, "csi.v1.ListSnapshotsResponse.Entry"),
        ("next_token", 2, S, False, None),
    ],
    "GetSnapshotRequest": [("snapshot_id", 1, S, False, None), ("secrets", 2, MAP, True, None)],
    "GetSnapshotResponse": [("snapshot", 1, M, False, "csi.v1.Snapshot")],
    "ControllerExpandVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("capacity_range", 2, M, False, "csi.v1.CapacityRange"),
        ("secrets", 3, MAP, True, None),
        ("volume_capability", 4, M, False, "csi.v1.VolumeCapability"),
    ],
    "ControllerExpandVolumeResponse": [
        ("capacity_bytes", 1, I64, False, None),
        ("node_expansion_required", 2, B, False, None),
    ],
    "NodeStageVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("publish_context", 2, MAP, True, None),
        ("staging_target_path", 3, S, False, None),
        ("volume_capability", 4, M, False, "csi.v1.VolumeCapability"),
        ("secrets", 5, MAP, True, None),
        ("volume_context", 6, MAP, True, None),
    ],
    "NodeUnstageVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("staging_target_path", 2, S, False, None),
    ],
    "NodePublishVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("publish_context", 2, MAP, True, None),
        ("staging_target_path", 3, S, False, None),
        ("target_path", 4, S, False, None),
        ("volume_capability", 5, M, False, "csi.v1.VolumeCapability"),
        ("readonly", 6, B, False, None),
        ("secrets", 7, MAP, True, None),
        ("volume_context", 8, MAP, True, None),
    ],
    "NodeUnpublishVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("target_path", 2, S, False, None),
    ],
    "NodeGetVolumeStatsRequest": [
        ("volume_id", 1, S, False, None),
        ("volume_path", 2, S, False, None),
        ("staging_target_path", 3, S, False, None),
    ],
    "NodeGetVolumeStatsResponse": [
        ("usage", 1, M, True, "csi.v1.VolumeUsage"),
        ("volume_condition", 2, M, False, "csi.v1.VolumeCondition"),
    ],
    "VolumeUsage": [
        ("available", 1, I64, False, None),
        ("total", 2, I64, False, None),
        ("used", 3, I64, False, None),
        ("unit", 4, E, False, "csi.v1.VolumeUsage.Unit"),
    ],
    "VolumeCondition": [("abnormal", 1, B, False, None), ("message", 2, S, False, None)],
    "NodeServiceCapability": [("rpc", 1, M, False, "csi.v1.NodeServiceCapability.RPC")],
    "NodeGetInfoResponse": [
        ("node_id", 1, S, False, None),
        ("max_volumes_per_node", 2, I64, False, None),
        ("accessible_topology", 3, M, False, "csi.v1.Topology"),
    ],
    "NodeExpandVolumeRequest": [
        ("volume_id", 1, S, False, None),
        ("volume_path", 2, S, False, None),
        ("capacity_range", 3, M, False, "csi.v1.CapacityRange"),
        ("staging_target_path", 4, S, False, None),
        ("volume_capability", 5, M, False, "csi.v1.VolumeCapability"),
        ("secrets", 6, MAP, True, None),
    ],
    "NodeExpandVolumeResponse": [("capacity_bytes", 1, I64, False, None)],
    "CreateVolumeGroupSnapshotRequest": [
        ("name", 1, S, False, None),
        ("source_volume_ids", 2, S, True, None),
        ("secrets", 3, MAP, True, None),
        ("parameters", 4, MAP, True, None),
    ],
    "VolumeGroupSnapshot": [
        ("group_snapshot_id", 1, S, False, None),
        ("snapshots", 2, M, True, "csi.v1.Snapshot"),
        ("creation_time", 3, M, False, "google.protobuf.Timestamp"),
        ("ready_to_use", 4, B, False, None),
    ],
    "DeleteVolumeGroupSnapshotRequest": [
        ("group_snapshot_id", 1, S, False, None),
        ("snapshot_ids", 2, S, True, None),
        ("secrets", 3, MAP, True, None),
    ],
    "GetVolumeGroupSnapshotRequest": [
        ("group_snapshot_id", 1, S, False, None),
        ("snapshot_ids", 2, S, True, None),
        ("secrets", 3, MAP, True, None),
    ],
    "BlockMetadata": [("byte_offset", 1, I64, False, None), ("size_bytes", 2, I64, False, None)],
    "GetMetadataAllocatedRequest": [
        ("snapshot_id", 1, S, False, None),
        ("starting_offset", 2, I64, False, None),
        ("max_results", 3, I32, False, None),
        ("secrets", 4, MAP, True, None),
    ],
    "GetMetadataAllocatedResponse": [
        ("block_metadata_type", 1, E, False, "csi.v1.BlockMetadataType"),
        ("volume_capacity_bytes", 2, I64, False, None),
        ("block_metadata", 3, M, True, "csi.v1.BlockMetadata"),
    ],
    "GetMetadataDeltaRequest": [
        ("base_snapshot_id", 1, S, False, None),
        ("target_snapshot_id", 2, S, False, None),
        ("starting_offset", 3, I64, False, None),
        ("max_results", 4, I32, False, None),
        ("secrets", 5, MAP, True, None),
    ],
    "GetMetadataDeltaResponse": [
        ("block_metadata_type", 1, E, False, "csi.v1.BlockMetadataType"),
        ("volume_capacity_bytes", 2, I64, False, None),
        ("block_metadata", 3, M, True, "csi.v1.BlockMetadata"),
    ],
}

# Enum full name (without "csi.v1.") -> {value name: number}, csi.md section 1.2.
ENUMS: dict[str, dict[str, int]] = {
    "PluginCapability.Service.Type": {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    },
    "PluginCapability.VolumeExpansion.Type": {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2},
    "ControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "CREATE_DELETE_VOLUME": 1,
        "PUBLISH_UNPUBLISH_VOLUME": 2,
        "LIST_VOLUMES": 3,
        "GET_CAPACITY": 4,
        "CREATE_DELETE_SNAPSHOT": 5,
        "LIST_SNAPSHOTS": 6,
        "CLONE_VOLUME": 7,
        "PUBLISH_READONLY": 8,
        "EXPAND_VOLUME": 9,
        "LIST_VOLUMES_PUBLISHED_NODES": 10,
        "VOLUME_CONDITION": 11,
        "GET_VOLUME": 12,
        "SINGLE_NODE_MULTI_WRITER": 13,
        "MODIFY_VOLUME": 14,
        "GET_SNAPSHOT": 15,
    },
    "NodeServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    },
    "GroupControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT": 1,
    },
    "VolumeCapability.AccessMode.Mode": {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    },
    "BlockMetadataType": {"UNKNOWN": 0, "FIXED_LENGTH": 1, "VARIABLE_LENGTH": 2},
    "VolumeUsage.Unit": {"UNKNOWN": 0, "BYTES": 1, "INODES": 2},
}

# Every field that must carry the csi_secret option (and no other field).
SECRET_FIELDS = {
    "CreateVolumeRequest.secrets",
    "DeleteVolumeRequest.secrets",
    "ControllerPublishVolumeRequest.secrets",
    "ControllerUnpublishVolumeRequest.secrets",
    "ValidateVolumeCapabilitiesRequest.secrets",
    "ControllerModifyVolumeRequest.secrets",
    "CreateSnapshotRequest.secrets",
    "DeleteSnapshotRequest.secrets",
    "ListSnapshotsRequest.secrets",
    "GetSnapshotRequest.secrets",
    "ControllerExpandVolumeRequest.secrets",
    "NodeStageVolumeRequest.secrets",
    "NodePublishVolumeRequest.secrets",
    "NodeExpandVolumeRequest.secrets",
    "CreateVolumeGroupSnapshotRequest.secrets",
    "DeleteVolumeGroupSnapshotRequest.secrets",
    "GetVolumeGroupSnapshotRequest.secrets",
    "GetMetadataAllocatedRequest.secrets",
    "GetMetadataDeltaRequest.secrets",
}

# Experimental parts flagged alpha in v1.12 (csi.md section 1.2).
ALPHA_FIELDS = {
    "ListVolumesResponse.VolumeStatus.volume_condition",
    "GetCapacityResponse.minimum_volume_size",
    "NodeGetVolumeStatsResponse.volume_condition",
    "NodeExpandVolumeRequest.secrets",
}
ALPHA_METHODS = {"Controller.GetSnapshot", "Controller.ControllerGetVolume"}
ALPHA_MESSAGES = {
    "ControllerGetVolumeRequest",
    "ControllerGetVolumeResponse",
    "GetSnapshotRequest",
    "GetSnapshotResponse",
    "VolumeCondition",
}
ALPHA_ENUM_VALUES = {
    "PluginCapability.Service.Type.SNAPSHOT_METADATA_SERVICE",
    "ControllerServiceCapability.RPC.Type.VOLUME_CONDITION",
    "ControllerServiceCapability.RPC.Type.GET_VOLUME",
    "ControllerServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER",
    "ControllerServiceCapability.RPC.Type.GET_SNAPSHOT",
    "NodeServiceCapability.RPC.Type.VOLUME_CONDITION",
    "NodeServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER",
    "VolumeCapability.AccessMode.Mode.SINGLE_NODE_SINGLE_WRITER",
    "VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER",
}


def _flag(desc: Any, option: str) -> bool:
    """Whether ``desc`` carries the boolean CSI option ``option``."""
    options: Any = desc.GetOptions()
    return bool(options.Extensions[getattr(csi_pb2, option)])


def _message(name: str) -> Any:
    return FILE.pool.FindMessageTypeByName(f"csi.v1.{name}")


def _all_messages() -> list[Any]:
    found: list[Any] = []
    stack = list(FILE.message_types_by_name.values())
    while stack:
        desc = stack.pop()
        if desc.GetOptions().map_entry:
            continue
        found.append(desc)
        stack.extend(desc.nested_types)
    return found


def _type_name(field: Any) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return MAP
    return _TYPE_NAMES[field.type]


def _target(field: Any) -> str | None:
    """Full name of the message or enum type of ``field`` (None for scalars and maps)."""
    if _type_name(field) == MAP:
        return None
    target = field.message_type or field.enum_type
    return None if target is None else str(target.full_name)


def test_package_and_imports():
    assert FILE.package == "csi.v1"
    assert descriptor_pb2.FileDescriptorProto.FromString(FILE.serialized_pb).syntax == "proto3"
    assert {d.name for d in FILE.dependencies} == {
        "google/protobuf/descriptor.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    }


def test_option_extensions_have_the_spec_numbers():
    ext = FILE.extensions_by_name
    expected = {
        "csi_secret": ("google.protobuf.FieldOptions", 1059),
        "alpha_field": ("google.protobuf.FieldOptions", 1060),
        "alpha_enum": ("google.protobuf.EnumOptions", 1060),
        "alpha_enum_value": ("google.protobuf.EnumValueOptions", 1060),
        "alpha_message": ("google.protobuf.MessageOptions", 1060),
        "alpha_method": ("google.protobuf.MethodOptions", 1060),
        "alpha_service": ("google.protobuf.ServiceOptions", 1060),
    }
    assert set(ext) == set(expected)
    for name, (extendee, number) in expected.items():
        extended = ext[name].containing_type
        assert extended is not None, name
        assert extended.full_name == extendee, name
        assert ext[name].number == number, name
        assert ext[name].type == FieldDescriptor.TYPE_BOOL, name


def test_services_and_full_method_paths():
    assert set(FILE.services_by_name) == set(SERVICES)
    for service, methods in SERVICES.items():
        desc = FILE.services_by_name[service]
        assert desc.full_name == f"csi.v1.{service}"
        assert [m.name for m in desc.methods] == methods
        for method in desc.methods:
            assert method.input_type.full_name == f"csi.v1.{method.name}Request"
            assert method.output_type.full_name == f"csi.v1.{method.name}Response"


def test_wire_paths_seen_by_the_kubelet_and_sidecars():
    stub_paths = {
        f"/{m.containing_service.full_name}/{m.name}"
        for s in FILE.services_by_name.values()
        for m in s.methods
    }
    for path in (
        "/csi.v1.Identity/GetPluginInfo",
        "/csi.v1.Identity/Probe",
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Controller/GetCapacity",
        "/csi.v1.Controller/ControllerExpandVolume",
        "/csi.v1.Controller/ControllerModifyVolume",
        "/csi.v1.GroupController/GetVolumeGroupSnapshot",
        "/csi.v1.SnapshotMetadata/GetMetadataDelta",
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodePublishVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Node/NodeGetInfo",
    ):
        assert path in stub_paths, path


def test_only_snapshot_metadata_streams():
    for service in FILE.services_by_name.values():
        for method in service.methods:
            streams = service.name == "SnapshotMetadata"
            assert method.server_streaming is streams, method.full_name
            assert method.client_streaming is False, method.full_name


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_message_fields(name: str):
    desc = _message(name)
    actual = [
        (
            f.name,
            f.number,
            _type_name(f),
            f.is_repeated,
            _target(f),
        )
        for f in desc.fields
    ]
    assert actual == FIELDS[name]


def test_maps_are_string_to_string():
    for desc in _all_messages():
        for field in desc.fields:
            if _type_name(field) != MAP:
                continue
            entry = field.message_type
            assert entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
            assert entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING


def test_oneofs():
    oneofs = {
        "PluginCapability": ("type", ["service", "volume_expansion"]),
        "VolumeContentSource": ("type", ["snapshot", "volume"]),
        "VolumeCapability": ("access_type", ["block", "mount"]),
        "ControllerServiceCapability": ("type", ["rpc"]),
        "NodeServiceCapability": ("type", ["rpc"]),
        "GroupControllerServiceCapability": ("type", ["rpc"]),
    }
    seen = {d.full_name for d in _all_messages() if d.oneofs}
    assert seen == {f"csi.v1.{n}" for n in oneofs}
    for name, (oneof, members) in oneofs.items():
        desc = _message(name)
        assert [o.name for o in desc.oneofs] == [oneof]
        assert [f.name for f in desc.oneofs_by_name[oneof].fields] == members


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values(name: str):
    desc = FILE.pool.FindEnumTypeByName(f"csi.v1.{name}")
    assert {v.name: v.number for v in desc.values} == ENUMS[name]


def test_every_message_request_and_response_exists():
    names = {d.full_name for d in _all_messages()}
    for service, methods in SERVICES.items():
        for method in methods:
            assert f"csi.v1.{method}Request" in names, (service, method)
            assert f"csi.v1.{method}Response" in names, (service, method)


def test_csi_secret_is_on_every_secrets_field_and_nowhere_else():
    flagged = set()
    for desc in _all_messages():
        for field in desc.fields:
            if _flag(field, "csi_secret"):
                flagged.add(f"{desc.full_name.removeprefix('csi.v1.')}.{field.name}")
            elif field.name == "secrets":
                pytest.fail(f"{desc.full_name}.secrets lacks csi_secret")
    assert flagged == SECRET_FIELDS


def test_alpha_options():
    fields = {
        f"{d.full_name.removeprefix('csi.v1.')}.{f.name}"
        for d in _all_messages()
        for f in d.fields
        if _flag(f, "alpha_field")
    }
    assert fields == ALPHA_FIELDS
    methods = {
        f"{s.name}.{m.name}"
        for s in FILE.services_by_name.values()
        for m in s.methods
        if _flag(m, "alpha_method")
    }
    assert methods == ALPHA_METHODS
    services = {
        s.name
        for s in FILE.services_by_name.values()
        if _flag(s, "alpha_service")
    }
    assert services == {"SnapshotMetadata"}
    messages = {
        d.full_name.removeprefix("csi.v1.")
        for d in _all_messages()
        if _flag(d, "alpha_message")
    }
    assert messages >= ALPHA_MESSAGES
    # Nothing GA may be flagged alpha.
    for ga in ("CreateVolumeRequest", "ControllerModifyVolumeRequest", "Snapshot", "Volume"):
        assert ga not in messages
    values: set[str] = set()
    for name in ENUMS:
        enum = FILE.pool.FindEnumTypeByName(f"csi.v1.{name}")
        for value in enum.values:
            if _flag(value, "alpha_enum_value"):
                values.add(f"{name}.{value.name}")
    assert values == ALPHA_ENUM_VALUES


def test_round_trip_keeps_field_numbers_on_the_wire():
    # Hand-encoded bytes of NodeStageVolumeRequest{volume_id: "v", staging_target_path: "/s"}:
    # field 1 (tag 0x0a) and field 3 (tag 0x1a), both length-delimited.
    raw = b"\x0a\x01v\x1a\x02/s"
    req = csi_pb2.NodeStageVolumeRequest.FromString(raw)
    assert req.volume_id == "v"
    assert req.staging_target_path == "/s"
    # CreateVolumeRequest capacity_range (field 2) with required_bytes (field 1) = 1 MiB.
    req2 = csi_pb2.CreateVolumeRequest(
        name="n", capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20)
    )
    assert req2.SerializeToString() == b"\x0a\x01n\x12\x04\x08\x80\x80\x40"


def test_redaction_blanks_secrets_in_stage_and_create_requests():
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id="vol-1",
        staging_target_path="/var/lib/kubelet/x/globalmount",
        secrets={"password": "hunter2", "token": "abc"},
        volume_context={"pool": "default"},
    )
    clean = redacted_copy(stage)
    assert isinstance(clean, csi_pb2.NodeStageVolumeRequest)
    assert dict(clean.secrets) == {"password": REDACTED, "token": REDACTED}
    assert clean.volume_id == "vol-1"
    assert dict(clean.volume_context) == {"pool": "default"}
    assert "hunter2" not in str(clean)
    # The original request is untouched.
    assert stage.secrets["password"] == "hunter2"

    create = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        parameters={"pool": "default"},
        secrets={"key": "s3cr3t"},
        volume_capabilities=[
            csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            )
        ],
    )
    clean_create = redacted_copy(create)
    assert isinstance(clean_create, csi_pb2.CreateVolumeRequest)
    assert dict(clean_create.secrets) == {"key": REDACTED}
    assert dict(clean_create.parameters) == {"pool": "default"}
    assert clean_create.volume_capabilities[0].mount.fs_type == "ext4"
    assert "s3cr3t" not in str(clean_create)
