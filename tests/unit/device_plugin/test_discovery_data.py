"""Odd udev data never crashes discovery: sysfs values and pyudev-shaped devices."""

from __future__ import annotations

import os

import pytest

from device_plugin import sysfs
from device_plugin.discovery import device_info, enumerate_devices
from device_plugin.matching import AttributeNeeds

NEEDS = AttributeNeeds(frozenset({"serial", "ro", "huge", "blob", "missing"}),
                       frozenset({"serial"}))


def test_attribute_values_are_capped_decoded_and_stripped(tmp_path):
    (tmp_path / "blob").write_bytes(b"\xff\xfeok\n")
    (tmp_path / "huge").write_bytes(b"x" * 100_000)
    (tmp_path / "ro").write_text("0\n")
    os.mkdir(tmp_path / "subdir")
    os.mkfifo(tmp_path / "fifo")
    assert sysfs.read_attribute(str(tmp_path), "blob") == "\ufffd\ufffdok"
    assert sysfs.read_attribute(str(tmp_path), "huge") == "x" * sysfs.MAX_ATTRIBUTE_BYTES
    assert sysfs.read_attribute(str(tmp_path), "ro") == "0"
    assert sysfs.read_attribute(str(tmp_path), "subdir") is None
    assert sysfs.read_attribute(str(tmp_path), "fifo") is None  # never blocks
    assert sysfs.read_attribute(str(tmp_path), "missing") is None
    assert sysfs.read_attribute(str(tmp_path), "../etc/passwd") is None
    assert sysfs.read_attribute(str(tmp_path), "/etc/passwd") is None


def test_numa_node_takes_the_first_known_one(tmp_path):
    dev, parent, root = (tmp_path / n for n in ("dev", "parent", "root"))
    for d in (dev, parent, root):
        d.mkdir()
    (dev / "numa_node").write_text("-1\n")
    (parent / "numa_node").write_text("garbage\n")
    (root / "numa_node").write_text("1\n")
    assert sysfs.numa_node([str(dev), str(parent), str(root)]) == 1
    assert sysfs.numa_node([str(dev)]) is None


class BadProperties:
    """A pyudev ``Properties`` view whose values may not decode."""

    def __init__(self, values: dict[str, object]) -> None:
        self.values = values

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, key: str) -> str:
        value = self.values[key]
        if isinstance(value, bytes):
            raise UnicodeDecodeError("utf-8", value, 0, 1, "invalid start byte")
        return str(value)


class FakeDevice:
    """Shaped like pyudev.Device in the attributes discovery reads."""

    def __init__(self, sys_path, node, parent=None, props=None, links=(), subsystem="tty"):
        self.sys_path = sys_path
        self.sys_name = os.path.basename(sys_path)
        self.subsystem = subsystem
        self.device_type = None
        self.device_node = node
        self.parent = parent
        self.properties = BadProperties(props or {})
        self._links = links

    @property
    def device_links(self):
        if self._links == "broken":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")
        return iter(self._links)


def test_undecodable_properties_are_skipped_and_values_capped(tmp_path):
    node = tmp_path / "ttyX"
    node.write_text("")
    (tmp_path / "serial").write_bytes(b"\xc3\x28")
    parent = FakeDevice(str(tmp_path), None, props={"DRIVER": "x"}, subsystem="usb")
    dev = FakeDevice(str(tmp_path), str(node), parent,
                     props={"GOOD": "yes", "BAD": b"\xff", "LONG": "y" * 10_000},
                     links="broken")
    info = device_info(dev, NEEDS)
    assert info is not None
    assert info.properties["GOOD"] == "yes" and "BAD" not in info.properties
    assert len(info.properties["LONG"]) == 4096
    assert info.attributes["serial"] == "\ufffd("
    assert info.devlinks == ()
    assert info.ancestors[0].properties == {"DRIVER": "x"}


def test_a_node_that_vanished_before_stat_is_left_out(tmp_path):
    dev = FakeDevice(str(tmp_path), str(tmp_path / "gone"))
    assert device_info(dev, NEEDS) is None
    assert device_info(FakeDevice(str(tmp_path), None), NEEDS) is None


def test_devlinks_fall_back_to_the_property_and_must_exist(tmp_path):
    node = tmp_path / "ttyX"
    node.write_text("")
    dev = FakeDevice(str(tmp_path), str(node),
                     props={"DEVLINKS": "/dev/null /dev/does-not-exist-dpd /etc/passwd"})
    info = device_info(dev, NEEDS)
    assert info is not None and info.devlinks == ("/dev/null",)


class FakeContext:
    def __init__(self, devices):
        self.devices = devices

    def list_devices(self, **_filters):
        return self.devices


class Exploding(FakeDevice):
    @property
    def device_node(self):
        raise RuntimeError("libudev returned garbage")

    @device_node.setter
    def device_node(self, value):
        pass


def test_one_broken_device_does_not_stop_enumeration(tmp_path, caplog):
    node = tmp_path / "ok"
    node.write_text("")
    good = FakeDevice(str(tmp_path / "sys-ok"), str(node))
    bad = Exploding(str(tmp_path / "sys-bad"), None)
    found = enumerate_devices(FakeContext([bad, good]), ["tty"], NEEDS)
    assert [d.devnode for d in found["tty"]] == [str(node)]
    assert "skipping device" in caplog.text


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "."])
def test_attribute_names_are_relative_paths(name):
    assert sysfs.attribute_name_problem(name) is not None
