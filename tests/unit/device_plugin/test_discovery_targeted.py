"""Targeted uevent handling: a burst re-reads the devices it names, nothing else,
and falls back to re-enumeration where a targeted update cannot be trusted.

A fake sysfs stands in for pyudev: each fake device's ``sys_path`` is a real
temporary directory (attributes are read from files there by the real
``device_plugin.sysfs``) and its node a real file (discovery ``stat``s it).
``pyudev.Devices.from_sys_path`` and ``Context.list_devices`` look devices up in
that fake sysfs, and a spy records every ``device_info`` call.  After every
update the inventory must equal what a full enumeration of the same fake
system state gives, in content and order.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pyudev

from device_plugin import discovery
from device_plugin.config import parse_yaml
from device_plugin.discovery import (
    MAX_TARGETED_DEVICES,
    Burst,
    Inventory,
    UdevDiscovery,
    enumerate_devices,
)
from device_plugin.matching import AttributeNeeds, DeviceInfo

NEEDS = AttributeNeeds(frozenset({"ro"}), frozenset())
WATCHED = frozenset({"block", "tty"})
CONFIG = "resources:\n  - {name: b, match: [{subsystem: block}]}\n"


class FakeDevice:
    """Shaped like pyudev.Device in what discovery reads."""

    def __init__(self, sys_path: str, subsystem: str, node: str | None,
                 parent: FakeDevice | None = None) -> None:
        self.sys_path = sys_path
        self.sys_name = os.path.basename(sys_path)
        self.subsystem = subsystem
        self.device_type = None
        self.device_node = node
        self.parent = parent
        self.properties: dict[str, str] = {}
        self.device_links: tuple[str, ...] = ()


class FakeSysfs:
    """Devices that exist now, by sysfs path, rooted in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices: dict[str, FakeDevice] = {}
        self.listed: list[str | None] = []

    def add(self, rel: str, subsystem: str, ro: str = "0",
            parent: FakeDevice | None = None) -> FakeDevice:
        sys_path = self.root / "sys" / rel
        sys_path.mkdir(parents=True, exist_ok=True)
        (sys_path / "ro").write_text(ro + "\n")
        node = self.root / "dev" / sys_path.name
        node.parent.mkdir(exist_ok=True)
        node.write_text("")
        device = FakeDevice(str(sys_path), subsystem, str(node), parent)
        self.devices[device.sys_path] = device
        return device

    def remove(self, device: FakeDevice) -> None:
        del self.devices[device.sys_path]
        assert device.device_node is not None
        os.unlink(device.device_node)

    def list_devices(self, subsystem: str | None = None) -> list[FakeDevice]:
        self.listed.append(subsystem)
        return [d for d in self.devices.values() if subsystem in (None, d.subsystem)]

    def from_sys_path(self, _context: Any, sys_path: str) -> FakeDevice:
        try:
            return self.devices[sys_path]
        except KeyError:
            raise pyudev.DeviceNotFoundAtPathError(sys_path) from None


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    fake = FakeSysfs(tmp_path)
    monkeypatch.setattr(pyudev.Devices, "from_sys_path", fake.from_sys_path)
    return fake


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sysfs path of every device ``device_info`` was asked to read."""
    seen: list[str] = []
    real = discovery.device_info

    def spy(device: Any, needs: AttributeNeeds) -> DeviceInfo | None:
        seen.append(str(device.sys_path))
        return real(device, needs)

    monkeypatch.setattr(discovery, "device_info", spy)
    return seen


def full(sysfs: FakeSysfs) -> tuple[DeviceInfo, ...]:
    """What a full enumeration of the watched subsystems publishes now."""
    fresh = Inventory()
    fresh.replace(enumerate_devices(sysfs, WATCHED, NEEDS), None)
    return fresh.devices()


def started(sysfs: FakeSysfs, reads: list[str]) -> Inventory:
    inventory = Inventory()
    inventory.replace(enumerate_devices(sysfs, WATCHED, NEEDS), None)
    reads.clear()
    sysfs.listed.clear()
    return inventory


def burst(*events: tuple[str | None, str, str | None]) -> Burst:
    result = Burst()
    for subsystem, action, sys_path in events:
        result.add(subsystem, action, sys_path)
    return result


def loops(sysfs: FakeSysfs, count: int) -> list[FakeDevice]:
    return [sysfs.add(f"devices/virtual/block/loop{i}", "block") for i in range(count)]


def ro(inventory: Inventory, device: FakeDevice) -> str | None:
    found = [d for d in inventory.devices() if d.sys_path == device.sys_path]
    return found[0].attributes.get("ro") if found else None


def test_a_change_re_reads_only_the_named_device(sysfs, reads):
    devices = loops(sysfs, 100)
    inventory = started(sysfs, reads)
    target = devices[42]
    Path(target.sys_path, "ro").write_text("1\n")
    Path(devices[7].sys_path, "ro").write_text("1\n")  # changed, but no event names it

    inventory.apply(sysfs, burst(("block", "change", target.sys_path)), WATCHED, NEEDS)

    assert reads == [target.sys_path]
    assert sysfs.listed == []  # no enumeration at all
    assert ro(inventory, target) == "1"
    assert ro(inventory, devices[7]) == "0"  # level-triggered per device, not per system


def test_an_added_device_joins_the_inventory_in_enumeration_order(sysfs, reads):
    loops(sysfs, 5)
    inventory = started(sysfs, reads)
    new = sysfs.add("devices/virtual/block/loop10", "block")

    inventory.apply(sysfs, burst(("block", "add", new.sys_path)), WATCHED, NEEDS)

    assert reads == [new.sys_path]
    assert new.sys_path in [d.sys_path for d in inventory.devices()]
    assert inventory.devices() == full(sysfs)


def test_a_removed_device_leaves_with_its_children(sysfs, reads):
    usb = FakeDevice(str(sysfs.root / "sys/devices/usb1/1-2"), "usb", None)
    tty = sysfs.add("devices/usb1/1-2/1-2:1.0/tty/ttyUSB0", "tty", parent=usb)
    other = sysfs.add("devices/usb1/1-3/1-3:1.0/tty/ttyUSB1", "tty")
    inventory = started(sysfs, reads)
    assert tty.sys_path in {d.sys_path for d in inventory.devices()}
    sysfs.remove(tty)

    # Only the parent's remove arrives (the child's event was lost or filtered).
    inventory.apply(sysfs, burst(("usb", "remove", usb.sys_path)), WATCHED, NEEDS)

    assert reads == []  # neither exists any more: nothing to read
    assert sysfs.listed == []
    assert [d.sys_path for d in inventory.devices()] == [other.sys_path]
    assert inventory.devices() == full(sysfs)


def test_a_change_on_a_parent_re_reads_its_known_children(sysfs, reads):
    usb = FakeDevice(str(sysfs.root / "sys/devices/usb1/1-2"), "usb", None)
    sysfs.devices[usb.sys_path] = usb  # exists, has no node: never in the inventory
    tty = sysfs.add("devices/usb1/1-2/1-2:1.0/tty/ttyUSB0", "tty", parent=usb)
    sysfs.add("devices/usb1/1-3/1-3:1.0/tty/ttyUSB1", "tty")
    inventory = started(sysfs, reads)
    Path(tty.sys_path, "ro").write_text("1\n")

    inventory.apply(sysfs, burst(("usb", "bind", usb.sys_path)), WATCHED, NEEDS)

    assert reads == [usb.sys_path, tty.sys_path]  # not the other tty
    assert ro(inventory, tty) == "1"
    assert inventory.devices() == full(sysfs)


def test_a_synthetic_remove_keeps_a_device_that_still_exists(sysfs, reads):
    devices = loops(sysfs, 3)
    inventory = started(sysfs, reads)

    inventory.apply(sysfs, burst(("block", "remove", devices[1].sys_path)), WATCHED, NEEDS)

    assert inventory.devices() == full(sysfs)
    assert len(inventory.devices()) == 3


def test_a_device_that_stops_qualifying_is_dropped(sysfs, reads):
    devices = loops(sysfs, 3)
    inventory = started(sysfs, reads)
    assert devices[0].device_node is not None
    os.unlink(devices[0].device_node)  # node gone, sysfs entry still there

    inventory.apply(sysfs, burst(("block", "change", devices[0].sys_path)), WATCHED, NEEDS)

    assert devices[0].sys_path not in {d.sys_path for d in inventory.devices()}
    assert inventory.devices() == full(sysfs)


def test_a_device_of_an_unwatched_subsystem_is_not_adopted(sysfs, reads):
    inventory = started(sysfs, reads)
    net = sysfs.add("devices/virtual/misc/tun", "misc")

    inventory.apply(sysfs, burst(("block", "add", net.sys_path)), WATCHED, NEEDS)

    assert inventory.devices() == () == full(sysfs)


def test_a_device_that_fails_to_read_is_dropped_not_fatal(sysfs, reads, monkeypatch, caplog):
    devices = loops(sysfs, 2)
    inventory = started(sysfs, reads)

    def broken(_context: Any, _sys_path: str) -> Any:
        class Exploding:
            sys_path = devices[0].sys_path

            @property
            def device_node(self) -> str:
                raise RuntimeError("libudev returned garbage")
        return Exploding()

    monkeypatch.setattr(pyudev.Devices, "from_sys_path", broken)
    inventory.apply(sysfs, burst(("block", "change", devices[0].sys_path)), WATCHED, NEEDS)

    assert [d.sys_path for d in inventory.devices()] == [devices[1].sys_path]
    assert "skipping device" in caplog.text


@pytest.mark.parametrize(("events", "listed"), [
    pytest.param([("block", "change", None)], ["block"], id="no-sys-path"),
    pytest.param([(None, "change", "/sys/devices/x")], ["block", "tty"], id="no-subsystem"),
    pytest.param([("block", "move", "/sys/devices/virtual/block/loop0")], ["block", "tty"],
                 id="move"),
    pytest.param([("block", "change", f"/sys/devices/virtual/block/loop{i}")
                  for i in range(MAX_TARGETED_DEVICES + 1)], ["block"], id="large-burst"),
])
def test_untrusted_bursts_fall_back_to_enumeration(sysfs, reads, events, listed):
    devices = loops(sysfs, 4)
    tty = sysfs.add("devices/usb1/1-3/tty/ttyUSB1", "tty")
    inventory = started(sysfs, reads)
    gone, added = devices[0], sysfs.add("devices/virtual/block/loop9", "block")
    sysfs.remove(gone)
    Path(tty.sys_path, "ro").write_text("1\n")

    inventory.apply(sysfs, burst(*events), WATCHED, NEEDS)

    assert sorted(s for s in sysfs.listed if s is not None) == listed
    assert added.sys_path in {d.sys_path for d in inventory.devices()}
    assert gone.sys_path not in {d.sys_path for d in inventory.devices()}
    # A rescan of block only leaves tty as it was; a rescan of all sees its change.
    assert ro(inventory, tty) == ("1" if "tty" in listed else "0")
    assert (inventory.devices() == full(sysfs)) == ("tty" in listed)


def test_a_burst_at_the_limit_stays_targeted():
    result = burst(*[("block", "change", f"/sys/devices/virtual/block/loop{i}")
                     for i in range(MAX_TARGETED_DEVICES)])
    assert len(result.devices) == MAX_TARGETED_DEVICES and not result.rescan
    result.add("block", "change", "/sys/devices/virtual/block/loop999")
    assert result.devices == {} and result.rescan == {"block"}
    result.add("block", "add", "/sys/devices/virtual/block/loop1000")  # still covered
    assert result.devices == {} and result.rescan == {"block"}


class FakeMonitor:
    """``poll`` hands out queued uevents (or raises queued errors), then None."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def poll(self, timeout: float = 0.0) -> Any:
        if not self.events:
            return None
        event = self.events.pop(0)
        if isinstance(event, BaseException):
            raise event
        return event


