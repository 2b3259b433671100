"""The subvolume kind through the whole driver: what differs from image volumes.

A driver whose one pool is a subvolume pool on a btrfs made for the module
(``running_driver(pool_kind="subvolume")``).  Checks the rules the pool kind
decides: raw block and other fs types refused naming the pool and its kind,
expansion without a node step, the limit enforced and raised, stats from the
qgroup, no-CoW volumes, thick capacity, reconcile findings without deletion,
VolumeCondition of a missing subvolume, and ``csi-driver pools``; and a disk
pool in backing mode whose volumes are subvolumes on its btrfs disks.  The btrfs
ioctl layer itself is covered by its own kernel tests.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import btrfs, filesystems, loop, mounts
from csi_driver._proto import csi_pb2
from csi_driver.config import parse_config
from csi_driver.pools.subvolume import SubvolumePool
from plugin_runtime.errors import FailedPrecondition
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
    wait_until,
)

Code = grpc.StatusCode


# Every rule holds in both quota modes: auto (simple quotas on kernels that have them)
# and full qgroups.
@pytest.fixture(scope="module", params=["auto", "full"])
def subvol_driver(request: pytest.FixtureRequest) -> Iterator[DriverProcess]:
    with running_driver(node_id="node-subvol", pool_kind="subvolume",
                        pool_options={"quota_mode": request.param}) as driver:
        yield driver


@pytest.fixture
def scsi(subvol_driver: DriverProcess) -> Csi:
    return subvol_driver.csi()


def driver_quota_mode(driver: DriverProcess) -> str:
    assert driver.config is not None
    return str(driver.config["pools"][0]["quota_mode"])


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
    assert driver_quota_mode(subvol_driver) in ("auto", "full")
    simple = driver_quota_mode(subvol_driver) == "auto" and btrfs.simple_quotas_supported()
    assert pool["quota_mode"] == ("squota" if simple else "qgroup"), pool
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


def test_quotas_turned_off_are_abnormal_and_limits_come_back_at_start(
    subvol_driver: DriverProcess, scsi: Csi
):
    pool = str(_pool_path(subvol_driver))
    vid = scsi.create("pvc-kind-quota", size=8 * MiB).volume_id
    try:
        btrfs.disable_quotas(pool)  # an operator's mistake: every limit is gone
        got = scsi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vid), timeout=30)
        condition = got.status.volume_condition
        assert condition.abnormal and "quotas are off" in condition.message, condition
        subvol_driver.stop()
        subvol_driver.start()
        assert btrfs.quota_status(pool).enabled
        subvolume = btrfs.subvolume_id(os.path.join(pool, "volumes", vid))
        assert btrfs.qgroup_usage(pool, subvolume).max_referenced == 8 * MiB
        got = subvol_driver.csi().controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vid), timeout=30)
        assert not got.status.volume_condition.abnormal, got.status.volume_condition
    finally:
        subvol_driver.csi().delete(vid)


def test_a_lost_record_comes_back_with_its_limit_after_quotas_were_turned_off(
    subvol_driver: DriverProcess, scsi: Csi
):
    """The record of a volume is lost and its limit with it (quotas turned off while the
    driver was down): at start the record comes back from the subvolume, and so does
    the limit."""
    pool = str(_pool_path(subvol_driver))
    vid = scsi.create("pvc-kind-carried", size=8 * MiB).volume_id
    try:
        subvol_driver.stop()
        (subvol_driver.state_dir / "volumes" / f"{vid}.json").unlink()
        btrfs.disable_quotas(pool)
        subvol_driver.start()
        subvolume = btrfs.subvolume_id(os.path.join(pool, "volumes", vid))
        assert btrfs.qgroup_usage(pool, subvolume).max_referenced == 8 * MiB
        again = subvol_driver.csi().create("pvc-kind-carried", size=8 * MiB)
        assert (again.volume_id, again.capacity_bytes) == (vid, 8 * MiB)
    finally:
        subvol_driver.csi().delete(vid)


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


@pytest.fixture
def btrfs_disk() -> Iterator[tuple[Path, str]]:
    """One loop device made by this test, standing in for a disk of a disk pool."""
    base = Path(os.path.realpath(tempfile.mkdtemp(prefix="csik", dir="/tmp")))
    image = base / "disk0.img"
    with open(image, "wb") as handle:
        handle.truncate(512 * MiB)
    device = loop.attach(str(image), direct_io=False)
    try:
        yield base, device
    finally:
        for entry in mounts.read_mounts():
            if entry.source == device:
                mounts.unmount(entry.mount_point)
        assert wait_until(lambda: _detached(device), 30.0), f"{device} stays busy"
        shutil.rmtree(base, ignore_errors=True)


def _detached(device: str) -> bool:
    try:
        loop.detach(device)
    except FailedPrecondition:
        return False
    return True


def test_disk_pool_backing_mode_with_subvolume_volumes(btrfs_disk: tuple[Path, str]):
    base, device = btrfs_disk

    def config(driver_base: Path) -> dict[str, object]:
        return {"pools": [{
            "name": "disks", "type": "disk", "mode": "backing", "backing_fs_type": "btrfs",
            "volume_kind": "subvolume",
            "selector": {"kernel": "loop*",
                         "attributes": {"loop/backing_file": f"{base}/disk*.img"}}}]}

    with running_driver(node_id="node-disk-subvol", config=config) as driver:
        csi = driver.csi()
        assert filesystems.probe_filesystem(device) == "btrfs"
        (pool,) = driver.pools_json()["pools"]
        assert pool["volume_kind"] == "subvolume" and pool["quota_mode"] in ("squota", "qgroup")
        message = expect_code(Code.INVALID_ARGUMENT, csi.controller.CreateVolume,
                              csi_pb2.CreateVolumeRequest(name="pvc-disk-blk",
                                                          volume_capabilities=[block_cap()]))
        assert "disks" in message and "subvolume" in message, message
        vid, staging, target = _published(driver, csi, "pvc-disk-subvol", 16 * MiB)
        disk_mount = next(e.mount_point for e in mounts.read_mounts() if e.source == device)
        assert btrfs.is_subvolume(os.path.join(disk_mount, "volumes", vid))
        assert 8 * MiB < _fill(os.path.join(target, "data"), 32 * MiB) < 16 * MiB
        snap = csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id=vid, name="snap-disk-subvol"), timeout=30).snapshot
        assert btrfs.is_subvolume(os.path.join(disk_mount, "snapshots", snap.snapshot_id))
        grown = csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB)),
            timeout=30)
        assert not grown.node_expansion_required
        assert _fill(os.path.join(target, "more"), 16 * MiB) == 16 * MiB
        _teardown(csi, vid, staging, target)
        csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=30)
        assert os.listdir(os.path.join(disk_mount, "volumes")) == []
        assert os.listdir(os.path.join(disk_mount, "snapshots")) == []


def test_a_subvolume_deleted_behind_the_drivers_back_can_still_be_unstaged(
    subvol_driver: DriverProcess, scsi: Csi
):
    vid, staging, target = _published(subvol_driver, scsi, "pvc-kind-yanked", 8 * MiB)
    subvolume = _pool_path(subvol_driver) / "volumes" / vid
    btrfs.delete_subvolume(str(subvolume), check_mounts=False)  # the kernel allows it
    condition = scsi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=target), timeout=30).volume_condition
    assert condition.abnormal and "missing" in condition.message, condition
    scsi.unpublish(vid, target)
    scsi.unstage(vid, staging)
    assert not mounts.is_mountpoint(staging) and not os.path.lexists(target)
    scsi.delete(vid)
