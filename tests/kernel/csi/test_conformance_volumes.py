"""CSI conformance with real volumes: the spec's error and idempotency tables
(csi.md 1.3) walked in mount AND block mode against the real driver, plus the
kubelet's own flow (csi.md 2.2): directories created where and by whom the
kubelet creates them, data written and read through the published volume.

Root: real loop devices, mkfs and mounts.  Every volume lives under the
module's private state dir and kubelet root; the harness removes whatever the
driver leaves behind, even when a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    TOPOLOGY_KEY,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    cap_for,
    expect_code,
    loops_backed_by,
    mount_cap,
    mounts_under,
    topology,
)

Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
KINDS = ["mount", "block"]
REPEAT = 3  # csi-sanity repeats 10x; 3 is enough to catch non-idempotence cheaply
SIZE = 64 * MiB
XFS_SIZE = 320 * MiB  # mkfs.xfs refuses filesystems under 300 MiB

# (access kind, fs type, size) for the tests that depend on the filesystem.
FLAVOURS = [("mount", "ext4", SIZE), ("mount", "xfs", XFS_SIZE), ("block", "", SIZE)]
FLAVOUR_IDS = ["ext4", "xfs", "block"]


def _has_cap_sys_resource() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; some
    sandboxes drop it even for root, and the driver must then say so clearly."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


HAS_SYS_RESOURCE = _has_cap_sys_resource()


def _is_mountpoint(path: str) -> bool:
    return path in mounts_under(Path(path))


class Vol:
    """One volume and the kubelet paths it is used at."""

    def __init__(self, csi: Csi, kubelet: KubeletLayout, name: str, kind: str,
                 size: int = SIZE, fs_type: str = "", **create: Any) -> None:
        self.csi, self.kind, self.name = csi, kind, name
        self.volume = csi.create(name, size=size, kind=kind, fs_type=fs_type, **create)
        self.id = self.volume.volume_id
        self.cap = cap_for(kind, fs_type=fs_type)
        self.staging, self.target = kubelet.paths(kind, self.id, name, "pod-" + name[-12:])
        self.kubelet = kubelet

    def another_target(self, pod: str) -> str:
        if self.kind == "block":
            return self.kubelet.block_target(self.name, pod)
        return self.kubelet.target_dir(pod, self.name)

    def stage(self, cap: Any = None) -> Any:
        return self.csi.stage(self.id, self.staging, cap or self.cap)

    def publish(self, target: str | None = None, cap: Any = None, readonly: bool = False) -> Any:
        return self.csi.publish(self.id, self.staging, target or self.target, cap or self.cap,
                                readonly=readonly)

    def teardown(self) -> None:
        _teardown(self.csi, self.id, self.staging, self.target)


def _teardown(csi: Csi, vid: str, staging: str, target: str) -> None:
    """Best-effort undo in the kubelet's order (unpublish, unstage, delete)."""
    for call in (lambda: csi.unpublish(vid, target), lambda: csi.unstage(vid, staging),
                 lambda: csi.delete(vid)):
        with contextlib.suppress(grpc.RpcError):
            call()


