"""The CSI wire vocabulary: the only module that imports the generated stubs.

Re-exports the messages and servicer bases the servicers need, declares which
capabilities this driver advertises (only what is implemented), and converts
between protobuf messages and the domain's plain types in
``csi_driver.volumes`` / ``csi_driver.snapshots``.  Shape checks that depend
only on the message (a required field is missing, both block and mount set)
happen here and raise ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csi_driver._proto import csi_pb2 as pb
from csi_driver._proto import csi_pb2_grpc as pb_grpc
from csi_driver.store import SnapshotRecord, VolumeRecord
from csi_driver.volumes import TOPOLOGY_KEY, Capability, Condition, CreateRequest
from plugin_runtime.errors import InvalidArgument

__all__ = ["TOPOLOGY_KEY", "pb", "pb_grpc"]

MAX_STRING = 128
MAX_MAP_BYTES = 4096

_MODE = pb.VolumeCapability.AccessMode.Mode

PLUGIN_CAPABILITIES = (
    pb.PluginCapability(service=pb.PluginCapability.Service(
        type=pb.PluginCapability.Service.CONTROLLER_SERVICE)),
    pb.PluginCapability(service=pb.PluginCapability.Service(
        type=pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
        type=pb.PluginCapability.VolumeExpansion.ONLINE)),
)

_C = pb.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = tuple(
    pb.ControllerServiceCapability(rpc=_C(type=t))
    for t in (
        _C.CREATE_DELETE_VOLUME,
        _C.LIST_VOLUMES,
        _C.GET_CAPACITY,
        _C.CREATE_DELETE_SNAPSHOT,
        _C.LIST_SNAPSHOTS,
        _C.GET_SNAPSHOT,
        _C.CLONE_VOLUME,
        _C.EXPAND_VOLUME,
        _C.VOLUME_CONDITION,
        _C.GET_VOLUME,
        _C.SINGLE_NODE_MULTI_WRITER,
    )
)

_N = pb.NodeServiceCapability.RPC
NODE_CAPABILITIES = tuple(
    pb.NodeServiceCapability(rpc=_N(type=t))
    for t in (
        _N.STAGE_UNSTAGE_VOLUME,
        _N.GET_VOLUME_STATS,
        _N.EXPAND_VOLUME,
        _N.VOLUME_CONDITION,
        _N.SINGLE_NODE_MULTI_WRITER,
        _N.VOLUME_MOUNT_GROUP,
    )
)


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_STRING and field.endswith("_id"):
        raise InvalidArgument(f"{field} is longer than {MAX_STRING} bytes")
    return value


def check_map(values: Mapping[str, str], field: str) -> dict[str, str]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if size > MAX_MAP_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_MAP_BYTES} bytes")
    return dict(values)


def capability(cap: Any, field: str = "volume_capability") -> Capability:
    """Domain Capability from a VolumeCapability; InvalidArgument for a malformed one."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{field}: access_type (mount or block) is required")
    if not cap.HasField("access_mode") or cap.access_mode.mode == _MODE.UNKNOWN:
        raise InvalidArgument(f"{field}: access_mode is required")
    try:
        mode = _MODE.Name(cap.access_mode.mode)
    except ValueError:
        raise InvalidArgument(
            f"{field}: access_mode {cap.access_mode.mode} is not a known mode"
        ) from None
    if kind == "block":
        return Capability(block=True, access_mode=mode)
    mount = cap.mount
    if len(mount.fs_type.encode()) > MAX_STRING:
        raise InvalidArgument(f"{field}: fs_type is too long")
    return Capability(
        block=False,
        access_mode=mode,
        fs_type=mount.fs_type,
        mount_flags=tuple(mount.mount_flags),
        mount_group=mount.volume_mount_group,
    )


def required_capability(request: Any, field: str = "volume_capability") -> Capability:
    if not request.HasField(field):
        raise InvalidArgument(f"{field} is required")
    return capability(getattr(request, field), field)


def capabilities(caps: Any, field: str = "volume_capabilities") -> tuple[Capability, ...]:
    return tuple(capability(c, f"{field}[{i}]") for i, c in enumerate(caps))


def create_request(request: Any) -> CreateRequest:
    name = require(request.name, "name")
    if not request.volume_capabilities:
        raise InvalidArgument("volume_capabilities are required")
    caps = capabilities(request.volume_capabilities)
    snapshot = volume = ""
    if request.HasField("volume_content_source"):
        source = request.volume_content_source
        kind = source.WhichOneof("type")
        if kind == "snapshot":
            snapshot = require(source.snapshot.snapshot_id,
                               "volume_content_source.snapshot.snapshot_id")
        elif kind == "volume":
            volume = require(source.volume.volume_id, "volume_content_source.volume.volume_id")
        else:
            raise InvalidArgument("volume_content_source has neither a snapshot nor a volume")
    requisite: tuple[Mapping[str, str], ...] = ()
    preferred: tuple[Mapping[str, str], ...] = ()
    if request.HasField("accessibility_requirements"):
        reqs = request.accessibility_requirements
        requisite = tuple(dict(t.segments) for t in reqs.requisite)
        preferred = tuple(dict(t.segments) for t in reqs.preferred)
    rng = request.capacity_range
    return CreateRequest(
        name=name,
        capabilities=caps,
        required_bytes=rng.required_bytes,
        limit_bytes=rng.limit_bytes,
        parameters=check_map(request.parameters, "parameters"),
        source_snapshot=snapshot,
        source_volume=volume,
        requisite=requisite,
        preferred=preferred,
    )


def topology(node_id: str) -> Any:
    return pb.Topology(segments={TOPOLOGY_KEY: node_id})


def volume_message(rec: VolumeRecord, node_id: str) -> Any:
    vol = pb.Volume(
        volume_id=rec.id,
        capacity_bytes=rec.capacity_bytes,
        volume_context={"pool": rec.pool, **({"fsType": rec.fs_type} if rec.fs_type else {})},
        accessible_topology=[topology(node_id)],
    )
    if rec.source_snapshot:
        vol.content_source.snapshot.snapshot_id = rec.source_snapshot
    elif rec.source_volume:
        vol.content_source.volume.volume_id = rec.source_volume
    return vol


def condition_message(cond: Condition) -> Any:
    return pb.VolumeCondition(abnormal=cond.abnormal, message=cond.message)


def snapshot_message(snap: SnapshotRecord) -> Any:
    msg = pb.Snapshot(
        snapshot_id=snap.id,
        source_volume_id=snap.source_volume,
        size_bytes=snap.size_bytes,
        ready_to_use=snap.state == "ready",
    )
    msg.creation_time.FromNanoseconds(int(snap.created_at * 1e9))
    return msg


def capacity_range(request: Any) -> tuple[int, int]:
    if not request.HasField("capacity_range"):
        raise InvalidArgument("capacity_range is required")
    return request.capacity_range.required_bytes, request.capacity_range.limit_bytes
