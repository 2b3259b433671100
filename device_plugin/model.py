"""Domain types shared by the device plugin's domain and wire layers.

This module is the seam between the two halves of the plugin:

* the domain (config, matching, discovery, registry, allocation, CDI) builds
  ``ResourceSnapshot`` values and answers allocation questions; it never
  imports grpc or the generated stubs;
* the wire layer (servicer, lifecycle) serves one ``Resource`` per kubelet
  endpoint and translates these values to and from protobuf messages.

Everything here is immutable, so a snapshot can be handed to any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class DeviceUnit:
    """One allocatable ID as the kubelet sees it.

    ``id`` is at most 63 characters and stable across restarts and
    re-enumeration.  ``nodes`` are the host device nodes the unit hands out
    (several when a unit groups nodes that share an ancestor, e.g. a GPU's card
    and render nodes).  With a share count above one, several units carry the
    same nodes.
    """

    id: str
    healthy: bool
    numa_nodes: tuple[int, ...] = ()
    nodes: tuple[str, ...] = ()
    # Why the unit is unhealthy, for logs and `discover` output.
    reason: str = ""


@dataclass(frozen=True)
class ResourceSnapshot:
    """The full list of a resource's units at one generation."""

    resource: str
    generation: int
    units: tuple[DeviceUnit, ...]

    def by_id(self) -> Mapping[str, DeviceUnit]:
        return {u.id: u for u in self.units}


@dataclass(frozen=True)
class DeviceNodeGrant:
    container_path: str
    host_path: str
    permissions: str  # some of "r", "w", "m"


@dataclass(frozen=True)
class MountGrant:
    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerAllocation:
    """What one container gets for a set of IDs (maps to ContainerAllocateResponse)."""

    devices: tuple[DeviceNodeGrant, ...] = ()
    mounts: tuple[MountGrant, ...] = ()
    envs: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourceOptions:
    pre_start_required: bool = False
    get_preferred_allocation_available: bool = True


class Resource(Protocol):
    """What the wire layer needs to serve one extended resource.

    Errors are ``plugin_runtime.errors.DomainError`` subclasses: an unknown ID is
    ``NotFound``, an unhealthy one ``FailedPrecondition``, a malformed request
    ``InvalidArgument``, a snapshot over the kubelet's 4 MiB limit
    ``ResourceExhausted``.
    """

    @property
    def name(self) -> str:
        """Full extended resource name, e.g. ``hostkit.io/fuse``."""
        ...

    @property
    def options(self) -> ResourceOptions: ...

    def snapshot(self) -> ResourceSnapshot:
        """The current snapshot (never blocks)."""
        ...

    def wait_for_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> ResourceSnapshot:
        """Block until the generation differs from ``seen_generation``, ``stop`` is set,
        or ``timeout`` passes; return the latest snapshot either way.  Intermediate
        generations may be skipped (each snapshot is complete).

        An idle wait should not poll (the daemon idles in these waits), and a
        ``threading.Event`` cannot wake it: whoever sets ``stop`` also calls the
        resource's ``wake()`` when it has one, else the stop may only be noticed
        after a safety slice (30 s in the registry)."""
        ...

    def allocate(self, ids: Sequence[str]) -> ContainerAllocation:
        """Grants for one container.  Same IDs, same answer."""
        ...

    def preferred_allocation(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        """A subset of ``available`` of ``size`` IDs that contains ``must_include``
        and spans as few NUMA nodes as possible."""
        ...

    def pre_start(self, ids: Sequence[str]) -> None:
        """Run the configured pre-start check for these IDs (only when advertised)."""
        ...


class ResourceCatalog(Protocol):
    """The set of resources the plugin serves; changes on config reload."""

    def resources(self) -> Mapping[str, Resource]: ...

    def wait_for_catalog_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> int:
        """Block until the set of resources (or their options) changes, ``stop`` is
        set, or ``timeout`` passes; return the catalog generation.  As for
        ``Resource.wait_for_change``, whoever sets ``stop`` calls ``wake()`` when the
        catalog has one."""
        ...