def _write_and_checksum(kind: str, target: str, payload: bytes) -> str:
    if kind == "block":
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, payload, MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        with open(os.path.join(target, "data.bin"), "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
    return hashlib.sha256(payload).hexdigest()


def _read_checksum(kind: str, target: str, length: int) -> str:
    if kind == "block":
        fd = os.open(target, os.O_RDONLY)
        try:
            data = os.pread(fd, length, MiB)
        finally:
            os.close(fd)
    else:
        data = Path(target, "data.bin").read_bytes()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def make_vol(csi: Csi, kubelet: KubeletLayout, unique: Any):
    made: list[Vol] = []

    def make(kind: str, **kw: Any) -> Vol:
        vol = Vol(csi, kubelet, unique("pvc"), kind, **kw)
        made.append(vol)
        return vol

    yield make
    for vol in reversed(made):
        vol.teardown()


# ---------------------------------------------------------------------------
# CreateVolume / DeleteVolume
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_create_is_idempotent_and_exact(csi: Csi, driver: DriverProcess, unique: Any, kind: str):
    name = unique("pvc")
    first = csi.create(name, size=SIZE, kind=kind)
    try:
        assert first.capacity_bytes == SIZE, "returned capacity must equal the request"
        assert first.volume_id
        assert [dict(t.segments) for t in first.accessible_topology] == [
            {TOPOLOGY_KEY: driver.node_id}
        ]
        for _ in range(REPEAT):
            again = csi.create(name, size=SIZE, kind=kind)
            assert again.volume_id == first.volume_id
            assert again.capacity_bytes == first.capacity_bytes
        # Same name, other size -> ALREADY_EXISTS.
        expect_code(Code.ALREADY_EXISTS, csi.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap_for(kind)],
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE, limit_bytes=2 * SIZE)))
        # Validate confirms the capability it was created with.
        resp = csi.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=first.volume_id,
                                                      volume_capabilities=[cap_for(kind)]),
            timeout=30)
        assert resp.HasField("confirmed")
        assert list(resp.confirmed.volume_capabilities) == [cap_for(kind)]
        # A capability the volume cannot offer is not confirmed (and not an error).
        multi = cap_for(kind, mode=Mode.MULTI_NODE_MULTI_WRITER)
        refused = csi.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=first.volume_id,
                                                      volume_capabilities=[multi]),
            timeout=30)
        assert not refused.HasField("confirmed")
        assert refused.message
        got = csi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=first.volume_id), timeout=30)
        assert got.volume.volume_id == first.volume_id
        assert got.volume.capacity_bytes == SIZE
        assert not got.status.volume_condition.abnormal
    finally:
        for _ in range(REPEAT):
            csi.delete(first.volume_id)
    expect_code(Code.NOT_FOUND, csi.controller.ControllerGetVolume,
                csi_pb2.ControllerGetVolumeRequest(volume_id=first.volume_id))


def test_create_without_limit_or_range(csi: Csi, unique: Any):
    # No capacity_range at all: the driver picks a size and reports it.
    req = csi_pb2.CreateVolumeRequest(name=unique("pvc"), volume_capabilities=[mount_cap()])
    vol = csi.controller.CreateVolume(req, timeout=120).volume
    try:
        assert vol.capacity_bytes > 0
    finally:
        csi.delete(vol.volume_id)
    # Only a limit: the volume fits under it.
    req = csi_pb2.CreateVolumeRequest(name=unique("pvc"), volume_capabilities=[mount_cap()],
                                      capacity_range=csi_pb2.CapacityRange(limit_bytes=SIZE))
    vol = csi.controller.CreateVolume(req, timeout=120).volume
    try:
        assert 0 < vol.capacity_bytes <= SIZE
    finally:
        csi.delete(vol.volume_id)


def test_storage_class_parameters_are_accepted(csi: Csi, unique: Any):
    for params in ({"pool": "default", "fsType": "ext4", "thin": "true"},
                   {"csi.storage.k8s.io/fstype": "ext4", "thin": "false"}):
        vol = csi.create(unique("pvc"), size=SIZE, params=params)
        try:
            assert vol.capacity_bytes == SIZE
        finally:
            csi.delete(vol.volume_id)


def test_topology_requirements(csi: Csi, driver: DriverProcess, unique: Any):
    here, there = topology(driver.node_id), topology("some-other-node")
    req = csi_pb2.TopologyRequirement(requisite=[there, here], preferred=[there, here])
    vol = csi.create(unique("pvc"), requirements=req)
    try:
        assert [dict(t.segments) for t in vol.accessible_topology] == [dict(here.segments)]
    finally:
        csi.delete(vol.volume_id)


def test_delete_in_use_is_failed_precondition(make_vol: Any):
    vol = make_vol("mount")
    vol.stage()
    expect_code(Code.FAILED_PRECONDITION, vol.csi.controller.DeleteVolume,
                csi_pb2.DeleteVolumeRequest(volume_id=vol.id))


def test_list_volumes_paging(csi: Csi, make_vol: Any):
    ids = {make_vol("mount").id for _ in range(3)}
    seen: list[str] = []
    token = ""
    for _ in range(50):
        resp = csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=1, starting_token=token), timeout=30)
        assert len(resp.entries) <= 1
        seen += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    assert not token, "paging never ended"
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert ids <= set(seen)
    everything = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
    assert {e.volume.volume_id for e in everything.entries} == set(seen)
    assert not everything.next_token
    for entry in everything.entries:
        assert entry.volume.capacity_bytes > 0


