"""CSI conformance, pure-RPC part: identity, capabilities, and the spec's error table
for requests that must fail before any volume exists (csi.md 1.3, 1.4).

Runs the real driver (``python -m csi_driver serve``) on a unix socket.  Nothing
here mounts or attaches: every request is either informational or invalid.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import DRIVER_NAME
from csi_driver._proto import csi_pb2
from csi_driver.store import node_tag
from tests.grpc.csi.driver_harness import (
    TOPOLOGY_KEY,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    block_cap,
    expect_code,
    expect_ok_or,
    mount_cap,
    running_driver,
    topology,
)

Code = grpc.StatusCode
CtlCap = csi_pb2.ControllerServiceCapability.RPC.Type
NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
PluginSvc = csi_pb2.PluginCapability.Service.Type
Expansion = csi_pb2.PluginCapability.VolumeExpansion.Type
Mode = csi_pb2.VolumeCapability.AccessMode.Mode

UNKNOWN_VOLUME = "no-such-volume-3f9c"
UNKNOWN_SNAPSHOT = "no-such-snapshot-3f9c"


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------


def test_plugin_info(csi: Csi):
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert info.name == DRIVER_NAME
    assert len(info.name) <= 63
    assert info.vendor_version


def test_plugin_capabilities(csi: Csi):
    caps = csi.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=10
    ).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
    assert {PluginSvc.CONTROLLER_SERVICE, PluginSvc.VOLUME_ACCESSIBILITY_CONSTRAINTS} <= services
    assert Expansion.ONLINE in expansion
    # ONLINE expansion must be backed by controller and/or node EXPAND_VOLUME.
    assert CtlCap.EXPAND_VOLUME in csi.controller_caps() or NodeCap.EXPAND_VOLUME in csi.node_caps()


def test_probe_ready(csi: Csi):
    resp = csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert not resp.HasField("ready") or resp.ready.value


def test_controller_capabilities_match_the_issue(csi: Csi):
    caps = csi.controller_caps()
    for needed in (
        CtlCap.CREATE_DELETE_VOLUME, CtlCap.LIST_VOLUMES, CtlCap.GET_CAPACITY,
        CtlCap.CREATE_DELETE_SNAPSHOT, CtlCap.LIST_SNAPSHOTS, CtlCap.CLONE_VOLUME,
        CtlCap.EXPAND_VOLUME, CtlCap.GET_VOLUME, CtlCap.VOLUME_CONDITION, CtlCap.GET_SNAPSHOT,
    ):
        assert needed in caps, CtlCap.Name(needed)
    # Local volumes have no attach step.
    assert CtlCap.PUBLISH_UNPUBLISH_VOLUME not in caps
    assert CtlCap.UNKNOWN not in caps


def test_node_capabilities_match_the_issue(csi: Csi):
    caps = csi.node_caps()
    for needed in (
        NodeCap.STAGE_UNSTAGE_VOLUME, NodeCap.GET_VOLUME_STATS, NodeCap.EXPAND_VOLUME,
        NodeCap.VOLUME_CONDITION, NodeCap.SINGLE_NODE_MULTI_WRITER, NodeCap.VOLUME_MOUNT_GROUP,
    ):
        assert needed in caps, NodeCap.Name(needed)
    assert NodeCap.UNKNOWN not in caps


def test_node_get_info(csi: Csi, driver: DriverProcess):
    info = csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == driver.node_id
    assert info.max_volumes_per_node >= 0
    # VOLUME_ACCESSIBILITY_CONSTRAINTS is advertised, so topology must be present.
    assert info.HasField("accessible_topology")
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: driver.node_id}


def test_unadvertised_rpcs_are_unimplemented(csi: Csi):
    ctl = csi.controller_caps()
    if CtlCap.PUBLISH_UNPUBLISH_VOLUME not in ctl:
        expect_code(
            Code.UNIMPLEMENTED, csi.controller.ControllerPublishVolume,
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=UNKNOWN_VOLUME, node_id="n", volume_capability=mount_cap()
            ),
        )
        expect_code(
            Code.UNIMPLEMENTED, csi.controller.ControllerUnpublishVolume,
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=UNKNOWN_VOLUME, node_id="n"),
        )
    if CtlCap.MODIFY_VOLUME not in ctl:
        expect_code(
            Code.UNIMPLEMENTED, csi.controller.ControllerModifyVolume,
            csi_pb2.ControllerModifyVolumeRequest(
                volume_id=UNKNOWN_VOLUME, mutable_parameters={"a": "b"}
            ),
        )
    caps = csi.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=10
    ).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    if PluginSvc.GROUP_CONTROLLER_SERVICE not in services:
        expect_code(
            Code.UNIMPLEMENTED, csi.group.GroupControllerGetCapabilities,
            csi_pb2.GroupControllerGetCapabilitiesRequest(),
        )
    if PluginSvc.SNAPSHOT_METADATA_SERVICE not in services:
        with pytest.raises(grpc.RpcError) as info:
            list(csi.metadata.GetMetadataAllocated(
                csi_pb2.GetMetadataAllocatedRequest(snapshot_id=UNKNOWN_SNAPSHOT), timeout=10
            ))
        assert info.value.code() == Code.UNIMPLEMENTED


# ---------------------------------------------------------------------------
# Missing required fields -> INVALID_ARGUMENT (checked before any lookup)
# ---------------------------------------------------------------------------


def _requests(kubelet: KubeletLayout) -> dict[str, tuple[str, str, Any]]:
    """RPC name -> (service attribute, method, a complete request naming unknown objects)."""
    staging = kubelet.staging_dir(UNKNOWN_VOLUME)
    target = kubelet.target_dir("pod-rpc", "pv-rpc")
    cap = mount_cap()
    cr = csi_pb2.CapacityRange(required_bytes=64 * MiB)
    return {
        "CreateVolume": ("controller", "CreateVolume", csi_pb2.CreateVolumeRequest(
            name="pvc-required", volume_capabilities=[cap], capacity_range=cr)),
        "DeleteVolume": ("controller", "DeleteVolume",
                         csi_pb2.DeleteVolumeRequest(volume_id=UNKNOWN_VOLUME)),
        "ValidateVolumeCapabilities": (
            "controller", "ValidateVolumeCapabilities",
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=UNKNOWN_VOLUME, volume_capabilities=[cap])),
        "ControllerGetVolume": ("controller", "ControllerGetVolume",
                                csi_pb2.ControllerGetVolumeRequest(volume_id=UNKNOWN_VOLUME)),
        "ControllerExpandVolume": (
            "controller", "ControllerExpandVolume",
            csi_pb2.ControllerExpandVolumeRequest(volume_id=UNKNOWN_VOLUME, capacity_range=cr)),
        "CreateSnapshot": ("controller", "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
            source_volume_id=UNKNOWN_VOLUME, name="snap-required")),
        "DeleteSnapshot": ("controller", "DeleteSnapshot",
                           csi_pb2.DeleteSnapshotRequest(snapshot_id=UNKNOWN_SNAPSHOT)),
        "GetSnapshot": ("controller", "GetSnapshot",
                        csi_pb2.GetSnapshotRequest(snapshot_id=UNKNOWN_SNAPSHOT)),
        "NodeStageVolume": ("node", "NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
            volume_id=UNKNOWN_VOLUME, staging_target_path=staging, volume_capability=cap)),
        "NodeUnstageVolume": ("node", "NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(
            volume_id=UNKNOWN_VOLUME, staging_target_path=staging)),
        "NodePublishVolume": ("node", "NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
            volume_id=UNKNOWN_VOLUME, staging_target_path=staging, target_path=target,
            volume_capability=cap)),
        "NodeUnpublishVolume": ("node", "NodeUnpublishVolume",
                                csi_pb2.NodeUnpublishVolumeRequest(
                                    volume_id=UNKNOWN_VOLUME, target_path=target)),
        "NodeGetVolumeStats": ("node", "NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=UNKNOWN_VOLUME, volume_path=target)),
        "NodeExpandVolume": ("node", "NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(
            volume_id=UNKNOWN_VOLUME, volume_path=target, capacity_range=cr)),
    }


# (RPC, field cleared) for every field the spec calls REQUIRED.
REQUIRED = [
    ("CreateVolume", "name"),
    ("CreateVolume", "volume_capabilities"),
    ("DeleteVolume", "volume_id"),
    ("ValidateVolumeCapabilities", "volume_id"),
    ("ValidateVolumeCapabilities", "volume_capabilities"),
    ("ControllerGetVolume", "volume_id"),
    ("ControllerExpandVolume", "volume_id"),
    ("ControllerExpandVolume", "capacity_range"),
    ("CreateSnapshot", "source_volume_id"),
    ("CreateSnapshot", "name"),
    ("DeleteSnapshot", "snapshot_id"),
    ("GetSnapshot", "snapshot_id"),
    ("NodeStageVolume", "volume_id"),
    ("NodeStageVolume", "staging_target_path"),
    ("NodeStageVolume", "volume_capability"),
    ("NodeUnstageVolume", "volume_id"),
    ("NodeUnstageVolume", "staging_target_path"),
    ("NodePublishVolume", "volume_id"),
    ("NodePublishVolume", "target_path"),
    ("NodePublishVolume", "volume_capability"),
    ("NodeUnpublishVolume", "volume_id"),
    ("NodeUnpublishVolume", "target_path"),
    ("NodeGetVolumeStats", "volume_id"),
    ("NodeGetVolumeStats", "volume_path"),
    ("NodeExpandVolume", "volume_id"),
    ("NodeExpandVolume", "volume_path"),
]


def _call(csi: Csi, service: str, method: str) -> Callable[..., Any]:
    return getattr(getattr(csi, service), method)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("rpc", "field"), REQUIRED, ids=[f"{r}-{f}" for r, f in REQUIRED])
def test_missing_required_field_is_invalid_argument(
    csi: Csi, kubelet: KubeletLayout, rpc: str, field: str
):
    service, method, request = _requests(kubelet)[rpc]
    request.ClearField(field)
    message = expect_code(Code.INVALID_ARGUMENT, _call(csi, service, method), request)
    # The message names what is wrong.
    text = message.lower()
    first = field.split("_", maxsplit=1)[0]
    assert field in text or field.replace("_", " ") in text or first in text, message


@pytest.mark.parametrize(
    "broken",
    ["no access_type", "no access_mode", "mode UNKNOWN"],
)
def test_malformed_capability_is_invalid_argument(csi: Csi, broken: str):
    cap = mount_cap()
    if broken == "no access_type":
        cap.ClearField("mount")
    elif broken == "no access_mode":
        cap.ClearField("access_mode")
    else:
        cap.access_mode.mode = Mode.UNKNOWN
    expect_code(
        Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
        csi_pb2.CreateVolumeRequest(
            name="pvc-badcap", volume_capabilities=[cap],
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        ),
    )


# ---------------------------------------------------------------------------
# Unknown objects
# ---------------------------------------------------------------------------


# csi-sanity names unknown objects with ids of its own format ("fake-vol-id-..."), and
# the spec treats ids as opaque: an unknown but harmless id is NOT_FOUND, whatever
# the driver's own id format.
# "vol-" + this node's tag + random: the driver's own format, created here, gone.
OWN_FORMAT_ID = "vol-" + node_tag("node-a") + "0" * 24
FOREIGN_IDS = [UNKNOWN_VOLUME, OWN_FORMAT_ID, "fake-vol-id-1"]


@pytest.mark.parametrize("volume_id", FOREIGN_IDS)
def test_unknown_objects_are_not_found(csi: Csi, kubelet: KubeletLayout, volume_id: str):
    requests = _requests(kubelet)
    for _, _, request in requests.values():
        for field in ("volume_id", "snapshot_id"):
            if field in request.DESCRIPTOR.fields_by_name:
                setattr(request, field, volume_id if field == "volume_id" else
                        volume_id.replace("vol", "snap"))
    for rpc in (
        "ValidateVolumeCapabilities", "ControllerGetVolume", "ControllerExpandVolume",
        "GetSnapshot", "NodeStageVolume", "NodePublishVolume", "NodeGetVolumeStats",
        "NodeExpandVolume",
    ):
        service, method, request = requests[rpc]
        expect_code(Code.NOT_FOUND, _call(csi, service, method), request)


# Paths where no volume can be staged or published: relative, "..", outside the kubelet
# root, a NUL byte.  The spec's NodeGetVolumeStats/NodeExpandVolume tables have one code
# for a volume that does not exist at volume_path: NOT_FOUND, whatever the path looks like.
ODD_PATHS = ["some/path", "../x", "/etc", "/var/lib/kubelet/pods/\0x"]


@pytest.mark.parametrize("path", ODD_PATHS)
@pytest.mark.parametrize("volume_id", FOREIGN_IDS)
def test_stats_and_node_expand_of_unknown_volume_are_not_found_whatever_the_path(
    csi: Csi, volume_id: str, path: str
):
    expect_code(Code.NOT_FOUND, csi.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))
    expect_code(Code.NOT_FOUND, csi.node.NodeExpandVolume,
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=volume_id, volume_path=path,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB)))


def test_controller_expand_of_another_nodes_volume_defers_to_that_node(csi: Csi):
    """The elected resizer calls the driver beside it for every PVC: a volume whose ID
    carries another node's tag is grown by NodeExpandVolume on its own node."""
    elsewhere = "vol-" + node_tag("node-b") + "1" * 24
    reply = csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=elsewhere, capacity_range=csi_pb2.CapacityRange(required_bytes=5 * MiB + 1)
        ),
        timeout=30,
    )
    assert reply.node_expansion_required
    assert reply.capacity_bytes == 5 * MiB + 4096  # rounded up to the 4 KiB granularity
    expect_code(
        Code.OUT_OF_RANGE, csi.controller.ControllerExpandVolume,
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=elsewhere,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB),
        ),
    )


