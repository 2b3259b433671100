"""What a DRA resource looks like in the API server: devices, attributes, pools, slices.

Pure functions from the domain's units (``units.Unit``: the udev/sysfs records of
the device nodes a unit hands out) to the ResourceSlice objects that publish them,
shared by the slice publisher (API side) and the kubelet-side DRA service (which
maps an allocation result's pool and device back to a unit with ``pool_name`` and
``device_name``).  No I/O, no API client: the tests build units by hand.

Naming (``resource.k8s.io/v1`` validation, pkg/apis/resource/validation):

* one pool per resource and node, ``<node>-<resource short name>``: a pool belongs to
  one driver, so two resources of one driver need two pools;
* a device's name is a DNS label made from the unit's stable ID (``ttyUSB-3f2a..`` ->
  ``ttyusb-3f2a..``): the same device keeps its name across restarts and re-plugging.
  Both names come from ``device_plugin.dra.devices`` (``pool_name``, ``device_name``),
  where the kubelet side maps an allocation result back to a unit: one definition;
* slices are named ``<node>-<resource slug>-<index>`` (shortened with a hash when
  longer than an object name may be), so a restarted driver finds and adopts them.

Attributes (at most 32 attributes plus capacities per device, strings at most 64
bytes, names C identifiers of at most 32 characters, unqualified names belong to the
driver's domain) come from the unit's first device node and its ancestors, in a
fixed priority order so the cut at 32 is deterministic: what the device is
(resource, subsystem, kernel name, node, major/minor), where it is (NUMA node, PCI
address, USB bus path), what it is (vendor/product IDs, model, serial, driver,
PCI class, USB version) and state flags (read-only, removable).  Typed: IDs read as
hex stay strings (``"0403"``, as ``lsusb`` prints them), counts and numbers are ints,
flags bools, versions semver.  Block devices carry their size as the ``size``
capacity (bytes).

A device whose health probe fails is left out of the slices, so the scheduler
cannot allocate it; it returns with a new pool generation when it recovers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from device_plugin.config import ResourceConfig
from device_plugin.dra import devices as dra_devices
from device_plugin.dra.devices import device_name
from device_plugin.matching import Ancestor, DeviceInfo
from device_plugin.units import Unit

API_VERSION = "resource.k8s.io/v1"
# ResourceSliceSpec.devices: at most 128 (64 with taints, counters or list attributes,
# none of which we publish).
MAX_DEVICES_PER_SLICE = 128
# Attributes plus capacities of one device.
MAX_ATTRIBUTES_PER_DEVICE = 32
MAX_STRING_BYTES = 64
MAX_OBJECT_NAME = 253
STANDARD_PCI_BUS_ID = "resource.kubernetes.io/pciBusID"

_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_NOT_LABEL = re.compile(r"[^a-z0-9-]+")
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?"
)
_HEX = re.compile(r"(0x)?([0-9a-fA-F]+)")
# Every attribute name ``device_attributes`` may emit (unqualified: the driver's
# domain), for documentation and the examples' CEL selectors (tests/deploy).
PUBLISHED_ATTRIBUTES = (
    "resource", "subsystem", "kernelName", "devnode", "major", "minor", "numaNode",
    "pciAddress", "pciVendor", "pciDevice", "pciSubsystemVendor", "pciSubsystemDevice",
    "pciClass", "pciRevision", "idVendor", "idProduct", "usbBusPath", "usbBusNum",
    "usbDevNum", "usbVersion", "usbSpeedMbps", "manufacturer", "product", "serial", "vendor",
    "model", "driver", "idPath", "devtype", "readOnly", "removable", "loopBackingFile",
    "kernelVersion", STANDARD_PCI_BUS_ID,
)

AttributeValue = tuple[str, Any]  # ("string"|"int"|"bool"|"version", value)


@dataclass(frozen=True)
class DraDevice:
    """One published device: ``attributes`` map a (possibly qualified) name to a typed
    value, ``capacity`` a name to a quantity string."""

    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    capacity: Mapping[str, str] = field(default_factory=dict)

    def as_api(self) -> dict[str, Any]:
        device: dict[str, Any] = {"name": self.name}
        if self.attributes:
            device["attributes"] = {k: {kind: value} for k, (kind, value)
                                    in sorted(self.attributes.items())}
        if self.capacity:
            device["capacity"] = {k: {"value": v} for k, v in sorted(self.capacity.items())}
        return device


@dataclass(frozen=True)
class SliceSpec:
    """One ResourceSlice of a pool, before it meets the API server."""

    name: str
    driver: str
    node: str
    pool: str
    generation: int
    slice_count: int
    devices: tuple[DraDevice, ...]

    def as_api(self, owner: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The object as the API takes it (``owner``: the Node's name and uid, for
        garbage collection with the node)."""
        metadata: dict[str, Any] = {"name": self.name}
        if owner is not None:
            metadata["ownerReferences"] = [{
                "apiVersion": "v1", "kind": "Node", "name": owner["name"],
                "uid": owner["uid"], "controller": True,
            }]
        return {
            "apiVersion": API_VERSION,
            "kind": "ResourceSlice",
            "metadata": metadata,
            "spec": self.spec(),
        }

    def spec(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "nodeName": self.node,
            "pool": {"name": self.pool, "generation": self.generation,
                     "resourceSliceCount": self.slice_count},
            "devices": [d.as_api() for d in self.devices],
        }


