"""csi_driver.mounts with real mount(2)/umount2(2) on loop devices (root)."""

from __future__ import annotations

import errno
import os

import pytest

from csi_driver import mounts
from plugin_runtime import commands
from plugin_runtime.errors import FailedPrecondition, NotFound

from .conftest import Scratch

MiB = 1 << 20


@pytest.fixture
def ext4_device(scratch: Scratch) -> str:
    device = scratch.attach(scratch.image("fs.img", 64 * MiB))
    commands.run(["mkfs.ext4", "-F", "-q", device], timeout=60)
    return device


def test_mount_with_flag_and_data_options_shows_in_mountinfo(scratch: Scratch, ext4_device: str):
    target = scratch.mount(ext4_device, "m", "ext4", ("noatime", "nosuid", "data=ordered"))
    entry = mounts.find_mount(target)
    assert entry is not None
    assert entry.fs_type == "ext4" and entry.source == ext4_device
    assert {"noatime", "nosuid", "rw"} <= set(entry.mount_options)
    assert "data=ordered" in entry.super_options
    st = os.stat(ext4_device)
    assert mounts.mounts_of_device(os.major(st.st_rdev), os.minor(st.st_rdev)) == [entry]
    with open(os.path.join(target, "f"), "w") as handle:
        handle.write("hello")
    mounts.unmount(target)
    assert not mounts.is_mountpoint(target)
    mounts.unmount(target)  # not mounted: a no-op


def test_read_only_mount_refuses_writes(scratch: Scratch, ext4_device: str):
    target = scratch.directory("ro")
    mounts.mount(ext4_device, target, "ext4", read_only=True)
    scratch.mount_points.append(target)
    with pytest.raises(OSError) as info:
        open(os.path.join(target, "f"), "w").close()
    assert info.value.errno == errno.EROFS


def test_read_only_bind_mount_really_refuses_writes(scratch: Scratch, ext4_device: str):
    source = scratch.mount(ext4_device, "m", "ext4")
    os.makedirs(os.path.join(source, "sub"))
    bound = scratch.bind(os.path.join(source, "sub"), "b", read_only=True)
    entry = mounts.find_mount(bound)
    assert entry is not None and entry.root == "/sub" and entry.read_only
    with pytest.raises(OSError) as info:
        open(os.path.join(bound, "f"), "w").close()
    assert info.value.errno == errno.EROFS
    # The source stays writable.
    open(os.path.join(source, "sub", "f"), "w").close()
    assert os.path.exists(os.path.join(bound, "f"))


def test_bind_mount_of_a_device_node_onto_a_file(scratch: Scratch, ext4_device: str):
    target = scratch.path("blockfile")
    open(target, "x").close()
    mounts.bind_mount(ext4_device, target)
    scratch.mount_points.append(target)
    assert os.path.samestat(os.stat(target), os.stat(ext4_device))


def test_unmount_of_a_busy_mount_raises_and_is_not_lazy(scratch: Scratch, ext4_device: str):
    target = scratch.mount(ext4_device, "busy", "ext4")
    with open(os.path.join(target, "held"), "w"):
        with pytest.raises(FailedPrecondition, match=target):
            mounts.unmount(target)
        # Not detached lazily: still in the mount table and still reachable.
        assert mounts.is_mountpoint(target)
    mounts.unmount(target)
    assert not mounts.is_mountpoint(target)


def test_stacked_mounts_unmount_one_layer_at_a_time(scratch: Scratch, ext4_device: str):
    target = scratch.mount(ext4_device, "stack", "ext4")
    first = mounts.find_mount(target)
    scratch.bind(scratch.directory("other"), "stack")
    top = mounts.find_mount(target)
    assert first is not None and top is not None and top.parent_id == first.mount_id
    mounts.unmount(target)
    assert mounts.find_mount(target) == first


def test_mount_errors_name_the_cause(scratch: Scratch, ext4_device: str):
    with pytest.raises(NotFound):
        mounts.mount(ext4_device, scratch.path("absent"), "ext4")
    with pytest.raises(mounts.MountError) as info:
        mounts.mount(ext4_device, scratch.directory("x"), "xfs")
    assert info.value.errno == errno.EINVAL
    assert not mounts.is_mountpoint(scratch.path("x"))


def test_detach_of_a_mounted_loop_device_is_refused_and_stays_attached(
    scratch: Scratch, ext4_device: str, monkeypatch
):
    from csi_driver import loop

    monkeypatch.setattr(loop, "DETACH_WAIT_SECONDS", 0.2)
    scratch.mount(ext4_device, "m", "ext4")
    with pytest.raises(FailedPrecondition, match=ext4_device):
        loop.detach(ext4_device)
    (info,) = [i for i in loop.list_attached() if i.device == ext4_device]
    assert not info.autoclear  # not turned into a lazy "clear on last close"


def test_unmount_does_not_follow_a_symlink_target(scratch: Scratch, ext4_device: str):
    target = scratch.mount(ext4_device, "real", "ext4")
    link = scratch.path("link")
    os.symlink(target, link)
    mounts.unmount(link)  # the link itself is not a mount point: no-op
    assert mounts.is_mountpoint(target)
    assert mounts.find_mount(link) is not None  # lookups do resolve the link


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash", "new\nline", "a b"])
def test_find_mount_finds_a_real_mount_point_whose_name_the_kernel_escapes(
    scratch: Scratch, ext4_device: str, name: str
):
    """find_mount reads only the mountinfo lines holding the escaped path: a path the
    kernel escapes must still be found, and a prefix of it must not be."""
    target = scratch.mount(ext4_device, name, "ext4", ())
    entry = mounts.find_mount(target)
    assert entry is not None and entry.mount_point == target and entry.source == ext4_device
    assert mounts.find_mount(os.path.dirname(target) + "/" + name[:1]) is None
    assert mounts.is_mountpoint(target)