def test_create_from_missing_source_is_not_found(csi: Csi):
    for source in (
        csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=UNKNOWN_SNAPSHOT)),
        csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=UNKNOWN_VOLUME)),
    ):
        expect_code(
            Code.NOT_FOUND, csi.controller.CreateVolume,
            csi_pb2.CreateVolumeRequest(
                name="pvc-from-missing", volume_capabilities=[mount_cap()],
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_content_source=source,
            ),
        )


def test_deleting_unknown_objects_succeeds(csi: Csi):
    for _ in range(3):
        csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=UNKNOWN_VOLUME), timeout=10)
        csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=UNKNOWN_SNAPSHOT), timeout=10)


def test_unstage_and_unpublish_of_unknown_volume(csi: Csi, kubelet: KubeletLayout):
    # csi.md: NOT_FOUND for a missing volume; OK is also what the idempotency rule
    # ("not staged / not published") allows.  Never anything else.
    requests = _requests(kubelet)
    for rpc in ("NodeUnstageVolume", "NodeUnpublishVolume"):
        service, method, request = requests[rpc]
        expect_ok_or({Code.NOT_FOUND}, _call(csi, service, method), request)


def test_bad_list_tokens_are_aborted(csi: Csi):
    expect_code(Code.ABORTED, csi.controller.ListVolumes,
                csi_pb2.ListVolumesRequest(starting_token="not-a-token-zz"))
    expect_code(Code.ABORTED, csi.controller.ListSnapshots,
                csi_pb2.ListSnapshotsRequest(starting_token="not-a-token-zz"))


