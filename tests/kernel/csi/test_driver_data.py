"""Data paths of the real driver over gRPC: real loop devices, mkfs, mounts, bytes.

Each test drives ``python -m csi_driver serve`` on a unix socket with the
kubelet's directory layout and checks what lands on disk: files written through
a published volume, checksums across snapshots/clones/restores, online growth,
a simulated reboot.  The conformance and fault suites (tests/grpc/csi) cover the
error tables; these cover the bytes.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_driver import filesystems, loop, mounts
from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    block_cap,
    cleanup_kernel_objects,
    loops_backed_by,
    mount_cap,
    mounts_under,
    running_driver,
    wait_until,
)

SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB, "btrfs": 128 * MiB, "": 16 * MiB}


def payload(seed: str, size: int = 3 * MiB) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * (MiB // 32)
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_block(device_file: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(device_file, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_block(device_file: str, size: int, offset: int = 0) -> bytes:
    fd = os.open(device_file, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class Volume:
    """One volume walked through the kubelet's calls."""

    def __init__(self, csi: Csi, kubelet: KubeletLayout, kind: str, fs: str, size: int,
                 **create: object) -> None:
        self.csi, self.kind, self.fs = csi, kind, fs
        self.name = f"pvc-{uuid.uuid4()}"
        self.vol = csi.create(self.name, size=size, kind=kind, fs_type=fs, **create)  # type: ignore[arg-type]
        self.id = self.vol.volume_id
        self.cap = mount_cap(fs) if kind == "mount" else block_cap()
        self.staging, self.target = kubelet.paths(kind, self.id, f"pv-{self.name}",
                                                  str(uuid.uuid4()))

    def up(self) -> Volume:
        self.csi.stage(self.id, self.staging, self.cap)
        self.csi.publish(self.id, self.staging, self.target, self.cap)
        return self

    def down(self) -> None:
        self.csi.unpublish(self.id, self.target)
        self.csi.unstage(self.id, self.staging)

    def delete(self) -> None:
        self.csi.delete(self.id)


def assert_clean(driver: DriverProcess) -> None:
    assert mounts_under(driver.kubelet_root) == []
    assert loops_backed_by(driver.state_dir) == []


@pytest.mark.parametrize("fs", ["ext4", "xfs", "btrfs", ""], ids=["ext4", "xfs", "btrfs", "block"])
def test_lifecycle_writes_survive_unpublish_unstage_and_restage(csi, kubelet, driver, fs):
    kind = "block" if fs == "" else "mount"
    v = Volume(csi, kubelet, kind, fs, SIZES[fs])
    assert v.vol.capacity_bytes == SIZES[fs]
    v.up()
    data = payload(v.id)
    if kind == "mount":
        assert os.path.isdir(v.target)
        entry = mounts.find_mount(v.staging)
        assert entry is not None and entry.fs_type == fs
        write_file(os.path.join(v.target, "data"), data)
        usage = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=v.id, volume_path=v.target), timeout=30)
        units = {u.unit: u for u in usage.usage}
        assert units[csi_pb2.VolumeUsage.BYTES].used >= len(data)
        assert units[csi_pb2.VolumeUsage.BYTES].total <= SIZES[fs]
        if fs != "btrfs":  # btrfs allocates inodes dynamically and reports 0
            assert units[csi_pb2.VolumeUsage.INODES].total > 0
        assert not usage.volume_condition.abnormal
    else:
        assert os.path.isfile(v.target) or os.path.exists(v.target)
        assert loop.device_size(v.target) == SIZES[fs]
        write_block(v.target, data, offset=MiB)
    v.down()
    assert not os.path.exists(v.target), "NodeUnpublish must remove the target it created"
    assert_clean(driver)
    v.up()
    if kind == "mount":
        assert sha(read_file(os.path.join(v.target, "data"))) == sha(data)
    else:
        assert sha(read_block(v.target, len(data), offset=MiB)) == sha(data)
    v.down()
    v.delete()
    assert_clean(driver)
    images = list((driver.state_dir / "pools/default/volumes").iterdir())
    assert [p for p in images if v.id in p.name] == []


def test_hard_size_limit_is_the_image_size(csi, kubelet, driver):
    v = Volume(csi, kubelet, "mount", "ext4", 16 * MiB).up()
    try:
        with pytest.raises(OSError) as info:
            write_file(os.path.join(v.target, "big"), b"\0" * (32 * MiB))
        assert info.value.errno == 28  # ENOSPC inside the volume, not in the pool
    finally:
        v.down()
        v.delete()


