"""Stable device IDs derived from persistent identity.

The kubelet checkpoints allocations by device ID, so an ID must not depend on
enumeration order or on the ``/dev/ttyUSBn`` number a device happened to get.
The identity key, strongest first:

1. udev's ``ID_SERIAL`` (plus ``ID_USB_INTERFACE_NUM`` and partition number):
   the same serial adapter gets the same ID on any port;
2. without udev (kernel uevents only), the USB ancestor's sysfs ``serial`` with
   ``idVendor``/``idProduct`` and the interface number: same effect; a USB
   device without a serial is identified by its port (the USB device's sysfs
   path) and interface, so re-plugging into the same port keeps the ID even if
   it comes back as another ``ttyUSBn``;
3. udev's ``ID_PATH``: the same port gives the same ID;
4. the sysfs path, which is stable for a given port or bus address (and for
   virtual devices such as /dev/fuse).

The key is hashed; the ID is ``<readable prefix>-<12 hex digits>``, e.g.
``ttyUSB-3f2a9c01d4e7``: the prefix is the kernel name without its trailing
instance number, so IDs stay readable in ``kubectl describe node``.  Share
copies are ``<id>-<i>``.  Every ID is at most 63 characters of
``[A-Za-z0-9._-]``.
"""

from __future__ import annotations

import hashlib
import re

from device_plugin.matching import Ancestor, DeviceInfo

# Device.ID in the kubelet's api.proto: at most 63 characters.
MAX_ID_LENGTH = 63
_HASH_CHARS = 12
_MAX_PREFIX = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_VALID_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def readable_prefix(kernel: str) -> str:
    """``ttyUSB0`` -> ``ttyUSB``, ``renderD128`` -> ``renderD``, ``fuse`` -> ``fuse``."""
    stripped = kernel.rstrip("0123456789") or kernel
    prefix = _UNSAFE.sub("-", stripped).strip("-._")[:_MAX_PREFIX].strip("-._")
    return prefix or "dev"


def _usb_identity(lineage: tuple[Ancestor, ...]) -> str | None:
    interface = ""
    for node in lineage:
        if not interface and "bInterfaceNumber" in node.attributes:
            interface = node.attributes["bInterfaceNumber"]
        if "idVendor" not in node.attributes:
            continue
        serial = node.attributes.get("serial")
        if serial:
            return (f"usb:{node.attributes['idVendor']}:{node.attributes.get('idProduct', '')}:"
                    f"{serial}:if{interface}")
        # No serial: the port (the USB device's sysfs path) is the identity, without the
        # ttyUSBn number the driver happened to hand out this time.
        return f"usbport:{node.sys_path}:if{interface}"
    return None


def identity_key(info: DeviceInfo) -> str:
    """The persistent identity of one device, before hashing."""
    kind = f"{info.subsystem}:{readable_prefix(info.kernel)}"
    props = info.properties
    part = props.get("PARTN") or props.get("ID_PART_ENTRY_NUMBER") or ""
    serial = props.get("ID_SERIAL")
    if serial:
        return f"serial:{serial}:if{props.get('ID_USB_INTERFACE_NUM', '')}:p{part}:{kind}"
    usb = _usb_identity(info.lineage())
    if usb:
        return f"{usb}:p{part}:{kind}"
    path = props.get("ID_PATH")
    if path:
        return f"path:{path}:p{part}:{kind}:{info.kernel if part else ''}"
    return f"sys:{info.sys_path}"


def anchor_key(anchor: Ancestor) -> str:
    """Identity of a grouping ancestor (e.g. the PCI device of a GPU)."""
    serial = anchor.properties.get("ID_SERIAL") or anchor.attributes.get("serial")
    if serial:
        return f"anchor-serial:{anchor.subsystem}:{serial}"
    path = anchor.properties.get("ID_PATH")
    if path:
        return f"anchor-path:{path}"
    return f"anchor-sys:{anchor.sys_path}"


def make_id(prefix: str, key: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]
    return f"{readable_prefix(prefix)}-{digest}"


def device_id(info: DeviceInfo) -> str:
    return make_id(info.kernel, identity_key(info))


def share_ids(base: str, share: int) -> tuple[str, ...]:
    """The allocatable IDs of one unit: itself, or ``<base>-<i>`` for a share count above 1."""
    if share <= 1:
        return (base,)
    return tuple(f"{base}-{i}" for i in range(share))


def is_valid_id(value: str) -> bool:
    return len(value) <= MAX_ID_LENGTH and _VALID_ID.fullmatch(value) is not None