def test_negative_max_entries_is_invalid(csi: Csi):
    expect_code(Code.INVALID_ARGUMENT, csi.controller.ListVolumes,
                csi_pb2.ListVolumesRequest(max_entries=-1))
    expect_code(Code.INVALID_ARGUMENT, csi.controller.ListSnapshots,
                csi_pb2.ListSnapshotsRequest(max_entries=-1))


# ---------------------------------------------------------------------------
# CreateVolume arguments that must be refused without provisioning anything
# ---------------------------------------------------------------------------


def _create(name: str, **kw: Any) -> Any:
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[kw.pop("cap", mount_cap())],
        capacity_range=kw.pop("cr", csi_pb2.CapacityRange(required_bytes=64 * MiB)),
        parameters=kw.pop("parameters", {}),
    )
    if "requirements" in kw:
        req.accessibility_requirements.CopyFrom(kw.pop("requirements"))
    assert not kw
    return req


@pytest.mark.parametrize(
    "parameters",
    [
        {"colour": "blue"},
        {"fsType": "ntfs"},
        {"csi.storage.k8s.io/fstype": "vfat"},
        {"thin": "maybe"},
        {"pool": "no-such-pool"},
    ],
    ids=["unknown-key", "bad-fstype", "bad-k8s-fstype", "bad-thin", "unknown-pool"],
)
def test_bad_storage_class_parameters_are_invalid(csi: Csi, parameters: dict[str, str]):
    message = expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
                          _create("pvc-badparam", parameters=parameters))
    key = next(iter(parameters))
    value = parameters[key]
    assert key in message or value in message, message


