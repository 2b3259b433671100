"""From selected devices to allocatable units.

A unit is what one kubelet device ID hands out: normally one device node; with
``group_by`` every selected node that shares the same nearest ancestor of the
given subsystem (a GPU's card and render nodes under one PCI function).  This
module decides unit membership, the unit's base ID (``identity``), its nodes and
symlinks, and its NUMA nodes.  Pure functions of ``DeviceInfo`` records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from device_plugin import identity
from device_plugin.config import GroupBy, ResourceConfig
from device_plugin.matching import Ancestor, DeviceInfo, select


@dataclass(frozen=True)
class Unit:
    """One physical unit of a resource (before share copies)."""

    id: str
    devices: tuple[DeviceInfo, ...]
    numa_nodes: tuple[int, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(d.devnode for d in self.devices if d.devnode)

    @property
    def symlinks(self) -> tuple[str, ...]:
        links: list[str] = []
        for d in self.devices:
            links.extend(link for link in d.devlinks if link not in links)
        return tuple(links)

    @property
    def primary(self) -> DeviceInfo:
        return self.devices[0]


def _group_anchor(group_by: GroupBy, info: DeviceInfo) -> Ancestor | None:
    for node in info.ancestors:
        if node.subsystem == group_by.subsystem and (
            group_by.devtype is None or node.devtype == group_by.devtype
        ):
            return node
    return None


def _numa(devices: Iterable[DeviceInfo]) -> tuple[int, ...]:
    return tuple(sorted({d.numa_node for d in devices if d.numa_node is not None
                         and d.numa_node >= 0}))


def build_units(resource: ResourceConfig, devices: Iterable[DeviceInfo]) -> tuple[Unit, ...]:
    """The units of ``resource`` among ``devices``, sorted by ID (deterministic)."""
    selected = select(resource, devices)
    groups: dict[str, list[DeviceInfo]] = {}
    for info in selected:
        anchor = _group_anchor(resource.group_by, info) if resource.group_by else None
        key = identity.anchor_key(anchor) if anchor is not None else identity.identity_key(info)
        groups.setdefault(key, []).append(info)
    units: dict[str, Unit] = {}
    for key, members in groups.items():
        members.sort(key=lambda d: (d.devnode or "", d.sys_path))
        unit_id = identity.make_id(members[0].kernel, key)
        if unit_id in units or (len(members) > 1 and resource.group_by is None):
            # Two devices claim one identity (e.g. udev gave clones the same serial):
            # fall back to each one's sysfs path so neither disappears.
            for member in members:
                alt = identity.make_id(member.kernel, f"sys:{member.sys_path}")
                units[alt] = Unit(alt, (member,), _numa([member]))
            continue
        units[unit_id] = Unit(unit_id, tuple(members), _numa(members))
    return tuple(units[k] for k in sorted(units))
