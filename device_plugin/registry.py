"""Live state of every served resource: the ``model.Resource`` and ``ResourceCatalog``.

``ResourceState`` holds one resource's configuration, its units and their
health, and the immutable snapshot built from them, behind one
``threading.Condition``.  The generation is bumped only when the snapshot's
content really changes, and ``wait_for_change`` returns the latest snapshot,
so a slow ListAndWatch stream skips intermediate states.

``Catalog`` holds the set of resources.  Its generation changes when a resource
is added or removed or when a resource's ``ResourceOptions`` change (a config
reload): the wire layer then starts, stops or re-registers endpoints.  Other
option changes (env, mounts, matchers...) are applied in place to the existing
``ResourceState``; its snapshot changes if the units do.

Latency hook: each generation records ``last_event_monotonic``, the time the
uevent that caused it was read (None for enumerations, health changes and
reloads); the uevent-to-snapshot histogram is observed here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from device_plugin import allocation, identity, metrics
from device_plugin.cdi import CdiWriter
from device_plugin.config import Config, ResourceConfig
from device_plugin.health import probe_unit
from device_plugin.matching import DeviceInfo
from device_plugin.model import (
    HEALTHY,
    UNHEALTHY,
    ContainerAllocation,
    DeviceUnit,
    ResourceOptions,
    ResourceSnapshot,
)
from device_plugin.units import Unit, build_units
from plugin_runtime.errors import DomainError

log = logging.getLogger(__name__)

# Waits block on the condition, woken by a change or by ``wake()``; every caller
# that sets a ``stop`` event calls ``wake()`` (SnapshotFeed.close, PluginManager.stop,
# DevicePluginDomain.stop).  A ``threading.Event`` cannot notify our condition, so
# a ``stop`` set without ``wake()`` is still noticed, but only within this safety
# slice.  It used to be 0.5 s: two wake-ups a second per idle waiter (a feed per
# resource plus the catalog follower), the largest share of the idle daemon's
# wake-ups; 30 s costs nothing while keeping the contract's "stop is noticed".
SAFETY_SLICE_SECONDS = 30.0


def _wait(
    cond: threading.Condition,
    unchanged: Callable[[], bool],
    stop: threading.Event,
    timeout: float | None,
) -> None:
    """Wait on ``cond`` (held) while ``unchanged()`` and ``stop`` is clear, for at most
    ``timeout`` seconds (None: no limit), re-checking ``stop`` every safety slice."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while unchanged() and not stop.is_set():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        cond.wait(
            SAFETY_SLICE_SECONDS if remaining is None else min(remaining, SAFETY_SLICE_SECONDS)
        )


def options_for(config: ResourceConfig) -> ResourceOptions:
    return ResourceOptions(
        pre_start_required=config.pre_start_required,
        get_preferred_allocation_available=True,
    )