def test_unsupported_capability_fs_type_is_invalid(csi: Csi):
    expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
                _create("pvc-badfs", cap=mount_cap(fs_type="ntfs")))


def test_capacity_range_limits(csi: Csi):
    # Every capacity_range the driver cannot honour is the spec's "unsupported
    # capacity_range" row of CreateVolume: OUT_OF_RANGE (csi.md 1.3), not the
    # generic INVALID_ARGUMENT.
    # limit below required: an unsatisfiable range.
    expect_code(
        Code.OUT_OF_RANGE, csi.controller.CreateVolume,
        _create("pvc-range-a", cr=csi_pb2.CapacityRange(required_bytes=128 * MiB,
                                                         limit_bytes=64 * MiB)),
    )
    # A limit no volume can fit in (one byte): unsupported capacity -> OUT_OF_RANGE.
    expect_code(
        Code.OUT_OF_RANGE, csi.controller.CreateVolume,
        _create("pvc-range-b", cr=csi_pb2.CapacityRange(limit_bytes=1)),
    )
    # Negative sizes ("MUST NOT be negative" in csi.proto) are a range no volume has.
    expect_code(
        Code.OUT_OF_RANGE, csi.controller.CreateVolume,
        _create("pvc-range-c", cr=csi_pb2.CapacityRange(required_bytes=-5)),
    )
    expect_code(
        Code.OUT_OF_RANGE, csi.controller.CreateVolume,
        _create("pvc-range-d", cr=csi_pb2.CapacityRange(required_bytes=64 * MiB,
                                                         limit_bytes=-1)),
    )