# ---------------------------------------------------------------------------
# Node lifecycle, mount and block
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lifecycle_is_idempotent_and_cleans_up(make_vol: Any, kind: str):
    vol = make_vol(kind)
    csi = vol.csi
    for _ in range(REPEAT):
        vol.stage()
    for _ in range(REPEAT):
        vol.publish()
    if kind == "block":
        assert stat.S_ISBLK(os.stat(vol.target).st_mode), "block target must be a device"
    else:
        assert os.path.isdir(vol.target) and _is_mountpoint(vol.target)
    digest = _write_and_checksum(vol.kind, vol.target, os.urandom(256 * 1024))
    assert _read_checksum(kind, vol.target, 256 * 1024) == digest
    for _ in range(REPEAT):
        csi.unpublish(vol.id, vol.target)
    assert not os.path.lexists(vol.target), "NodeUnpublish must delete the target it created"
    assert os.path.isdir(os.path.dirname(vol.target)), "the CO's parent dir must stay"
    for _ in range(REPEAT):
        csi.unstage(vol.id, vol.staging)
    assert not _is_mountpoint(vol.staging)
    # Stage and publish again: the data is still there.
    vol.stage()
    vol.publish()
    assert _read_checksum(kind, vol.target, 256 * 1024) == digest
    csi.unpublish(vol.id, vol.target)
    csi.unstage(vol.id, vol.staging)
    for _ in range(REPEAT):
        csi.delete(vol.id)


@pytest.mark.parametrize("kind", KINDS)
def test_publish_before_stage_is_failed_precondition(make_vol: Any, kind: str):
    vol = make_vol(kind)
    expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.id, staging_target_path=vol.staging, target_path=vol.target,
                    volume_capability=vol.cap))
    assert not os.path.lexists(vol.target), "a refused publish must not leave the target"


@pytest.mark.parametrize("kind", KINDS)
def test_publish_without_staging_path_is_failed_precondition(make_vol: Any, kind: str):
    vol = make_vol(kind)
    vol.stage()
    expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.id, target_path=vol.target, volume_capability=vol.cap))


@pytest.mark.parametrize("kind", KINDS)
def test_stage_same_path_incompatible_is_already_exists(make_vol: Any, kind: str):
    vol = make_vol(kind)
    vol.stage()
    other = cap_for(kind, mode=Mode.SINGLE_NODE_READER_ONLY)
    expect_code(Code.ALREADY_EXISTS, vol.csi.node.NodeStageVolume,
                csi_pb2.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=vol.staging,
                                               volume_capability=other))


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_capabilities_at_the_node_are_failed_precondition(make_vol: Any, kind: str):
    vol = make_vol(kind)
    multi = cap_for(kind, mode=Mode.MULTI_NODE_MULTI_WRITER)
    expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodeStageVolume,
                csi_pb2.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=vol.staging,
                                               volume_capability=multi))
    assert not _is_mountpoint(vol.staging)
    if kind == "mount":
        # The volume holds ext4; it cannot be staged as another filesystem.
        expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodeStageVolume,
                    csi_pb2.NodeStageVolumeRequest(
                        volume_id=vol.id, staging_target_path=vol.staging,
                        volume_capability=mount_cap(fs_type="xfs")))
        assert not _is_mountpoint(vol.staging)
    vol.stage()
    expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.id, staging_target_path=vol.staging, target_path=vol.target,
                    volume_capability=multi))
    assert not os.path.lexists(vol.target)


@pytest.mark.parametrize("kind", KINDS)
def test_publish_same_target_other_args_is_already_exists(make_vol: Any, kind: str):
    vol = make_vol(kind)
    vol.stage()
    vol.publish()
    expect_code(Code.ALREADY_EXISTS, vol.csi.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.id, staging_target_path=vol.staging, target_path=vol.target,
                    volume_capability=vol.cap, readonly=True))


