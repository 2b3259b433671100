"""udev discovery: one thread turning uevents into complete device inventories.

The thread owns every pyudev object; what leaves it are frozen ``DeviceInfo``
records, delivered as a complete inventory to a sink (the catalog).

Order of operations, so no event can fall between listing and watching:

1. open the netlink monitor, filtered by the subsystems the configuration
   needs, and start it;
2. enumerate those subsystems and publish;
3. wait on the monitor socket (and a wake-up pipe for stop/reconfigure) with a
   timeout that expires only for the safety-net resync (``resync_seconds``).

The event source is chosen at run time: ``udev`` when ``/run/udev`` exists
(udevd runs, properties such as ID_SERIAL and DEVLINKS are complete),
``kernel`` otherwise; the choice is logged.  After the first event of a burst
the thread keeps draining until the socket stays quiet for ``coalesce_seconds``
(bounded by ``max_coalesce_seconds``), then updates its inventory once and
publishes all of it.

Targeted updates: the inventory is kept per device (``Inventory``: per
subsystem, sysfs path -> ``DeviceInfo``), and a burst re-reads only the devices
its events name, plus the inventory entries below them (children, whose
ancestor data may have changed).  A device that no longer exists, or that
``device_info`` now rejects, is dropped.  Work per event is thus proportional
to the devices it names, not to the size of the subsystem: a node with hundreds
of block devices (disks, partitions, loop devices of snaps and containers)
must not pay for all of them on every ``change``.

The update stays level-triggered: the action never decides the result, the
device's state in sysfs does.  A real ``remove`` is dropped because the
kernel deletes the device node (and udevd its symlinks) before it sends the
event, so the re-read finds nothing; a synthetic one (``echo remove >
.../uevent``) leaves the device in sysfs and in the inventory, exactly as a full
enumeration would.  ``add``, ``change`` (loop attach/detach only emit
``change``), ``bind``, ``online`` and the rest are re-reads alike.

Fallback to full enumeration where a targeted update cannot be trusted or
would cost more: an event without a subsystem, a receive error (socket
overflow: events were lost) and a ``move`` (a rename: the old path and the
paths of its children in other subsystems are stale) re-enumerate every
watched subsystem; an event without a sysfs path re-enumerates its subsystem;
a burst naming more than ``MAX_TARGETED_DEVICES`` devices re-enumerates the
subsystems it touched (one listing is cheaper than that many lookups).  The
initial enumeration, a reconfigure and the safety-net resync are full
enumerations too.  Either way the sink gets the same inventory, sorted by
subsystem and sysfs path, that a full enumeration of the same system state
gives.

Latency hook: the sink receives the monotonic time at which the first uevent of
the burst was read (None for the initial enumeration and resyncs); the registry
stores it per generation (``ResourceState.last_event_monotonic``) and observes
the uevent-to-snapshot histogram.

Odd udev data never stops the thread: properties that are not UTF-8 are
skipped, attribute values are capped and decoded with replacement
(``device_plugin.sysfs``), a device or node that vanishes between enumeration
and ``stat`` is left out, and any failure on one device only drops that device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyudev

from device_plugin import metrics, sysfs
from device_plugin.config import Config
from device_plugin.matching import Ancestor, AttributeNeeds, DeviceInfo, attribute_needs

log = logging.getLogger(__name__)

Sink = Callable[[tuple[DeviceInfo, ...], float | None], None]

MAX_PROPERTY_CHARS = 4096
# Whole device subtrees are never this deep; bounds a corrupt parent chain.
MAX_ANCESTORS = 32
RESTART_DELAY = 1.0
# A burst naming more devices than this re-enumerates the subsystems it touched.
MAX_TARGETED_DEVICES = 64


def default_source() -> str:
    return "udev" if os.path.isdir("/run/udev") else "kernel"


def _properties(device: Any) -> dict[str, str]:
    result: dict[str, str] = {}
    try:
        props = device.properties
        keys = list(props)
    except (UnicodeDecodeError, OSError, KeyError, ValueError):
        return result
    for key in keys:
        try:
            value = props[key]
        except (UnicodeDecodeError, KeyError, ValueError, OSError):
            log.debug("skipping undecodable property %r of %s", key, device.sys_path)
            continue
        result[str(key)] = str(value)[:MAX_PROPERTY_CHARS]
    return result


def _attributes(sys_path: str, names: Iterable[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name in names:
        value = sysfs.read_attribute(sys_path, name)
        if value is not None:
            result[name] = value
    return result


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def device_info(device: Any, needs: AttributeNeeds) -> DeviceInfo | None:
    """A ``DeviceInfo`` for a pyudev device with a node that exists and that some
    matcher may select (``needs.may_select``), else None."""
    devnode = _text(device.device_node)
    if devnode is None:
        return None
    subsystem = _text(device.subsystem)
    devtype = _text(device.device_type)
    kernel = str(device.sys_name)
    if not needs.may_select(subsystem, devtype, kernel, devnode):
        return None  # no matcher can select it: skip reading attributes and parents
    try:
        os.stat(devnode)
    except OSError:
        # Vanished between enumeration and now, or never created (no devtmpfs).
        return None
    sys_path = str(device.sys_path)
    ancestors: list[Ancestor] = []
    parent = device.parent
    while parent is not None and len(ancestors) < MAX_ANCESTORS:
        ancestors.append(Ancestor(
            sys_path=str(parent.sys_path),
            subsystem=_text(parent.subsystem),
            devtype=_text(parent.device_type),
            kernel=str(parent.sys_name),
            attributes=_attributes(str(parent.sys_path), needs.ancestor),
            properties=_properties(parent),
        ))
        parent = parent.parent
    properties = _properties(device)
    try:
        links = [str(link) for link in device.device_links]
    except (UnicodeDecodeError, OSError, ValueError):
        links = []
    if not links:
        links = properties.get("DEVLINKS", "").split()
    # Only links that exist: a missing host path would fail the container's creation.
    links = sorted(link for link in set(links)
                   if link.startswith("/dev/") and os.path.lexists(link))
    return DeviceInfo(
        sys_path=sys_path,
        subsystem=subsystem,
        devtype=devtype,
        kernel=kernel,
        devnode=devnode,
        properties=properties,
        attributes=_attributes(sys_path, needs.device),
        ancestors=tuple(ancestors),
        devlinks=tuple(links),
        numa_node=sysfs.numa_node([sys_path, *(a.sys_path for a in ancestors)]),
    )


def enumerate_devices(
    context: Any, subsystems: Iterable[str] | None, needs: AttributeNeeds
) -> dict[str, tuple[DeviceInfo, ...]]:
    """Current devices with nodes, grouped by subsystem (all subsystems when None)."""
    found: dict[str, list[DeviceInfo]] = {}
    listings: list[Any]
    if subsystems is None:
        listings = [context.list_devices()]
    else:
        listings = [context.list_devices(subsystem=s) for s in sorted(subsystems)]
        for s in subsystems:
            found.setdefault(s, [])
    for listing in listings:
        for device in _safe_iter(listing):
            try:
                info = device_info(device, needs)
            except Exception as exc:  # one odd device must not stop discovery
                log.warning("skipping device %s: %s", getattr(device, "sys_path", "?"), exc)
                continue
            if info is not None and info.subsystem is not None:
                found.setdefault(info.subsystem, []).append(info)
    return {k: tuple(sorted(v, key=lambda d: d.sys_path)) for k, v in found.items()}


def read_device(context: Any, sys_path: str, needs: AttributeNeeds) -> DeviceInfo | None:
    """The ``DeviceInfo`` of the device at ``sys_path`` as sysfs shows it now; None
    when it does not exist (any more) or ``device_info`` rejects it."""
    try:
        device = pyudev.Devices.from_sys_path(context, sys_path)
    except (pyudev.DeviceNotFoundError, OSError, UnicodeDecodeError, ValueError) as exc:
        log.debug("device %s is gone: %s", sys_path, exc)
        return None
    try:
        return device_info(device, needs)
    except Exception as exc:  # one odd device must not stop discovery
        log.warning("skipping device %s: %s", sys_path, exc)
        return None


def _safe_iter(listing: Iterable[Any]) -> Iterable[Any]:
    iterator = iter(listing)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except (pyudev.DeviceNotFoundError, OSError, UnicodeDecodeError, ValueError) as exc:
            log.debug("device vanished during enumeration: %s", exc)


@dataclass
class Burst:
    """What one coalesced burst of uevents touched.

    ``devices``: sysfs path -> subsystem of each device an event named, for a
    targeted re-read; ``rescan``: subsystems to re-enumerate in full; ``rescan_all``:
    re-enumerate every watched subsystem (events lost, a rename, no subsystem).
    """

    devices: dict[str, str] = field(default_factory=dict)
    rescan: set[str] = field(default_factory=set)
    rescan_all: bool = False

    def empty(self) -> bool:
        return not (self.devices or self.rescan or self.rescan_all)

    def add(self, subsystem: str | None, action: str, sys_path: str | None) -> None:
        """Record one uevent."""
        if not subsystem or action == "move":
            self.rescan_all = True
        elif not sys_path or subsystem in self.rescan:
            self.rescan.add(subsystem)
        else:
            self.devices[sys_path] = subsystem
            if len(self.devices) > MAX_TARGETED_DEVICES:
                self.rescan.update(self.devices.values())
                self.devices.clear()


class Inventory:
    """Discovery's current devices: per subsystem, sysfs path -> ``DeviceInfo``."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, DeviceInfo]] = {}

    def replace(self, found: Mapping[str, Iterable[DeviceInfo]],
                subsystems: Iterable[str] | None) -> None:
        """Adopt an enumeration of ``subsystems`` (None: of everything)."""
        if subsystems is None:
            self._groups.clear()
        else:
            for s in subsystems:
                self._groups.pop(s, None)
        for s, infos in found.items():
            self._groups[s] = {d.sys_path: d for d in infos}

    def refresh(self, context: Any, sys_paths: Iterable[str],
                subsystems: frozenset[str] | None, needs: AttributeNeeds) -> None:
        """Re-read the devices at ``sys_paths`` and every known device below them
        (only devices of ``subsystems`` are kept, None: of any subsystem)."""
        named = set(sys_paths)
        targets = set(named)
        for group in self._groups.values():
            targets.update(known for known in group if _below(known, named))
        for path in sorted(targets):
            for group in self._groups.values():
                group.pop(path, None)
            info = read_device(context, path, needs)
            if info is None or info.subsystem is None:
                continue
            if subsystems is not None and info.subsystem not in subsystems:
                continue
            self._groups.setdefault(info.subsystem, {})[info.sys_path] = info

    def apply(self, context: Any, burst: Burst, subsystems: frozenset[str] | None,
              needs: AttributeNeeds) -> None:
        """Bring the devices ``burst`` touched up to date (see the module docstring)."""
        if burst.rescan_all:
            self.replace(enumerate_devices(context, subsystems, needs), subsystems)
            return
        if burst.rescan:
            self.replace(enumerate_devices(context, burst.rescan, needs), burst.rescan)
        targeted = [p for p, s in burst.devices.items() if s not in burst.rescan]
        if targeted:
            self.refresh(context, targeted, subsystems, needs)

    def devices(self) -> tuple[DeviceInfo, ...]:
        """Every device, sorted by subsystem and sysfs path (as a full enumeration)."""
        found: list[DeviceInfo] = []
        for s in sorted(self._groups):
            group = self._groups[s]
            found.extend(group[path] for path in sorted(group))
        return tuple(found)


