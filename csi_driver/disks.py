"""Whole-disk discovery for the disk pool: selection through udev, safety, and a watcher.

This module owns the answer to "which disks may the driver take?".  Disks are
block devices of devtype "disk" found through pyudev (udev properties when
udevd runs, sysfs otherwise) and matched by a ``DiskSelector``.  Matching is
not permission: ``unsafe_reason`` refuses, with the reason, any disk that is
in use or holds something: partitions, a signature (filesystem, RAID, LVM,
partition table), holders, mounts, swap, read-only media, the disk under /
or under any other protected path (resolved through partitions, device-mapper
slaves and loop backing files), and loop devices backed by the driver's own
image files.  Loop devices are otherwise allowed: on machines without spare
disks they stand in for disks in tests.

``DiskWatcher`` keeps a pool's disk list current: it opens a udev monitor
before enumerating (no event can fall between the two), re-enumerates on every
block event (level-triggered: loop attach/detach arrive only as "change") and
reports the differences to a callback.  A slow periodic resync (on its own
clock, so a steady stream of unrelated events cannot postpone it) and an
explicit ``rescan`` re-offer every present disk, changed or not: a consumer
that refused a disk for a reason that has since gone away (mounted or being
probed at the time) gets to look at it again although no uevent will ever
come for it.  pyudev objects never leave the watcher's thread.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_driver import filesystems, mounts
from plugin_runtime.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
SYS_DEV_BLOCK = Path("/sys/dev/block")
SECTOR = 512
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*")


@dataclass(frozen=True)
class DiskSelector:
    """Which disks a pool wants.  Every given constraint must hold.

    ``properties``: udev property name -> glob (``ID_MODEL: "QEMU*"``).
    ``attributes``: sysfs attribute path under the disk -> glob
    (``queue/rotational: "0"``, ``device/model: "Samsung*"``).
    ``kernel_names``: globs of which one must match the kernel name (``vd[b-z]``, ``loop*``).
    ``min_size``/``max_size``: bytes, inclusive.
    """

    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    kernel_names: tuple[str, ...] = ()
    min_size: int = 1
    max_size: int | None = None

    def __post_init__(self) -> None:
        for name in self.attributes:
            if not _ATTRIBUTE_NAME.fullmatch(name) or ".." in name.split("/"):
                raise InvalidArgument(f"disk selector attribute {name!r} is not a sysfs path")
        if self.min_size < 0 or (self.max_size is not None and self.max_size < self.min_size):
            raise InvalidArgument(
                f"disk selector size range {self.min_size}..{self.max_size} is empty"
            )

    def matches(
        self,
        kernel_name: str,
        size: int,
        properties: Mapping[str, str],
        read_attribute: Callable[[str], str | None],
    ) -> bool:
        if self.kernel_names and not any(
            fnmatch.fnmatchcase(kernel_name, pattern) for pattern in self.kernel_names
        ):
            return False
        if size < self.min_size or (self.max_size is not None and size > self.max_size):
            return False
        for key, pattern in self.properties.items():
            value = properties.get(key)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        for name, pattern in self.attributes.items():
            value = read_attribute(name)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        return True


@dataclass(frozen=True)
class Disk:
    """A whole disk as discovery saw it."""

    devnode: str
    kernel_name: str
    sys_path: str
    size_bytes: int
    major: int
    minor: int
    disk_id: str
    """Stable identity: WWN, serial, a loop device's backing file, ID_PATH, or sysfs path."""
    serial: str | None = None
    wwn: str | None = None
    id_path: str | None = None
    backing_file: str | None = None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _disk_id(
    kernel_name: str,
    sys_path: str,
    *,
    wwn: str | None,
    serial: str | None,
    id_path: str | None,
    backing: str | None,
) -> str:
    if wwn:
        return f"wwn-{wwn}"
    if serial:
        return f"serial-{serial}"
    if kernel_name.startswith("loop"):
        return f"loop-{_short_hash(backing or sys_path)}"
    if id_path:
        return f"path-{id_path}"
    return f"sys-{_short_hash(sys_path)}"