@pytest.mark.parametrize("kind", KINDS)
def test_single_writer_modes_at_a_second_target(make_vol: Any, kind: str):
    vol = make_vol(kind)
    if NodeCap.SINGLE_NODE_MULTI_WRITER not in vol.csi.node_caps():
        pytest.skip("driver does not advertise SINGLE_NODE_MULTI_WRITER")
    single = cap_for(kind, mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    vol.stage(single)
    vol.publish(cap=single)
    second = vol.another_target("pod-second")
    expect_code(Code.FAILED_PRECONDITION, vol.csi.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.id, staging_target_path=vol.staging, target_path=second,
                    volume_capability=single))
    assert not os.path.lexists(second)
    vol.csi.unpublish(vol.id, vol.target)
    vol.csi.unstage(vol.id, vol.staging)
    # SINGLE_NODE_MULTI_WRITER: a second target on the same node is fine.
    multi = cap_for(kind, mode=Mode.SINGLE_NODE_MULTI_WRITER)
    vol.stage(multi)
    vol.publish(cap=multi)
    vol.publish(target=second, cap=multi)
    vol.csi.unpublish(vol.id, second)
    assert not os.path.lexists(second)


def test_readonly_publish_refuses_writes(make_vol: Any):
    vol = make_vol("mount")
    vol.stage()
    vol.publish(readonly=True)
    with pytest.raises(OSError) as info:
        Path(vol.target, "x").write_text("no")
    assert info.value.errno == 30  # EROFS


def test_volume_mount_group_owns_the_root(make_vol: Any):
    vol = make_vol("mount")
    cap = mount_cap(group="4321")
    vol.stage(cap)
    vol.publish(cap=cap)
    assert os.stat(vol.target).st_gid == 4321


@pytest.mark.parametrize("kind", KINDS)
def test_paths_outside_the_kubelet_root_are_refused(make_vol: Any, kind: str):
    vol = make_vol(kind)
    outside = tempfile.mkdtemp(prefix="csi-outside", dir="/tmp")
    try:
        for staging in (outside, "relative/path", vol.staging + "/../../../../../../" + outside):
            expect_code(Code.INVALID_ARGUMENT, vol.csi.node.NodeStageVolume,
                        csi_pb2.NodeStageVolumeRequest(
                            volume_id=vol.id, staging_target_path=staging,
                            volume_capability=vol.cap))
        vol.stage()
        for target in (os.path.join(outside, "t"), "relative/t",
                       os.path.dirname(vol.target) + "/../../../../../../" + outside + "/t"):
            expect_code(Code.INVALID_ARGUMENT, vol.csi.node.NodePublishVolume,
                        csi_pb2.NodePublishVolumeRequest(
                            volume_id=vol.id, staging_target_path=vol.staging,
                            target_path=target, volume_capability=vol.cap))
        assert os.listdir(outside) == []
    finally:
        os.rmdir(outside)


# ---------------------------------------------------------------------------
# Stats, expansion
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_node_get_volume_stats(make_vol: Any, kind: str, kubelet: KubeletLayout):
    vol = make_vol(kind)
    vol.stage()
    vol.publish()
    resp = vol.csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=vol.target), timeout=30)
    units = {u.unit: u for u in resp.usage}
    by = units[csi_pb2.VolumeUsage.BYTES]
    assert by.total > 0
    if kind == "mount":
        assert by.total <= SIZE
        assert by.used + by.available <= by.total
        inodes = units[csi_pb2.VolumeUsage.INODES]
        assert inodes.total > 0 and inodes.used > 0
    else:
        assert by.total == SIZE
    assert resp.HasField("volume_condition")
    assert not resp.volume_condition.abnormal
    # The spec: volume_path may be any path where the volume was staged or published.
    staged = vol.csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=vol.staging,
                                          staging_target_path=vol.staging), timeout=30)
    assert {u.unit for u in staged.usage} == set(units)
    # An existing path that is not this volume's -> NOT_FOUND.
    elsewhere = kubelet.root / "pods" / "unrelated"
    elsewhere.mkdir(parents=True, exist_ok=True)
    expect_code(Code.NOT_FOUND, vol.csi.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=str(elsewhere)))
    # A path that does not exist -> NOT_FOUND.
    expect_code(Code.NOT_FOUND, vol.csi.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id,
                                                  volume_path=str(elsewhere / "missing")))
    # A relative path cannot be where the volume is published -> NOT_FOUND (not
    # INVALID_ARGUMENT), for stats and for node expansion alike.
    for path in ("some/path", os.path.relpath(vol.target), "../x", "/etc"):
        message = expect_code(Code.NOT_FOUND, vol.csi.node.NodeGetVolumeStats,
                              csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id,
                                                                volume_path=path))
        assert vol.id in message, message
        expect_code(Code.NOT_FOUND, vol.csi.node.NodeExpandVolume,
                    csi_pb2.NodeExpandVolumeRequest(volume_id=vol.id, volume_path=path))