@pytest.mark.parametrize("fs", ["xfs", "btrfs", "ext4"])
def test_online_expansion_of_a_mounted_filesystem(csi, kubelet, driver, fs):
    # A mounted ext4 grows only with CAP_SYS_RESOURCE, which some sandboxes withhold
    # from root: there the node must refuse clearly and keep the data.
    online = filesystems.can_grow_online(fs)
    v = Volume(csi, kubelet, "mount", fs, SIZES[fs]).up()
    try:
        data = payload(fs)
        write_file(os.path.join(v.target, "before"), data)
        new_size = SIZES[fs] + 256 * MiB  # xfs hides a small last AG from statfs
        resp = csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=v.id, capacity_range=csi_pb2.CapacityRange(required_bytes=new_size)),
            timeout=60)
        assert resp.capacity_bytes == new_size and resp.node_expansion_required
        expand = csi_pb2.NodeExpandVolumeRequest(
            volume_id=v.id, volume_path=v.target, staging_target_path=v.staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
            volume_capability=v.cap)
        if not online:
            with pytest.raises(grpc.RpcError) as refused:
                csi.node.NodeExpandVolume(expand, timeout=120)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "CAP_SYS_RESOURCE" in (refused.value.details() or "")
            assert sha(read_file(os.path.join(v.target, "before"))) == sha(data)
            return
        node = csi.node.NodeExpandVolume(expand, timeout=120)
        assert node.capacity_bytes == new_size
        st = os.statvfs(v.target)
        assert st.f_blocks * st.f_frsize > (SIZES[fs] + new_size) // 2
        assert sha(read_file(os.path.join(v.target, "before"))) == sha(data)
        # Repeating is OK (already large enough).
        again = csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=v.id, capacity_range=csi_pb2.CapacityRange(required_bytes=new_size)),
            timeout=60)
        assert again.capacity_bytes == new_size
    finally:
        v.down()
        v.delete()


def test_expansion_of_an_unstaged_volume_grows_the_fs_at_next_stage(csi, kubelet, driver):
    v = Volume(csi, kubelet, "mount", "xfs", SIZES["xfs"])
    v.up()
    write_file(os.path.join(v.target, "keep"), b"kept")
    v.down()
    new_size = SIZES["xfs"] + 256 * MiB
    resp = csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=v.id, capacity_range=csi_pb2.CapacityRange(required_bytes=new_size)),
        timeout=60)
    assert resp.capacity_bytes == new_size and not resp.node_expansion_required
    v.up()
    try:
        st = os.statvfs(v.target)
        assert st.f_blocks * st.f_frsize > SIZES["xfs"] + 64 * MiB
        assert read_file(os.path.join(v.target, "keep")) == b"kept"
    finally:
        v.down()
        v.delete()


def test_block_expansion_refreshes_the_device(csi, kubelet, driver):
    v = Volume(csi, kubelet, "block", "", 16 * MiB).up()
    try:
        resp = csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=v.id, capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB)),
            timeout=60)
        assert not resp.node_expansion_required
        assert loop.device_size(v.target) == 32 * MiB
    finally:
        v.down()
        v.delete()


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_snapshot_restore_and_clone_keep_the_bytes(csi, kubelet, driver, fs):
    src = Volume(csi, kubelet, "mount", fs, SIZES[fs]).up()
    made: list[Volume] = []
    snap_id = ""
    try:
        data = payload(src.id)
        write_file(os.path.join(src.target, "data"), data)
        # Taken while mounted: the driver freezes the filesystem for the copy.
        snap = csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"snap-{uuid.uuid4()}", source_volume_id=src.id), timeout=120).snapshot
        snap_id = snap.snapshot_id
        assert snap.ready_to_use and snap.size_bytes == SIZES[fs]
        write_file(os.path.join(src.target, "data"), b"changed after the snapshot")

        bigger = SIZES[fs] + 256 * MiB
        restore_source = csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap_id))
        restored = Volume(csi, kubelet, "mount", fs, bigger, source=restore_source)
        made.append(restored)
        assert restored.vol.capacity_bytes == bigger
        assert restored.vol.content_source.snapshot.snapshot_id == snap_id
        restored.up()  # xfs: same UUID as the mounted source -> nouuid
        assert sha(read_file(os.path.join(restored.target, "data"))) == sha(data)
        st = os.statvfs(restored.target)
        assert st.f_blocks * st.f_frsize > SIZES[fs], "restored fs should grow to the new size"

        clone_source = csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=src.id))
        clone = Volume(csi, kubelet, "mount", fs, SIZES[fs], source=clone_source)
        made.append(clone)
        clone.up()
        assert read_file(os.path.join(clone.target, "data")) == b"changed after the snapshot"

        # The snapshot survives its source.
        src.down()
        src.delete()
        got = csi.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap_id),
                                         timeout=30).snapshot
        assert got.source_volume_id == src.id
        again = Volume(csi, kubelet, "mount", fs, SIZES[fs], source=restore_source)
        made.append(again)
        again.up()
        assert sha(read_file(os.path.join(again.target, "data"))) == sha(data)
    finally:
        for v in made:
            v.down()
            v.delete()
        if snap_id:
            csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id),
                                          timeout=60)
        try:
            src.down()
            src.delete()
        except grpc.RpcError:
            pass
    assert_clean(driver)


