"""Safety promises of the node side, on real loop devices, filesystems and mounts (root).

- A disk pool never takes a loop device backed by one of the driver's own
  images (an image pool's volume, any image under the state dir) nor the disk
  that holds the state dir: formatting it would destroy a volume.  Checked on
  the pools ``build_pools`` makes from a config (where a disk pool learns the
  image pools' directories) and end to end through the running driver.
- NodeExpandVolume alone (node-only deployment, no ControllerExpandVolume)
  grows image, loop device and filesystem.
- NodeUnpublishVolume never deletes a target recursively.
- A staged xfs that shut itself down is reported abnormal through the RPCs.
- Loop devices are attached with direct I/O as the pool config says.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import disks, filesystems, loop, mounts
from csi_driver._proto import csi_pb2
from csi_driver.config import DriverConfig, PoolConfig, SelectorConfig
from csi_driver.pools import build_pools
from csi_driver.pools.disk import DiskPool
from plugin_runtime import commands
from tests.grpc.csi.driver_harness import (
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    block_cap,
    expect_code,
    loops_backed_by,
    mount_cap,
    running_driver,
    wait_until,
)

from .conftest import Scratch

WAIT = 20.0


def _wait_for(predicate: Callable[[], object], timeout: float = WAIT) -> bool:
    return wait_until(predicate, timeout)


def _payload(seed: str, size: int = 1 * MiB) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _sysfs_loop(device: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(device)}/loop/{name}").read_text().strip()


class _Volume:
    """One volume of the driver under test, walked through the kubelet's calls."""

    def __init__(self, csi: Csi, kubelet: KubeletLayout, kind: str, fs: str, size: int,
                 params: dict[str, str] | None = None) -> None:
        self.csi = csi
        self.name = f"pvc-{uuid.uuid4()}"
        self.vol = csi.create(self.name, size=size, kind=kind, fs_type=fs, params=params)
        self.id: str = self.vol.volume_id
        self.cap = mount_cap(fs) if kind == "mount" else block_cap()
        self.staging, self.target = kubelet.paths(kind, self.id, f"pv-{self.name}",
                                                  str(uuid.uuid4()))

    def up(self) -> _Volume:
        self.csi.stage(self.id, self.staging, self.cap)
        self.csi.publish(self.id, self.staging, self.target, self.cap)
        return self

    def down_and_delete(self) -> None:
        self.csi.unpublish(self.id, self.target)
        self.csi.unstage(self.id, self.staging)
        self.csi.delete(self.id)

    def device(self, driver: DriverProcess) -> str:
        """The loop device of this volume's image (the one image in the pool's dir)."""
        found = [d for d in loops_backed_by(driver.state_dir)
                 if self.id in _sysfs_loop(d, "backing_file")]
        assert len(found) == 1, found
        return found[0]


# ---------------------------------------------------------------------------
# The disk pool never takes the driver's own images
# ---------------------------------------------------------------------------


def _selector(scratch_root: str) -> SelectorConfig:
    # Only loop devices backed by this test's own files: other helpers' never match.
    return SelectorConfig(kernel="loop*", attributes={"loop/backing_file": f"{scratch_root}/*"})


def _pools_from_config(scratch: Scratch, state_dir: str, images: str) -> DiskPool:
    """The disk pool ``build_pools`` makes beside an image pool outside the state dir."""
    config = DriverConfig(pools=(
        PoolConfig(name="img", type="image", path=images),
        PoolConfig(name="disks", type="disk", mode="volume", selector=_selector(scratch.root)),
    ))
    pools = build_pools(config, state_dir)
    (disk_pool,) = [p for p in pools if isinstance(p, DiskPool)]
    return disk_pool


def _refusal(pool: DiskPool, device: str) -> str:
    """The reason ``pool`` gives for refusing ``device`` (asserts it is refused)."""
    pool.inspect()  # one discovery pass, no watcher, nothing claimed or formatted
    lines = pool.describe()["disks"]
    assert isinstance(lines, list)
    assert device not in {d.get("device") for d in lines}, f"{device} was accepted: {lines}"
    ids = {d.disk_id for d in disks.find_disks(pool.selector) if d.devnode == device}
    reasons = [str(d["reason"]) for d in lines if d["state"] == "refused" and d["id"] in ids]
    assert len(reasons) == 1, f"{device} not refused: {lines}"
    return reasons[0]


