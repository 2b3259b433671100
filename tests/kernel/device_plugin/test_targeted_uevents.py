"""Targeted uevent handling on real kernel uevents: each burst re-reads the
devices it names and nothing else, and add, change and remove all land.

The test makes loop devices of its own with ``LOOP_CTL_ADD`` at random high
indices (``losetup --find`` hands out the lowest free index, so other users on
the machine never pick these) and deletes them with ``LOOP_CTL_REMOVE``: real
``add`` and ``remove`` uevents of a device that really comes and goes.  The
configuration matches only this test's devices by kernel name, and every device
is removed in teardown even on failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pyudev

from device_plugin import discovery
from device_plugin.config import parse_yaml
from device_plugin.discovery import UdevDiscovery
from device_plugin.matching import AttributeNeeds, DeviceInfo, attribute_needs

WAIT = 15.0
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
BLKROSET = 0x125D


class OwnLoops:
    """Loop devices this test created; all removed at the end whatever happened."""

    def __init__(self) -> None:
        self.control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        self.made: list[int] = []

    def add(self) -> str:
        """A new, unbound loop device; returns its sysfs path."""
        for _ in range(100):
            index = random.randrange(3000, 9000)
            try:
                number = fcntl.ioctl(self.control, LOOP_CTL_ADD, index)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise
            self.made.append(number)
            return f"/sys/devices/virtual/block/loop{number}"
        raise AssertionError("no free loop index found")

    def remove(self, sys_path: str) -> None:
        number = int(os.path.basename(sys_path).removeprefix("loop"))
        fcntl.ioctl(self.control, LOOP_CTL_REMOVE, number)
        self.made.remove(number)

    def cleanup(self) -> None:
        for number in list(self.made):
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.control, LOOP_CTL_REMOVE, number)
            self.made.remove(number)
        os.close(self.control)


@pytest.fixture
def loops() -> Iterator[OwnLoops]:
    own = OwnLoops()
    try:
        yield own
    finally:
        own.cleanup()


class Published:
    """Discovery's sink: keeps the latest inventory and wakes waiters."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.latest: dict[str, DeviceInfo] = {}

    def __call__(self, devices: tuple[DeviceInfo, ...], _event: float | None) -> None:
        with self.cond:
            self.count += 1
            self.latest = {d.sys_path: d for d in devices}
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, DeviceInfo]], bool], what: str,
                 after: int = 0) -> dict[str, DeviceInfo]:
        deadline = time.monotonic() + WAIT
        with self.cond:
            while self.count <= after or not predicate(self.latest):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out waiting for {what}; last {sorted(self.latest)}"
                self.cond.wait(remaining)
            return self.latest


def config_for(*sys_paths: str) -> Any:
    names = ", ".join(f'{{subsystem: block, kernel: "{os.path.basename(p)}"}}'
                      for p in sys_paths)
    return parse_yaml(f"""
resync_seconds: 3600
resources:
  - name: own-loops
    match: [{names}]
    health: {{probe: attribute, attribute: ro, healthy_values: ["0"], interval_seconds: 3600}}
""")


@contextlib.contextmanager
def running(config: Any, published: Published) -> Iterator[UdevDiscovery]:
    udev = UdevDiscovery(config, published)
    udev.start()
    try:
        assert udev.ready.wait(WAIT) and udev.error is None
        yield udev
    finally:
        udev.stop()


def uevent(sys_path: str, action: str) -> None:
    with open(os.path.join(sys_path, "uevent"), "w") as f:
        f.write(action)


def test_a_change_uevent_updates_that_device(loops):
    sys_path = loops.add()
    published = Published()
    with running(config_for(sys_path), published):
        published.wait_for(lambda inv: sys_path in inv, "our device")
        fd = os.open(f"/dev/{os.path.basename(sys_path)}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for flag in ("1", "0"):
                fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(flag)))
                uevent(sys_path, "change")  # resync is an hour away: only this event

                def flipped(inv: dict[str, DeviceInfo], want: str = flag) -> bool:
                    info = inv.get(sys_path)
                    return info is not None and info.attributes.get("ro") == want

                published.wait_for(flipped, f"ro={flag} after the change uevent")
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, BLKROSET, struct.pack("i", 0))
            os.close(fd)


def test_a_new_device_is_added_and_a_removed_one_leaves(loops):
    # Guess the name first: the config must match the device before it exists.
    sys_path = loops.add()
    loops.remove(sys_path)
    published = Published()
    with running(config_for(sys_path), published):
        first = published.wait_for(lambda inv: True, "the first enumeration")
        assert sys_path not in first
        seen = published.count
        number = int(os.path.basename(sys_path).removeprefix("loop"))
        assert fcntl.ioctl(loops.control, LOOP_CTL_ADD, number) == number
        loops.made.append(number)
        added = published.wait_for(lambda inv: sys_path in inv, "the add uevent", seen)
        assert added[sys_path].devnode == f"/dev/loop{number}"
        loops.remove(sys_path)
        published.wait_for(lambda inv: sys_path not in inv, "the remove uevent")


def test_a_uevent_reads_only_the_device_it_names(loops, monkeypatch):
    target = loops.add()
    bystanders = {loops.add() for _ in range(16)}
    reads: list[str] = []
    armed = threading.Event()
    real = discovery.device_info

    def spy(device: Any, needs: AttributeNeeds) -> DeviceInfo | None:
        if armed.is_set():
            reads.append(str(device.sys_path))
        return real(device, needs)

    monkeypatch.setattr(discovery, "device_info", spy)
    published = Published()
    # Every device of ours matches, so a rescan would read each bystander.
    with running(config_for(target, *bystanders), published):
        published.wait_for(lambda inv: {target, *bystanders} <= set(inv), "our devices")
        seen = published.count
        armed.set()
        uevent(target, "change")
        published.wait_for(lambda _inv: target in reads, "the change to be read", seen)
    assert not bystanders & set(reads), "a bystander was re-read for another's uevent"
    # A full enumeration reads them all: the spy does see such reads.
    reads.clear()
    discovery.enumerate_devices(pyudev.Context(), {"block"}, attribute_needs(config_for(target)))
    assert bystanders <= set(reads)