def test_block_publish_twice_for_multi_writer_and_read_only(csi, kubelet, driver):
    v = Volume(csi, kubelet, "block", "", 16 * MiB)
    cap = block_cap(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER)
    csi.stage(v.id, v.staging, cap)
    second = os.path.join(os.path.dirname(v.target), "second-pod")
    try:
        csi.publish(v.id, v.staging, v.target, cap)
        csi.publish(v.id, v.staging, second, cap, readonly=True)
        write_block(v.target, b"through the first pod")
        assert read_block(second, 21) == b"through the first pod"
        # The second bind is read-only; for a device node that does not stop writes
        # to the device (the container runtime enforces readOnly for block volumes).
        entry = mounts.find_mount(second)
        assert entry is not None and entry.read_only
    finally:
        csi.unpublish(v.id, second)
        csi.unpublish(v.id, v.target)
        csi.unstage(v.id, v.staging)
        v.delete()
    assert not os.path.exists(second) and not os.path.exists(v.target)


def test_volume_mount_group_sets_the_root_group_setgid(csi, kubelet, driver):
    v = Volume(csi, kubelet, "mount", "ext4", 16 * MiB)
    v.cap = mount_cap("ext4", group="4321")
    v.up()
    try:
        st = os.stat(v.target)
        assert st.st_gid == 4321 and st.st_mode & 0o2070 == 0o2070
        csi.unpublish(v.id, v.target)
        csi.publish(v.id, v.staging, v.target, v.cap, readonly=True)
        entry = mounts.find_mount(v.target)
        assert entry is not None and entry.read_only
        assert os.stat(v.target).st_gid == 4321
    finally:
        v.down()
        v.delete()


def test_condition_turns_abnormal_when_the_loop_device_is_detached(csi, kubelet, driver):
    v = Volume(csi, kubelet, "block", "", 16 * MiB).up()
    try:
        device = loops_backed_by(driver.state_dir)
        assert len(device) == 1
        mounts.unmount(v.target)
        loop.detach(device[0])
        resp = csi.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=v.id), timeout=30)
        assert resp.status.volume_condition.abnormal
        assert "detached" in resp.status.volume_condition.message
    finally:
        v.down()
        v.delete()


def test_simulated_reboot_then_stage_brings_the_data_back():
    with running_driver() as driver:
        csi, kubelet = driver.csi(), KubeletLayout(driver.kubelet_root)
        vols = [Volume(csi, kubelet, "mount", "ext4", SIZES["ext4"]).up(),
                Volume(csi, kubelet, "mount", "xfs", SIZES["xfs"]).up(),
                Volume(csi, kubelet, "block", "", SIZES[""]).up()]
        data = {v.id: payload(v.id) for v in vols}
        for v in vols:
            if v.kind == "mount":
                write_file(os.path.join(v.target, "data"), data[v.id])
            else:
                write_block(v.target, data[v.id])
        # "Reboot": the driver dies, every mount and loop device is gone.
        driver.kill9()
        cleaned = cleanup_kernel_objects([driver.kubelet_root], driver.state_dir)
        assert any(c.startswith("loop") for c in cleaned)
        assert_clean(driver)
        driver.start()
        # Reconcile re-attached the staged volumes' loop devices.
        assert len(loops_backed_by(driver.state_dir)) == 3
        csi = driver.csi()
        for v in vols:
            v.csi = csi
            # The kubelet stages again at the same path and publishes for a new pod.
            if v.kind == "mount":
                os.makedirs(v.staging, exist_ok=True)
            v.target = kubelet.paths(v.kind, v.id, f"pv-{v.name}", str(uuid.uuid4()))[1]
            v.up()
            if v.kind == "mount":
                assert sha(read_file(os.path.join(v.target, "data"))) == sha(data[v.id])
            else:
                assert sha(read_block(v.target, len(data[v.id]))) == sha(data[v.id])
        for v in vols:
            v.down()
            v.delete()
        assert_clean(driver)