def test_disk_pool_refuses_loop_devices_backed_by_the_drivers_own_images(scratch: Scratch):
    state_dir = scratch.directory("state")
    images = scratch.directory("images")  # an image pool outside the state dir
    own_volume = os.path.join(scratch.directory("images/volumes"), "vol-raw.img")
    under_state = os.path.join(scratch.directory("state/pools/default/volumes"), "vol-raw.img")
    for path in (own_volume, under_state):
        with open(path, "xb") as handle:
            handle.truncate(16 * MiB)
    volume_loop = scratch.attach(own_volume)
    state_loop = scratch.attach(under_state)
    free_loop = scratch.attach(scratch.image("spare-disk.img", 16 * MiB))

    pool = _pools_from_config(scratch, state_dir, images)
    reason = _refusal(pool, volume_loop)
    assert own_volume in reason and "own" in reason, reason
    reason = _refusal(pool, state_loop)
    assert under_state in reason and "own" in reason, reason
    # The selector matches all three: a spare disk that is no image of ours is taken.
    pool.inspect()
    lines = pool.describe()["disks"]
    assert isinstance(lines, list)
    assert [(d["device"], d["state"]) for d in lines if "device" in d] == [(free_loop, "free")]


def test_disk_pool_refuses_the_disk_that_holds_the_state_dir(scratch: Scratch):
    # The state dir lives on a filesystem on this test's loop device, which the
    # selector matches: the pool must not take it (it is mounted and holds the state).
    holder = scratch.attach(scratch.image("holder.img", 64 * MiB))
    filesystems.make_filesystem(holder, "ext4")
    mounted = scratch.mount(holder, "holder", "ext4")
    state_dir = os.path.join(mounted, "state")
    os.mkdir(state_dir)
    pool = _pools_from_config(scratch, state_dir, scratch.directory("images"))
    reason = _refusal(pool, holder)
    assert holder in reason and mounted in reason, reason


def _image_and_disk_pools(base: Path) -> dict[str, object]:
    # The disk pool's selector matches every loop device backed by a file under the
    # test's base, the driver's own images included: only the safety check keeps them out.
    return {"pools": [
        {"name": "default", "type": "image", "path": str(base / "state/pools/default")},
        {"name": "disks", "type": "disk", "mode": "volume",
         "selector": {"kernel": "loop*", "attributes": {"loop/backing_file": f"{base}/*"}}},
    ]}


def test_running_driver_never_gives_an_image_volume_as_a_disk():
    with running_driver(config=_image_and_disk_pools) as driver:
        csi, kubelet = driver.csi(), KubeletLayout(driver.kubelet_root)
        raw = _Volume(csi, kubelet, "block", "", 128 * MiB).up()
        data = _payload(raw.id)
        with open(raw.target, "r+b") as device_file:
            device_file.write(data)
            device_file.flush()
            os.fsync(device_file.fileno())
        image_loop = raw.device(driver)
        spare = driver.base / "spare-disk.img"
        with open(spare, "xb") as handle:
            handle.truncate(64 * MiB)
        # Attached after the image's loop device: once the pool has seen the spare (the
        # watcher re-enumerates on each uevent), it has looked at the image's loop too.
        spare_loop = loop.attach(str(spare), direct_io=False)
        try:
            def disk_capacity() -> int:
                cap = csi.controller.GetCapacity(
                    csi_pb2.GetCapacityRequest(parameters={"pool": "disks"}), timeout=30)
                return int(cap.available_capacity)

            assert _wait_for(lambda: disk_capacity() >= 64 * MiB), disk_capacity()
            assert disk_capacity() == 64 * MiB, "the image's loop device counted as a disk"
            # A disk volume that only the image's loop device could hold is refused...
            request = csi_pb2.CreateVolumeRequest(
                name=f"pvc-{uuid.uuid4()}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=100 * MiB),
                volume_capabilities=[block_cap()], parameters={"pool": "disks"})
            expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume,
                        request)
            # ... the operator is told why ...
            report = driver.pools_json()
            disk_pool = next(p for p in report["pools"] if p["name"] == "disks")
            refused = [d for d in disk_pool["disks"] if d["state"] == "refused"]
            assert len(refused) == 1, disk_pool
            assert image_loop in refused[0]["reason"]
            assert _image_of(driver, raw.id) in refused[0]["reason"]
            # ... and the volume's bytes are untouched.
            with open(raw.target, "rb") as reader:
                assert reader.read(len(data)) == data
        finally:
            loop.detach(spare_loop)
        raw.down_and_delete()


def _image_of(driver: DriverProcess, volume_id: str) -> str:
    return str(driver.state_dir / "pools/default/volumes" / f"{volume_id}.img")


# ---------------------------------------------------------------------------
# NodeExpandVolume alone, recursive deletes, shut-down xfs, direct I/O
# ---------------------------------------------------------------------------


XFS_SIZE = 320 * MiB