def _size_seen(kind: str, target: str) -> int:
    if kind == "block":
        fd = os.open(target, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    st = os.statvfs(target)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize(("kind", "fs_type", "size"), FLAVOURS, ids=FLAVOUR_IDS)
def test_online_expansion(make_vol: Any, kind: str, fs_type: str, size: int):
    vol = make_vol(kind, size=size, fs_type=fs_type)
    csi = vol.csi
    vol.stage()
    vol.publish()
    digest = _write_and_checksum(vol.kind, vol.target, os.urandom(128 * 1024))
    before = _size_seen(kind, vol.target)
    new = 2 * size
    cr = csi_pb2.CapacityRange(required_bytes=new)
    for attempt in range(REPEAT):
        resp = csi.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.id, capacity_range=cr,
                                                  volume_capability=vol.cap), timeout=120)
        assert resp.capacity_bytes >= new
        if attempt == 0 and kind == "mount" and _size_seen(kind, vol.target) == before:
            # The filesystem has not grown yet: the CO must be told to call the node.
            assert resp.node_expansion_required
    node_request = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.id, volume_path=vol.target, staging_target_path=vol.staging,
        capacity_range=cr, volume_capability=vol.cap)
    if fs_type == "ext4" and not HAS_SYS_RESOURCE:
        # The spec's answer when the filesystem cannot grow while published.
        message = expect_code(Code.FAILED_PRECONDITION, csi.node.NodeExpandVolume, node_request)
        assert "CAP_SYS_RESOURCE" in message
        assert _read_checksum(kind, vol.target, 128 * 1024) == digest
        return
    for _ in range(REPEAT):
        node = csi.node.NodeExpandVolume(node_request, timeout=120)
        assert node.capacity_bytes == 0 or node.capacity_bytes >= new
    after = _size_seen(kind, vol.target)
    assert after > before
    if kind == "block":
        assert after == new
    assert _read_checksum(kind, vol.target, 128 * 1024) == digest
    # Asking for less than the current size is already satisfied.
    small = csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)),
        timeout=60)
    assert small.capacity_bytes >= new
    # A limit below the current size cannot be met.
    expect_code(Code.OUT_OF_RANGE, csi.controller.ControllerExpandVolume,
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vol.id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=size)))
    listed = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.id), timeout=30)
    assert listed.volume.capacity_bytes >= new


# ---------------------------------------------------------------------------
# Snapshots, restore, clone
# ---------------------------------------------------------------------------


def _snap(csi: Csi, source: str, name: str) -> Any:
    return csi.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(source_volume_id=source, name=name), timeout=120).snapshot


