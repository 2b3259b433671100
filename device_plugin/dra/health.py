"""The device health list the kubelet streams from NodeWatchResources.

The health is the device plugin's (``device_plugin.health``: a vanished device
leaves the snapshot, a failing probe keeps it as unhealthy with a reason); this
module only turns the DRA resources' snapshots into the complete list the
kubelet wants (reference dra.md §7): every device of every DRA pool with
HEALTHY or UNHEALTHY and the reason, sent whole on each change and again every
``resend_seconds``, because the kubelet turns a device Unknown when it has not
heard of it for ``timeout_seconds``.

``HealthFeed`` keeps no thread: ``changed`` is the non-blocking wake-up the
catalog calls after any change of a resource (``Catalog.subscribe``, or a
``ResourceState``'s ``on_change``); it bumps one generation that streams wait
on.  A stream wakes on a change, on its resend tick, or when it ends (``wake``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from device_plugin.dra.devices import CatalogDevices

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
        *,
        resend_seconds: float = RESEND_SECONDS,
        timeout_seconds: int = TIMEOUT_SECONDS,
    ) -> None:
        self._devices = devices
        self.resend_seconds = resend_seconds
        self.timeout_seconds = timeout_seconds
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        return self._generation

    def changed(self) -> None:
        """Something changed (units, health, configuration): streams send a new list."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake and end every waiting stream."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def report(self) -> list[DeviceHealthReport]:
        """The complete list now, ordered by pool and device."""
        reports = []
        for pool, state in sorted(self._devices.pools().items()):
            for name, device in sorted(self._devices.devices(pool, state).items()):
                reports.append(DeviceHealthReport(pool, name, device.healthy, device.reason))
        return reports

    def wait(self, seen: int, ended: threading.Event, timeout: float) -> int:
        """Block until the generation differs from ``seen``, ``ended`` is set (whoever
        sets it calls ``wake``), the feed is closed, or ``timeout`` passes; the
        generation."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._generation == seen and not ended.is_set() and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
