"""The device plugin's domain as one object: what the wire layer starts and stops.

``DevicePluginDomain`` wires the domain parts together: the catalog
(``registry.Catalog``, the ``model.ResourceCatalog`` the wire layer serves),
the udev discovery thread feeding it, the health-probe thread, and, when the
configuration came from a file, the hot-reload watcher.  ``discover()`` is the
one-shot variant behind ``device-plugin discover``: enumerate once, build the
snapshots, return rows; no threads, no monitor, no kubelet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyudev

from device_plugin import metrics
from device_plugin.config import Config, load_config
from device_plugin.discovery import UdevDiscovery, default_source, enumerate_devices
from device_plugin.health import HealthMonitor
from device_plugin.matching import attribute_needs
from device_plugin.model import HEALTHY, UNHEALTHY
from device_plugin.registry import Catalog, ResourceState
from device_plugin.reload import ConfigReloader
from plugin_runtime.errors import Unavailable

log = logging.getLogger(__name__)


class DevicePluginDomain:
    """Discovery + health + reload around one ``Catalog``.

    ``config_path`` None means the embedded default (no reload watcher).  The
    constructor loads and validates the configuration (``ConfigError`` names the
    bad key) unless ``config`` is given; ``transform`` is applied to the first and
    every reloaded configuration (e.g. a ``--cdi-dir`` override).  ``start()``
    returns once the first enumeration is published (``Unavailable`` if discovery
    cannot start).
    """

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        config: Config | None = None,
        source: str | None = None,
        watch_config: bool = True,
        transform: Callable[[Config], Config] | None = None,
    ) -> None:
        self.config_path = None if config_path is None else Path(config_path)
        self._transform = transform or (lambda c: c)
        initial = self._transform(config if config is not None else load_config(self.config_path))
        self.catalog = Catalog(initial)
        self.discovery = UdevDiscovery(initial, self.catalog.publish_inventory, source=source)
        self.health = HealthMonitor(lambda: self.catalog.resources().values())
        self.reloader: ConfigReloader | None = None
        if self.config_path is not None and watch_config:
            self.reloader = ConfigReloader(self.config_path, self._apply, initial=initial)
        metrics.CONFIG_LAST_RELOAD_SUCCESS.set(1)

    @property
    def config(self) -> Config:
        return self.catalog.config

    def _apply(self, config: Config) -> None:
        """A reloaded, valid configuration: adopt it everywhere."""
        config = self._transform(config)
        self.catalog.apply_config(config)
        self.discovery.reconfigure(config)
        self.health.poke()

    def start(self, ready_timeout: float = 30.0) -> None:
        self.discovery.start()
        if not self.discovery.ready.wait(ready_timeout) or self.discovery.error is not None:
            self.discovery.stop()
            raise Unavailable(
                f"udev discovery did not complete its first enumeration: "
                f"{self.discovery.error or f'timed out after {ready_timeout:g}s'}"
            )
        self.health.start()
        if self.reloader is not None:
            self.reloader.start()
        log.info("device plugin domain started: %d resources, source %s",
                 len(self.catalog.resources()), self.discovery.source)

    def stop(self) -> None:
        """Stop the threads, wake every waiter, remove CDI specs."""
        if self.reloader is not None:
            self.reloader.stop()
        self.discovery.stop()
        self.health.stop()
        self.catalog.close()
        self.catalog.wake()
        for res in self.catalog.resources().values():
            res.wake()


@dataclass(frozen=True)
class DiscoveredDevice:
    """One advertised ID as ``device-plugin discover`` shows it."""

    resource: str
    id: str
    nodes: tuple[str, ...]
    health: str
    numa_nodes: tuple[int, ...]
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "id": self.id,
            "nodes": list(self.nodes),
            "health": self.health,
            "numa_nodes": list(self.numa_nodes),
            "reason": self.reason,
        }


def _rows(state: ResourceState) -> list[DiscoveredDevice]:
    return [
        DiscoveredDevice(
            resource=state.name,
            id=unit.id,
            nodes=unit.nodes,
            health=HEALTHY if unit.healthy else UNHEALTHY,
            numa_nodes=unit.numa_nodes,
            reason=unit.reason,
        )
        for unit in state.snapshot().units
    ]


def catalog_devices(catalog: Catalog) -> list[DiscoveredDevice]:
    """What the running daemon offers now, as ``discover`` rows (no enumeration)."""
    return [row for state in catalog.resources().values() for row in _rows(state)]


def discover(config: Config | str | Path | None = None) -> list[DiscoveredDevice]:
    """What would be advertised now: enumerate once and build every resource's snapshot.

    ``config`` is a loaded ``Config``, a path, or None for the embedded default.
    Rows are ordered by resource (config order) then ID.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    log.debug("discover: event source would be %s", default_source())
    inventory = enumerate_devices(pyudev.Context(), cfg.subsystems(), attribute_needs(cfg))
    devices = tuple(d for group in inventory.values() for d in group)
    rows: list[DiscoveredDevice] = []
    for res in cfg.resources:
        state = ResourceState(res, cdi=None)
        state.update_devices(devices)
        rows.extend(_rows(state))
        metrics.forget_resource(res.name)
    return rows


__all__ = ["DevicePluginDomain", "DiscoveredDevice", "catalog_devices", "discover"]