def test_64_concurrent_creates_with_one_name_make_one_volume():
    with running_driver() as driver:
        csi = driver.csi()
        name = f"pvc-{uuid.uuid4()}"

        def create(_: int) -> str:
            try:
                return str(csi.create(name, size=16 * MiB, kind="block").volume_id)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, err.details()
                return "aborted"

        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(create, range(64)))
        ids = {r for r in results if r != "aborted"}
        assert len(ids) == 1, results
        records = list((driver.state_dir / "volumes").glob("vol-*.json"))
        assert len(records) == 1
        images = [p for p in (driver.state_dir / "pools/default/volumes").iterdir()]
        assert len(images) == 1
        csi.delete(ids.pop())


def test_pools_command_reports_volumes_and_orphans():


    with running_driver() as driver:
        csi = driver.csi()
        vol = csi.create(f"pvc-{uuid.uuid4()}", size=16 * MiB, kind="block")
        stray = driver.state_dir / "pools/default/volumes" / f"vol-{'0' * 32}.img"
        stray.write_bytes(b"")
        data = driver.pools_json()
        assert data["pools"][0]["name"] == "default" and data["pools"][0]["volumes"] == 1
        assert [v["id"] for v in data["volumes"]] == [vol.volume_id]
        assert {"kind": "image-without-record", "pool": "default", "path": str(stray),
                "detail": ""} in data["findings"]
        assert stray.exists(), "orphans are reported, never deleted"
        stray.unlink()
        csi.delete(vol.volume_id)


@pytest.fixture
def loop_disks():
    """Three loop devices made by this test, standing in for disks."""
    base = Path(os.path.realpath(__import__("tempfile").mkdtemp(prefix="csid", dir="/tmp")))
    devices = []
    try:
        for i in range(3):
            image = base / f"disk{i}.img"
            with open(image, "wb") as f:
                f.truncate((400 + 100 * i) * MiB)
            devices.append(loop.attach(str(image), direct_io=False))
        yield base, devices
    finally:
        for dev in devices:
            for entry in mounts.read_mounts():
                if entry.source == dev:
                    mounts.unmount(entry.mount_point)
            loop.detach(dev)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def _disk_config(base: Path, mode: str):
    def make(driver_base: Path) -> dict[str, object]:
        return {"restrict_paths": True, "pools": [
            {"name": "disks", "type": "disk", "mode": mode,
             "selector": {"kernel": "loop*",
                          "attributes": {"loop/backing_file": f"{base}/disk*.img"}}},
            {"name": "default", "type": "image", "path": str(driver_base / "state/pools/d")},
        ]}
    return make


