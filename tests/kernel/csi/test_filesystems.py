"""csi_driver.filesystems with real mkfs, mounts, ioctls and copies on loop devices (root)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest

from csi_driver import filesystems, loop, mounts
from plugin_runtime import commands
from plugin_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange

from .conftest import Scratch

MiB = 1 << 20
FS_SIZE = 320 * MiB  # above xfs's 300 MiB minimum


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs"])
def test_make_mount_write_grow_freeze_unmount(scratch: Scratch, fs_type: str):
    image = scratch.image("vol.img", FS_SIZE)
    device = scratch.attach(image)
    assert filesystems.probe_filesystem(device) is None
    assert filesystems.identify_filesystem(device) is None
    assert not filesystems.has_signature(device)
    filesystems.make_filesystem(device, fs_type, label="vol1")
    assert filesystems.probe_filesystem(device) == fs_type
    assert filesystems.identify_filesystem(device) == fs_type
    assert filesystems.has_signature(device)
    with pytest.raises(FailedPrecondition, match="not empty"):
        filesystems.make_filesystem(device, fs_type)

    target = scratch.mount(device, "m", fs_type)
    payload = os.urandom(3 * MiB)
    data_file = os.path.join(target, "data")
    with open(data_file, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    before = filesystems.fs_usage(target)
    assert before.bytes_used >= 3 * MiB
    assert before.bytes_total <= FS_SIZE
    assert filesystems.filesystem_error(device, fs_type, target) is None

    os.truncate(image, 2 * FS_SIZE)
    loop.refresh_capacity(device)
    assert loop.device_size(device) == 2 * FS_SIZE
    if filesystems.can_grow_online(fs_type):
        filesystems.grow_filesystem(fs_type, device, target)
        after = filesystems.fs_usage(target)
        assert after.bytes_total > before.bytes_total + FS_SIZE // 2
    else:
        # ext4 without CAP_SYS_RESOURCE (these machines): refused with the reason.
        with pytest.raises(FailedPrecondition, match="CAP_SYS_RESOURCE"):
            filesystems.grow_filesystem(fs_type, device, target)
        assert filesystems.fs_usage(target).bytes_total == before.bytes_total

    with filesystems.frozen(target):
        with pytest.raises(FailedPrecondition, match="already frozen"):
            filesystems.freeze(target)
        done = threading.Event()

        def write() -> None:
            with open(os.path.join(target, "during-freeze"), "wb") as handle:
                handle.write(b"x" * 4096)
                os.fsync(handle.fileno())
            done.set()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # Negative check only: a write that got through would set the event at once.
        assert not done.wait(0.3)
    writer.join(timeout=30)
    assert done.is_set()
    filesystems.thaw(target)  # not frozen any more: no-op

    mounts.unmount(target)
    assert not mounts.is_mountpoint(target)
    mounts.mount(device, target, fs_type)
    with open(data_file, "rb") as reader:
        assert reader.read() == payload


def test_ext4_grows_offline_when_unmounted(scratch: Scratch):
    image = scratch.image("off.img", 64 * MiB)
    device = scratch.attach(image)
    filesystems.make_filesystem(device, "ext4")
    target = scratch.mount(device, "m", "ext4")
    with open(os.path.join(target, "keep"), "wb") as handle:
        handle.write(b"kept")
    before = filesystems.fs_usage(target).bytes_total
    mounts.unmount(target)
    os.truncate(image, 192 * MiB)
    loop.refresh_capacity(device)
    filesystems.grow_filesystem("ext4", device, None)
    mounts.mount(device, target, "ext4")
    assert filesystems.fs_usage(target).bytes_total > before + 100 * MiB
    with open(os.path.join(target, "keep"), "rb") as reader:
        assert reader.read() == b"kept"
    with pytest.raises(InvalidArgument, match="only while mounted"):
        filesystems.grow_filesystem("xfs", device, None)


def test_identify_leaves_ext3_and_mixed_signatures_to_blkid(scratch: Scratch):
    device = scratch.attach(scratch.image("e3.img", 64 * MiB))
    commands.run(["mkfs.ext3", "-F", "-q", device], timeout=60)
    assert filesystems.identify_filesystem(device) is None
    assert filesystems.probe_filesystem(device) == "ext3"
    ext4 = scratch.attach(scratch.image("e4.img", 64 * MiB))
    filesystems.make_filesystem(ext4, "ext4")
    assert filesystems.identify_filesystem(ext4) == "ext4"
    with open(ext4, "r+b") as handle:  # an xfs magic in ext4's boot block: ambiguous
        handle.write(b"XFSB")
    assert filesystems.identify_filesystem(ext4) is None


def test_conflicting_signatures_are_refused_not_guessed(scratch: Scratch):
    donor = scratch.attach(scratch.image("donor.img", 64 * MiB))
    filesystems.make_filesystem(donor, "ext4")
    device = scratch.attach(scratch.image("both.img", 200 * MiB))
    filesystems.make_filesystem(device, "btrfs")
    with open(donor, "rb") as source, open(device, "r+b") as target:
        source.seek(1024)
        target.seek(1024)
        target.write(source.read(1024))  # an ext4 superblock next to btrfs's
        target.flush()
        os.fsync(target.fileno())
    assert filesystems.has_signature(device)
    with pytest.raises(filesystems.AmbivalentSignatures, match="more than one"):
        filesystems.probe_filesystem(device)
    assert filesystems.identify_filesystem(device) is None
    with pytest.raises(FailedPrecondition, match="conflicting"):
        filesystems.make_filesystem(device, "ext4")


def test_frozen_thaws_when_the_body_raises(scratch: Scratch):
    device = scratch.attach(scratch.image("f.img", 64 * MiB))
    filesystems.make_filesystem(device, "ext4")
    target = scratch.mount(device, "m", "ext4")
    with pytest.raises(RuntimeError), filesystems.frozen(target):
        raise RuntimeError("boom")
    filesystems.freeze(target)  # would be FailedPrecondition if still frozen
    filesystems.thaw(target)


def test_make_filesystem_refuses_bad_input(scratch: Scratch):
    device = scratch.attach(scratch.image("small.img", 100 * MiB))
    with pytest.raises(InvalidArgument, match="vfat"):
        filesystems.make_filesystem(device, "vfat")
    with pytest.raises(OutOfRange, match="xfs needs at least"):
        filesystems.make_filesystem(device, "xfs")
    with pytest.raises(InvalidArgument, match="label"):
        filesystems.make_filesystem(device, "xfs", label="much-too-long-for-xfs")
    with pytest.raises(InvalidArgument, match="not a block device"):
        filesystems.make_filesystem(scratch.path("small.img"), "ext4")
    assert not filesystems.has_signature(device)


@pytest.mark.parametrize("pool_fs", ["xfs", "btrfs"])
def test_reflink_copy_on_a_reflink_capable_pool(scratch: Scratch, pool_fs: str):
    device = scratch.attach(scratch.image("pool.img", FS_SIZE))
    filesystems.make_filesystem(device, pool_fs)
    pool = scratch.mount(device, "pool", pool_fs)
    src = os.path.join(pool, "src.img")
    with open(src, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(8 * MiB)
        handle.write(os.urandom(2 * MiB))
    free_before = filesystems.fs_usage(pool).bytes_available
    dst = os.path.join(pool, "dst.img")
    assert filesystems.reflink_copy(src, dst) is True
    assert _digest(dst) == _digest(src)
    # Shared extents: the clone did not consume another 2 MiB.
    assert free_before - filesystems.fs_usage(pool).bytes_available < 1 * MiB
    with pytest.raises(FailedPrecondition, match="already exists"):
        filesystems.reflink_copy(src, dst)


def test_ext4_has_no_reflink_and_sparse_copy_keeps_holes(scratch: Scratch):
    device = scratch.attach(scratch.image("pool.img", 256 * MiB))
    filesystems.make_filesystem(device, "ext4")
    pool = scratch.mount(device, "pool", "ext4")
    src = os.path.join(pool, "src.img")
    with open(src, "wb") as handle:
        handle.truncate(128 * MiB)
        for offset in (0, 40 * MiB, 127 * MiB):
            handle.seek(offset)
            handle.write(os.urandom(MiB))
    dst = os.path.join(pool, "dst.img")
    assert filesystems.reflink_copy(src, dst) is False
    assert not os.path.exists(dst)

    filesystems.sparse_copy(src, dst)
    src_st, dst_st = os.stat(src), os.stat(dst)
    assert dst_st.st_size == src_st.st_size
    assert _digest(dst) == _digest(src)
    assert dst_st.st_blocks * 512 <= 4 * MiB  # 3 MiB of data, not 128 MiB
    assert dst_st.st_blocks <= src_st.st_blocks + 64
    with pytest.raises(FailedPrecondition, match="already exists"):
        filesystems.sparse_copy(src, dst)


def test_sparse_copy_across_filesystems_and_of_an_all_hole_file(scratch: Scratch):
    device = scratch.attach(scratch.image("other.img", 64 * MiB))
    filesystems.make_filesystem(device, "ext4")
    other = scratch.mount(device, "other", "ext4")
    src = scratch.path("holes.img")
    with open(src, "wb") as handle:
        handle.truncate(16 * MiB)
        handle.seek(5 * MiB)
        handle.write(b"middle")
    dst = os.path.join(other, "copy.img")
    filesystems.sparse_copy(src, dst)
    assert _digest(dst) == _digest(src)
    empty = scratch.path("empty.img")
    with open(empty, "wb") as handle:
        handle.truncate(8 * MiB)
    filesystems.sparse_copy(empty, os.path.join(other, "empty.img"))
    st = os.stat(os.path.join(other, "empty.img"))
    assert st.st_size == 8 * MiB and st.st_blocks == 0


def test_sparse_copy_falls_back_to_sendfile(scratch: Scratch, monkeypatch):
    src = scratch.path("fallback-src.img")
    with open(src, "wb") as handle:
        handle.truncate(8 * MiB)
        handle.seek(3 * MiB)
        handle.write(os.urandom(MiB))

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = scratch.path("fallback-dst.img")
    filesystems.sparse_copy(src, dst)
    assert _digest(dst) == _digest(src)
    assert os.stat(dst).st_blocks * 512 <= 2 * MiB


def test_copies_of_a_missing_source_raise_not_found(scratch: Scratch):
    with pytest.raises(NotFound, match="missing"):
        filesystems.reflink_copy(scratch.path("missing"), scratch.path("d1"))
    with pytest.raises(NotFound, match="missing"):
        filesystems.sparse_copy(scratch.path("missing"), scratch.path("d2"))
    assert not os.path.exists(scratch.path("d1")) and not os.path.exists(scratch.path("d2"))


def test_sparse_copy_failure_leaves_no_destination(scratch: Scratch):
    device = scratch.attach(scratch.image("tiny.img", 16 * MiB))
    filesystems.make_filesystem(device, "ext4")
    tiny = scratch.mount(device, "tiny", "ext4")
    src = scratch.path("big.img")
    with open(src, "wb") as handle:
        handle.write(os.urandom(32 * MiB))
    dst = os.path.join(tiny, "copy.img")
    with pytest.raises(Exception, match="No space left"):
        filesystems.sparse_copy(src, dst)
    assert not os.path.exists(dst)


def test_filesystem_error_reports_ext4_errors(scratch: Scratch):
    device = scratch.attach(scratch.image("e.img", 64 * MiB))
    filesystems.make_filesystem(device, "ext4")
    target = scratch.mount(device, "m", "ext4", ("errors=continue",))
    assert filesystems.filesystem_error(device, "ext4", target) is None
    with open(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error", "w") as handle:
        handle.write("injected by test")
    # ext4 copies the error into the superblock (which sysfs shows) from a work item.
    deadline = time.monotonic() + 10
    message = None
    while message is None and time.monotonic() < deadline:
        message = filesystems.filesystem_error(device, "ext4", target)
        time.sleep(0.02)
    assert message is not None and "error" in message and device in message


def test_filesystem_error_reports_a_shut_down_xfs(scratch: Scratch):
    device = scratch.attach(scratch.image("x.img", FS_SIZE))
    filesystems.make_filesystem(device, "xfs")
    target = scratch.mount(device, "m", "xfs")
    assert filesystems.filesystem_error(device, "xfs", target) is None
    commands.run(["xfs_io", "-x", "-c", "shutdown", target], timeout=30)
    message = filesystems.filesystem_error(device, "xfs", target)
    assert message is not None and target in message


def test_filesystem_error_of_a_healthy_btrfs(scratch: Scratch):
    device = scratch.attach(scratch.image("b.img", FS_SIZE))
    filesystems.make_filesystem(device, "btrfs")
    target = scratch.mount(device, "m", "btrfs")
    assert filesystems.filesystem_error(device, "btrfs", target) is None