def test_requisite_topology_of_another_node_is_resource_exhausted(csi: Csi):
    other = csi_pb2.TopologyRequirement(requisite=[topology("some-other-node")],
                                        preferred=[topology("some-other-node")])
    expect_code(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume,
                _create("pvc-elsewhere", requirements=other))
    unknown_key = csi_pb2.TopologyRequirement(
        requisite=[csi_pb2.Topology(segments={"topology.kubernetes.io/zone": "z9"})])
    expect_code(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume,
                _create("pvc-elsewhere-2", requirements=unknown_key))


def test_overlong_name_is_invalid(csi: Csi):
    expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, _create("p" * 4096))


# ---------------------------------------------------------------------------
# GetCapacity
# ---------------------------------------------------------------------------


def test_get_capacity_reports_sizes(csi: Csi, driver: DriverProcess):
    for cap in (mount_cap(), block_cap()):
        resp = csi.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(volume_capabilities=[cap],
                                       accessible_topology=topology(driver.node_id)),
            timeout=10,
        )
        assert resp.available_capacity > 0
        assert resp.HasField("maximum_volume_size")
        assert resp.maximum_volume_size.value > 0
        assert resp.HasField("minimum_volume_size")
        assert 0 <= resp.minimum_volume_size.value <= resp.maximum_volume_size.value
    # No topology at all: the node's own capacity.
    plain = csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=10)
    assert plain.available_capacity > 0


# The smallest volume of each kind: what each mkfs accepts (ext4 1 MiB, xfs 300 MiB,
# btrfs 109 MiB) and one 4 KiB block for raw block volumes.  The default fsType is ext4.
MINIMUM_SIZES = [
    (mount_cap(), {}, 1 << 20),
    (mount_cap(fs_type="ext4"), {}, 1 << 20),
    (mount_cap(fs_type="xfs"), {}, 300 << 20),
    (mount_cap(fs_type="btrfs"), {}, 114294784),
    (mount_cap(), {"fsType": "xfs"}, 300 << 20),
    (block_cap(), {}, 4096),
]


@pytest.mark.parametrize(("cap", "parameters", "minimum"), MINIMUM_SIZES,
                         ids=["default", "ext4", "xfs", "btrfs", "xfs-param", "block"])
def test_get_capacity_minimum_volume_size_per_fs_type(
    csi: Csi, cap: Any, parameters: dict[str, str], minimum: int
):
    resp = csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(volume_capabilities=[cap], parameters=parameters), timeout=10)
    assert resp.HasField("minimum_volume_size")
    assert resp.minimum_volume_size.value == minimum


