"""csi_driver.loop on real loop devices (root)."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from csi_driver import loop
from plugin_runtime import commands
from plugin_runtime.errors import FailedPrecondition, Internal, InvalidArgument, NotFound

from .conftest import Scratch, open_fd

MiB = 1 << 20


def test_attach_with_direct_io_find_and_detach(scratch: Scratch):
    image = scratch.image("a.img", 64 * MiB)
    device = scratch.attach(image)
    assert device.startswith("/dev/loop")
    assert loop.backing_file(device) == image
    assert loop.device_size(device) == 64 * MiB
    assert loop.find_by_backing_file(image) == [device]
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert info.direct_io and not info.autoclear and not info.read_only
    with open(f"/sys/block/{device[5:]}/loop/dio") as handle:
        assert handle.read().strip() == "1"
    loop.detach(device)
    assert loop.backing_file(device) is None
    assert loop.find_by_backing_file(image) == []
    loop.detach(device)  # idempotent on a free device


def test_legacy_set_fd_path_for_kernels_before_5_8(scratch: Scratch, monkeypatch):
    monkeypatch.setattr(loop, "USE_LOOP_CONFIGURE", False)
    image = scratch.image("legacy.img", 16 * MiB)
    device = scratch.attach(image)
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert info.direct_io and not info.autoclear and info.backing_file == image
    assert loop.find_by_backing_file(image) == [device]
    ro_image = scratch.image("legacy-ro.img", 16 * MiB)
    ro_device = scratch.attach(ro_image, read_only=True)
    (ro_info,) = [i for i in loop.list_attached() if i.device == ro_device]
    assert ro_info.read_only


def test_missing_device_node_is_created_with_the_kernels_numbers(scratch: Scratch):
    device = scratch.attach(scratch.image("node.img", 4 * MiB))
    number = int(device.removeprefix("/dev/loop"))
    node = loop._ensure_node(number, dev_dir=scratch.root)
    assert node == scratch.path(f"loop{number}")
    assert os.stat(node).st_rdev == os.stat(device).st_rdev
    assert loop._ensure_node(number, dev_dir=scratch.root) == node  # exists: kept
    with open_fd(node) as fd:
        assert loop._get_status(fd) is not None


def test_direct_io_refused_by_the_backing_fs_falls_back_to_buffered(scratch: Scratch, caplog):
    ramfs = scratch.mount("none", "ramfs", "ramfs")  # ramfs has no O_DIRECT
    image = os.path.join(ramfs, "r.img")
    with open(image, "wb") as handle:
        handle.truncate(8 * MiB)
    with caplog.at_level(logging.WARNING, logger="csi_driver.loop"):
        device = scratch.attach(image)
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert not info.direct_io
    assert any(
        "buffered I/O" in r.getMessage() and device in r.getMessage() for r in caplog.records
    )
    block = os.urandom(4096)
    with open_fd(device, os.O_RDWR) as fd:
        os.pwrite(fd, block, 0)
        assert os.pread(fd, 4096, 0) == block


def test_block_size_4096_is_applied(scratch: Scratch):
    device = scratch.attach(scratch.image("bs4k.img", 8 * MiB), block_size=4096)
    with open(f"/sys/block/{device[5:]}/queue/logical_block_size") as handle:
        assert handle.read().strip() == "4096"


def test_find_by_backing_file_follows_renames_and_deletion(scratch: Scratch):
    image = scratch.image("b.img", 8 * MiB)
    other = scratch.image("other.img", 8 * MiB)
    device = scratch.attach(image)
    scratch.attach(other)
    renamed = scratch.path("renamed.img")
    os.rename(image, renamed)
    assert loop.find_by_backing_file(renamed) == [device]
    assert loop.find_by_backing_file(image) == []
    os.unlink(renamed)
    assert loop.backing_file(device) == f"{renamed} (deleted)"
    assert loop.find_by_backing_file(renamed) == [device]


def test_refresh_capacity_after_growing_the_file(scratch: Scratch):
    image = scratch.image("grow.img", 16 * MiB)
    device = scratch.attach(image)
    os.truncate(image, 48 * MiB)
    assert loop.device_size(device) == 16 * MiB
    loop.refresh_capacity(device)
    assert loop.device_size(device) == 48 * MiB


def test_read_only_attach_refuses_writes(scratch: Scratch):
    image = scratch.image("ro.img", 8 * MiB)
    device = scratch.attach(image, read_only=True)
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert info.read_only
    with open_fd(device, os.O_WRONLY) as fd, pytest.raises(OSError):
        os.pwrite(fd, b"x" * 4096, 0)


def test_data_written_through_the_device_lands_in_the_file(scratch: Scratch):
    image = scratch.image("data.img", 8 * MiB)
    device = scratch.attach(image)
    block = os.urandom(4096)
    with open_fd(device, os.O_WRONLY) as fd:
        os.pwrite(fd, block, 4096)
        os.fsync(fd)
    with open(image, "rb") as handle:
        handle.seek(4096)
        assert handle.read(4096) == block


def test_detach_of_a_device_held_open_is_refused_not_lazy(scratch: Scratch, monkeypatch):
    monkeypatch.setattr(loop, "DETACH_WAIT_SECONDS", 0.3)
    image = scratch.image("busy.img", 8 * MiB)
    device = scratch.attach(image)
    with open_fd(device), pytest.raises(FailedPrecondition, match=device):
        loop.detach(device)
    # Still attached, and the kernel's deferred "clear on last close" was taken back.
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert not info.autoclear
    assert loop.backing_file(device) == image


def test_a_device_reused_right_after_the_unbind_counts_as_detached(
    scratch: Scratch, monkeypatch
):
    # Volumes attach and detach concurrently: another attach may take the device our
    # unbind just freed before detach checks it.  Our binding is gone, so detach is done.
    ours = scratch.image("ours.img", 4 * MiB)
    theirs = scratch.image("theirs.img", 4 * MiB)
    device = scratch.attach(ours)
    real_wait_cleared = loop._wait_cleared

    def reuse_then_wait(dev: str, deadline: float) -> bool:
        commands.run(["losetup", dev, theirs], timeout=30)
        return real_wait_cleared(dev, deadline)

    monkeypatch.setattr(loop, "_wait_cleared", reuse_then_wait)
    loop.detach(device)
    assert loop.backing_file(device) == theirs
    (info,) = [i for i in loop.list_attached() if i.device == device]
    assert not info.autoclear


def test_concurrent_attaches_get_distinct_devices(scratch: Scratch):
    from concurrent.futures import ThreadPoolExecutor

    images = [scratch.image(f"c{i}.img", 4 * MiB) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(loop.attach, image) for image in images]
        devices = []
        errors = []
        for future in futures:
            try:
                devices.append(future.result(timeout=30))
            except Exception as exc:
                errors.append(exc)
    scratch.devices.extend(devices)
    assert not errors
    assert len(set(devices)) == 8
    for image, device in zip(images, devices, strict=True):
        assert loop.find_by_backing_file(image) == [device]


def test_losing_the_race_for_a_free_device_retries_on_another(scratch: Scratch, monkeypatch):
    # Another attacher takes the device LOOP_CTL_GET_FREE just returned (the real race:
    # losetup binds it between our GET_FREE and LOOP_CONFIGURE); attach gets EBUSY and
    # moves on.
    ours = scratch.image("ours.img", 4 * MiB)
    theirs = scratch.image("theirs.img", 4 * MiB)
    real_ensure_node = loop._ensure_node
    stolen: list[str] = []

    def ensure_node_then_steal(number: int, dev_dir: str = "/dev") -> str:
        device = real_ensure_node(number, dev_dir)
        if not stolen:
            commands.run(["losetup", device, theirs], timeout=30)
            stolen.append(device)
            scratch.devices.append(device)
        return device

    monkeypatch.setattr(loop, "_ensure_node", ensure_node_then_steal)
    device = scratch.attach(ours)
    assert stolen and device != stolen[0]
    assert loop.backing_file(device) == ours
    assert loop.backing_file(stolen[0]) == theirs


def test_failed_configure_leaves_no_device(scratch: Scratch, monkeypatch):
    image = scratch.image("fail.img", 4 * MiB)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(loop, "_configure", broken)
    with pytest.raises(Internal, match=r"fail\.img"):
        loop.attach(image)
    assert loop.find_by_backing_file(image) == []


def test_bad_inputs(scratch: Scratch):
    with pytest.raises(NotFound, match=r"missing\.img"):
        loop.attach(scratch.path("missing.img"))
    with pytest.raises(InvalidArgument, match="not a regular file"):
        loop.attach(scratch.root)
    with pytest.raises(InvalidArgument, match="loop device"):
        loop.detach("/dev/sda")
    with pytest.raises(InvalidArgument, match="block size 1000"):
        loop.attach(scratch.image("bs.img", MiB), block_size=1000)


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _preallocated(scratch: Scratch, name: str) -> str:
    """A 16 MiB image with every block allocated (as a thick volume's)."""
    image = scratch.image(name, 16 * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 16 * MiB)
    finally:
        os.close(fd)
    return image


def _blkdiscard(device: str) -> commands.CommandResult:
    return commands.run(["blkdiscard", "--offset", "0", "--length", str(8 * MiB), device],
                        timeout=30, check=False)


def test_a_discard_punches_a_hole_in_the_backing_file_by_default(scratch: Scratch):
    """What ``discard=False`` is for: through a plain loop device a discard frees the
    backing file's blocks (a thick image would lose its preallocation)."""
    image = _preallocated(scratch, "plain.img")
    device = scratch.attach(image)
    assert loop.discards(device)
    assert _blkdiscard(device).returncode == 0
    assert _allocated(image) <= 8 * MiB + 64 * 1024


def test_without_discard_the_file_keeps_its_blocks_and_detach_retires_the_device(
        scratch: Scratch):
    image = _preallocated(scratch, "thick.img")
    device = scratch.attach(image, discard=False)
    assert not loop.discards(device)
    refused = _blkdiscard(device)
    assert refused.returncode != 0 and "not supported" in refused.stderr, refused.stderr
    assert _allocated(image) >= 16 * MiB
    loop.keep_allocation(device)  # idempotent
    loop.detach(device)
    # The kernel cannot turn discard on again on that device, so detach removed it:
    # whoever gets its number next gets a fresh device that discards.
    other = scratch.attach(scratch.image("next.img", 16 * MiB))
    assert loop.discards(other)
    assert not os.path.exists(f"/sys/block/{os.path.basename(device)}") \
        or loop.discards(device), f"{device} was left with discard off"