def _disk_from_udev(device: Any, selector: DiskSelector | None) -> Disk | None:
    kernel_name: str = device.sys_name
    sys_dir = Path(device.sys_path)
    sectors = _read_text(sys_dir / "size")
    size = int(sectors) * SECTOR if sectors and sectors.isdigit() else 0
    if size == 0:
        return None  # no medium, or a loop device with nothing attached
    properties: Mapping[str, str] = dict(device.properties)

    def read_attribute(name: str) -> str | None:
        return _read_text(sys_dir / name)

    if selector is not None and not selector.matches(kernel_name, size, properties, read_attribute):
        return None
    number = device.device_number
    serial = (
        properties.get("ID_SERIAL_SHORT")
        or properties.get("ID_SERIAL")
        or read_attribute("device/serial")
        or read_attribute("serial")
        or None
    )
    wwn = (
        properties.get("ID_WWN_WITH_EXTENSION")
        or properties.get("ID_WWN")
        or read_attribute("wwid")
        or read_attribute("device/wwid")
        or None
    )
    id_path = properties.get("ID_PATH") or None
    backing = read_attribute("loop/backing_file") if kernel_name.startswith("loop") else None
    return Disk(
        devnode=device.device_node or f"/dev/{kernel_name}",
        kernel_name=kernel_name,
        sys_path=str(sys_dir),
        size_bytes=size,
        major=os.major(number),
        minor=os.minor(number),
        disk_id=_disk_id(
            kernel_name, str(sys_dir), wwn=wwn, serial=serial, id_path=id_path, backing=backing
        ),
        serial=serial,
        wwn=wwn,
        id_path=id_path,
        backing_file=backing,
    )


def _list_disks(context: Any, selector: DiskSelector | None) -> list[Disk]:
    disks = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        try:
            disk = _disk_from_udev(device, selector)
        except (OSError, ValueError) as exc:
            log.debug("skipping %s: %s", device.sys_path, exc)
            continue
        if disk is not None:
            disks.append(disk)
    return sorted(disks, key=lambda d: d.kernel_name)


def find_disks(selector: DiskSelector) -> list[Disk]:
    """Whole disks (devtype "disk", non-zero size) that match ``selector``."""
    import pyudev

    return _list_disks(pyudev.Context(), selector)


# --- safety ------------------------------------------------------------------


def list_partitions(disk: Disk) -> list[str]:
    """Kernel names of the partitions the kernel made for ``disk``."""
    base = Path(disk.sys_path)
    try:
        children = list(base.iterdir())
    except OSError:
        return []
    return sorted(c.name for c in children if (c / "partition").exists())


def _numbers_of(sys_dir: Path) -> tuple[int, int] | None:
    text = _read_text(sys_dir / "dev")
    if not text or ":" not in text:
        return None
    major, _, minor = text.partition(":")
    return int(major), int(minor)


def _whole_disks_under(major: int, minor: int, seen: set[tuple[int, int]]) -> set[str]:
    """Kernel names of the whole disks that block device major:minor lives on.

    Follows partitions to their disk, device-mapper/md slaves to theirs, and
    loop devices to the disks under their backing files.
    """
    if (major, minor) in seen:
        return set()
    seen.add((major, minor))
    sys_dir = SYS_DEV_BLOCK / f"{major}:{minor}"
    try:
        real = sys_dir.resolve(strict=True)
    except OSError:
        return set()
    if (real / "partition").exists():
        real = real.parent
    names = {real.name}
    with contextlib.suppress(OSError):
        for slave in (real / "slaves").iterdir():
            numbers = _numbers_of(slave)
            if numbers:
                names |= _whole_disks_under(*numbers, seen)
    backing = _read_text(real / "loop" / "backing_file")
    if backing:
        backing = backing.removesuffix(" (deleted)")
        with contextlib.suppress(OSError, Internal):
            names |= _disks_holding(backing, seen)
    return names


