"""Pure device matching: configured matchers against frozen device records.

``DeviceInfo`` is what discovery knows about one udev device, captured once in
the discovery thread (pyudev objects never leave it).  Everything here is a pure
function of plain data, so tests build records by hand and need no udev.

Ancestor matching follows udev's ATTRS/SUBSYSTEMS/KERNELS semantics: the
device itself and then each parent, nearest first, is tried, and ONE of them
must satisfy every key of the ``parent`` matcher.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from device_plugin.config import Config, Matcher, ParentMatch, ResourceConfig


@dataclass(frozen=True)
class Ancestor:
    """A parent of a device, as far as matching and identity need it."""

    sys_path: str
    subsystem: str | None
    devtype: str | None
    kernel: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceInfo:
    """One udev device.  ``attributes`` holds only the sysfs attributes some matcher,
    probe or identity rule asks for (read lazily by discovery); values are
    decoded with replacement, capped and stripped of trailing whitespace."""

    sys_path: str
    subsystem: str | None
    devtype: str | None
    kernel: str
    devnode: str | None = None
    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    # Nearest parent first.
    ancestors: tuple[Ancestor, ...] = ()
    devlinks: tuple[str, ...] = ()
    numa_node: int | None = None

    def as_ancestor(self) -> Ancestor:
        return Ancestor(self.sys_path, self.subsystem, self.devtype, self.kernel,
                        self.attributes, self.properties)

    def lineage(self) -> tuple[Ancestor, ...]:
        """The device itself, then its parents nearest first (udev's ATTRS order)."""
        return (self.as_ancestor(), *self.ancestors)


def _glob_pairs(wanted: Iterable[tuple[str, str]], have: Mapping[str, str]) -> bool:
    for key, pattern in wanted:
        value = have.get(key)
        if value is None or not fnmatchcase(value, pattern):
            return False
    return True


def _ancestor_matches(parent: ParentMatch, node: Ancestor) -> bool:
    if parent.subsystem is not None and node.subsystem != parent.subsystem:
        return False
    if parent.devtype is not None and node.devtype != parent.devtype:
        return False
    if parent.kernel is not None and not fnmatchcase(node.kernel, parent.kernel):
        return False
    return _glob_pairs(parent.attributes, node.attributes) and _glob_pairs(
        parent.properties, node.properties
    )


def matched_ancestor(parent: ParentMatch, info: DeviceInfo) -> Ancestor | None:
    """The nearest of the device and its parents that satisfies ``parent``."""
    for node in info.lineage():
        if _ancestor_matches(parent, node):
            return node
    return None


def cheap_match(
    matcher: Matcher, subsystem: str | None, devtype: str | None, kernel: str,
    devnode: str | None,
) -> bool:
    """The keys that need neither attributes nor ancestors: the first part of ``matches``
    and discovery's pre-filter (``AttributeNeeds.may_select``)."""
    if matcher.subsystem is not None and subsystem != matcher.subsystem:
        return False
    if matcher.devtype is not None and devtype != matcher.devtype:
        return False
    if matcher.kernel is not None and not fnmatchcase(kernel, matcher.kernel):
        return False
    return matcher.devnode is None or (
        devnode is not None and fnmatchcase(devnode, matcher.devnode)
    )


def matches(matcher: Matcher, info: DeviceInfo) -> bool:
    """Whether ``info`` satisfies every key of ``matcher``."""
    if not cheap_match(matcher, info.subsystem, info.devtype, info.kernel, info.devnode):
        return False
    if not _glob_pairs(matcher.properties, info.properties):
        return False
    if not _glob_pairs(matcher.attributes, info.attributes):
        return False
    return matcher.parent is None or matched_ancestor(matcher.parent, info) is not None


def resource_matches(resource: ResourceConfig, info: DeviceInfo) -> bool:
    """A device is selected when it has a node and matches ANY of the resource's matchers."""
    return info.devnode is not None and any(matches(m, info) for m in resource.match)


def select(resource: ResourceConfig, devices: Iterable[DeviceInfo]) -> tuple[DeviceInfo, ...]:
    """The devices ``resource`` selects, ordered by sysfs path (deterministic)."""
    return tuple(sorted((d for d in devices if resource_matches(resource, d)),
                        key=lambda d: d.sys_path))


@dataclass(frozen=True)
class AttributeNeeds:
    """What discovery must read for a configuration: which sysfs attributes, and
    which devices are worth reading at all (``matchers`` as a cheap pre-filter;
    empty means every device with a node)."""

    device: frozenset[str]
    ancestor: frozenset[str]
    matchers: tuple[Matcher, ...] = ()

    def may_select(
        self, subsystem: str | None, devtype: str | None, kernel: str, devnode: str
    ) -> bool:
        if not self.matchers:
            return True
        return any(cheap_match(m, subsystem, devtype, kernel, devnode) for m in self.matchers)


# Read on every device and ancestor for identity (serial-based IDs without udev,
# identity._usb_identity); NUMA topology is read separately (sysfs.numa_node).
IDENTITY_ANCESTOR_ATTRIBUTES = frozenset({"serial", "idVendor", "idProduct",
                                          "bInterfaceNumber"})
# Read in addition when some resource is served through DRA: what device_plugin.slices
# publishes as device attributes and capacity.
DRA_DEVICE_ATTRIBUTES = frozenset({"size", "ro", "removable", "loop/backing_file"})
DRA_ANCESTOR_ATTRIBUTES = frozenset({
    "idVendor", "idProduct", "serial", "manufacturer", "product", "busnum", "devnum",
    "version", "speed", "vendor", "device", "subsystem_vendor", "subsystem_device", "class",
    "revision", "model",
})


def attribute_needs(config: Config) -> AttributeNeeds:
    device: set[str] = set(IDENTITY_ANCESTOR_ATTRIBUTES)
    ancestor: set[str] = set(IDENTITY_ANCESTOR_ATTRIBUTES)
    if config.dra_enabled:
        device |= DRA_DEVICE_ATTRIBUTES
        ancestor |= DRA_ANCESTOR_ATTRIBUTES
    for res in config.resources:
        for m in res.match:
            device.update(k for k, _ in m.attributes)
            if m.parent is not None:
                # The parent walk starts at the device itself.
                device.update(k for k, _ in m.parent.attributes)
                ancestor.update(k for k, _ in m.parent.attributes)
        if res.health is not None and res.health.attribute:
            device.add(res.health.attribute)
    matchers = tuple(m for res in config.resources for m in res.match)
    return AttributeNeeds(frozenset(device), frozenset(ancestor), matchers)