# --------------------------------------------------------------------------- #
# Names


def _label(text: str, limit: int = 63) -> str:
    """``text`` as a DNS label (lower case, ``[a-z0-9-]``, alphanumeric ends)."""
    label = _NOT_LABEL.sub("-", text.lower()).strip("-")
    if len(label) > limit or not label:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        label = f"{label[: limit - 11].strip('-')}-{digest}".strip("-")
    return label


def resource_slug(resource: str) -> str:
    """The part of a resource name after ``/`` as a DNS label (``hostkit.io/loop`` ->
    ``loop``)."""
    return _label(resource.split("/", 1)[-1])


def pool_name(node: str, config: ResourceConfig) -> str:
    """This node's pool of the resource ``config``."""
    return dra_devices.pool_name(node, config)


def slice_name(node: str, resource: str, index: int) -> str:
    base = f"{node}-{resource_slug(resource)}"
    if len(base) > MAX_OBJECT_NAME - 8:
        digest = hashlib.sha256(base.encode()).hexdigest()[:10]
        base = f"{base[: MAX_OBJECT_NAME - 20].rstrip('-.')}-{digest}"
    return f"{base}-{index:05x}"


# --------------------------------------------------------------------------- #
# Attributes


def _string(value: str) -> str:
    raw = value.encode("utf-8")
    if len(raw) <= MAX_STRING_BYTES:
        return value
    return raw[:MAX_STRING_BYTES].decode("utf-8", "ignore")


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip(), 0)
    except ValueError:
        return None


def _hex_id(value: str | None) -> str | None:
    """A hex ID as lsusb/lspci print it: ``0x10de`` -> ``10de``."""
    if value is None:
        return None
    match = _HEX.fullmatch(value.strip())
    return match.group(2).lower() if match else None


def _version(value: str | None) -> str | None:
    """A semver 2.0.0 string from ``2.00``, `` 1.10``, ``6.1.0-18-amd64``..."""
    if value is None:
        return None
    text = value.strip().lstrip("vV")
    if _SEMVER.fullmatch(text) and len(text) <= MAX_STRING_BYTES:
        return text
    numbers = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not numbers:
        return None
    parts = [int(p) if p else 0 for p in numbers.groups()]
    return "{}.{}.{}".format(*parts)


def _first(lineage: Sequence[Ancestor], subsystem: str, devtype: str | None = None
           ) -> Ancestor | None:
    for node in lineage:
        if node.subsystem == subsystem and (devtype is None or node.devtype == devtype):
            return node
    return None


def _driver(lineage: Sequence[Ancestor]) -> str | None:
    for node in lineage:
        driver = node.properties.get("DRIVER")
        if driver:
            return driver
    return None