class ResourceState:
    """One extended resource (implements ``device_plugin.model.Resource``)."""

    def __init__(
        self, config: ResourceConfig, cdi: CdiWriter | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        # Called (outside the lock, must not block) when the units or the snapshot
        # changed: the DRA slice publisher's wake-up (Catalog.subscribe).
        self._on_change = on_change
        self._cond = threading.Condition()
        self._config = config
        self._cdi = cdi
        self._devices: tuple[DeviceInfo, ...] = ()
        self._units: tuple[Unit, ...] = ()
        self._by_id: dict[str, Unit] = {}
        self._snapshot = ResourceSnapshot(config.name, 0, ())
        self._index: Mapping[str, DeviceUnit] = {}
        self.last_event_monotonic: float | None = None
        self._ticket = 0
        self._published_ticket = 0
        self._cdi_lock = threading.Lock()
        self._cdi_ticket = 0
        self._cdi_written: tuple[object, ...] | None = None
        self._update_gauges()

    # ---- model.Resource -------------------------------------------------- #

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def options(self) -> ResourceOptions:
        return options_for(self._config)

    @property
    def config(self) -> ResourceConfig:
        return self._config

    def snapshot(self) -> ResourceSnapshot:
        return self._snapshot

    def wait_for_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> ResourceSnapshot:
        with self._cond:
            _wait(self._cond, lambda: self._snapshot.generation == seen_generation, stop,
                  timeout)
            return self._snapshot

    def wake(self) -> None:
        """Wake every ``wait_for_change`` (call after setting a stop event)."""
        with self._cond:
            self._cond.notify_all()

    def allocate(self, ids: Sequence[str]) -> ContainerAllocation:
        with self._cond:
            config, index, by_id = self._config, self._index, self._by_id
        vendor = self._cdi.vendor if (self._cdi is not None and config.cdi) else None
        try:
            answer = allocation.allocate(config, index, by_id, ids, vendor)
        except DomainError as exc:
            metrics.ALLOCATIONS.labels(resource=config.name, result=exc.code).inc()
            raise
        metrics.ALLOCATIONS.labels(resource=config.name, result="ok").inc()
        return answer

    def preferred_allocation(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        return allocation.preferred_allocation(
            self.name, self._index, available, must_include, size
        )

    def pre_start(self, ids: Sequence[str]) -> None:
        with self._cond:
            config, index, by_id = self._config, self._index, self._by_id
        allocation.pre_start(config, index, by_id, ids)

    # ---- domain side ----------------------------------------------------- #

    @property
    def units(self) -> tuple[Unit, ...]:
        return self._units

    @property
    def probe_interval(self) -> float | None:
        probe = self._config.health
        return None if probe is None else probe.interval_seconds

    def update_devices(
        self, devices: Iterable[DeviceInfo], event_monotonic: float | None = None
    ) -> bool:
        """Adopt a new device inventory; probe health; True when the snapshot changed."""
        return self._rebuild(self._begin(tuple(devices)), event_monotonic)

    def reprobe(self) -> bool:
        """Run the health probe on every unit; True when the snapshot changed."""
        return self._rebuild(self._begin(None), None)

    def reconfigure(self, config: ResourceConfig, cdi: CdiWriter | None) -> bool:
        """Apply a changed configuration of the same resource name."""
        with self._cond:
            self._config = config
            self._cdi = cdi
        return self._rebuild(self._begin(None), None)

    def _begin(
        self, devices: tuple[DeviceInfo, ...] | None
    ) -> tuple[int, ResourceConfig, tuple[DeviceInfo, ...]]:
        """Take a ticket: the newest inventory and config, in order.

        Discovery, health probes and reloads run in different threads and build
        outside the lock; a result whose ticket is older than one already
        published is dropped, so a slow probe never brings back stale units.
        """
        with self._cond:
            if devices is not None:
                self._devices = devices
            self._ticket += 1
            return self._ticket, self._config, self._devices

    def _rebuild(
        self,
        begun: tuple[int, ResourceConfig, tuple[DeviceInfo, ...]],
        event_monotonic: float | None,
    ) -> bool:
        ticket, config, devices = begun
        units = build_units(config, devices)
        entries: list[DeviceUnit] = []
        by_id: dict[str, Unit] = {}
        for unit in units:
            state = probe_unit(config.health, unit)
            for unit_id in identity.share_ids(unit.id, config.share):
                entries.append(DeviceUnit(unit_id, state.healthy, unit.numa_nodes, unit.nodes,
                                          state.reason))
                by_id[unit_id] = unit
        new_units = tuple(entries)
        with self._cond:
            if ticket < self._published_ticket:
                return False  # a newer inventory/config was published meanwhile
            self._published_ticket = ticket
            changed_units = units != self._units
            self._units = units
            self._by_id = by_id
            changed_snapshot = new_units != self._snapshot.units
            if changed_snapshot:
                self._snapshot = ResourceSnapshot(config.name, self._snapshot.generation + 1,
                                                  new_units)
                self._index = self._snapshot.by_id()
                self.last_event_monotonic = event_monotonic
                self._cond.notify_all()
            snapshot = self._snapshot
            cdi = self._cdi
        if cdi is not None and config.cdi:
            self._write_cdi(cdi, ticket, config, units)
        if (changed_units or changed_snapshot) and self._on_change is not None:
            self._on_change()
        if not changed_snapshot:
            return False
        if event_monotonic is not None:
            metrics.UEVENT_TO_SNAPSHOT.labels(resource=config.name).observe(
                time.monotonic() - event_monotonic
            )
        self._update_gauges()
        healthy = sum(1 for u in snapshot.units if u.healthy)
        log.info("%s: generation %d, %d units (%d healthy)", config.name, snapshot.generation,
                 len(snapshot.units), healthy)
        return True

    def _update_gauges(self) -> None:
        snapshot = self._snapshot
        healthy = sum(1 for u in snapshot.units if u.healthy)
        metrics.DEVICES.labels(resource=snapshot.resource, health=HEALTHY).set(healthy)
        metrics.DEVICES.labels(resource=snapshot.resource, health=UNHEALTHY).set(
            len(snapshot.units) - healthy
        )

    def _write_cdi(
        self, cdi: CdiWriter, ticket: int, config: ResourceConfig, units: tuple[Unit, ...]
    ) -> None:
        with self._cdi_lock:
            if ticket < self._cdi_ticket:
                return  # a newer spec is already on disk
            self._cdi_ticket = ticket
            if self._cdi_written == (cdi.directory, cdi.vendor, config, units):
                return
            try:
                cdi.write(config, units)
                self._cdi_written = (cdi.directory, cdi.vendor, config, units)
            except OSError as exc:
                log.error("cannot write the CDI spec of %s: %s", config.name, exc)

    def remove_cdi(self) -> None:
        with self._cdi_lock:
            if self._cdi is not None and self._config.cdi:
                self._cdi.remove(self._config)
            self._cdi_written = None

    def close(self) -> None:
        """The resource is no longer served: remove its CDI spec and gauges."""
        self.remove_cdi()
        metrics.forget_resource(self._config.name)


class Catalog:
    """The served resources (implements ``device_plugin.model.ResourceCatalog``)."""

    def __init__(self, config: Config) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._resources: dict[str, ResourceState] = {}
        self._config = config
        self._devices: tuple[DeviceInfo, ...] = ()
        self._cdi = self._writer(config)
        self._listeners: list[Callable[[], None]] = []
        for res in config.resources:
            self._resources[res.name] = ResourceState(res, self._cdi, self._notify)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (a non-blocking wake-up) after any change of a resource's
        units, snapshot or configuration, or of the set of resources."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    @staticmethod
    def _writer(config: Config) -> CdiWriter:
        return CdiWriter(config.cdi.dir, config.cdi.vendor)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def generation(self) -> int:
        return self._generation

    def resources(self) -> Mapping[str, ResourceState]:
        with self._cond:
            return dict(self._resources)

    def wait_for_catalog_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> int:
        with self._cond:
            _wait(self._cond, lambda: self._generation == seen_generation, stop, timeout)
            return self._generation

    def wake(self) -> None:
        """Wake every ``wait_for_catalog_change`` (call after setting a stop event)."""
        with self._cond:
            self._cond.notify_all()

    def publish_inventory(
        self, devices: tuple[DeviceInfo, ...], event_monotonic: float | None = None
    ) -> None:
        """Discovery's sink: hand the whole inventory to every resource."""
        with self._cond:
            self._devices = devices
            states = list(self._resources.values())
        for state in states:
            state.update_devices(devices, event_monotonic)

    def apply_config(self, config: Config) -> bool:
        """Adopt a reloaded configuration; True when the catalog generation changed."""
        cdi = self._writer(config)
        with self._cond:
            old = self._resources
            old_config = self._config
            new: dict[str, ResourceState] = {}
            changed = [r for r in config.resources if r.name in old]
            added = [r for r in config.resources if r.name not in old]
            removed = [s for name, s in old.items() if name not in {r.name for r in
                                                                     config.resources}]
            options_changed = any(options_for(r) != old[r.name].options
                                  or r.dra != old[r.name].config.dra for r in changed)
            for res in config.resources:
                new[res.name] = old.get(res.name) or ResourceState(res, cdi, self._notify)
            self._resources = new
            self._config = config
            self._cdi = cdi
            devices = self._devices
            bump = bool(added or removed or options_changed)
        for state in removed:
            state.close()
        for res in changed:
            state = new[res.name]
            if old_config.cdi != config.cdi or (state.config.cdi and not res.cdi):
                state.remove_cdi()  # the spec moves (new dir/vendor) or CDI is now off
            state.reconfigure(res, cdi)
        for res in added:
            new[res.name].update_devices(devices)
        if bump:
            with self._cond:
                self._generation += 1
                self._cond.notify_all()
        self._notify()
        log.info("configuration %s applied: %d added, %d changed, %d removed", config.source,
                 len(added), len(changed), len(removed))
        return bump

    def close(self) -> None:
        """Shutdown: remove every CDI spec this catalog wrote."""
        for state in self.resources().values():
            state.close()


class DevicePluginView:
    """The catalog as the device-plugin wire layer sees it: only the resources NOT
    served through DRA (implements ``device_plugin.model.ResourceCatalog``).

    A resource is served by one API only; the DRA side reads the same ``Catalog``
    (``Catalog.resources()`` holds both kinds, so discovery and health serve both).
    Switching a resource between the APIs bumps the catalog generation, so the
    device-plugin endpoints follow a reload."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def resources(self) -> Mapping[str, ResourceState]:
        return {n: s for n, s in self._catalog.resources().items() if not s.config.dra}

    def wait_for_catalog_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> int:
        return self._catalog.wait_for_catalog_change(seen_generation, stop, timeout)

    def wake(self) -> None:
        self._catalog.wake()