def _below(path: str, roots: set[str]) -> bool:
    """Whether ``path`` lies strictly below one of ``roots`` (sysfs paths)."""
    parent = os.path.dirname(path)
    while len(parent) > 1:
        if parent in roots:
            return True
        parent = os.path.dirname(parent)
    return False


class UdevDiscovery:
    """The discovery thread.  ``start()``, ``reconfigure(config)``, ``stop()``."""

    def __init__(
        self,
        config: Config,
        sink: Sink,
        *,
        source: str | None = None,
        coalesce_seconds: float = 0.002,
        max_coalesce_seconds: float = 0.05,
    ) -> None:
        self._config = config
        self._sink = sink
        self.source = source or default_source()
        self._coalesce = coalesce_seconds
        self._max_coalesce = max_coalesce_seconds
        self._stop = threading.Event()
        self._reconfigured = threading.Event()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        log.info("udev discovery: event source %r (%s)", self.source,
                 "udevd runs: /run/udev exists" if self.source == "udev"
                 else "no /run/udev: raw kernel uevents")
        self._thread = threading.Thread(target=self._run, name="udev-discovery", daemon=True)
        self._thread.start()

    def reconfigure(self, config: Config) -> None:
        """Adopt a new configuration: re-open the monitor and re-enumerate."""
        with self._lock:
            self._config = config
        self._reconfigured.set()
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("udev discovery thread did not stop within %.1fs", timeout)
                return
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
            except Exception as exc:
                if not self.ready.is_set():
                    # Cannot even start (no netlink socket, no sysfs): report to start().
                    self.error = exc
                    log.exception("udev discovery cannot start")
                    self.ready.set()
                    return
                # Later failures re-open the monitor and re-enumerate from scratch.
                log.exception("udev discovery failed; restarting it in %.0fs", RESTART_DELAY)
                self._stop.wait(RESTART_DELAY)
                self._reconfigured.set()

    def _open(self, context: Any, config: Config) -> tuple[Any, frozenset[str] | None]:
        subsystems = config.subsystems()
        monitor = pyudev.Monitor.from_netlink(context, source=self.source)
        if subsystems is not None:
            for s in sorted(subsystems):
                monitor.filter_by(s)
        monitor.start()
        return monitor, subsystems

    def _loop(self) -> None:
        context = pyudev.Context()
        inventory = Inventory()
        monitor: Any = None
        subsystems: frozenset[str] | None = None
        needs: AttributeNeeds | None = None
        next_resync = 0.0
        while not self._stop.is_set():
            if monitor is None or self._reconfigured.is_set():
                self._reconfigured.clear()
                with self._lock:
                    config = self._config
                monitor = None
                # Monitor first, then enumerate: nothing falls in between.
                monitor, subsystems = self._open(context, config)
                needs = attribute_needs(config)
                inventory.replace(enumerate_devices(context, subsystems, needs), None)
                self._publish(inventory, None)
                next_resync = time.monotonic() + config.resync_seconds
                self.ready.set()
                continue
            assert needs is not None
            wait = max(0.0, next_resync - time.monotonic())
            try:
                readable, _, _ = select.select([monitor.fileno(), self._wake_r], [], [], wait)
            except InterruptedError:
                continue
            if self._wake_r in readable:
                self._drain_wake()
                continue
            if monitor.fileno() in readable:
                first_event = time.monotonic()
                burst = self._drain(monitor, first_event)
                if burst.empty():
                    continue  # woken by an event of another subsystem, filtered out
                inventory.apply(context, burst, subsystems, needs)
                self._publish(inventory, first_event)
                continue
            with self._lock:
                resync = self._config.resync_seconds
            log.debug("safety-net resync")
            inventory.replace(enumerate_devices(context, subsystems, needs), None)
            self._publish(inventory, None)
            next_resync = time.monotonic() + resync

    def _drain(self, monitor: Any, started: float) -> Burst:
        """Read the burst; return the devices and subsystems it touched."""
        burst = Burst()
        deadline = started + self._max_coalesce
        timeout = 0.0
        while True:
            try:
                device = monitor.poll(timeout=timeout)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                # e.g. ENOBUFS: the socket overflowed and events were lost; rescan all.
                log.warning("uevent receive failed (%s); rescanning", exc)
                burst.rescan_all = True
                device = None
            if device is None:
                remaining = deadline - time.monotonic()
                if timeout > 0 or remaining <= 0 or burst.empty():
                    # Quiet after a burst, out of time, or only events the monitor's
                    # filter dropped (other subsystems): nothing more to wait for.
                    break
                # Quiet right now: wait one coalescing window for the rest of a burst.
                timeout = min(self._coalesce, remaining)
                continue
            timeout = 0.0
            subsystem = _text(device.subsystem)
            action = _text(device.action) or "unknown"
            metrics.UEVENTS.labels(subsystem=subsystem or "", action=action).inc()
            burst.add(subsystem, action, _text(device.sys_path))
            if time.monotonic() >= deadline:
                break
        return burst

    def _publish(self, inventory: Inventory, event: float | None) -> None:
        self._sink(inventory.devices(), event)
