"""The driver process's own lifecycle, and how its images sit on the pool filesystem.

* Probe says ready=false while the pools are still being prepared or the
  start-up reconcile has not run, and ready once both are done (csi.md 1.3:
  the livenessprobe and the kubelet wait on it).
* SIGTERM stops the driver gracefully: a call in flight completes, the socket
  is removed, the process logs the signal and exits 0.
* thick volumes are preallocated and thin ones sparse, and an ext4 volume's first
  mount takes nothing back from a thick image nor fills a thin one.

To hold the driver mid-preparation or mid-call without a test hook in the
driver, the pool lives on a small ext4 filesystem of the test's own (image,
loop device, mount under the driver's state dir) that the test freezes with
fsfreeze(8): every write to a frozen filesystem, even mkdir of a directory that
exists, sleeps in the kernel until it is thawed; reads go on.  That is what a
pool on a filesystem frozen for a backup snapshot does to the real driver.  The
test thaws in ``finally`` before stopping the driver, so a failure never leaves
a process stuck on a frozen filesystem.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import loop
from csi_driver._proto import csi_pb2
from plugin_runtime import commands
from tests.grpc.csi.driver_harness import (
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    cap_for,
    cleanup_kernel_objects,
    loops_backed_by,
    mounts_under,
)

POOL_FS_BYTES = 512 * MiB
XFS_SIZE = 300 * MiB  # xfs's minimum: its mkfs takes the longest of our fs types


def _poll(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (bounded) until ``check()`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FreezableFs:
    """A driver with a small ext4 filesystem of the test's own that it can freeze.

    ``holds="pool"``: the driver's only pool lives on it.  ``holds="records"``: the
    directories of volume records and node state (``<state>/volumes``, ``<state>/node``)
    do, through symlinks, while the default pool stays on the host filesystem.
    """

    def __init__(self, base: Path, holds: str) -> None:
        self.driver = DriverProcess(base=base, node_id="node-frz")
        state = self.driver.state_dir
        state.mkdir(parents=True)
        image = state / "frozenfs.img"  # under the state dir: the harness detaches its loop
        with open(image, "xb") as handle:
            handle.truncate(POOL_FS_BYTES)
        commands.run(["mkfs.ext4", "-q", "-F", str(image)], timeout=120)
        self.mountpoint = state / "frozenfs"
        self.mountpoint.mkdir()
        device = commands.run(["losetup", "-f", "--show", str(image)], timeout=30).stdout.strip()
        try:
            commands.run(["mount", device, str(self.mountpoint)], timeout=30)
        except BaseException:
            commands.run(["losetup", "-d", device], timeout=30, check=False)
            raise
        self.frozen = False
        if holds == "pool":
            self.driver.config = {"pools": [{
                "name": "frz", "type": "image", "path": str(self.mountpoint / "pool"),
                "reserve_percent": 0, "reserve_bytes": 0,
            }]}
        else:
            for records in ("volumes", "node"):
                (self.mountpoint / records).mkdir()
                (state / records).symlink_to(self.mountpoint / records)

    def freeze(self) -> None:
        commands.run(["fsfreeze", "--freeze", str(self.mountpoint)], timeout=30)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            commands.run(["fsfreeze", "--unfreeze", str(self.mountpoint)], timeout=30)
            self.frozen = False


@contextlib.contextmanager
def freezable_fs(holds: str) -> Iterator[FreezableFs]:
    base = Path(tempfile.mkdtemp(prefix="csifrz", dir="/tmp"))
    fs: FreezableFs | None = None
    try:
        fs = FreezableFs(base, holds)
        yield fs
    finally:
        if fs is not None:
            fs.thaw()  # first: a driver blocked on a frozen fs cannot even be killed
            leftovers = fs.driver.cleanup()  # also unmounts the fs, detaches its loop
            if leftovers:
                print(f"cleaned after the driver in {base}: {leftovers}")
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def freezable() -> Iterator[FreezableFs]:
    with freezable_fs("pool") as fs:
        yield fs


def _probe(csi: Csi) -> Any:
    return csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)


def _first_probe(driver: DriverProcess) -> Any:
    """The first Probe answer of a driver started with ``wait=False`` (bounded)."""
    answers: list[Any] = []

    def answered() -> bool:
        assert driver.alive(), f"the driver exited:\n{driver.log_tail()}"
        if not driver.socket.exists():
            return False
        with contextlib.suppress(grpc.RpcError):
            answers.append(_probe(driver.csi()))
            return True
        return False

    # The socket is served at once, before the pools are ready (server.py).
    _poll("the first Probe answer", answered)
    return answers[-1]


def test_probe_is_not_ready_until_the_pools_are_prepared(freezable: FreezableFs):
    driver = freezable.driver
    freezable.freeze()  # the pool's start (mkdir of its directories) now sleeps
    driver.start(wait=False)
    first = _first_probe(driver)
    assert first.HasField("ready"), "Probe must say ready=false explicitly while preparing"
    assert first.ready.value is False
    # Other calls are served meanwhile (the kubelet and sidecars connect at once).
    info = driver.csi().identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
    assert info.name
    # Still frozen, still not ready: nothing but the thaw can finish the preparation.
    assert _probe(driver.csi()).ready.value is False
    freezable.thaw()
    driver.wait_ready(timeout=60)
    assert _probe(driver.csi()).ready.value is True
    assert "driver ready" in driver.log_path.read_text(errors="replace")


def test_probe_is_not_ready_until_reconcile_has_run():
    """Pools ready, reconcile not done: still not ready.

    After a "reboot" (mounts and loop devices gone) reconcile re-attaches the loop
    device of a staged volume and records the new device; with the records on a
    frozen filesystem that write sleeps, so reconcile is held after the pools are up
    (the placeholder loop device is detached by the harness: its file is under the
    state dir).
    """
    with freezable_fs("records") as fs:
        driver = fs.driver
        driver.start()
        csi, kubelet = driver.csi(), KubeletLayout(driver.kubelet_root)
        vol = csi.create("pvc-staged", size=16 * MiB, kind="block")
        csi.stage(vol.volume_id, kubelet.block_staging("pv-staged"), cap_for("block"))
        driver.kill9()
        # "Reboot": the kubelet's mounts and the pool's loop devices are gone.
        gone = cleanup_kernel_objects([driver.kubelet_root], driver.state_dir / "pools")
        old = [c.split()[1] for c in gone if c.startswith("loop ")]
        assert len(old) == 1, gone
        # As after a real reboot, the old loop device is not free for the volume
        # (here: another image holds it), so reconcile must record a new device.
        placeholder = driver.state_dir / "placeholder.img"
        with open(placeholder, "xb") as handle:
            handle.truncate(MiB)
        commands.run(["losetup", old[0], str(placeholder)], timeout=30, check=False)
        fs.freeze()
        driver.start(wait=False)
        first = _first_probe(driver)
        assert first.HasField("ready") and first.ready.value is False
        # The pool itself is ready: GetCapacity answers 0 for a pool that is not.
        cap = csi_pb2.GetCapacityRequest(volume_capabilities=[cap_for("block")])
        _poll("the pool to be ready",
              lambda: driver.csi().controller.GetCapacity(cap, timeout=5).available_capacity > 0)
        assert _probe(driver.csi()).ready.value is False
        fs.thaw()
        driver.wait_ready(timeout=60)
        assert _probe(driver.csi()).ready.value is True
        # Reconcile did its work: the staged volume's loop device is back.
        assert len(loops_backed_by(driver.state_dir / "pools")) == 1
        csi = driver.csi()
        csi.unstage(vol.volume_id, kubelet.block_staging("pv-staged"))
        csi.delete(vol.volume_id)


def test_sigterm_lets_an_in_flight_create_finish_then_exits_cleanly(
    freezable: FreezableFs,
):
    driver = freezable.driver
    driver.start()
    csi = driver.csi()
    records = driver.state_dir / "volumes"
    before = set(records.glob("*.json"))
    freezable.freeze()  # the new image cannot be written until the thaw
    result: dict[str, Any] = {}

    def create() -> None:
        try:
            result["volume"] = csi.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-inflight", volume_capabilities=[cap_for("mount", fs_type="xfs")],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=XFS_SIZE),
                ),
                timeout=120,
            ).volume
        except grpc.RpcError as err:
            result["error"] = err

    caller = threading.Thread(target=create, name="inflight-create")
    caller.start()
    try:
        # In flight: its "creating" record is on the (unfrozen) state dir, and the
        # image it must build next is on the frozen pool.
        _poll("the in-flight create's record", lambda: set(records.glob("*.json")) != before)
        assert caller.is_alive() and not result
        assert driver.proc is not None
        driver.proc.send_signal(signal.SIGTERM)
        _poll("the driver to log SIGTERM",
              lambda: "received SIGTERM" in driver.log_path.read_text(errors="replace"))
        freezable.thaw()
        caller.join(timeout=120)
        assert not caller.is_alive(), "the in-flight CreateVolume never returned"
    finally:
        freezable.thaw()
        caller.join(timeout=120)
    assert "error" not in result, f"in-flight call failed: {result.get('error')!r}"
    assert result["volume"].capacity_bytes == XFS_SIZE
    assert driver.proc is not None
    assert driver.proc.wait(timeout=60) == 0, driver.log_tail()
    assert not driver.socket.exists(), "the socket was left behind"
    log = driver.log_path.read_text(errors="replace")
    assert "stopped serving" in log
    # The volume it finished is complete and usable by the next driver.
    driver.start()
    listed = driver.csi().controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert [e.volume.volume_id for e in listed.entries] == [result["volume"].volume_id]


@pytest.mark.parametrize("kind", ["block", "mount"])
def test_thick_images_are_preallocated_and_thin_images_sparse(
    csi: Csi, driver: DriverProcess, unique: Callable[[str], str], kind: str
):
    size = 64 * MiB
    allocated: dict[str, int] = {}
    made: list[str] = []
    try:
        for thin in ("true", "false"):
            vol = csi.create(unique("pvc"), size=size, kind=kind, params={"thin": thin})
            made.append(vol.volume_id)
            assert vol.capacity_bytes == size
            (image,) = driver.state_dir.rglob(f"{vol.volume_id}.img")
            st = image.stat()
            assert st.st_size == size
            allocated[thin] = st.st_blocks * 512
    finally:
        for volume_id in made:
            csi.delete(volume_id)
    # Thick: every byte is reserved on the pool filesystem now (no ENOSPC later).
    assert allocated["false"] >= size
    # Thin: only what mkfs wrote (nothing at all for a block volume).
    assert allocated["true"] < size // 4
    if kind == "block":
        assert allocated["true"] == 0


# The kernel starts zeroing an ext4 filesystem's inode tables (ext4lazyinit) at a random
# moment up to EXT4_DEF_LI_MAX_START_DELAY = 5 s after the mount; watch a little longer.
LAZYINIT_START_DELAY = 5.0


@dataclass
class StagedImage:
    volume_id: str
    staging: str
    image: Path

    @property
    def allocated(self) -> int:
        return self.image.stat().st_blocks * 512


@contextlib.contextmanager
def _thin_and_thick_staged(csi: Csi, driver: DriverProcess, unique: Callable[[str], str],
                           size: int) -> Iterator[dict[bool, StagedImage]]:
    """A thin and a thick volume of ``size`` (the pool's fs type), staged, keyed by thin;
    unstaged and deleted after, even on failure."""
    kubelet = KubeletLayout(driver.kubelet_root)
    staged: dict[bool, StagedImage] = {}
    made: list[str] = []
    try:
        for thin in (True, False):
            vol = csi.create(unique("pvc"), size=size, params={"thin": str(thin).lower()})
            made.append(vol.volume_id)
            staging = kubelet.staging_dir(vol.volume_id)
            csi.stage(vol.volume_id, staging, cap_for("mount"))
            (image,) = driver.state_dir.rglob(f"{vol.volume_id}.img")
            staged[thin] = StagedImage(vol.volume_id, staging, image)
        yield staged
    finally:
        for done in staged.values():
            csi.unstage(done.volume_id, done.staging)
        for volume_id in made:
            csi.delete(volume_id)


def test_fstrim_in_a_thick_volume_is_refused_and_in_a_thin_one_frees_space(
    csi: Csi, driver: DriverProcess, unique: Callable[[str], str]
):
    """The loop driver turns a discard into a hole punched in the image: fstrim inside a
    thick volume (or a host's weekly fstrim.timer, which trims every mounted filesystem)
    would give its preallocated space back to the pool.  A thick volume's device refuses
    discards; a thin one's passes them, so deleted data goes back to the pool.  After
    the unstage no loop device is left with discard turned off."""
    size = 128 * MiB
    with _thin_and_thick_staged(csi, driver, unique, size) as staged:
        devices = []
        for vol in staged.values():
            devices += loop.devices_backed_by(str(vol.image))
            data = Path(vol.staging, "data")
            data.write_bytes(os.urandom(32 * MiB))
            os.sync()
            data.unlink()
            os.sync()
        refused = commands.run(["fstrim", staged[False].staging], timeout=60, check=False)
        assert refused.returncode != 0 and "not supported" in refused.stderr, refused.stderr
        assert staged[False].allocated >= size, "the thick image lost blocks"
        before = staged[True].allocated
        commands.run(["fstrim", staged[True].staging], timeout=60)
        assert staged[True].allocated <= before - 24 * MiB, \
            "fstrim gave nothing back from the thin volume"
    assert len(devices) == 2, devices
    for device in devices:
        queue = Path("/sys/block", os.path.basename(device), "queue", "discard_max_bytes")
        assert not queue.exists() or queue.read_text().strip() != "0", \
            f"{device} was left with discard off"


def test_a_thick_volume_staged_by_an_older_driver_refuses_discards_after_a_restart(
    csi: Csi, driver: DriverProcess, unique: Callable[[str], str]
):
    """A driver that let discards through left a thick volume staged on a device that
    accepts them; start-up reconcile turns discard off on it, and the volume stays
    mounted with its data."""
    kubelet = KubeletLayout(driver.kubelet_root)
    vol = csi.create(unique("pvc"), size=64 * MiB, params={"thin": "false"})
    staging = kubelet.staging_dir(vol.volume_id)
    csi.stage(vol.volume_id, staging, cap_for("mount"))
    try:
        Path(staging, "kept").write_text("data of the volume")
        (image,) = driver.state_dir.rglob(f"{vol.volume_id}.img")
        driver.stop()
        # What the older driver left: the same image, mounted at the same path, through
        # a device that passes discards.
        commands.run(["umount", staging], timeout=30)
        for device in loop.devices_backed_by(str(image)):
            loop.detach(device)
        device = loop.attach(str(image), block_size=4096)
        commands.run(["mount", device, staging], timeout=30)
        assert loop.discards(device)
        driver.start()
        assert not loop.discards(device), "reconcile left the thick volume's device discarding"
        assert Path(staging, "kept").read_text() == "data of the volume"
        assert loop.devices_backed_by(str(image)) == [device]
    finally:
        csi = driver.csi()
        csi.unstage(vol.volume_id, staging)
        csi.delete(vol.volume_id)


def test_a_mounted_ext4_image_keeps_its_preallocation_and_thin_stays_thin(
    csi: Csi, driver: DriverProcess, unique: Callable[[str], str]
):
    """mkfs marks every inode table zeroed, so the kernel has nothing to zero after the
    first mount; otherwise its write-zeroes through the loop device punch holes in a
    thick image (32 MiB of a 2 GiB one, measured) and the "never ENOSPC" promise breaks.
    """
    size = 256 * MiB  # two block groups: inode tables outside the first one
    with _thin_and_thick_staged(csi, driver, unique, size) as staged:
        dumped = commands.run(["dumpe2fs", str(staged[False].image)], timeout=30).stdout
        groups = [line for line in dumped.splitlines() if re.match(r"Group [0-9]+:", line)]
        assert len(groups) >= 2 and all("ITABLE_ZEROED" in line for line in groups), (
            f"mkfs left inode tables for the kernel to zero (e2fsprogs >= 1.47 marks them): "
            f"{groups}")
        thin_before = staged[True].allocated
        deadline = time.monotonic() + LAZYINIT_START_DELAY + 1.0
        while time.monotonic() < deadline:
            assert staged[False].allocated >= size, "thick image lost blocks"
            time.sleep(0.1)
        # Thin: nothing but what mkfs and the mount itself wrote (a few MiB at most).
        assert staged[True].allocated - thin_before < 4 * MiB
        assert thin_before < size // 8
