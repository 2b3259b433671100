"""Which pool and device names our units carry in DRA, and finding a unit by them.

A DRA device is named inside its pool, and both names come back to the driver
in a claim's allocation results.  Pools are per node and resource
(``<node>-<resource short name>``); a device is named after its unit's stable
ID, made a DNS label (lower case; characters other than ``[a-z0-9-]`` become
``-``), because ResourceSlice validation requires one.  Unit IDs already are at
most 63 characters and differ in their hash part, so the mapping stays unique.

``CatalogDevices`` answers "which current unit is ``<pool>/<device>``" from the
live resource states, so a prepared claim always maps to what is plugged in now.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from device_plugin.config import ResourceConfig
from device_plugin.registry import ResourceState
from device_plugin.units import Unit

_NOT_LABEL = re.compile(r"[^a-z0-9-]+")
MAX_LABEL = 63


def _label(text: str) -> str:
    label = _NOT_LABEL.sub("-", text.lower()).strip("-")
    return label[:MAX_LABEL].rstrip("-") or "device"


def device_name(unit_id: str) -> str:
    """The DRA device name (a DNS label) of a unit."""
    return _label(unit_id)


def pool_name(node: str, config: ResourceConfig) -> str:
    """This node's pool of ``config``: ``<node>-<short name>``, a DNS subdomain."""
    short = _NOT_LABEL.sub("-", config.short_name.lower()).strip("-") or "resource"
    return f"{node}-{short}"


@dataclass(frozen=True)
class LocatedDevice:
    """A current unit found by its pool and device name."""

    pool: str
    name: str
    config: ResourceConfig
    unit: Unit
    healthy: bool
    reason: str = ""


class DeviceLookup(Protocol):
    """Finds this node's current devices by name; never blocks on I/O."""

    def lookup(self, pool: str, device: str) -> LocatedDevice | None:
        """The unit now behind ``<pool>/<device>``, or None if the pool is not this
        node's or the device is not present."""
        ...


class CatalogDevices:
    """``DeviceLookup`` over the live DRA resources of the catalog.

    ``resources`` returns the resources served through DRA (called on every
    lookup, so a config reload is followed).  The name index of each resource
    is rebuilt only when its snapshot generation changes.
    """

    def __init__(self, node: str, resources: Callable[[], Mapping[str, ResourceState]]) -> None:
        self.node = node
        self._resources = resources
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, ResourceConfig, dict[str, LocatedDevice]]] = {}

    def pools(self) -> dict[str, ResourceState]:
        return {pool_name(self.node, s.config): s for s in self._resources().values()}

    def lookup(self, pool: str, device: str) -> LocatedDevice | None:
        state = self.pools().get(pool)
        if state is None:
            return None
        return self.devices(pool, state).get(device)

    def devices(self, pool: str, state: ResourceState) -> dict[str, LocatedDevice]:
        """Every current device of one pool by name (cached per snapshot generation)."""
        snapshot = state.snapshot()
        with self._lock:
            cached = self._index.get(pool)
            if cached is not None and cached[0] == snapshot.generation and \
                    cached[1] is state.config:
                return cached[2]
        health = {u.id: u for u in snapshot.units}
        index: dict[str, LocatedDevice] = {}
        for unit in state.units:
            entry = health.get(unit.id)
            name = device_name(unit.id)
            index[name] = LocatedDevice(
                pool, name, state.config, unit,
                healthy=entry.healthy if entry is not None else False,
                reason=entry.reason if entry is not None else "not in the snapshot",
            )
        with self._lock:
            self._index[pool] = (snapshot.generation, state.config, index)
        return index