def test_get_capacity_elsewhere_is_zero(csi: Csi):
    resp = csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(accessible_topology=topology("some-other-node")), timeout=10
    )
    assert resp.available_capacity == 0


def test_get_capacity_with_bad_parameters_is_invalid(csi: Csi):
    expect_code(Code.INVALID_ARGUMENT, csi.controller.GetCapacity,
                csi_pb2.GetCapacityRequest(parameters={"colour": "blue"}))


# ---------------------------------------------------------------------------
# Secrets never reach the log; multi-node modes are refused by a local driver
# ---------------------------------------------------------------------------


def test_secrets_never_reach_the_log(csi: Csi, driver: DriverProcess, kubelet: KubeletLayout):
    secret = "hunter2-8c1f-do-not-log"
    # Failing requests are logged with their content; make several fail.
    expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="pvc-secret", volume_capabilities=[mount_cap()],
        parameters={"colour": "blue"}, secrets={"password": secret}))
    expect_code(Code.NOT_FOUND, csi.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=UNKNOWN_VOLUME, staging_target_path=kubelet.staging_dir(UNKNOWN_VOLUME),
        volume_capability=mount_cap(), secrets={"token": secret}))
    expect_code(Code.NOT_FOUND, csi.controller.ControllerExpandVolume,
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=UNKNOWN_VOLUME, secrets={"k": secret},
                    capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)))
    log = driver.log_path.read_text(errors="replace")
    assert "pvc-secret" in log or UNKNOWN_VOLUME in log, "the failures were not logged at all"
    assert secret not in log


@pytest.mark.parametrize(
    "mode", [Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_SINGLE_WRITER],
    ids=["MULTI_NODE_MULTI_WRITER", "MULTI_NODE_SINGLE_WRITER"],
)
def test_multi_node_writers_are_refused(csi: Csi, mode: int):
    # A node-local volume cannot be written from several nodes.
    expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
                _create("pvc-multinode", cap=mount_cap(mode=mode)))


# ---------------------------------------------------------------------------
# A driver with its own config: the node's volume limit and the RPC metrics
# ---------------------------------------------------------------------------

VOLUME_LIMIT = 7


@pytest.fixture(scope="module")
def configured() -> Iterator[DriverProcess]:
    """A driver with max_volumes_per_node set and /metrics on a free local port."""

    def config(base: Path) -> dict[str, Any]:
        return {"max_volumes_per_node": VOLUME_LIMIT,
                "pools": [{"name": "p", "type": "image", "path": str(base / "state" / "p")}]}

    with running_driver(node_id="node-cfg", config=config,
                        extra_args=("--metrics-address", "127.0.0.1:0")) as proc:
        yield proc


def test_node_get_info_reports_the_configured_volume_limit(configured: DriverProcess):
    info = configured.csi().node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    # The kubelet copies this into CSINode's allocatable count (csi.md 2.1).
    assert info.max_volumes_per_node == VOLUME_LIMIT
    assert info.node_id == "node-cfg"


def _metrics_port(driver: DriverProcess) -> int:
    found = re.search(r"serving metrics on \S+:(\d+)", driver.log_path.read_text(errors="replace"))
    assert found, f"the driver did not log its metrics port:\n{driver.log_tail()}"
    return int(found.group(1))


def _rpc_total(port: int, method: str, code: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {"service": "csi.v1.Controller", "method": method, "code": code}
    for line in text.splitlines():
        found = re.fullmatch(r"hostkit_rpc_total\{(.*)\} (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) == wanted:
            return float(found.group(2))
    return 0.0


def test_not_found_is_counted_by_code_in_the_rpc_metrics(configured: DriverProcess):
    port = _metrics_port(configured)
    csi = configured.csi()
    before = _rpc_total(port, "ControllerGetVolume", "NOT_FOUND")
    for _ in range(2):
        expect_code(Code.NOT_FOUND, csi.controller.ControllerGetVolume,
                    csi_pb2.ControllerGetVolumeRequest(volume_id=UNKNOWN_VOLUME))
    assert _rpc_total(port, "ControllerGetVolume", "NOT_FOUND") == before + 2
    # Counted under its own code only.
    assert _rpc_total(port, "ControllerGetVolume", "OK") == 0