@pytest.mark.parametrize(("kind", "fs_type", "size"), FLAVOURS, ids=FLAVOUR_IDS)
def test_snapshot_restore_and_clone(
    make_vol: Any, kind: str, fs_type: str, size: int, unique: Any
):
    vol = make_vol(kind, size=size, fs_type=fs_type)
    csi = vol.csi
    vol.stage()
    vol.publish()
    digest = _write_and_checksum(vol.kind, vol.target, os.urandom(512 * 1024))
    name = unique("snap")
    snap = _snap(csi, vol.id, name)
    try:
        assert snap.ready_to_use
        assert snap.source_volume_id == vol.id
        assert snap.snapshot_id
        assert snap.size_bytes == size
        assert snap.creation_time.seconds > 0
        for _ in range(REPEAT):
            again = _snap(csi, vol.id, name)
            assert again.snapshot_id == snap.snapshot_id
            assert again.creation_time == snap.creation_time
        other = make_vol(kind, size=size, fs_type=fs_type)
        expect_code(Code.ALREADY_EXISTS, csi.controller.CreateSnapshot,
                    csi_pb2.CreateSnapshotRequest(source_volume_id=other.id, name=name))
        got = csi.controller.GetSnapshot(
            csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=30).snapshot
        assert got.snapshot_id == snap.snapshot_id and got.source_volume_id == vol.id
        by_source = csi.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(source_volume_id=vol.id), timeout=30)
        assert [e.snapshot.snapshot_id for e in by_source.entries] == [snap.snapshot_id]
        by_id = csi.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id), timeout=30)
        assert [e.snapshot.snapshot_id for e in by_id.entries] == [snap.snapshot_id]
        none = csi.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(snapshot_id="no-such-snapshot-x"), timeout=30)
        assert list(none.entries) == []

        # Restore (same and larger size) and clone.
        from_snap = csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
        from_vol = csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vol.id))
        for source, new_size in ((from_snap, size), (from_snap, 2 * size), (from_vol, size)):
            restored = make_vol(kind, size=new_size, fs_type=fs_type, source=source)
            assert restored.volume.capacity_bytes == new_size
            assert restored.volume.content_source == source
            # A larger restore grows its filesystem (offline, before the first mount:
            # no CAP_SYS_RESOURCE needed for ext4).
            restored.stage()
            restored.publish()
            assert _read_checksum(kind, restored.target, 512 * 1024) == digest
            if kind == "mount" and new_size > size:
                assert _size_seen(kind, restored.target) > _size_seen(kind, vol.target)
        # A restore smaller than the snapshot cannot hold it: the spec's own example
        # of an unsupported capacity_range (OUT_OF_RANGE).
        expect_code(Code.OUT_OF_RANGE, csi.controller.CreateVolume,
                     csi_pb2.CreateVolumeRequest(
                         name=unique("pvc"), volume_capabilities=[vol.cap],
                         capacity_range=csi_pb2.CapacityRange(required_bytes=size // 2,
                                                              limit_bytes=size // 2),
                         volume_content_source=from_snap))
        # The snapshot survives deletion of its source.
        vol.teardown()
        survivor = make_vol(kind, size=size, fs_type=fs_type, source=from_snap)
        survivor.stage()
        survivor.publish()
        assert _read_checksum(kind, survivor.target, 512 * 1024) == digest
    finally:
        for _ in range(REPEAT):
            csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=60)
    expect_code(Code.NOT_FOUND, csi.controller.GetSnapshot,
                csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_list_snapshots_paging(make_vol: Any, unique: Any):
    vol = make_vol("mount")
    csi = vol.csi
    ids = {_snap(csi, vol.id, unique("snap")).snapshot_id for _ in range(3)}
    try:
        seen: list[str] = []
        token = ""
        for _ in range(50):
            resp = csi.controller.ListSnapshots(
                csi_pb2.ListSnapshotsRequest(max_entries=1, starting_token=token), timeout=30)
            assert len(resp.entries) <= 1
            seen += [e.snapshot.snapshot_id for e in resp.entries]
            token = resp.next_token
            if not token:
                break
        assert not token
        assert len(seen) == len(set(seen))
        assert ids <= set(seen)
    finally:
        for snap_id in ids:
            csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id), timeout=60)


# ---------------------------------------------------------------------------
# The kubelet's flow, step by step
# ---------------------------------------------------------------------------


def test_kubelet_like_filesystem_flow(csi: Csi, kubelet: KubeletLayout, unique: Any):
    pv = unique("pvc")
    volume = csi.create(pv, size=SIZE, kind="mount",
                        requirements=csi_pb2.TopologyRequirement(
                            requisite=[topology(csi.node.NodeGetInfo(
                                csi_pb2.NodeGetInfoRequest(), timeout=10).node_id)]))
    vid = volume.volume_id
    staging = kubelet.staging_dir(vid)  # kubelet: MkdirAll + vol_data.json
    pod = "0b8a1c7e-0000-4000-8000-000000000001"
    target = kubelet.target_dir(pod, pv)  # kubelet: parent 0750 + vol_data.json
    cap = mount_cap(fs_type="ext4")
    context = {"csi.storage.k8s.io/pod.name": "web-0",
               "csi.storage.k8s.io/pod.namespace": "default",
               "csi.storage.k8s.io/pod.uid": pod,
               "csi.storage.k8s.io/serviceAccount.name": "default",
               "csi.storage.k8s.io/ephemeral": "false"}
    try:
        assert not os.path.exists(target)
        csi.stage(vid, staging, cap, context=volume.volume_context)
        assert _is_mountpoint(staging)
        csi.publish(vid, staging, target, cap, context={**volume.volume_context, **context})
        assert _is_mountpoint(target)
        Path(target, "hello.txt").write_text("written by the pod\n")
        assert Path(target, "hello.txt").read_text() == "written by the pod\n"
        # The kubelet's own files are untouched.
        assert Path(target).parent.joinpath("vol_data.json").exists()
        assert Path(staging).parent.joinpath("vol_data.json").exists()
        csi.unpublish(vid, target)
        assert not os.path.exists(target)
        assert Path(target).parent.joinpath("vol_data.json").exists()
        csi.unstage(vid, staging)
        assert not _is_mountpoint(staging)
        assert Path(staging).parent.joinpath("vol_data.json").exists()
    finally:
        _teardown(csi, vid, staging, target)