def test_disk_pool_from_loop_devices_found_through_udev(loop_disks):
    base, devices = loop_disks
    with running_driver(config=_disk_config(base, "volume")) as driver:
        csi, kubelet = driver.csi(), KubeletLayout(driver.kubelet_root)
        cap = csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters={"pool": "disks"}), timeout=30)
        assert cap.available_capacity == (400 + 500 + 600) * MiB
        assert cap.maximum_volume_size.value == 600 * MiB
        report = driver.pools_json()
        disks_pool = next(p for p in report["pools"] if p["name"] == "disks")
        assert sorted(d["device"] for d in disks_pool["disks"]) == sorted(devices)
        assert {d["state"] for d in disks_pool["disks"]} == {"free"}
        v = Volume(csi, kubelet, "mount", "ext4", 450 * MiB, params={"pool": "disks"}).up()
        write_file(os.path.join(v.target, "f"), b"on a whole disk")
        entry = mounts.find_mount(v.staging)
        assert entry is not None and entry.source == devices[1], "smallest disk that fits"
        v.down()
        # After a restart the formatted disk is recognised as the volume's, not refused.
        driver.stop()
        driver.start()
        v.csi = csi = driver.csi()
        v.up()
        assert read_file(os.path.join(v.target, "f")) == b"on a whole disk"
        v.down()
        v.delete()
        assert filesystems.probe_filesystem(devices[1]) is None, "delete wipes the disk"
        with pytest.raises(grpc.RpcError) as info:
            Volume(csi, kubelet, "block", "", 700 * MiB, params={"pool": "disks"})
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_disk_pool_backing_mode_formats_mounts_and_survives_a_reboot(loop_disks):
    base, devices = loop_disks
    with running_driver(config=_disk_config(base, "backing")) as driver:
        csi, kubelet = driver.csi(), KubeletLayout(driver.kubelet_root)
        for dev in devices:
            assert filesystems.probe_filesystem(dev) == "xfs"
        disk_mounts = [e.mount_point for e in mounts.read_mounts() if e.source in devices]
        assert len(disk_mounts) == 3
        assert all(m.startswith(str(driver.state_dir / "disks") + "/") for m in disk_mounts)
        v = Volume(csi, kubelet, "mount", "ext4", 64 * MiB, params={"pool": "disks"}).up()
        data = payload("x")
        write_file(os.path.join(v.target, "f"), data)
        snap = csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"s-{uuid.uuid4()}", source_volume_id=v.id), timeout=120).snapshot
        import json

        vol_image = json.loads((driver.state_dir / f"volumes/{v.id}.json").read_text())["backing"]
        snap_image = json.loads(
            (driver.state_dir / f"snapshots/{snap.snapshot_id}.json").read_text())["backing"]
        assert Path(vol_image).parents[1] == Path(snap_image).parents[1], "same disk: a reflink"
        # Reboot: the driver dies, every mount (volume and disk) and loop of the volume goes.
        driver.kill9()
        cleanup_kernel_objects([driver.kubelet_root], driver.state_dir)
        for point in disk_mounts:
            mounts.unmount(point)
        driver.start()
        # The disks carry our label: they are mounted again, not refused as "in use".
        assert len([e for e in mounts.read_mounts() if e.source in devices]) == 3
        csi = driver.csi()
        v.csi = csi
        os.makedirs(v.staging, exist_ok=True)
        v.up()
        assert sha(read_file(os.path.join(v.target, "f"))) == sha(data)
        v.down()
        v.delete()
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=snap.snapshot_id), timeout=60)
        driver.stop()
        # The pool's own disk mounts stay until the operator removes the pool.
        for entry in mounts.read_mounts():
            if entry.source in devices:
                mounts.unmount(entry.mount_point)


def _wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> bool:
    return wait_until(predicate, timeout)


def test_disks_that_appear_later_join_and_vanished_disks_turn_volumes_abnormal(loop_disks):
    base, devices = loop_disks
    with running_driver(config=_disk_config(base, "volume")) as driver:
        csi = driver.csi()

        def available() -> int:
            return int(csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(
                parameters={"pool": "disks"}), timeout=30).available_capacity)

        # Probe said ready only after the pool handled its first enumeration, so all
        # three disks are in already; if one is not, the driver log says why (the
        # pool logs every refusal with its reason).
        first = available()
        assert first == 1500 * MiB, f"{first / MiB:g} MiB available:\n{driver.log_tail()}"
        late = base / "disk3.img"
        with open(late, "wb") as f:
            f.truncate(300 * MiB)
        devices.append(loop.attach(str(late), direct_io=False))  # the fixture detaches it
        assert _wait_for(lambda: available() == 1800 * MiB), driver.log_tail()

        vol = csi.create(f"pvc-{uuid.uuid4()}", size=300 * MiB, kind="block",
                         params={"pool": "disks"})
        assert _wait_for(lambda: available() == 1500 * MiB), available()
        loop.detach(devices.pop())

        def abnormal() -> bool:
            resp = csi.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
                volume_id=vol.volume_id), timeout=30)
            return bool(resp.status.volume_condition.abnormal)

        assert _wait_for(abnormal)
        csi.delete(vol.volume_id)


def test_a_failed_first_stage_leaves_no_loop_device_or_mount(csi, kubelet, driver):
    v = Volume(csi, kubelet, "mount", "ext4", 16 * MiB)
    bad = mount_cap("ext4", flags=("nouuid",))  # allowed (xfs), but ext4 refuses it
    with pytest.raises(grpc.RpcError) as info:
        csi.stage(v.id, v.staging, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nouuid" in str(info.value.details())
    assert_clean(driver)
    v.up()  # and the volume still stages normally
    v.down()
    v.delete()
    assert_clean(driver)


def test_reader_only_stage_with_a_mount_group_mounts_read_only(csi, kubelet, driver):
    v = Volume(csi, kubelet, "mount", "ext4", 16 * MiB)
    v.cap = mount_cap("ext4", mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
                      group="4321")
    v.up()
    try:
        entry = mounts.find_mount(v.staging)
        assert entry is not None and entry.read_only
        with pytest.raises(OSError):
            write_file(os.path.join(v.target, "x"), b"no")
    finally:
        v.down()
        v.delete()