class Event:
    """A received uevent, as the monitor's pyudev.Device shows it."""

    def __init__(self, subsystem: str | None, action: str | None,
                 sys_path: str | None) -> None:
        self.subsystem, self.action, self.sys_path = subsystem, action, sys_path


def drain(events: list[Any]) -> Burst:
    udev = UdevDiscovery(parse_yaml(CONFIG), lambda *_: None, coalesce_seconds=0.0005)
    try:  # never started: only the drain runs, on this thread
        return udev._drain(FakeMonitor(events), time.monotonic())
    finally:
        udev.stop()


def test_drain_collects_each_named_device_with_its_subsystem():
    result = drain([Event("block", "add", "/sys/a"), Event("block", "change", "/sys/a"),
                    Event("tty", "remove", "/sys/b")])
    assert result == Burst({"/sys/a": "block", "/sys/b": "tty"})


@pytest.mark.parametrize("events", [
    pytest.param([Event("block", "change", "/sys/a"), OSError(errno.ENOBUFS, "No buffer")],
                 id="overflow"),
    pytest.param([Event("block", "move", "/sys/b")], id="move"),
    pytest.param([Event(None, "change", "/sys/a")], id="no-subsystem"),
])
def test_drain_marks_lost_or_renamed_events_for_a_full_rescan(events):
    assert drain(events).rescan_all


def test_drain_of_nothing_is_empty():
    assert drain([]).empty()
