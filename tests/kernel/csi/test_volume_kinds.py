"""The subvolume kind through the whole driver: what differs from image volumes.

A driver whose one pool is a subvolume pool on a btrfs made for the module
(``running_driver(pool_kind="subvolume")``).  Checks the rules the pool kind
decides: raw block and other fs types refused naming the pool and its kind,
expansion without a node step, the limit enforced and raised, stats from the
qgroup, no-CoW volumes, thick capacity, reconcile findings without deletion,
VolumeCondition of a missing subvolume, and ``csi-driver pools``.  The btrfs
ioctl layer itself is covered by its own kernel tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import btrfs
from csi_driver._proto import csi_pb2
from csi_driver.config import parse_config
from csi_driver.pools.subvolume import SubvolumePool
from tests.grpc.csi.driver_harness import (
    SUBVOLUME_POOL,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    block_cap,
    expect_code,
    mount_cap,
    running_driver,
)

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def subvol_driver() -> Iterator[DriverProcess]:
    with running_driver(node_id="node-subvol", pool_kind="subvolume") as driver:
        yield driver


@pytest.fixture
def scsi(subvol_driver: DriverProcess) -> Csi:
    return subvol_driver.csi()


def _pool_path(driver: DriverProcess) -> Path:
    assert driver.config is not None
    return Path(driver.config["pools"][0]["path"])


def _published(driver: DriverProcess, csi: Csi, name: str, size: int) -> tuple[str, str, str]:
    vid = csi.create(name, size=size).volume_id
    kubelet = KubeletLayout(driver.kubelet_root)
    staging = kubelet.staging_dir(vid)
    target = kubelet.target_dir(f"pod-{name}", name)
    csi.stage(vid, staging, mount_cap())
    csi.publish(vid, staging, target, mount_cap())
    return vid, staging, target


def _fill(path: str, size: int) -> int:
    """Write up to ``size`` bytes (fsync'd); the bytes written before EDQUOT."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        chunk = b"\xa5" * (256 * 1024)
        while written < size:
            try:
                written += os.write(fd, chunk[: size - written])
                os.fsync(fd)
            except OSError as exc:
                assert exc.errno == errno.EDQUOT, exc
                return written
    finally:
        os.close(fd)
    return written


def _stats(csi: Csi, vid: str, path: str) -> dict[int, csi_pb2.VolumeUsage]:
    resp = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path), timeout=30)
    assert not resp.volume_condition.abnormal, resp.volume_condition.message
    return {u.unit: u for u in resp.usage}


def _teardown(csi: Csi, vid: str, staging: str, target: str) -> None:
    csi.unpublish(vid, target)
    csi.unstage(vid, staging)
    csi.delete(vid)


def test_pools_shows_the_quota_mode(subvol_driver: DriverProcess):
    (pool,) = subvol_driver.pools_json()["pools"]
    assert pool["type"] == "subvolume" and pool["ready"]
    expected = "squota" if btrfs.simple_quotas_supported() else "qgroup"
    assert pool["quota_mode"] == expected, pool
    assert pool["quota_reason"], pool


def test_raw_block_and_foreign_fs_types_are_refused(scsi: Csi):
    message = expect_code(Code.INVALID_ARGUMENT, scsi.controller.CreateVolume,
                          csi_pb2.CreateVolumeRequest(name="pvc-kind-blk",
                                                      volume_capabilities=[block_cap()]))
    assert SUBVOLUME_POOL in message and "subvolume" in message, message
    message = expect_code(Code.INVALID_ARGUMENT, scsi.controller.CreateVolume,
                          csi_pb2.CreateVolumeRequest(
                              name="pvc-kind-ext4",
                              volume_capabilities=[mount_cap(fs_type="ext4")]))
    assert "ext4" in message and SUBVOLUME_POOL in message, message
    message = expect_code(Code.INVALID_ARGUMENT, scsi.controller.CreateVolume,
                          csi_pb2.CreateVolumeRequest(
                              name="pvc-kind-nocow", parameters={"nocow": "maybe"},
                              volume_capabilities=[mount_cap()]))
    assert "nocow" in message, message


def test_limit_is_enforced_and_raised_without_a_node_step(
    subvol_driver: DriverProcess, scsi: Csi
):
    vid, staging, target = _published(subvol_driver, scsi, "pvc-kind-limit", 16 * MiB)
    try:
        # Other volumes of the pool are not affected by this one being full.
        other = scsi.create("pvc-kind-other", size=16 * MiB).volume_id
        data = os.path.join(target, "data")
        written = _fill(data, 32 * MiB)
        assert 8 * MiB < written < 16 * MiB, written
        by = _stats(scsi, vid, target)[csi_pb2.VolumeUsage.BYTES]
        assert by.total == 16 * MiB and by.used >= written
        grown = scsi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB)),
            timeout=30)
        assert grown.capacity_bytes == 48 * MiB and not grown.node_expansion_required
        # The same writer continues at once: no NodeExpandVolume needed.
        assert _fill(data, 16 * MiB) == 16 * MiB
        assert _stats(scsi, vid, target)[csi_pb2.VolumeUsage.BYTES].total == 48 * MiB
        node = scsi.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target), timeout=30)
        assert node.capacity_bytes == 48 * MiB
        scsi.delete(other)
    finally:
        _teardown(scsi, vid, staging, target)