def test_kubelet_like_block_flow(csi: Csi, kubelet: KubeletLayout, unique: Any):
    pv = unique("pvc")
    vid = csi.create(pv, size=SIZE, kind="block").volume_id
    staging = kubelet.block_staging(pv)
    pod = "0b8a1c7e-0000-4000-8000-000000000002"
    target = kubelet.block_target(pv, pod)
    cap = cap_for("block")
    try:
        csi.stage(vid, staging, cap)
        csi.publish(vid, staging, target, cap)
        st = os.stat(target)
        assert stat.S_ISBLK(st.st_mode)
        fd = os.open(target, os.O_RDWR)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == SIZE
            os.pwrite(fd, b"\xa5" * 4096, 0)
            os.fsync(fd)
            assert os.pread(fd, 4096, 0) == b"\xa5" * 4096
        finally:
            os.close(fd)
        csi.unpublish(vid, target)
        assert not os.path.lexists(target), "the device file the driver created must go"
        assert os.path.isdir(os.path.dirname(target))
        csi.unstage(vid, staging)
    finally:
        _teardown(csi, vid, staging, target)



# ---------------------------------------------------------------------------
# Health, concurrency, mount options
# ---------------------------------------------------------------------------


def test_volume_condition_turns_abnormal_when_the_backing_file_goes(
    make_vol: Any, driver: DriverProcess
):
    vol = make_vol("mount")
    vol.stage()
    vol.publish()
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=vol.target)
    assert not vol.csi.node.NodeGetVolumeStats(stats, timeout=30).volume_condition.abnormal
    images = [p for p in driver.state_dir.rglob("*")
              if vol.id in p.name and p.is_file() and p.stat().st_size >= SIZE]
    assert len(images) == 1, f"expected one image file for {vol.id}: {images}"
    images[0].unlink()  # the loop device keeps the inode; the file is gone
    cond = vol.csi.node.NodeGetVolumeStats(stats, timeout=30).volume_condition
    assert cond.abnormal and cond.message
    got = vol.csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.id), timeout=30)
    assert got.status.volume_condition.abnormal
    listed = vol.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
    entry = next(e for e in listed.entries if e.volume.volume_id == vol.id)
    assert entry.status.volume_condition.abnormal
    # The CO can still tear it down, and nothing stays attached.
    loops_before = loops_backed_by(driver.state_dir)
    vol.csi.unpublish(vol.id, vol.target)
    vol.csi.unstage(vol.id, vol.staging)
    vol.csi.delete(vol.id)
    assert len(loops_backed_by(driver.state_dir)) == len(loops_before) - 1


def test_concurrent_creates_of_one_name_make_one_volume(csi: Csi, unique: Any):
    name = unique("pvc")
    before = {e.volume.volume_id for e in csi.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(), timeout=30).entries}
    request = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE, limit_bytes=SIZE))
    futures = [csi.controller.CreateVolume.future(request, timeout=120) for _ in range(64)]
    ids: set[str] = set()
    codes: list[grpc.StatusCode] = []
    for future in futures:
        try:
            ids.add(future.result().volume.volume_id)
            codes.append(Code.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    try:
        assert set(codes) <= {Code.OK, Code.ABORTED}, codes
        assert Code.OK in codes
        assert len(ids) == 1, f"one name made {len(ids)} volumes"
        after = {e.volume.volume_id for e in csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(), timeout=30).entries}
        assert after - before == ids
    finally:
        for vid in ids:
            csi.delete(vid)