def _disks_holding(path: str, seen: set[tuple[int, int]]) -> set[str]:
    """Kernel names of the whole disks the filesystem holding ``path`` lives on."""
    st_dev = os.stat(path).st_dev
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major != 0:
        return _whole_disks_under(major, minor, seen)
    # Anonymous device (btrfs subvolume, overlay, tmpfs): look at the mount's source.
    entries = mounts.read_mounts()
    candidates = [e for e in entries if (e.major, e.minor) == (major, minor)]
    names: set[str] = set()
    for entry in candidates:
        with contextlib.suppress(OSError):
            source_st = os.stat(entry.source)
            if stat.S_ISBLK(source_st.st_mode):
                names |= _whole_disks_under(
                    os.major(source_st.st_rdev), os.minor(source_st.st_rdev), seen
                )
        for option in entry.super_options:
            key, _, value = option.partition("=")
            if key in ("upperdir", "lowerdir") and value:
                for layer in value.split(":"):
                    with contextlib.suppress(OSError):
                        names |= _disks_holding(layer, seen)
    return names


def protected_disks(paths: Iterable[str]) -> set[str]:
    """Kernel names of every disk that holds one of ``paths`` (see ``unsafe_reason``)."""
    names: set[str] = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            names |= _disks_holding(path, set())
    return names


def _within(path: str, directory: str) -> bool:
    directory = os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def unsafe_reason(
    disk: Disk,
    *,
    protected_paths: Sequence[str] = ("/",),
    image_dirs: Sequence[str] = (),
    entries: Sequence[mounts.MountEntry] | None = None,
) -> str | None:
    """Why ``disk`` must not be taken by a pool, or None when it is free to use.

    ``protected_paths``: the disks holding these paths are refused (pass / and
    the driver's state directory).  ``image_dirs``: loop devices whose backing
    file lives under one of these directories (the driver's own image-file
    volumes) are refused.  Probing runs blkid, so this is for discovery, not
    for a hot path.
    """
    base = Path(disk.sys_path)
    name = disk.kernel_name
    if not base.exists():
        return f"{disk.devnode} is gone"
    if _read_text(base / "ro") == "1":
        return f"{disk.devnode} is read-only"
    parts = list_partitions(disk)
    if parts:
        return f"{disk.devnode} has partitions ({', '.join(parts)})"
    holders = sorted(os.listdir(base / "holders")) if (base / "holders").is_dir() else []
    if holders:
        return f"{disk.devnode} is held by {', '.join(holders)}"
    table = mounts.read_mounts() if entries is None else entries
    mounted = mounts.mounts_of_device(disk.major, disk.minor, table)
    if mounted:
        return f"{disk.devnode} is mounted at {mounted[0].mount_point}"
    swaps = _read_text(Path("/proc/swaps")) or ""
    if any(line.split()[0] == disk.devnode for line in swaps.splitlines()[1:] if line.split()):
        return f"{disk.devnode} is in use as swap"
    if name in protected_disks(protected_paths):
        return f"{disk.devnode} holds a protected path ({', '.join(protected_paths)})"
    backing = _read_text(base / "loop" / "backing_file")
    if backing:
        backing_path = os.path.realpath(backing.removesuffix(" (deleted)"))
        for directory in image_dirs:
            if _within(backing_path, directory):
                return f"{disk.devnode} is backed by {backing_path}, an image of the driver's own"
    try:
        if filesystems.has_signature(disk.devnode):
            try:
                found = filesystems.probe_filesystem(disk.devnode) or "partition table or other"
            except filesystems.AmbivalentSignatures:
                found = "several conflicting ones"
            return f"{disk.devnode} has a signature ({found})"
    except Internal as exc:
        return f"{disk.devnode} could not be probed: {exc}"
    return None


# --- watcher -----------------------------------------------------------------

ChangeCallback = Callable[[list[Disk], list[str]], None]


