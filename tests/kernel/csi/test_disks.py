"""csi_driver.disks on real loop devices through pyudev and real kernel uevents (root)."""

from __future__ import annotations

import os
import queue
import struct

import pytest

from csi_driver import disks, filesystems, loop
from plugin_runtime.errors import InvalidArgument

from .conftest import Scratch

MiB = 1 << 20
EVENT_TIMEOUT = 20.0


def _selector(scratch: Scratch, **kwargs) -> disks.DiskSelector:
    # Only loop devices backed by this test's own files: other helpers' devices never match.
    return disks.DiskSelector(
        kernel_names=("loop*",),
        attributes={"loop/backing_file": f"{scratch.root}/*"},
        **kwargs,
    )


def _write_mbr(image: str) -> None:
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 8192)
    with open(image, "r+b") as handle:
        handle.seek(446)
        handle.write(entry)
        handle.seek(510)
        handle.write(b"\x55\xaa")


def test_find_disks_matches_own_loop_device_and_describes_it(scratch: Scratch):
    image = scratch.image("d1.img", 32 * MiB)
    device = scratch.attach(image)
    scratch.attach(scratch.image("small.img", 4 * MiB))
    (disk,) = disks.find_disks(_selector(scratch, min_size=16 * MiB))
    assert disk.devnode == device
    assert disk.kernel_name == os.path.basename(device)
    assert disk.size_bytes == 32 * MiB
    st = os.stat(device)
    assert (disk.major, disk.minor) == (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert disk.backing_file == image
    assert disk.disk_id.startswith("loop-")
    assert len(disks.find_disks(_selector(scratch))) == 2
    assert disks.find_disks(_selector(scratch, max_size=2 * MiB)) == []
    only = disks.DiskSelector(kernel_names=(disk.kernel_name,), properties={"DEVTYPE": "disk"})
    assert [d.devnode for d in disks.find_disks(only)] == [device]
    no_match = disks.DiskSelector(kernel_names=(disk.kernel_name,), properties={"ID_X": "*"})
    assert disks.find_disks(no_match) == []
    assert disks.unsafe_reason(disk) is None


def test_disk_id_is_stable_across_reattach(scratch: Scratch):
    image = scratch.image("stable.img", 16 * MiB)
    device = scratch.attach(image)
    (first,) = disks.find_disks(_selector(scratch))
    loop.detach(device)
    scratch.attach(image)
    (second,) = disks.find_disks(_selector(scratch))
    assert first.disk_id == second.disk_id


def test_unsafe_once_it_has_a_filesystem_or_is_mounted(scratch: Scratch):
    device = scratch.attach(scratch.image("fs.img", 64 * MiB))
    (disk,) = disks.find_disks(_selector(scratch))
    assert disks.unsafe_reason(disk) is None
    filesystems.make_filesystem(device, "ext4")
    reason = disks.unsafe_reason(disk)
    assert reason is not None and "signature" in reason and "ext4" in reason
    target = scratch.mount(device, "m", "ext4")
    reason = disks.unsafe_reason(disk)
    assert reason is not None and "mounted" in reason and target in reason


def test_unsafe_when_it_has_a_partition_table(scratch: Scratch):
    image = scratch.image("parts.img", 16 * MiB)
    _write_mbr(image)
    scratch.attach(image, partscan=True)
    (disk,) = disks.find_disks(_selector(scratch))
    reason = disks.unsafe_reason(disk)
    assert reason is not None
    if disks.list_partitions(disk):
        # A kernel with MSDOS_PARTITION made loopNp1: refused for its partitions.
        assert f"{disk.kernel_name}p1" in reason
    else:
        # This machine's kernel has no partition parsers: the table's signature refuses it.
        assert "signature" in reason


def test_unsafe_when_read_only(scratch: Scratch):
    scratch.attach(scratch.image("ro.img", 16 * MiB), read_only=True)
    (disk,) = disks.find_disks(_selector(scratch))
    reason = disks.unsafe_reason(disk)
    assert reason is not None and "read-only" in reason


def test_protected_paths_resolve_through_loop_backing_files(scratch: Scratch):
    # A filesystem on loop A holds the "state dir"; loop B is backed by a file on it.
    lower = scratch.attach(scratch.image("lower.img", 64 * MiB))
    filesystems.make_filesystem(lower, "ext4")
    mounted = scratch.mount(lower, "lower", "ext4")
    state_dir = os.path.join(mounted, "state")
    os.mkdir(state_dir)
    images = os.path.join(mounted, "images")
    os.mkdir(images)
    upper_image = os.path.join(images, "vol.img")
    with open(upper_image, "wb") as handle:
        handle.truncate(16 * MiB)
    upper = scratch.attach(upper_image)

    root_dev = os.stat("/").st_dev
    root_disk = os.path.basename(
        os.path.realpath(f"/sys/dev/block/{os.major(root_dev)}:{os.minor(root_dev)}")
    )
    protected = disks.protected_disks([state_dir])
    assert os.path.basename(lower) in protected
    assert root_disk in protected or os.path.exists(
        f"/sys/dev/block/{os.major(root_dev)}:{os.minor(root_dev)}/partition"
    )
    assert os.path.basename(upper) not in protected

    selector = disks.DiskSelector(kernel_names=(os.path.basename(upper),))
    (disk,) = disks.find_disks(selector)
    assert disks.unsafe_reason(disk, protected_paths=("/", state_dir)) is None
    reason = disks.unsafe_reason(disk, image_dirs=(images,))
    assert reason is not None and "own" in reason
    # Protecting a path on the upper device itself refuses it.
    filesystems.make_filesystem(upper, "ext4")
    top = scratch.mount(upper, "upper", "ext4")
    assert os.path.basename(upper) in disks.protected_disks([top])


def test_selector_validation():
    with pytest.raises(InvalidArgument, match="sysfs path"):
        disks.DiskSelector(attributes={"../../etc/passwd": "*"})
    with pytest.raises(InvalidArgument, match="size range"):
        disks.DiskSelector(min_size=10, max_size=5)


def test_watcher_sees_own_loop_device_appear_change_and_disappear(scratch: Scratch):
    changes: queue.Queue[tuple[list[disks.Disk], list[str]]] = queue.Queue()
    watcher = disks.DiskWatcher(
        _selector(scratch),
        lambda added, removed: changes.put((added, removed)),
        resync_seconds=600,
    )
    watcher.start()
    try:
        assert changes.get(timeout=EVENT_TIMEOUT) == ([], [])  # initial snapshot
        image = scratch.image("w.img", 16 * MiB)
        device = scratch.attach(image)  # the kernel sends "change" on attach
        added, removed = changes.get(timeout=EVENT_TIMEOUT)
        assert [d.devnode for d in added] == [device] and removed == []
        disk_id = added[0].disk_id
        assert [d.disk_id for d in watcher.snapshot()] == [disk_id]

        os.truncate(image, 24 * MiB)
        loop.refresh_capacity(device)
        added, removed = changes.get(timeout=EVENT_TIMEOUT)
        assert [(d.disk_id, d.size_bytes) for d in added] == [(disk_id, 24 * MiB)]

        # Synthetic uevents only trigger a resync: sysfs, not the event's action, is
        # the truth, so a synthetic "remove" of a device that is still there reports
        # nothing, and the next call is the real detach.
        for action in ("remove", "add", "change"):
            with open(f"/sys/class/block/{os.path.basename(device)}/uevent", "w") as handle:
                handle.write(action)
        loop.detach(device)
        added, removed = changes.get(timeout=EVENT_TIMEOUT)
        assert added == [] and removed == [disk_id]
        assert watcher.snapshot() == []
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()
