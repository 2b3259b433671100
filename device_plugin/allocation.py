"""Answers to Allocate, GetPreferredAllocation and PreStartContainer.

Pure functions of the resource's configuration and one snapshot (indexed by
ID, plus the units behind its IDs), so they are deterministic: the same IDs always give the
same ``ContainerAllocation`` (IDs are sorted, units ordered by ID, nodes in
unit order), which matters because the kubelet checkpoints the answer and
replays it at every container restart.

Validation: an empty or duplicated ID list is ``InvalidArgument``, an ID not in
the current snapshot ``NotFound``, an Unhealthy one ``FailedPrecondition``; each
message names the resource and the IDs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence

from device_plugin.config import ResourceConfig
from device_plugin.health import open_problem
from device_plugin.model import (
    ContainerAllocation,
    DeviceNodeGrant,
    DeviceUnit,
    MountGrant,
)
from device_plugin.units import Unit
from plugin_runtime.errors import FailedPrecondition, InvalidArgument, NotFound


def _shown(ids: Sequence[str], limit: int = 5) -> str:
    listed = ", ".join(repr(i) for i in ids[:limit])
    return listed + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def validate_ids(
    resource: str, index: Mapping[str, DeviceUnit], ids: Sequence[str], *, healthy: bool = True
) -> list[DeviceUnit]:
    """The snapshot units for ``ids`` (sorted by ID), or the error that explains why not.
    ``index`` is the current snapshot by ID (``ResourceSnapshot.by_id()``)."""
    if not ids:
        raise InvalidArgument(f"{resource}: no device IDs requested")
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise InvalidArgument(f"{resource}: device IDs requested more than once: {_shown(dupes)}")
    unknown = sorted(i for i in ids if i not in index)
    if unknown:
        raise NotFound(
            f"{resource}: unknown device ID(s) {_shown(unknown)}: not advertised "
            f"(the device is gone or the ID belongs to another resource)"
        )
    units = [index[i] for i in sorted(ids)]
    if healthy:
        sick = [u for u in units if not u.healthy]
        if sick:
            raise FailedPrecondition(
                f"{resource}: device ID(s) {_shown([u.id for u in sick])} are Unhealthy"
                + (f": {sick[0].reason}" if sick[0].reason else "")
            )
    return units


def container_path(config: ResourceConfig, host_path: str) -> str:
    return config.container_path.format(path=host_path, name=os.path.basename(host_path))


def _physical(ids: Sequence[str], units_by_id: Mapping[str, Unit]) -> list[Unit]:
    seen: dict[str, Unit] = {}
    for i in ids:
        unit = units_by_id[i]
        seen.setdefault(unit.id, unit)
    return [seen[k] for k in sorted(seen)]


def cdi_name(vendor: str, config: ResourceConfig, unit_id: str) -> str:
    return f"{vendor}/{config.short_name}={unit_id}"


def device_grants(config: ResourceConfig, unit: Unit) -> list[DeviceNodeGrant]:
    """Every node of the unit (and its udev symlinks when enabled)."""
    paths = list(unit.nodes)
    if config.symlinks:
        paths.extend(link for link in unit.symlinks if link not in paths)
    return [DeviceNodeGrant(container_path(config, p), p, config.permissions) for p in paths]


def mount_grants(config: ResourceConfig) -> list[MountGrant]:
    return [MountGrant(m.container_path, m.host_path, m.read_only) for m in config.mounts]


def allocate(
    config: ResourceConfig,
    index: Mapping[str, DeviceUnit],
    units_by_id: Mapping[str, Unit],
    ids: Sequence[str],
    cdi_vendor: str | None = None,
) -> ContainerAllocation:
    """The grants for one container; with ``cdi_vendor`` the nodes and mounts come from the
    CDI spec and the answer names the CDI devices instead."""
    chosen = validate_ids(config.name, index, ids)
    sorted_ids = [u.id for u in chosen]
    physical = _physical(sorted_ids, units_by_id)
    grants: list[DeviceNodeGrant] = []
    seen_paths: set[str] = set()
    for unit in physical:
        for grant in device_grants(config, unit):
            if grant.container_path not in seen_paths:
                seen_paths.add(grant.container_path)
                grants.append(grant)
    values = {
        "ids": ",".join(sorted_ids),
        "paths": ",".join(g.container_path for g in grants),
        "resource": config.name,
        "count": str(len(sorted_ids)),
    }
    envs = {name: template.format(**values) for name, template in config.env}
    annotations = {config.name: values["ids"]}
    if cdi_vendor is not None:
        return ContainerAllocation(
            envs=envs,
            annotations=annotations,
            cdi_devices=tuple(cdi_name(cdi_vendor, config, u.id) for u in physical),
        )
    return ContainerAllocation(
        devices=tuple(grants),
        mounts=tuple(mount_grants(config)),
        envs=envs,
        annotations=annotations,
    )


def preferred_allocation(
    resource: str,
    index: Mapping[str, DeviceUnit],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """``size`` IDs from ``available`` including ``must_include``, on as few NUMA nodes as
    possible.  Only IDs from ``available`` are returned; devices without topology are
    used last (like the kubelet's pseudo-node -1).  ``index`` is the snapshot by ID."""
    if size <= 0:
        raise InvalidArgument(f"{resource}: allocation size must be positive, got {size}")
    must = list(dict.fromkeys(must_include))
    if size < len(must):
        raise InvalidArgument(
            f"{resource}: allocation size {size} is smaller than the {len(must)} "
            f"must-include IDs"
        )
    avail = list(dict.fromkeys(available))
    unknown = sorted({i for i in avail if i not in index} | {i for i in must if i not in index})
    if unknown:
        raise NotFound(f"{resource}: unknown device ID(s) {_shown(unknown)}")
    avail_set = set(avail)
    missing = [i for i in must if i not in avail_set]
    if missing:
        raise InvalidArgument(
            f"{resource}: must-include ID(s) {_shown(missing)} are not among the available IDs"
        )
    chosen = list(must)
    must_set = set(must)
    covered: set[int] = {n for i in must for n in index[i].numa_nodes}
    # Healthy candidates grouped by their NUMA node set, each group in ID order.
    groups: dict[frozenset[int], list[str]] = {}
    for i in sorted(avail_set - must_set):
        if index[i].healthy:
            groups.setdefault(frozenset(index[i].numa_nodes), []).append(i)
    need = size - len(chosen)
    while need > 0 and groups:
        inside = sorted((k for k in groups if k and k <= covered), key=sorted)
        if inside:
            for key in inside:
                taken = groups.pop(key)[:need]
                chosen.extend(taken)
                need -= len(taken)
                if not need:
                    break
            continue
        # usable[n]: IDs that adding node n makes fully covered; touching[n]: any IDs on n.
        usable: dict[int, int] = {}
        touching: dict[int, int] = {}
        for key, ids in groups.items():
            rest = key - covered
            if len(rest) == 1:
                (n,) = rest
                usable[n] = usable.get(n, 0) + len(ids)
            for n in rest:
                touching[n] = touching.get(n, 0) + len(ids)
        if not touching:
            # Only devices without topology are left: they come last.
            chosen.extend(groups.pop(frozenset())[:need])
            break
        # The smallest node that finishes the request alone, else the one that frees the
        # most IDs, else (only multi-node devices left) the busiest node.
        enough = sorted(n for n, count in usable.items() if count >= need)
        if enough:
            node = enough[0]
        else:
            counts = usable or touching
            node = max(counts, key=lambda n: (counts[n], -n))
        covered.add(node)
    return chosen


def pre_start(
    config: ResourceConfig,
    index: Mapping[str, DeviceUnit],
    units_by_id: Mapping[str, Unit],
    ids: Sequence[str],
) -> None:
    """Run the configured PreStartContainer checks; FailedPrecondition names the node."""
    chosen = validate_ids(config.name, index, ids, healthy=False)
    if not config.pre_start_required:
        return
    for unit in _physical([u.id for u in chosen], units_by_id):
        for node in unit.nodes:
            problem = open_problem(node)
            if problem:
                raise FailedPrecondition(f"{config.name}: unit {unit.id}: {problem}")
