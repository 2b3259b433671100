"""Device health: what a unit's health is and when it is re-checked.

Policy (also in the configuration reference):

* a device that vanishes from udev LEAVES the snapshot.  The kubelet then lowers
  the resource's capacity; running pods keep their device (the kubelet never
  evicts).  Re-plugged, the device returns with the same ID (``identity``), so
  the kubelet's checkpoint still refers to it;
* a present device is Healthy unless its resource has a ``health`` probe that
  fails: ``attribute`` (a sysfs attribute of the unit's first device must match
  one of ``healthy_values``) or ``open`` (every node of the unit must open,
  non-blocking, without becoming the controlling terminal).  A failing unit
  stays in the snapshot as Unhealthy with a reason and turns Healthy again when
  the probe passes.

Probes run right after each discovery change (the registry calls
``probe_unit`` before publishing, so a new device never flaps), and every
``interval_seconds`` in ``HealthMonitor``'s thread.  A probe never raises.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Protocol

from device_plugin import sysfs
from device_plugin.config import HealthProbe
from device_plugin.units import Unit

log = logging.getLogger(__name__)

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str = ""


HEALTHY = Health(True)


def open_problem(path: str) -> str | None:
    """Why ``path`` does not open (non-blocking, read-only), or None when it does."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        return f"{path} does not open: {exc.strerror or exc}"
    os.close(fd)
    return None


def probe_unit(probe: HealthProbe | None, unit: Unit) -> Health:
    if probe is None:
        return HEALTHY
    if probe.probe == "open":
        for node in unit.nodes:
            problem = open_problem(node)
            if problem:
                return Health(False, problem)
        return HEALTHY
    assert probe.attribute is not None
    value = sysfs.read_attribute(unit.primary.sys_path, probe.attribute)
    if value is None:
        return Health(False, f"attribute {probe.attribute} is missing or unreadable")
    if any(fnmatchcase(value, pattern) for pattern in probe.healthy_values):
        return HEALTHY
    shown = value if len(value) <= 64 else value[:61] + "..."
    return Health(False, f"attribute {probe.attribute} is {shown!r}, not one of "
                         f"{list(probe.healthy_values)}")


class Probed(Protocol):
    """What the monitor needs from a resource (``registry.ResourceState``)."""

    @property
    def probe_interval(self) -> float | None: ...

    def reprobe(self) -> bool: ...


class HealthMonitor:
    """Re-probes every resource that has a probe at its interval, in one thread."""

    def __init__(self, resources: Callable[[], Iterable[Probed]]) -> None:
        self._resources = resources
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._due: dict[int, float] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-probes", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Recompute schedules (resources or intervals changed)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self, now: float | None = None) -> float | None:
        """Probe what is due; return seconds until the next probe (None: nothing to do)."""
        now = time.monotonic() if now is None else now
        next_due: float | None = None
        live: set[int] = set()
        for res in self._resources():
            interval = res.probe_interval
            if interval is None:
                continue
            key = id(res)
            live.add(key)
            due = self._due.setdefault(key, now + interval)
            if due <= now:
                try:
                    res.reprobe()
                except Exception:  # a probe bug must not end health checking
                    log.exception("health probe failed")
                due = now + interval
                self._due[key] = due
            next_due = due if next_due is None else min(next_due, due)
        for key in set(self._due) - live:
            del self._due[key]
        return None if next_due is None else max(0.0, next_due - now)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.run_once()
            self._wake.wait(wait)
            self._wake.clear()
