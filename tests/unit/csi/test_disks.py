"""Disk selection and the sysfs-only safety checks, on a fabricated sysfs tree (no root)."""

from __future__ import annotations

import os

import pytest

from csi_driver import disks
from plugin_runtime.errors import InvalidArgument


def _disk(sys_path: str) -> disks.Disk:
    return disks.Disk(
        devnode="/dev/sdz",
        kernel_name="sdz",
        sys_path=sys_path,
        size_bytes=1 << 30,
        major=8,
        minor=400,
        disk_id="serial-x",
    )


def _sysfs(tmp_path, *, ro: str = "0", partitions=(), holders=()):
    base = tmp_path / "sdz"
    (base / "holders").mkdir(parents=True)
    (base / "ro").write_text(ro + "\n")
    for name in partitions:
        (base / name).mkdir()
        (base / name / "partition").write_text("1\n")
    for name in holders:
        (base / "holders" / name).mkdir()
    return str(base)


def test_disk_with_partitions_is_refused_and_they_are_named(tmp_path):
    disk = _disk(_sysfs(tmp_path, partitions=("sdz1", "sdz2")))
    assert disks.list_partitions(disk) == ["sdz1", "sdz2"]
    assert disks.unsafe_reason(disk) == "/dev/sdz has partitions (sdz1, sdz2)"


def test_disk_with_holders_is_refused(tmp_path):
    disk = _disk(_sysfs(tmp_path, holders=("dm-0",)))
    assert disks.unsafe_reason(disk) == "/dev/sdz is held by dm-0"


def test_read_only_and_vanished_disks_are_refused(tmp_path):
    assert disks.unsafe_reason(_disk(_sysfs(tmp_path, ro="1"))) == "/dev/sdz is read-only"
    assert disks.unsafe_reason(_disk(str(tmp_path / "gone"))) == "/dev/sdz is gone"


def test_mounted_disk_is_refused_by_major_minor(tmp_path):
    from csi_driver import mounts

    table = mounts.parse_mountinfo("40 1 8:400 / /srv rw - xfs /dev/sdz rw\n")
    reason = disks.unsafe_reason(_disk(_sysfs(tmp_path)), entries=table)
    assert reason == "/dev/sdz is mounted at /srv"


def test_selector_matching_rules():
    attrs: dict[str, str | None] = {"queue/rotational": "0", "device/model": "QEMU HARDDISK"}
    nothing: dict[str, str | None] = {}
    selector = disks.DiskSelector(
        properties={"ID_BUS": "scsi"},
        attributes={"queue/rotational": "0", "device/model": "QEMU*"},
        kernel_names=("sd[a-z]", "vd?"),
        min_size=1 << 30,
        max_size=1 << 40,
    )
    assert selector.matches("sdb", 1 << 31, {"ID_BUS": "scsi"}, attrs.get)
    assert not selector.matches("sdb1", 1 << 31, {"ID_BUS": "scsi"}, attrs.get)
    assert not selector.matches("sdb", 1 << 20, {"ID_BUS": "scsi"}, attrs.get)
    assert not selector.matches("sdb", 1 << 41, {"ID_BUS": "scsi"}, attrs.get)
    assert not selector.matches("sdb", 1 << 31, {}, attrs.get)
    assert not selector.matches("sdb", 1 << 31, {"ID_BUS": "scsi"}, nothing.get)
    assert disks.DiskSelector().matches("anything", 1, {}, nothing.get)


@pytest.mark.parametrize("name", ["../x", "a/../b", "/abs", "a b", ""])
def test_selector_refuses_attribute_names_that_escape_sysfs(name):
    with pytest.raises(InvalidArgument, match="sysfs path"):
        disks.DiskSelector(attributes={name: "*"})


def test_disk_id_prefers_wwn_then_serial_then_backing_file():
    ids = [
        disks._disk_id("sda", "/sys/a", wwn="0x5000", serial="S1", id_path="p", backing=None),
        disks._disk_id("sda", "/sys/a", wwn=None, serial="S1", id_path="p", backing=None),
        disks._disk_id("loop3", "/sys/l", wwn=None, serial=None, id_path=None, backing="/i"),
        disks._disk_id("sda", "/sys/a", wwn=None, serial=None, id_path="pci-0", backing=None),
        disks._disk_id("sda", "/sys/a", wwn=None, serial=None, id_path=None, backing=None),
    ]
    assert ids[:2] == ["wwn-0x5000", "serial-S1"]
    assert ids[2].startswith("loop-") and ids[3] == "path-pci-0" and ids[4].startswith("sys-")
    assert ids[2] == disks._disk_id(
        "loop7", "/sys/o", wwn=None, serial=None, id_path=None, backing="/i"
    )
    assert os.sep not in "".join(ids[2:3])