def test_mount_flags_pass_through_and_are_checked(make_vol: Any):
    # The kubelet passes the PV's mountOptions in both NodeStage and NodePublish.
    vol = make_vol("mount")
    cap = mount_cap(flags=("noatime",))
    vol.stage(cap)
    vol.publish(cap=cap)
    with open("/proc/self/mountinfo") as handle:
        lines = [line.split() for line in handle]
    options = next(f[5] for f in lines if f[4] == vol.target)
    assert "noatime" in options.split(",")
    vol.csi.unpublish(vol.id, vol.target)
    for bad in ("no-such-option", "journal_path=/dev/sda", "x-mount.mkdir"):
        expect_code(Code.INVALID_ARGUMENT, vol.csi.node.NodePublishVolume,
                    csi_pb2.NodePublishVolumeRequest(
                        volume_id=vol.id, staging_target_path=vol.staging,
                        target_path=vol.target, volume_capability=mount_cap(flags=(bad,))))
        expect_code(Code.INVALID_ARGUMENT, vol.csi.node.NodeStageVolume,
                    csi_pb2.NodeStageVolumeRequest(
                        volume_id=vol.id, staging_target_path=vol.staging + "-other",
                        volume_capability=mount_cap(flags=(bad,))))
        assert not os.path.lexists(vol.target)


@pytest.mark.parametrize("kind", KINDS)
def test_racing_repeats_of_stage_and_publish_mount_once(make_vol: Any, kind: str):
    """After a timeout the kubelet may send the same call again while the first is
    still running: each must end OK (or ABORTED), and nothing is mounted twice."""
    vol = make_vol(kind)
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=vol.staging,
                                           volume_capability=vol.cap)
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.id, staging_target_path=vol.staging, target_path=vol.target,
        volume_capability=vol.cap)
    for call, request in ((vol.csi.node.NodeStageVolume, stage),
                          (vol.csi.node.NodePublishVolume, publish)):
        futures = [call.future(request, timeout=120) for _ in range(16)]
        codes = []
        for future in futures:
            try:
                future.result()
                codes.append(Code.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert set(codes) <= {Code.OK, Code.ABORTED}, codes
        call(request, timeout=120)  # and it settles to OK
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    assert points.count(vol.target) == 1, "the target is mounted more than once"
    if kind == "mount":
        assert points.count(vol.staging) == 1, "the staging path is mounted more than once"


def test_parallel_lifecycles_of_many_volumes(csi: Csi, kubelet: KubeletLayout, unique: Any):
    """8 workers, each running the kubelet's whole sequence on its own volumes."""
    import concurrent.futures

    def worker(index: int) -> str:
        kind = KINDS[index % 2]
        for round_ in range(3):
            name = unique(f"par{index}")
            vid = csi.create(name, size=SIZE, kind=kind).volume_id
            staging, target = kubelet.paths(kind, vid, name, f"pod-par-{index}-{round_}")
            cap = cap_for(kind)
            try:
                csi.stage(vid, staging, cap)
                csi.publish(vid, staging, target, cap)
                digest = _write_and_checksum(kind, target, os.urandom(64 * 1024))
                assert _read_checksum(kind, target, 64 * 1024) == digest
                csi.unpublish(vid, target)
                assert not os.path.lexists(target)
                csi.unstage(vid, staging)
            finally:
                _teardown(csi, vid, staging, target)
            csi.delete(vid)
        return kind

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        kinds = list(pool.map(worker, range(8), timeout=600))
    assert sorted(kinds) == sorted(KINDS * 4)


def test_concurrent_stage_and_unstage_of_different_volumes(make_vol: Any):
    """Loop numbers are recycled at once: one volume's detach and another's attach
    race for the same /dev/loopN.  Neither may mistake the other for a holder."""
    import concurrent.futures

    vols = [make_vol(KINDS[i % 2]) for i in range(8)]

    def cycle(vol: Vol) -> None:
        for _ in range(15):
            vol.stage()
            vol.csi.unstage(vol.id, vol.staging)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(cycle, vol) for vol in vols]:
            future.result(timeout=600)


def test_zz_nothing_is_left_behind(csi: Csi, driver: DriverProcess):
    """Runs last in this module: every test above tore its volumes down through the
    RPCs, so the driver must hold no volume, snapshot, mount, loop device or image."""
    assert list(csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries) == []
    assert list(csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(), timeout=30).entries) == []
    assert mounts_under(driver.kubelet_root, driver.state_dir) == []
    assert loops_backed_by(driver.state_dir) == []
    images = [p for p in driver.state_dir.rglob("*") if p.is_file() and p.stat().st_size >= MiB]
    assert images == []
