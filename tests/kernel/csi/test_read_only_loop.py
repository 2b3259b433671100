"""A loop device another program left read-only does not break staging.

The kernel keeps a block device's read-only policy (BLKROSET, what
``blockdev --setro`` sets) after the loop device is detached, and
LOOP_CONFIGURE does not reset it: a volume staged on such a device used to fail
at mount with EACCES.  The driver clears the policy on a device it attaches for
read-write use, and when it cannot (no CAP_SYS_ADMIN) it refuses with
FAILED_PRECONDITION naming the device instead of an opaque mount error.

The device is the test's own: a loop device it adds with LOOP_CTL_ADD at a
number well above every existing one (LOOP_CTL_GET_FREE hands out the lowest
unbound device, so nobody else on the machine is given it), binds to its own
image, sets read-only, detaches, and steers the driver to
(``tests.kernel.csi.loop_choice``).  Teardown clears the policy and removes
the device, whatever the test did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver import loop, mounts
from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    ROOT,
    KubeletLayout,
    MiB,
    cap_for,
    expect_code,
    loops_backed_by,
    running_driver,
    wait_until,
)
from tests.kernel.csi import loop_choice

LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
NUMBER_GAP = 100  # how far above the highest existing loop device ours is made
# Root without CAP_SYS_ADMIN: BLKROSET answers EACCES, loop ioctls still work.
WITHOUT_SYS_ADMIN = ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--")


@dataclass
class LeftReadOnly:
    number: int
    device: str


def _read_only(device: str) -> bool:
    fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return loop.read_only_policy(fd)
    finally:
        os.close(fd)


def _add_private_device(control_fd: int) -> int:
    names = os.listdir("/sys/block")
    highest = max((int(n[4:]) for n in names if n.startswith("loop") and n[4:].isdigit()),
                  default=0)
    for number in range(highest + NUMBER_GAP, highest + 2 * NUMBER_GAP):
        try:
            return int(fcntl.ioctl(control_fd, LOOP_CTL_ADD, number))
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    raise AssertionError("no free loop device number to add a private device at")


def _bind_set_read_only_and_detach(device: str, image: str) -> None:
    """What the other program did: use the device, ``blockdev --setro`` it, detach."""
    file_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            loop._configure(loop_fd, file_fd, flags=0, block_size=0, name=os.fsencode(image))
            loop.set_read_only_policy(loop_fd, True)
        finally:
            os.close(loop_fd)
    finally:
        os.close(file_fd)
    loop.detach(device)


@pytest.fixture
def left_read_only() -> Iterator[LeftReadOnly]:
    """A free loop device of the test's own, left read-only after a detach."""
    base = tempfile.mkdtemp(prefix="csiro.", dir="/tmp")
    image = os.path.join(base, "other.img")
    with open(image, "xb") as handle:
        handle.truncate(8 * MiB)
    control_fd = os.open(loop.LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        number = _add_private_device(control_fd)
    except BaseException:
        os.close(control_fd)
        shutil.rmtree(base)
        raise
    device = loop._ensure_node(number)
    problems: list[str] = []
    try:
        _bind_set_read_only_and_detach(device, image)
        # The premise of the issue: the policy outlives the detach.
        assert loop.backing_file(device) is None
        assert _read_only(device), f"{device}: the kernel dropped the policy on detach"
        yield LeftReadOnly(number, device)
    finally:
        with contextlib.suppress(OSError):
            loop.detach(device)
        try:
            fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                loop.set_read_only_policy(fd, False)
            finally:
                os.close(fd)
        except OSError as exc:
            problems.append(f"could not restore {device} writable: {exc}")
        try:
            fcntl.ioctl(control_fd, LOOP_CTL_REMOVE, number)
        except OSError as exc:
            problems.append(f"could not remove {device}: {exc}")
        os.close(control_fd)
        os.unlink(image)
        os.rmdir(base)
    assert not problems, problems


@pytest.mark.parametrize("kind", ["mount", "block"])
def test_stage_on_a_device_left_read_only_succeeds_and_writes(left_read_only, kind):
    with running_driver(module="tests.kernel.csi.loop_choice",
                        env={loop_choice.ENV: str(left_read_only.number)}) as driver:
        csi = driver.csi()
        kubelet = KubeletLayout(driver.kubelet_root)
        volume = csi.create(f"ro-left-{kind}", 32 * MiB, kind=kind)
        staging, target = kubelet.paths(kind, volume.volume_id, f"pv-{kind}", "pod-ro")
        cap = cap_for(kind)
        csi.stage(volume.volume_id, staging, cap)
        assert loops_backed_by(driver.state_dir) == [left_read_only.device], \
            "the driver was not steered to the prepared device"
        assert not _read_only(left_read_only.device)
        csi.publish(volume.volume_id, staging, target, cap)
        if kind == "mount":
            entry = mounts.find_mount(staging)
            assert entry is not None and not entry.read_only
            Path(target, "written").write_bytes(b"through a device once read-only")
            assert Path(staging, "written").read_bytes() == b"through a device once read-only"
        else:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
            try:
                assert os.pwrite(fd, b"x" * 4096, 0) == 4096
            finally:
                os.close(fd)
        log = driver.log_path.read_text()
        assert f"{left_read_only.device} was left read-only" in log
        csi.unpublish(volume.volume_id, target)
        csi.unstage(volume.volume_id, staging)
        assert loops_backed_by(driver.state_dir) == []
        csi.delete(volume.volume_id)


_REFUSAL = textwrap.dedent("""
    import sys
    from csi_driver import loop
    from plugin_runtime.errors import FailedPrecondition
    from tests.kernel.csi import loop_choice
    loop_choice.install(int(sys.argv[1]))
    try:
        device = loop.attach(sys.argv[2])
    except FailedPrecondition as exc:
        print(exc)
        raise SystemExit(3)
    print("attached", device)
""")


def test_attach_without_the_right_to_clear_it_names_the_read_only_device(left_read_only):
    """Without CAP_SYS_ADMIN BLKROSET fails: the answer says which device is read-only."""
    with tempfile.TemporaryDirectory(prefix="csiro.", dir="/tmp") as base:
        image = os.path.join(base, "vol.img")
        with open(image, "xb") as handle:
            handle.truncate(8 * MiB)
        result = subprocess.run(
            [*WITHOUT_SYS_ADMIN, sys.executable, "-c", _REFUSAL, str(left_read_only.number), image],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
            text=True, timeout=60, check=False,
        )
        assert result.returncode == 3, (result.stdout, result.stderr)
        message = result.stdout
        assert f"loop device {left_read_only.device} is read-only" in message
        assert "blockdev --setrw" in message
        # Nothing is left bound to the refused device.
        assert wait_until(lambda: loop.backing_file(left_read_only.device) is None, 5.0), \
            f"{left_read_only.device} still bound to {loop.backing_file(left_read_only.device)}"


def test_stage_answers_failed_precondition_naming_the_read_only_device(left_read_only):
    """The same refusal through the driver: FAILED_PRECONDITION, not an opaque mount error."""
    with running_driver(module="tests.kernel.csi.loop_choice", command_prefix=WITHOUT_SYS_ADMIN,
                        env={loop_choice.ENV: str(left_read_only.number)}) as driver:
        csi = driver.csi()
        volume = csi.create("ro-refused", 32 * MiB)
        staging = KubeletLayout(driver.kubelet_root).staging_dir(volume.volume_id)
        request = csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging,
            volume_capability=cap_for("mount"),
        )
        message = expect_code(grpc.StatusCode.FAILED_PRECONDITION, csi.node.NodeStageVolume,
                              request)
        assert f"loop device {left_read_only.device} is read-only" in message
        assert wait_until(lambda: loops_backed_by(driver.state_dir) == [], 5.0)
        assert mounts.find_mount(staging) is None
        csi.delete(volume.volume_id)