class DiskWatcher:
    """A thread that reports disks matching a selector as they come and go.

    ``on_change(added, removed)``: ``added`` lists disks that are new or whose
    description changed (size, backing file), ``removed`` the ``disk_id`` of
    disks that are gone.  The first call, made before ``start`` returns, lists
    every matching disk, and so does every resync (each ``resync_seconds``)
    and ``rescan``: the consumer must treat a disk it already holds, unchanged,
    as a no-op, and may re-evaluate one it refused.  The callback runs on the
    watcher thread; exceptions from it are logged and do not stop the watcher.
    """

    def __init__(
        self,
        selector: DiskSelector,
        on_change: ChangeCallback,
        *,
        resync_seconds: float = 60.0,
        source: str | None = None,
    ) -> None:
        self.selector = selector
        self.on_change = on_change
        self.resync_seconds = resync_seconds
        self.source = source or ("udev" if os.path.isdir("/run/udev") else "kernel")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._known: dict[str, Disk] = {}
        # Rescan requests and the full passes that answered them, by sequence number.
        self._passes = threading.Condition(self._lock)
        self._requested = 0
        self._done = 0
        self._thread = threading.Thread(target=self._run, name="disk-watcher", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise Internal(f"disk watcher did not start within {timeout:g} s")
        if self._failure is not None:
            raise Internal(f"disk watcher failed to start: {self._failure}") from self._failure

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._passes:
            self._passes.notify_all()  # a rescan waiting for this thread gives up
        if self._thread.is_alive():
            self._thread.join(timeout)

    def rescan(self, timeout: float | None = None) -> bool:
        """Re-offer every present disk to the callback soon, on the watcher thread.

        With ``timeout``, wait (bounded) until that pass has run; False when it
        had not within ``timeout`` seconds.  Without, return at once (True).
        """
        with self._passes:
            self._requested += 1
            wanted = self._requested
            if timeout is None:
                return True
            return self._passes.wait_for(
                lambda: self._done >= wanted or self._stop.is_set(), timeout
            ) and self._done >= wanted

    def snapshot(self) -> list[Disk]:
        with self._lock:
            return sorted(self._known.values(), key=lambda d: d.kernel_name)

    def _publish(self, disks: list[Disk], *, full: bool = False) -> None:
        """Report what changed since the last pass; with ``full``, every present disk."""
        current = {d.disk_id: d for d in disks}
        with self._lock:
            changed = [d for key, d in current.items() if self._known.get(key) != d]
            removed = [key for key in self._known if key not in current]
            self._known = current
        added = list(current.values()) if full else changed
        if added or removed or not self._ready.is_set():
            try:
                self.on_change(added, removed)
            except Exception:
                log.exception("disk watcher callback failed")

    def _run(self) -> None:
        try:
            import pyudev

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context, source=self.source)
            monitor.filter_by("block")
            monitor.start()
            self._publish(_list_disks(context, self.selector))
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        poll_seconds = min(0.5, self.resync_seconds)
        next_resync = time.monotonic() + self.resync_seconds
        while not self._stop.is_set():
            try:
                device = monitor.poll(timeout=poll_seconds)
            except OSError as exc:
                log.warning("disk watcher: udev monitor failed (%s); resyncing", exc)
                device = None
                next_resync = 0.0
                self._stop.wait(poll_seconds)  # a monitor that keeps failing must not spin
            with self._lock:
                upto = self._requested
            full = upto > self._done or time.monotonic() >= next_resync
            if device is None and not full:
                continue
            if full:
                next_resync = time.monotonic() + self.resync_seconds
            # Coalesce a burst of events into one re-enumeration.
            with contextlib.suppress(OSError):
                while monitor.poll(timeout=0) is not None:
                    pass
            try:
                self._publish(_list_disks(context, self.selector), full=full)
            except Exception:
                log.exception("disk watcher: enumeration failed")
            if full:
                with self._passes:
                    self._done = max(self._done, upto)
                    self._passes.notify_all()
