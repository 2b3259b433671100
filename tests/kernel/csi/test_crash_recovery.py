"""kill -9 at every durable step of every volume operation, then restart and retry.

The driver's fault hook (``csi_driver.faults``): with ``HOSTKIT_CRASH_AT=<point>``
in its environment it SIGKILLs itself on reaching that point.  For each point
the test

1. prepares what the operation needs with a normal driver,
2. restarts the driver with the crash point armed and sends the operation,
   which must die with the process (the RPC fails UNAVAILABLE/CANCELLED and the
   process exits by SIGKILL),
3. restarts it normally and retries the same operation until it succeeds,
4. checks the result is right (sizes, data, mounts), tears everything down with
   the ordinary RPCs, and checks nothing is left: no loop device, mount or file
   of this scenario, and
5. checks that a bystander volume published before any crash still holds its
   data (sha256).

At the points where the source filesystem is frozen (a snapshot or a clone of a
staged volume), the test also checks, while the driver is dead, that the
filesystem really is frozen: the point is reached only with the freeze, and the
restarted driver must thaw it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver._proto import csi_pb2
from csi_driver.faults import CRASH_POINTS
from plugin_runtime import commands
from tests.grpc.csi.driver_harness import (
    POOL_KINDS,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    btrfs_mount,
    expect_ok_or,
    loops_backed_by,
    mount_cap,
    mounts_under,
    subvolume_pool_config,
)

POINTS: tuple[str, ...] = tuple(CRASH_POINTS)

SIZE = 64 * MiB
XFS_SIZE = 320 * MiB  # mkfs.xfs minimum is 300 MiB
CAP = mount_cap(fs_type="ext4")
# Expansion runs on xfs: growing a mounted ext4 needs CAP_SYS_RESOURCE, which
# some sandboxes drop (the conformance suite covers that answer).
XFS_CAP = mount_cap(fs_type="xfs")


@dataclass
class Scene:
    """The objects one scenario made (ids, names, paths) for leak checks."""

    driver: DriverProcess
    kubelet: KubeletLayout
    tag: str
    volumes: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    staging: str = ""
    target: str = ""
    digest: str = ""
    loops_before: list[str] = field(default_factory=list)
    fs_type: str = "ext4"
    create_kind: str = "mount"
    pool_kind: str = "image"

    def __post_init__(self) -> None:
        if self.pool_kind == "subvolume":
            self.fs_type = ""  # the pool's own btrfs, whatever the scenario asks of images

    @property
    def size(self) -> int:
        return XFS_SIZE if self.fs_type == "xfs" else SIZE

    @property
    def cap(self) -> Any:
        if self.pool_kind == "subvolume":
            return mount_cap()
        return XFS_CAP if self.fs_type == "xfs" else CAP

    @property
    def csi(self) -> Csi:
        return self.driver.csi()

    def create(self, name: str, source: Any = None) -> str:
        vol = self.csi.create(name, size=self.size, kind=self.create_kind,
                              fs_type=self.fs_type if self.create_kind == "mount" else "",
                              source=source)
        assert vol.capacity_bytes == self.size
        if vol.volume_id not in self.volumes:
            self.volumes.append(vol.volume_id)
        return str(vol.volume_id)

    def paths_for(self, vid: str) -> None:
        self.staging = self.kubelet.staging_dir(vid)
        self.target = self.kubelet.target_dir(f"pod-{self.tag}", f"pv-{self.tag}")

    def write(self) -> None:
        payload = os.urandom(300 * 1024)
        with open(os.path.join(self.target, "data.bin"), "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        self.digest = hashlib.sha256(payload).hexdigest()

    def read_digest(self, root: str | None = None) -> str:
        data = Path(root or self.target, "data.bin").read_bytes()
        return hashlib.sha256(data).hexdigest()


def _sha_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Scenarios: prepare -> action (crashes) -> verify after the retry
# ---------------------------------------------------------------------------


@dataclass
class Scenario:
    prepare: Callable[[Scene], None]
    action: Callable[[Scene], None]
    verify: Callable[[Scene], None]
    fs_type: str = "ext4"
    # "block": the volume is created raw, so the first mount-mode stage formats it.
    create_kind: str = "mount"


def _nothing(s: Scene) -> None:
    return None


def _create_vol(s: Scene) -> None:
    vid = s.create(f"pv-{s.tag}")
    s.paths_for(vid)


def _create_staged(s: Scene) -> None:
    _create_vol(s)
    s.csi.stage(s.volumes[0], s.staging, s.cap)


def _create_published(s: Scene) -> None:
    _create_staged(s)
    s.csi.publish(s.volumes[0], s.staging, s.target, s.cap)
    s.write()


def _create_with_snapshot(s: Scene) -> None:
    _create_published(s)
    snap = _snapshot(s, f"snap-{s.tag}")
    s.snapshots.append(snap)


def _snapshot(s: Scene, name: str) -> str:
    resp = s.csi.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(source_volume_id=s.volumes[0], name=name), timeout=120)
    assert resp.snapshot.ready_to_use
    if resp.snapshot.snapshot_id not in s.snapshots:
        s.snapshots.append(resp.snapshot.snapshot_id)
    return str(resp.snapshot.snapshot_id)


def _fresh_fs_works(s: Scene) -> None:
    vid = s.volumes[-1]
    s.paths_for(vid)
    s.csi.stage(vid, s.staging, s.cap)
    s.csi.publish(vid, s.staging, s.target, s.cap)
    s.write()
    assert s.read_digest() == s.digest


def _act_create(s: Scene) -> None:
    vid = s.create(f"pv-{s.tag}")
    s.paths_for(vid)


def _verify_create(s: Scene) -> None:
    # Exactly one volume for the name: the retry returned the same id every time.
    again = s.csi.create(f"pv-{s.tag}", size=s.size, fs_type=s.fs_type)
    assert again.volume_id == s.volumes[-1]
    _fresh_fs_works(s)


def _act_restore(s: Scene) -> None:
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshots[0]))
    s.create(f"restore-{s.tag}", source=source)


def _assert_new_volume_holds_the_source_data(s: Scene, prefix: str) -> None:
    """The newest volume (a restore or a clone), staged and published, reads as the source."""
    digest = s.digest
    vid = s.volumes[-1]
    staging = s.kubelet.staging_dir(vid)
    target = s.kubelet.target_dir(f"pod-{prefix}-{s.tag}", f"pv-{prefix}-{s.tag}")
    s.csi.stage(vid, staging, s.cap)
    s.csi.publish(vid, staging, target, s.cap)
    try:
        assert s.read_digest(target) == digest
    finally:
        s.csi.unpublish(vid, target)
        s.csi.unstage(vid, staging)


def _verify_restore(s: Scene) -> None:
    _assert_new_volume_holds_the_source_data(s, "r")


def _act_delete(s: Scene) -> None:
    s.csi.delete(s.volumes[0])


def _verify_delete(s: Scene) -> None:
    with pytest.raises(grpc.RpcError) as info:
        s.csi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=s.volumes[0]), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _act_stage(s: Scene) -> None:
    s.csi.stage(s.volumes[0], s.staging, s.cap)


def _verify_stage(s: Scene) -> None:
    assert s.staging in mounts_under(Path(s.staging))
    s.csi.publish(s.volumes[0], s.staging, s.target, s.cap)
    s.write()
    assert s.read_digest() == s.digest


def _act_unstage(s: Scene) -> None:
    s.csi.unstage(s.volumes[0], s.staging)


def _verify_unstaged(s: Scene) -> None:
    assert not mounts_under(Path(s.staging))
    # The loop device of this volume is gone too (the bystander's stays).
    assert loops_backed_by(s.driver.state_dir) == s.loops_before


def _act_publish(s: Scene) -> None:
    s.csi.publish(s.volumes[0], s.staging, s.target, s.cap)


def _verify_publish(s: Scene) -> None:
    assert s.target in mounts_under(Path(s.target))
    s.write()
    assert s.read_digest() == s.digest


def _act_unpublish(s: Scene) -> None:
    s.csi.unpublish(s.volumes[0], s.target)


def _verify_unpublish(s: Scene) -> None:
    assert not os.path.lexists(s.target)
    # Still staged: publish again and the data is there.
    s.csi.publish(s.volumes[0], s.staging, s.target, s.cap)
    assert s.read_digest() == s.digest


def _act_expand(s: Scene) -> None:
    cr = csi_pb2.CapacityRange(required_bytes=2 * s.size)
    s.csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id=s.volumes[0], capacity_range=cr,
                                              volume_capability=s.cap), timeout=120)
    s.csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=s.volumes[0], volume_path=s.target,
                                        staging_target_path=s.staging, capacity_range=cr,
                                        volume_capability=s.cap), timeout=120)


def _verify_expand(s: Scene) -> None:
    if s.pool_kind == "subvolume":  # statvfs shows the pool; the limit is in the stats
        stats = s.csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=s.volumes[0], volume_path=s.target), timeout=30)
        assert stats.usage[0].total == 2 * s.size, "the limit was not raised"
    else:
        st = os.statvfs(s.target)
        assert st.f_blocks * st.f_frsize > s.size, "filesystem did not grow"
    assert s.read_digest() == s.digest
    got = s.csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=s.volumes[0]), timeout=30)
    assert got.volume.capacity_bytes == 2 * s.size


def _act_snapshot(s: Scene) -> None:
    _snapshot(s, f"snap-{s.tag}")


def _not_frozen(path: str) -> None:
    """A frozen filesystem refuses a second freeze with EBUSY; probe without writing."""
    result = commands.run(["fsfreeze", "--freeze", path], timeout=30, check=False)
    if result.returncode == 0:
        commands.run(["fsfreeze", "--unfreeze", path], timeout=30)
        return
    commands.run(["fsfreeze", "--unfreeze", path], timeout=30, check=False)
    raise AssertionError(f"{path} was left frozen after the restart: {result.stderr}")


def _verify_snapshot(s: Scene) -> None:
    _not_frozen(s.target)
    s.write()  # the source is writable again
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshots[-1]))
    vid = s.create(f"restore-{s.tag}", source=source)
    staging = s.kubelet.staging_dir(vid)
    target = s.kubelet.target_dir(f"pod-r-{s.tag}", f"pv-r-{s.tag}")
    s.csi.stage(vid, staging, s.cap)
    s.csi.publish(vid, staging, target, s.cap)
    try:
        # The snapshot holds a complete filesystem (the data written before it).
        assert Path(target, "data.bin").stat().st_size == 300 * 1024
    finally:
        s.csi.unpublish(vid, target)
        s.csi.unstage(vid, staging)


def _is_frozen(path: str) -> bool:
    """True if the filesystem at ``path`` is frozen (a second freeze is EBUSY); leaves it
    as it was."""
    result = commands.run(["fsfreeze", "--freeze", path], timeout=30, check=False)
    if result.returncode == 0:
        commands.run(["fsfreeze", "--unfreeze", path], timeout=30)
        return False
    assert "busy" in result.stderr.lower(), result.stderr
    return True


def _act_clone(s: Scene) -> None:
    source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=s.volumes[0]))
    s.create(f"clone-{s.tag}", source=source)


def _verify_clone(s: Scene) -> None:
    _not_frozen(s.target)
    _assert_new_volume_holds_the_source_data(s, "c")
    s.write()  # the source is writable again


def _act_delete_snapshot(s: Scene) -> None:
    s.csi.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshots[0]), timeout=60)


def _verify_delete_snapshot(s: Scene) -> None:
    with pytest.raises(grpc.RpcError) as info:
        s.csi.controller.GetSnapshot(
            csi_pb2.GetSnapshotRequest(snapshot_id=s.snapshots[0]), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# Points where the source filesystem is frozen: a kill -9 there leaves it frozen
# until the restarted driver's reconcile thaws it.
FROZEN_AT = ("snapshot.after_freeze", "clone.after_freeze")

SCENARIOS: dict[str, Scenario] = {
    "store": Scenario(_nothing, _act_create, _verify_create),
    "create": Scenario(_nothing, _act_create, _verify_create),
    "create.after_copy": Scenario(_create_with_snapshot, _act_restore, _verify_restore),
    "clone": Scenario(_create_published, _act_clone, _verify_clone),
    "delete": Scenario(_create_vol, _act_delete, _verify_delete),
    "stage": Scenario(_create_vol, _act_stage, _verify_stage),
    "stage.after_mkfs": Scenario(_create_vol, _act_stage, _verify_stage, create_kind="block"),
    "unstage": Scenario(_create_staged, _act_unstage, _verify_unstaged),
    "publish": Scenario(_create_staged, _act_publish, _verify_publish),
    "unpublish": Scenario(_create_published, _act_unpublish, _verify_unpublish),
    "expand": Scenario(_create_published, _act_expand, _verify_expand, fs_type="xfs"),
    "snapshot": Scenario(_create_published, _act_snapshot, _verify_snapshot),
    "delete_snapshot": Scenario(_create_with_snapshot, _act_delete_snapshot,
                                _verify_delete_snapshot),
}



def _scenario(point: str) -> Scenario:
    return SCENARIOS.get(point) or SCENARIOS[point.split(".", maxsplit=1)[0]]


# ---------------------------------------------------------------------------
# The driver, shared by all points, and the bystander
# ---------------------------------------------------------------------------


@dataclass
class Bed:
    driver: DriverProcess
    kubelet: KubeletLayout
    bystander_target: str
    bystander_digest: str
    pool_kind: str = "image"

    def pool_entries(self) -> set[str]:
        """Subvolumes and snapshots in a subvolume pool (outside the state dir)."""
        if self.pool_kind != "subvolume":
            return set()
        pool = Path(self.driver.config["pools"][0]["path"]) if self.driver.config else None
        assert pool is not None
        return {f"{d}/{e.name}" for d in ("volumes", "snapshots")
                for e in (pool / d).iterdir()}


# Points that image volumes never pass: a subvolume's own steps.
IMAGE_UNREACHED = frozenset({"create.before_subvolume_named"})
# Points that subvolume volumes never pass: no loop device to attach or detach, no
# filesystem of their own to make or grow, no freeze (their snapshots are atomic).
SUBVOLUME_UNREACHED = frozenset({
    "create.after_mkfs", "stage.after_attach", "stage.after_mkfs", "unstage.after_detach",
    "expand.after_grow_fs", "snapshot.after_freeze", "clone.after_freeze",
})


def _cases(points: Iterator[str] | tuple[str, ...] | list[str]) -> list[Any]:
    return [pytest.param(kind, point, id=f"{kind}-{point}") for kind in POOL_KINDS
            for point in points
            if point not in (IMAGE_UNREACHED if kind == "image" else SUBVOLUME_UNREACHED)]


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    kind = getattr(request, "param", "image")
    base = Path(tempfile.mkdtemp(prefix="csicrash", dir="/tmp"))
    driver = DriverProcess(base=base, node_id="node-crash")
    stack = contextlib.ExitStack()
    try:
        if kind == "subvolume":
            driver.config = subvolume_pool_config(stack.enter_context(btrfs_mount(base)))
        driver.start()
        csi = driver.csi()
        kubelet = KubeletLayout(driver.kubelet_root)
        cap = CAP if kind == "image" else mount_cap()
        vid = csi.create("pv-bystander", size=SIZE,
                         fs_type="ext4" if kind == "image" else "").volume_id
        staging = kubelet.staging_dir(vid)
        target = kubelet.target_dir("pod-bystander", "pv-bystander")
        csi.stage(vid, staging, cap)
        csi.publish(vid, staging, target, cap)
        payload = os.urandom(1 * MiB)
        Path(target, "precious.bin").write_bytes(payload)
        os.sync()
        yield Bed(driver, kubelet, target, hashlib.sha256(payload).hexdigest(), kind)
    finally:
        driver.cleanup()
        stack.close()
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def _state_files(driver: DriverProcess) -> set[str]:
    return {str(p.relative_to(driver.state_dir)) for p in driver.state_dir.rglob("*")
            if p.is_file() or p.is_symlink()}


def _retry(driver: DriverProcess, action: Callable[[], None], attempts: int = 5) -> None:
    """Retry like a CO: ABORTED/UNAVAILABLE are transient; anything else is final."""
    for attempt in range(attempts):
        try:
            action()
            return
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                raise
            if attempt == attempts - 1:
                raise
            if not driver.alive():
                driver.start()


def _teardown(scene: Scene) -> None:
    csi = scene.csi
    # After a delete scenario the volume is gone: NOT_FOUND is the spec's answer then.
    if scene.target:
        expect_ok_or({grpc.StatusCode.NOT_FOUND}, csi.node.NodeUnpublishVolume,
                     csi_pb2.NodeUnpublishVolumeRequest(volume_id=scene.volumes[0],
                                                        target_path=scene.target))
        assert not os.path.lexists(scene.target)
    if scene.staging:
        expect_ok_or({grpc.StatusCode.NOT_FOUND}, csi.node.NodeUnstageVolume,
                     csi_pb2.NodeUnstageVolumeRequest(volume_id=scene.volumes[0],
                                                      staging_target_path=scene.staging))
    for snap in scene.snapshots:
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap),
                                      timeout=60)
    for vid in scene.volumes:
        csi.delete(vid)


@pytest.mark.skipif(not POINTS, reason="csi_driver.faults.CRASH_POINTS is missing")
def test_enough_crash_points():
    assert len(POINTS) >= 20
    for prefix in ("create", "stage", "publish", "expand", "snapshot", "delete"):
        assert any(p.startswith(prefix + ".") for p in POINTS), prefix


@pytest.mark.parametrize(("bed", "point"), _cases(POINTS or ["(no crash points)"]),
                         indirect=["bed"])
def test_crash_and_recover(bed: Bed, point: str):
    if not POINTS:
        pytest.fail("csi_driver.faults.CRASH_POINTS is missing: the fault hook has not landed")
    driver = bed.driver
    if not driver.alive():
        driver.start()
    tag = point.replace(".", "-").replace("_", "-")
    scenario = _scenario(point)
    scene = Scene(driver, bed.kubelet, tag, fs_type=scenario.fs_type,
                  create_kind=scenario.create_kind, pool_kind=bed.pool_kind)
    files_before = _state_files(driver)
    pool_before = bed.pool_entries()
    mounts_before = set(mounts_under(driver.kubelet_root, driver.state_dir))
    loops_before = loops_backed_by(driver.state_dir)
    scene.loops_before = loops_before

    scenario.prepare(scene)
    # Arm the crash point and send the operation.
    driver.stop()
    driver.start(env={"HOSTKIT_CRASH_AT": point})
    crashed = False
    try:
        scenario.action(scene)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                              grpc.StatusCode.UNKNOWN), f"{err.code().name}: {err.details()}"
        crashed = True
    if crashed:
        status = driver.wait_exit(timeout=30)
        assert status == -signal.SIGKILL, f"driver exited with {status}, not by SIGKILL"
    else:
        driver.stop()
        pytest.fail(f"crash point {point} was never reached by its scenario")
    if point in FROZEN_AT:
        assert _is_frozen(scene.target), f"{point} was reached without the source frozen"

    # Restart normally and retry until it converges.
    driver.start()
    _retry(driver, lambda: scenario.action(scene))
    _retry(driver, lambda: scenario.action(scene))  # and once more: idempotent after a crash
    scenario.verify(scene)

    # Tear down with the ordinary RPCs; nothing of this scenario may remain.
    _teardown(scene)
    assert set(mounts_under(driver.kubelet_root, driver.state_dir)) == mounts_before
    assert loops_backed_by(driver.state_dir) == loops_before
    ids = scene.volumes + scene.snapshots
    leaked = sorted(f for f in _state_files(driver) - files_before
                    if any(i in f for i in ids) or f.startswith("pools/"))
    assert not leaked, f"files left behind: {leaked}"
    assert bed.pool_entries() == pool_before, "subvolumes left behind"

    # The bystander never noticed.
    assert _sha_file(os.path.join(bed.bystander_target, "precious.bin")) == bed.bystander_digest


def test_simulated_reboot_restages_with_data_intact(bed: Bed):
    """A reboot drops every mount and loop device; the kubelet then calls NodeStage and
    NodePublish again with the same paths.  The driver must bring the data back."""
    driver = bed.driver
    if not driver.alive():
        driver.start()
    scene = Scene(driver, bed.kubelet, "reboot")
    scene.loops_before = loops_backed_by(driver.state_dir)
    _create_published(scene)
    vid = scene.volumes[0]
    digest = scene.digest
    os.sync()
    # The reboot: the driver dies, then our mounts and our loop devices vanish.
    driver.kill9()
    ours = [m for m in mounts_under(driver.kubelet_root) if "reboot" in m or
            hashlib.sha256(vid.encode()).hexdigest() in m]
    for point in sorted(ours, key=len, reverse=True):
        commands.run(["umount", point], timeout=30)
    attached_before = set(loops_backed_by(driver.state_dir)) - set(scene.loops_before)
    for loop in attached_before:
        commands.run(["losetup", "-d", loop], timeout=30)
    assert not os.path.ismount(scene.staging)
    driver.start()
    # The kubelet's retries after boot: stage and publish at the same paths.
    scene.csi.stage(vid, scene.staging, scene.cap)
    scene.csi.publish(vid, scene.staging, scene.target, scene.cap)
    assert scene.read_digest() == digest
    _teardown(scene)
    assert loops_backed_by(driver.state_dir) == scene.loops_before
    assert _sha_file(os.path.join(bed.bystander_target, "precious.bin")) == bed.bystander_digest


ABANDON_POINTS = [p for p in POINTS if p.split(".", maxsplit=1)[0] in ("stage", "publish")]


@pytest.mark.parametrize(("bed", "point"), _cases(ABANDON_POINTS), indirect=["bed"])
def test_crash_then_abandon(bed: Bed, point: str):
    """The kubelet may give up instead of retrying (the pod was deleted meanwhile):
    after the crash it only calls NodeUnpublish/NodeUnstage, and the volume is then
    deleted.  Whatever the half-finished stage or publish left (a loop device, a
    mount the record does not know about, a target dir) must go with them."""
    driver = bed.driver
    if not driver.alive():
        driver.start()
    scenario = _scenario(point)
    scene = Scene(driver, bed.kubelet, "abandon-" + point.replace(".", "-").replace("_", "-"),
                  fs_type=scenario.fs_type, create_kind=scenario.create_kind,
                  pool_kind=bed.pool_kind)
    files_before = _state_files(driver)
    pool_before = bed.pool_entries()
    mounts_before = set(mounts_under(driver.kubelet_root, driver.state_dir))
    scene.loops_before = loops_backed_by(driver.state_dir)
    scenario.prepare(scene)
    driver.stop()
    driver.start(env={"HOSTKIT_CRASH_AT": point})
    with pytest.raises(grpc.RpcError) as info:
        scenario.action(scene)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert driver.wait_exit(timeout=30) == -signal.SIGKILL
    driver.start()
    _teardown(scene)
    assert set(mounts_under(driver.kubelet_root, driver.state_dir)) == mounts_before
    assert loops_backed_by(driver.state_dir) == scene.loops_before
    assert not os.path.lexists(scene.target), "the target the driver created is still there"
    leaked = sorted(f for f in _state_files(driver) - files_before
                    if any(i in f for i in scene.volumes) or f.startswith("pools/"))
    assert not leaked, f"files left behind: {leaked}"
    assert bed.pool_entries() == pool_before, "subvolumes left behind"
    assert _sha_file(os.path.join(bed.bystander_target, "precious.bin")) == bed.bystander_digest
