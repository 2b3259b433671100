"""Discovery's start-up contract, observed on the real pyudev calls.

A spy wraps pyudev's ``Context`` and ``Monitor`` (every call goes to the real
library, on this host's real netlink socket and sysfs) and records their order:
the monitor must be listening before the first enumeration, or a device added
in between is never seen.  The event source follows ``/run/udev`` (checked
through a patched ``os.path.isdir``: this machine has no udevd) and is logged.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest
import pyudev

from device_plugin.config import parse_yaml
from device_plugin.discovery import UdevDiscovery
from device_plugin.matching import DeviceInfo

CONFIG = parse_yaml("""\
domain: hostkit.io
resources:
  - name: "null"
    match: [{subsystem: mem, kernel: "null"}]
""")


class _Spy:
    """Records pyudev calls in order and passes each to the real library."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        spy = self
        real_from_netlink = pyudev.Monitor.from_netlink

        class Context(pyudev.Context):  # type: ignore[misc]
            def list_devices(self, **filters: Any) -> Any:
                spy.calls.append(("list_devices", filters))
                return super().list_devices(**filters)

        class Monitor:
            def __init__(self, real: Any) -> None:
                self._real = real

            @staticmethod
            def from_netlink(context: Any, source: str = "udev") -> Monitor:
                spy.calls.append(("from_netlink", source))
                return Monitor(real_from_netlink(context, source=source))

            def filter_by(self, subsystem: str, device_type: str | None = None) -> None:
                spy.calls.append(("filter_by", subsystem))
                self._real.filter_by(subsystem, device_type)

            def start(self) -> None:
                spy.calls.append(("start", None))
                self._real.start()

            def __getattr__(self, name: str) -> Any:  # fileno, poll: unrecorded
                return getattr(self._real, name)

        self.Context = Context
        self.Monitor = Monitor

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    recorder = _Spy()
    monkeypatch.setattr(pyudev, "Context", recorder.Context)
    monkeypatch.setattr(pyudev, "Monitor", recorder.Monitor)
    return recorder


def _run_udev(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    real_isdir = os.path.isdir
    monkeypatch.setattr(
        os.path, "isdir", lambda p: present if p == "/run/udev" else real_isdir(p)
    )


def _first_inventory(udev: UdevDiscovery, published: list[tuple[DeviceInfo, ...]],
                     done: threading.Event) -> tuple[DeviceInfo, ...]:
    udev.start()
    try:
        assert udev.ready.wait(10) and udev.error is None
        assert done.wait(10)
    finally:
        udev.stop()
    return published[0]


def _sink() -> tuple[list[tuple[DeviceInfo, ...]], threading.Event, Any]:
    published: list[tuple[DeviceInfo, ...]] = []
    done = threading.Event()

    def sink(devices: tuple[DeviceInfo, ...], _event: float | None) -> None:
        published.append(devices)
        done.set()

    return published, done, sink


def test_the_monitor_listens_before_the_first_enumeration(spy, monkeypatch):
    _run_udev(monkeypatch, True)
    published, done, sink = _sink()
    inventory = _first_inventory(UdevDiscovery(CONFIG, sink), published, done)
    assert "/dev/null" in {d.devnode for d in inventory}
    names = spy.names()
    assert names[:3] == ["from_netlink", "filter_by", "start"], spy.calls
    assert ("filter_by", "mem") in spy.calls
    assert "list_devices" in names
    assert names.index("start") < names.index("list_devices"), spy.calls


@pytest.mark.parametrize(("present", "source"), [(True, "udev"), (False, "kernel")])
def test_the_event_source_follows_run_udev_and_is_logged(spy, monkeypatch, caplog,
                                                         present, source):
    _run_udev(monkeypatch, present)
    caplog.set_level(logging.INFO, logger="device_plugin.discovery")
    published, done, sink = _sink()
    udev = UdevDiscovery(CONFIG, sink)
    assert udev.source == source
    _first_inventory(udev, published, done)
    assert ("from_netlink", source) in spy.calls
    logged = [m for m in caplog.messages if "event source" in m]
    assert len(logged) == 1 and repr(source) in logged[0], caplog.messages
