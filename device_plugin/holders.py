"""Who holds which device: the kubelet's allocations joined with what is present now.

The kubelet's pod-resources API lists, per container, the device IDs it was
allocated for each extended resource and the DRA devices (driver, pool, device)
of each ResourceClaim it prepared for it.  This module joins that list, as
plain ``HeldDevice`` records (the wire module ``device_plugin.podresources``
converts the messages), with the devices this plugin currently offers
(``plugin.discover`` rows), for ``device-plugin status`` and the
``hostkit_device_plugin_held_devices_vanished`` metric:

* every present device, with the containers holding it (none when free);
* every held device of ours that is no longer present (``present=False``): a
  USB adapter pulled out under a running pod, a loop device detached.  The
  kubelet never evicts such a pod (device plugin or DRA), so this is where an
  operator sees it.

Ours means: an extended resource of our configuration (IDs are unit IDs or
share copies ``<id>-<i>``), or a DRA device of our driver in one of this node's
pools (``dra.devices.pool_name``; device names ``dra.devices.device_name``).
Pure data in, rows out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from device_plugin.config import Config
from device_plugin.dra.devices import device_name, pool_name
from device_plugin.plugin import DiscoveredDevice

DEVICE_PLUGIN = "device-plugin"
DRA = "dra"


@dataclass(frozen=True)
class Holder:
    namespace: str
    pod: str
    container: str
    # ``<namespace>/<claim>`` for a DRA allocation, "" for an extended resource.
    claim: str = ""

    def __str__(self) -> str:
        text = f"{self.namespace}/{self.pod}/{self.container}"
        return f"{text} (claim {self.claim})" if self.claim else text


@dataclass(frozen=True)
class HeldDevice:
    """One device a container was allocated, as the kubelet reports it: an
    extended-resource ID (``resource``, ``device_id``) or a DRA device (``driver``,
    ``pool``, ``device_id`` is the device name)."""

    holder: Holder
    device_id: str
    resource: str = ""
    driver: str = ""
    pool: str = ""


@dataclass(frozen=True)
class DeviceStatus:
    resource: str
    api: str  # DEVICE_PLUGIN or DRA
    device: str  # the kubelet's device ID, or the DRA device name
    present: bool
    health: str = ""
    nodes: tuple[str, ...] = ()
    pool: str = ""
    holders: tuple[Holder, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource, "api": self.api, "device": self.device,
            "pool": self.pool, "present": self.present, "health": self.health,
            "nodes": list(self.nodes),
            "holders": [{"namespace": h.namespace, "pod": h.pod, "container": h.container,
                         "claim": h.claim} for h in self.holders],
        }


def device_status(
    config: Config, node: str, present: Sequence[DiscoveredDevice], held: Iterable[HeldDevice],
) -> list[DeviceStatus]:
    """Every present device with its holders, then every held device of ours that is
    gone; in configuration order, then by device."""
    by_resource = {r.name: r for r in config.resources}
    dra_pools = {pool_name(node, r): r.name for r in config.dra_resources()}
    driver = config.dra.driver
    rows: dict[tuple[str, str], DeviceStatus] = {}
    holders: dict[tuple[str, str], list[Holder]] = {}
    for d in present:
        res = by_resource.get(d.resource)
        if res is None:
            continue
        if res.dra:
            key = (res.name, device_name(d.id))
            rows[key] = DeviceStatus(res.name, DRA, key[1], True, d.health, d.nodes,
                                     pool_name(node, res))
        else:
            key = (res.name, d.id)
            rows[key] = DeviceStatus(res.name, DEVICE_PLUGIN, d.id, True, d.health, d.nodes)
    for h in held:
        if h.driver:
            if h.driver != driver:
                continue
            resource = dra_pools.get(h.pool, f"(pool {h.pool})")
            key = (resource, h.device_id)
            if key not in rows:
                rows[key] = DeviceStatus(resource, DRA, h.device_id, False, pool=h.pool)
        else:
            if h.resource not in by_resource or by_resource[h.resource].dra:
                continue
            key = (h.resource, h.device_id)
            if key not in rows:
                rows[key] = DeviceStatus(h.resource, DEVICE_PLUGIN, h.device_id, False)
        holders.setdefault(key, [])
        if h.holder not in holders[key]:
            holders[key].append(h.holder)
    order = {name: i for i, name in enumerate(by_resource)}
    result = []
    for key in sorted(rows, key=lambda k: (order.get(k[0], len(order)), not rows[k].present,
                                           k[1])):
        row = rows[key]
        result.append(DeviceStatus(row.resource, row.api, row.device, row.present, row.health,
                                   row.nodes, row.pool, tuple(holders.get(key, ()))))
    return result


def vanished_held(rows: Iterable[DeviceStatus]) -> dict[str, int]:
    """Per resource, how many held devices are no longer present."""
    counts: dict[str, int] = {}
    for row in rows:
        if not row.present and row.holders:
            counts[row.resource] = counts.get(row.resource, 0) + 1
    return counts