def test_node_expand_alone_grows_image_loop_device_and_filesystem(csi, kubelet, driver):
    # A node-only deployment: no external-resizer, so no ControllerExpandVolume.
    v = _Volume(csi, kubelet, "mount", "xfs", XFS_SIZE).up()
    try:
        with open(os.path.join(v.target, "keep"), "wb") as handle:
            handle.write(b"kept")
        device = v.device(driver)
        before = os.statvfs(v.target)
        new_size = XFS_SIZE + 256 * MiB
        resp = csi.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=v.id, volume_path=v.target, staging_target_path=v.staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
            volume_capability=v.cap), timeout=120)
        assert resp.capacity_bytes == new_size
        assert os.stat(_image_of(driver, v.id)).st_size == new_size
        assert loop.device_size(device) == new_size
        after = os.statvfs(v.target)
        grown = (after.f_blocks - before.f_blocks) * after.f_frsize
        assert grown > 200 * MiB, f"filesystem grew by {grown} bytes only"
        got = csi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=v.id), timeout=30)
        assert got.volume.capacity_bytes == new_size
        with open(os.path.join(v.target, "keep"), "rb") as handle:
            assert handle.read() == b"kept"
    finally:
        v.down_and_delete()


def test_unpublish_never_deletes_a_target_recursively(csi, kubelet, driver):
    v = _Volume(csi, kubelet, "mount", "ext4", 32 * MiB).up()
    try:
        # Someone unmounted the target behind the driver's back and left a file in the
        # bare directory: that file is not the volume's, and it must survive.
        mounts.unmount(v.target)
        stray = os.path.join(v.target, "not-the-volumes")
        with open(stray, "wb") as handle:
            handle.write(b"someone else's")
        csi.unpublish(v.id, v.target)  # OK: the volume is no longer published there
        with open(stray, "rb") as handle:
            assert handle.read() == b"someone else's"
        # Repeating is idempotent and still removes nothing.
        csi.unpublish(v.id, v.target)
        assert os.path.exists(stray)
        os.unlink(stray)
        csi.unpublish(v.id, v.target)
        assert not os.path.exists(v.target), "an empty target directory is removed"
    finally:
        if os.path.exists(v.target) and not mounts.is_mountpoint(v.target):
            for entry in os.listdir(v.target):
                os.unlink(os.path.join(v.target, entry))
        v.down_and_delete()


def test_a_shut_down_xfs_is_reported_abnormal_and_still_cleans_up(csi, kubelet, driver):
    v = _Volume(csi, kubelet, "mount", "xfs", XFS_SIZE).up()
    try:
        stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=v.id, volume_path=v.target, staging_target_path=v.staging), timeout=30)
        assert not stats.volume_condition.abnormal
        commands.run(["xfs_io", "-x", "-c", "shutdown", v.staging], timeout=30)
        # Its mount points now answer EIO even to lstat: still the volume's, not NOT_FOUND.
        stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=v.id, volume_path=v.target, staging_target_path=v.staging), timeout=30)
        assert stats.volume_condition.abnormal
        assert "xfs" in stats.volume_condition.message, stats.volume_condition.message
        got = csi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=v.id), timeout=30)
        assert got.status.volume_condition.abnormal
        assert got.status.volume_condition.message == stats.volume_condition.message
    except BaseException:
        with contextlib.suppress(grpc.RpcError):
            v.down_and_delete()
        raise
    # A shut-down xfs still unmounts: the kubelet's teardown works and leaves nothing.
    device = v.device(driver)
    v.down_and_delete()
    assert not mounts.is_mountpoint(v.target) and not mounts.is_mountpoint(v.staging)
    assert not os.path.exists(v.target)
    assert device not in loops_backed_by(driver.state_dir)


@pytest.fixture
def buffered_driver() -> Iterator[DriverProcess]:
    """A driver whose image pool turns direct I/O off."""
    def config(base: Path) -> dict[str, object]:
        return {"pools": [{"name": "default", "type": "image", "direct_io": False,
                           "path": str(base / "state/pools/default")}]}

    with running_driver(config=config) as proc:
        yield proc


def test_stage_attaches_the_loop_device_with_direct_io(csi, kubelet, driver, buffered_driver):
    v = _Volume(csi, kubelet, "mount", "ext4", 32 * MiB).up()
    try:
        assert _sysfs_loop(v.device(driver), "dio") == "1"
    finally:
        v.down_and_delete()
    other = _Volume(buffered_driver.csi(), KubeletLayout(buffered_driver.kubelet_root),
                    "block", "", 16 * MiB).up()
    try:
        assert _sysfs_loop(other.device(buffered_driver), "dio") == "0"
    finally:
        other.down_and_delete()