class _Attributes:
    """Collects attributes in priority order up to the per-device limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values: dict[str, AttributeValue] = {}

    def add(self, name: str, kind: str, value: Any) -> None:
        if value is None or value == "" or name in self.values or len(self.values) >= self.limit:
            return
        if kind == "string":
            value = _string(str(value))
        self.values[name] = (kind, value)


def device_attributes(
    resource: str, info: DeviceInfo, numa_nodes: Sequence[int] = (),
    kernel_release: str | None = None, *, limit: int = MAX_ATTRIBUTES_PER_DEVICE,
) -> dict[str, AttributeValue]:
    """The attributes of a device node ``info`` (see the module docstring)."""
    out = _Attributes(limit)
    props = info.properties
    lineage = info.lineage()
    out.add("resource", "string", resource)
    out.add("subsystem", "string", info.subsystem)
    out.add("kernelName", "string", info.kernel)
    out.add("devnode", "string", info.devnode)
    out.add("major", "int", _int(props.get("MAJOR")))
    out.add("minor", "int", _int(props.get("MINOR")))
    if numa_nodes:
        out.add("numaNode", "int", numa_nodes[0])
    # The nearest bus device: a USB adapter is not described by its host controller's
    # PCI IDs (a CEL selector on pciVendor must not pick serial adapters).
    pci = _first(lineage, "pci")
    usb = _first(lineage, "usb", "usb_device")
    if pci is not None and usb is not None:
        if lineage.index(usb) < lineage.index(pci):
            pci = None
        else:
            usb = None
    if pci is not None:
        out.add(STANDARD_PCI_BUS_ID, "string", pci.kernel)
        out.add("pciAddress", "string", pci.kernel)
        out.add("pciVendor", "string", _hex_id(pci.attributes.get("vendor")))
        out.add("pciDevice", "string", _hex_id(pci.attributes.get("device")))
        out.add("pciSubsystemVendor", "string", _hex_id(pci.attributes.get("subsystem_vendor")))
        out.add("pciSubsystemDevice", "string", _hex_id(pci.attributes.get("subsystem_device")))
        out.add("pciClass", "string", _hex_id(pci.attributes.get("class")))
        out.add("pciRevision", "int", _int(pci.attributes.get("revision")))
    if usb is not None:
        out.add("idVendor", "string", _hex_id(usb.attributes.get("idVendor")))
        out.add("idProduct", "string", _hex_id(usb.attributes.get("idProduct")))
        out.add("usbBusPath", "string", usb.kernel)
        out.add("usbBusNum", "int", _int(usb.attributes.get("busnum")))
        out.add("usbDevNum", "int", _int(usb.attributes.get("devnum")))
        out.add("usbVersion", "version", _version(usb.attributes.get("version")))
        out.add("usbSpeedMbps", "int", _int((usb.attributes.get("speed") or "").split(".")[0]))
        out.add("manufacturer", "string", usb.attributes.get("manufacturer"))
        out.add("product", "string", usb.attributes.get("product"))
    serial = (props.get("ID_SERIAL_SHORT") or (usb.attributes.get("serial") if usb else None))
    out.add("serial", "string", serial)
    out.add("vendor", "string", props.get("ID_VENDOR") or _scsi(lineage, "vendor"))
    out.add("model", "string", props.get("ID_MODEL") or _scsi(lineage, "model"))
    out.add("driver", "string", _driver(lineage))
    out.add("idPath", "string", props.get("ID_PATH"))
    out.add("devtype", "string", info.devtype)
    out.add("readOnly", "bool", _flag(info.attributes.get("ro")))
    out.add("removable", "bool", _flag(info.attributes.get("removable")))
    out.add("loopBackingFile", "string", info.attributes.get("loop/backing_file"))
    out.add("kernelVersion", "version", _version(kernel_release))
    return out.values


def _scsi(lineage: Sequence[Ancestor], name: str) -> str | None:
    node = _first(lineage, "scsi")
    return None if node is None else node.attributes.get(name)


def _flag(value: str | None) -> bool | None:
    if value in ("0", "1"):
        return value == "1"
    return None


def device_capacity(info: DeviceInfo) -> dict[str, str]:
    """Capacities the hardware reports: a block device's size in bytes."""
    if info.subsystem == "block":
        sectors = _int(info.attributes.get("size"))
        if sectors is not None and sectors > 0:
            return {"size": str(sectors * 512)}
    return {}


def dra_device(resource: str, unit: Unit, kernel_release: str | None = None) -> DraDevice:
    """The published form of one unit."""
    info = unit.primary
    capacity = device_capacity(info)
    attributes = device_attributes(resource, info, unit.numa_nodes, kernel_release,
                                   limit=MAX_ATTRIBUTES_PER_DEVICE - len(capacity))
    return DraDevice(device_name(unit.id), attributes, capacity)


def pool_devices(
    config: ResourceConfig, units: Sequence[Unit], unhealthy: frozenset[str] = frozenset(),
    kernel_release: str | None = None,
) -> tuple[DraDevice, ...]:
    """The devices of a resource's pool, sorted by name; units whose ID is in
    ``unhealthy`` are left out."""
    devices = {}
    for unit in units:
        if unit.id in unhealthy:
            continue
        device = dra_device(config.name, unit, kernel_release)
        devices[device.name] = device
    return tuple(devices[name] for name in sorted(devices))


def plan_pool(
    driver: str, node: str, config: ResourceConfig, devices: Sequence[DraDevice],
    generation: int,
    max_per_slice: int = MAX_DEVICES_PER_SLICE,
) -> tuple[SliceSpec, ...]:
    """The slices of one pool: devices in name order, ``max_per_slice`` per slice; an
    empty pool is one empty slice (an empty pool is not the same as no pool)."""
    chunks = [tuple(devices[i:i + max_per_slice])
              for i in range(0, len(devices), max_per_slice)] or [()]
    pool = pool_name(node, config)
    return tuple(
        SliceSpec(slice_name(node, config.name, i), driver, node, pool, generation, len(chunks),
                  chunk)
        for i, chunk in enumerate(chunks)
    )


def attribute_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid device attribute/capacity name (for tests)."""
    domain, _, ident = name.rpartition("/")
    if not _C_IDENTIFIER.fullmatch(ident):
        return f"{ident!r} is not a C identifier of at most 32 characters"
    if domain and (len(domain) > 63 or not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", domain)):
        return f"domain {domain!r} is not a DNS subdomain of at most 63 characters"
    return None