def test_read_only_stage_and_fs_group(subvol_driver: DriverProcess, scsi: Csi):
    vid = scsi.create("pvc-kind-ro", size=8 * MiB).volume_id
    kubelet = KubeletLayout(subvol_driver.kubelet_root)
    staging = kubelet.staging_dir(vid)
    target = kubelet.target_dir("pod-kind-ro", "pvc-kind-ro")
    writer = mount_cap(group="4321")
    scsi.stage(vid, staging, writer)
    scsi.publish(vid, staging, target, writer)
    try:
        st = os.stat(target)
        assert st.st_gid == 4321 and st.st_mode & 0o2070 == 0o2070
        Path(target, "kept").write_text("x")
        scsi.unpublish(vid, target)
        scsi.publish(vid, staging, target, writer, readonly=True)
        with pytest.raises(OSError) as info:
            Path(target, "new").write_text("x")
        assert info.value.errno == errno.EROFS
        assert Path(target, "kept").read_text() == "x"
    finally:
        _teardown(scsi, vid, staging, target)


def test_snapshot_survives_its_source_and_restores_get_their_own_limit(
    subvol_driver: DriverProcess, scsi: Csi
):
    vid, staging, target = _published(subvol_driver, scsi, "pvc-kind-src", 16 * MiB)
    payload = os.urandom(4 * MiB)
    Path(target, "data").write_bytes(payload)
    snap = scsi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=vid, name="snap-kind"), timeout=30).snapshot
    assert snap.ready_to_use and snap.size_bytes == 16 * MiB
    snap_path = _pool_path(subvol_driver) / "snapshots" / snap.snapshot_id
    assert btrfs.is_read_only(str(snap_path))
    Path(target, "data").write_bytes(b"changed after the snapshot")
    _teardown(scsi, vid, staging, target)  # the source goes; the snapshot stays
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    restored = scsi.create("pvc-kind-restored", size=32 * MiB, source=source).volume_id
    kubelet = KubeletLayout(subvol_driver.kubelet_root)
    staging = kubelet.staging_dir(restored)
    target = kubelet.target_dir("pod-kind-restored", "pvc-kind-restored")
    scsi.stage(restored, staging, mount_cap())
    scsi.publish(restored, staging, target, mount_cap())
    try:
        assert Path(target, "data").read_bytes() == payload
        Path(target, "more").write_bytes(b"writable")  # a writable snapshot of it
        assert _stats(scsi, restored, target)[csi_pb2.VolumeUsage.BYTES].total == 32 * MiB
    finally:
        _teardown(scsi, restored, staging, target)
        scsi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=30)
    assert not snap_path.exists()


def test_nocow_volumes(subvol_driver: DriverProcess, scsi: Csi):
    vid = scsi.create("pvc-kind-nocow", size=8 * MiB, params={"nocow": "true"}).volume_id
    plain = scsi.create("pvc-kind-cow", size=8 * MiB).volume_id
    try:
        volumes = _pool_path(subvol_driver) / "volumes"
        assert btrfs.has_nocow(str(volumes / vid))
        assert not btrfs.has_nocow(str(volumes / plain))
    finally:
        scsi.delete(vid)
        scsi.delete(plain)


def test_thick_volumes_keep_their_unused_limit_counted(scsi: Csi):
    def available() -> int:
        resp = scsi.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(parameters={"thin": "false"}), timeout=30)
        return int(resp.available_capacity)

    before = available()
    vid = scsi.create("pvc-kind-thick", size=64 * MiB, params={"thin": "false"}).volume_id
    try:
        assert before - available() >= 60 * MiB
    finally:
        scsi.delete(vid)
    assert abs(available() - before) < 8 * MiB


def test_reconcile_reports_drift_and_deletes_nothing(
    subvol_driver: DriverProcess, scsi: Csi
):
    volumes = _pool_path(subvol_driver) / "volumes"
    stray = btrfs.create_subvolume(str(volumes), "stray-subvolume")
    vid = scsi.create("pvc-kind-gone", size=8 * MiB).volume_id
    try:
        btrfs.delete_subvolume(str(volumes / vid))
        got = scsi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vid), timeout=30)
        condition = got.status.volume_condition
        assert condition.abnormal and "missing" in condition.message, condition
        kinds = {(f["kind"], os.path.basename(f["path"]))
                 for f in subvol_driver.pools_json()["findings"]}
        assert ("subvolume-without-record", "stray-subvolume") in kinds
        assert ("record-without-subvolume", vid) in kinds
        assert btrfs.is_subvolume(stray.path), "reconcile deleted a subvolume"
    finally:
        scsi.delete(vid)
        btrfs.delete_subvolume(stray.path)


def test_a_path_that_is_not_btrfs_is_refused(tmp_path: Path):
    config = parse_config({"pools": [{"name": "nob", "type": "subvolume",
                                      "path": str(tmp_path / "pool")}]}, str(tmp_path))
    pool = SubvolumePool(config.pools[0])
    with pytest.raises(btrfs.NotBtrfs) as info:
        pool.start()
    message = str(info.value)
    assert "not btrfs" in message and "mkfs.btrfs" in message, message
    assert not pool.ready
    assert pool.describe()["problem"] == message
