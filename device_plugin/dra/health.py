"""The device health list the kubelet streams from NodeWatchResources.

The health is the device plugin's (``device_plugin.health``: a vanished device
leaves the snapshot, a failing probe keeps it as unhealthy with a reason); this
module only turns the DRA resources' snapshots into the complete list the
kubelet wants (reference §7): every device of every DRA pool with HEALTHY or
UNHEALTHY and the reason, sent whole on each change and again every
``resend_seconds`` because the kubelet turns a device Unknown when it has not
heard of it for ``timeout_seconds``.

``HealthFeed`` watches each DRA resource in a thread of its own (blocked in
``ResourceState.wait_for_change``, no polling) and bumps one generation that
streams wait on; a stream wakes on a change, on its resend tick, or when it
ends (``wake``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from device_plugin.dra.devices import CatalogDevices
from device_plugin.registry import ResourceState

# A device not reported within the timeout becomes Unknown at the kubelet
# (default 30 s there); we resend well inside ours.
RESEND_SECONDS = 10.0
TIMEOUT_SECONDS = 45


@dataclass(frozen=True)
class DeviceHealthReport:
    pool: str
    device: str
    healthy: bool
    reason: str = ""


class HealthFeed:
    """Complete health lists of the DRA devices, with change notification."""

    def __init__(
        self,
        devices: CatalogDevices,
        resources: Callable[[], Mapping[str, ResourceState]],
        *,
        resend_seconds: float = RESEND_SECONDS,
        timeout_seconds: int = TIMEOUT_SECONDS,
    ) -> None:
        self._devices = devices
        self._resources = resources
        self.resend_seconds = resend_seconds
        self.timeout_seconds = timeout_seconds
        self._cond = threading.Condition()
        self._generation = 0
        self._stop = threading.Event()
        self._watchers: dict[str, threading.Thread] = {}

    @property
    def generation(self) -> int:
        return self._generation

    def start(self) -> None:
        self.follow()

    def follow(self) -> None:
        """Watch every current DRA resource (call again after a config reload)."""
        for name, state in self._resources().items():
            thread = self._watchers.get(name)
            if thread is not None and thread.is_alive():
                continue
            thread = threading.Thread(target=self._watch, args=(name, state),
                                      name=f"dra-health-{name}", daemon=True)
            self._watchers[name] = thread
            thread.start()
        self.changed()

    def stop(self) -> None:
        self._stop.set()
        for state in self._resources().values():
            state.wake()
        self.changed()
        for thread in self._watchers.values():
            thread.join(2.0)

    def changed(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _watch(self, name: str, state: ResourceState) -> None:
        seen = state.snapshot().generation
        while not self._stop.is_set():
            if self._resources().get(name) is not state:
                return  # removed or replaced by a reload
            snapshot = state.wait_for_change(seen, self._stop, timeout=None)
            if snapshot.generation != seen:
                seen = snapshot.generation
                self.changed()

    def report(self) -> list[DeviceHealthReport]:
        """The complete list now, ordered by pool and device."""
        reports = []
        for pool, state in sorted(self._devices.pools().items()):
            for name, device in sorted(self._devices.devices(pool, state).items()):
                reports.append(DeviceHealthReport(pool, name, device.healthy, device.reason))
        return reports

    def wait(self, seen: int, ended: threading.Event, timeout: float) -> int:
        """Block until the generation differs from ``seen``, ``ended`` is set (whoever
        sets it calls ``wake``), or ``timeout`` passes; the generation."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._generation == seen and not ended.is_set() and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._generation

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
