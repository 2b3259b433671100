"""Publishing this node's DRA pools as ResourceSlices: level-triggered, retried.

``SlicePublisher`` owns one thread that brings the API server's ResourceSlices of
(this node, this driver) to the desired state computed from the catalog
(``device_plugin.slices``), and one thread that watches those slices.  It never
applies a diff it remembers: every round lists what the API server holds and
recomputes what should be there, so a lost write, an API server restart, a 409
Conflict, a slice someone deleted (the kubelet deletes every slice of its node
when it starts) or edited are all repaired by the next round.  Rounds are
triggered by

* a change of a DRA resource's units or health (``Catalog.subscribe``: a uevent
  or a probe, through the same event-driven discovery as the device plugin),
* a watch event on our slices that our own writes did not cause,
* a failed round (retried after a backoff from 50 ms doubling to 30 s, with
  jitter; the change is not lost, since the next round recomputes it), and
* a slow resync (``resync_seconds``), the safety net for a missed watch event.

Writes per pool: any change of a pool's content publishes the whole pool under
generation + 1 (the scheduler uses only the newest generation and waits for
``resourceSliceCount`` slices, so it never sees a device twice while devices shift
between slices), one write per slice: a pool of up to 128 devices costs one write
per change.  (The upstream controller keeps the generation when exactly one slice
changes, saving writes in large pools; we follow the rule that every device change
is a new generation, which consumers can rely on.)  Order: delete obsolete slices,
update, create.
Slices of this node and driver that belong to no configured pool (a removed
resource, a previous run's leftovers) are deleted; at start existing slices are
adopted by name (``slices.slice_name``) and rewritten only where they differ.

lightkube is imported inside the functions that call the API (the layering test
keeps every module importable without it).

Comparison with what the server holds is semantic (``_normalized``): the API
server rewrites quantities to canonical form, so bytes are compared as numbers.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from device_plugin import metrics, slices
from device_plugin.config import ResourceConfig
from device_plugin.registry import Catalog

if TYPE_CHECKING:
    from lightkube import Client
    from lightkube.resources.resource_v1 import ResourceSlice

log = logging.getLogger(__name__)

BACKOFF_INITIAL_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 30.0
RESYNC_SECONDS = 30.0

_QUANTITY = re.compile(r"([+-]?\d+(?:\.\d+)?)([a-zA-Z]*)")
_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "m": 10**-3}


def quantity_value(text: str) -> float | str:
    """A resource.Quantity as a number (``2Mi`` == ``2097152``); odd text stays text."""
    match = _QUANTITY.fullmatch(str(text).strip())
    if not match or match.group(2) not in _SUFFIX:
        return str(text)
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _normalized(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a slice spec means, independent of the server's canonical forms."""
    pool = spec.get("pool") or {}
    devices = []
    for device in spec.get("devices") or ():
        attributes = tuple(sorted(
            (name, tuple(sorted((k, v) for k, v in (value or {}).items() if v is not None)))
            for name, value in (device.get("attributes") or {}).items()
        ))
        capacity = tuple(sorted(
            (name, quantity_value((value or {}).get("value", "")))
            for name, value in (device.get("capacity") or {}).items()
        ))
        devices.append((device.get("name"), attributes, capacity))
    return (spec.get("driver"), spec.get("nodeName"), pool.get("name"), pool.get("generation"),
            pool.get("resourceSliceCount"), tuple(devices))


def _same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from the pool generation and count."""
    x, y = _normalized(a), _normalized(b)
    return (x[0], x[1], x[2], x[5]) == (y[0], y[1], y[2], y[5])


@dataclass
class PublishStats:
    """Counters for tests, benchmarks and logs."""

    rounds: int = 0
    writes: int = 0
    failures: int = 0
    last_error: str = ""
    generations: dict[str, int] = field(default_factory=dict)


class SlicePublisher:
    """Keeps this node's ResourceSlices equal to the catalog's DRA resources."""

    def __init__(
        self,
        catalog: Catalog,
        client_factory: Callable[[], Client],
        node: str,
        *,
        resync_seconds: float = RESYNC_SECONDS,
        kernel_release: str | None = None,
    ) -> None:
        self._catalog = catalog
        self._client_factory = client_factory
        self._client: Client | None = None
        self.node = node
        self._resync = resync_seconds
        self._kernel_release = kernel_release or os.uname().release
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_client: Client | None = None
        self._owner: dict[str, str] | None = None
        # Drivers published under before a reload renamed the driver: their slices of
        # this node are deleted by the next round.
        self._former_drivers: set[str] = set()
        self._driver_watched: str | None = None
        self._own_versions: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        # Every poke is numbered; a round covers the pokes made before it started (it
        # reads the catalog afterwards), so a caller can wait for its change to be out.
        self._pokes = 0
        self._synced_pokes = 0
        self.stats = PublishStats()
        catalog.subscribe(self.poke)

    @property
    def driver(self) -> str:
        return self._catalog.config.dra.driver

    # ---- lifecycle ---------------------------------------------------------------- #

    def start(self) -> None:
        self._client = self._client_factory()
        self.poke()  # the first round: adopt or replace what the node has
        for target, name in ((self._run, "dra-slices"), (self._watch, "dra-slice-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("publishing ResourceSlices of node %s, driver %s", self.node, self.driver)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing; the slices stay (a restarted driver adopts them, and the
        kubelet wipes them 30 s after the plugin deregisters)."""
        self._stop.set()
        self._wake.set()
        # The watch blocks in a read: closing its client ends it.  The publishing thread
        # finishes its round (every call is bounded) before its client is closed.
        _close_quietly(self._watch_client)
        for thread in self._threads:
            if thread.name == "dra-slices":
                thread.join(timeout)
        _close_quietly(self._client)
        for thread in self._threads:
            if thread.name != "dra-slices":
                thread.join(0.5)

    def poke(self) -> None:
        """Request a round (non-blocking; called from discovery and health threads)."""
        with self._lock:
            self._pokes += 1
        self._wake.set()

    def wait_synced(self, timeout: float) -> bool:
        """Block until a round that started after every poke made so far (a catalog
        change pokes before it returns) completed without error, so the API server
        holds what the catalog held; False on timeout.  For tests and benchmarks."""
        deadline = time.monotonic() + timeout
        with self._done:
            target = self._pokes
            while self._synced_pokes < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            return True

    # ---- the level-triggered loop ------------------------------------------------ #

    def _run(self) -> None:
        backoff = BACKOFF_INITIAL_SECONDS
        wait: float = 0.0
        while not self._stop.is_set():
            self._wake.wait(wait)
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                covered = self._pokes
            self.stats.rounds += 1
            try:
                self.reconcile()
            except Exception as exc:
                self.stats.failures += 1
                self.stats.last_error = _describe(exc)
                metrics.SLICE_PUBLISH_FAILURES.inc()
                wait = backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
                log.warning("publishing ResourceSlices failed (%s); retrying in %.2fs",
                            self.stats.last_error, wait)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                continue
            backoff = BACKOFF_INITIAL_SECONDS
            wait = self._resync
            with self._done:
                self._synced_pokes = max(self._synced_pokes, covered)
                self._done.notify_all()

    def desired(self) -> dict[str, tuple[ResourceConfig, tuple[slices.DraDevice, ...]]]:
        """pool name -> (resource, devices) for every DRA resource of the catalog."""
        wanted: dict[str, tuple[ResourceConfig, tuple[slices.DraDevice, ...]]] = {}
        for state in self._catalog.resources().values():
            config = state.config
            if not config.dra:
                continue
            units = state.units
            unhealthy = frozenset(u.id for u in state.snapshot().units if not u.healthy)
            devices = slices.pool_devices(config, units, unhealthy, self._kernel_release)
            wanted[slices.pool_name(self.node, config)] = (config, devices)
        return wanted

    def reconcile(self) -> None:
        """One round: list, compare, write.  Raises on any API failure."""
        from lightkube.resources.resource_v1 import ResourceSlice

        client = self._client
        assert client is not None, "start() first"
        event = self._newest_event()
        driver = self.driver
        if self._driver_watched is not None and self._driver_watched != driver:
            self._former_drivers.add(self._driver_watched)
            _close_quietly(self._watch_client)  # the watch restarts with the new driver
        self._driver_watched = driver
        wanted = self.desired()
        existing: dict[str, Any] = {}
        obj: Any
        for obj in client.list(ResourceSlice, fields={"spec.nodeName": self.node,
                                                      "spec.driver": driver}):
            existing[obj.metadata.name] = obj
        owner = self._node_owner(client)
        by_pool: dict[str, list[Any]] = {}
        for obj in existing.values():
            by_pool.setdefault(obj.spec.pool.name, []).append(obj)
        writes = 0
        for former in sorted(self._former_drivers - {driver}):
            for obj in client.list(ResourceSlice, fields={"spec.nodeName": self.node,
                                                          "spec.driver": former}):
                writes += self._delete(client, obj, f"the driver is now {driver}")
            self._former_drivers.discard(former)
        for pool, objs in sorted(by_pool.items()):
            if pool not in wanted:
                for obj in objs:
                    writes += self._delete(client, obj, "its pool is no longer published")
        for pool, (resource, devices) in sorted(wanted.items()):
            writes += self._publish_pool(client, driver, pool, resource, devices,
                                         by_pool.get(pool, []), owner)
        self.stats.writes += writes
        if writes and event is not None:
            metrics.UEVENT_TO_SLICE.observe(time.monotonic() - event)

    def _newest_event(self) -> float | None:
        times = [s.last_event_monotonic for s in self._catalog.resources().values()
                 if s.config.dra and s.last_event_monotonic is not None]
        return max(times) if times else None

    def _publish_pool(
        self, client: Client, driver: str, pool: str, resource: ResourceConfig,
        devices: tuple[slices.DraDevice, ...], current: list[Any],
        owner: dict[str, str] | None,
    ) -> int:
        by_name = {obj.metadata.name: obj for obj in current}
        generation = max((obj.spec.pool.generation for obj in current), default=0)
        plan = slices.plan_pool(driver, self.node, resource, devices, generation)
        planned = {s.name for s in plan}
        obsolete = [obj for name, obj in by_name.items() if name not in planned]
        missing = [s for s in plan if s.name not in by_name]
        stale_generation = any(obj.spec.pool.generation != generation for obj in current)
        changed = [s for s in plan if s.name in by_name
                   and not _same_content(by_name[s.name].spec.to_dict(), s.spec())]
        if not (obsolete or missing or changed or stale_generation) and all(
            by_name[s.name].spec.pool.resourceSliceCount == len(plan) for s in plan
        ):
            return 0
        writes = 0
        generation += 1
        plan = slices.plan_pool(driver, self.node, resource, devices, generation)
        for obj in obsolete:
            writes += self._delete(client, obj, f"pool {pool} shrank")
        for spec in plan:
            if spec.name in by_name:
                writes += self._replace(client, by_name[spec.name], spec, owner)
            else:
                writes += self._create(client, spec, owner)
        self.stats.generations[pool] = generation
        log.info("pool %s: generation %d, %d devices in %d slices (%d writes)", pool,
                 generation, len(devices), len(plan), writes)
        return writes

    # ---- API calls ------------------------------------------------------------------ #

    def _create(self, client: Client, spec: slices.SliceSpec,
                owner: dict[str, str] | None) -> int:
        from lightkube import ApiError

        try:
            created = client.create(_slice(spec, owner))
        except ApiError as exc:
            if exc.status.code == 409:
                # A slice of that name exists after all (created since our list): the
                # next round adopts it.
                self.poke()
                raise
            raise
        self._remember(created)
        metrics.SLICE_WRITES.labels(operation="create").inc()
        return 1

    def _replace(self, client: Client, current: Any, spec: slices.SliceSpec,
                 owner: dict[str, str] | None) -> int:
        obj = _slice(spec, owner)
        assert obj.metadata is not None
        obj.metadata.resourceVersion = current.metadata.resourceVersion
        if owner is None:
            obj.metadata.ownerReferences = current.metadata.ownerReferences
        replaced = client.replace(obj)  # 409 when someone wrote since our list: retried
        self._remember(replaced)
        metrics.SLICE_WRITES.labels(operation="update").inc()
        return 1

    def _delete(self, client: Client, obj: Any, why: str) -> int:
        from lightkube import ApiError
        from lightkube.resources.resource_v1 import ResourceSlice

        try:
            client.delete(ResourceSlice, obj.metadata.name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
        log.info("deleted ResourceSlice %s: %s", obj.metadata.name, why)
        metrics.SLICE_WRITES.labels(operation="delete").inc()
        return 1

    def _remember(self, obj: Any) -> None:
        version = obj.metadata.resourceVersion if obj.metadata is not None else None
        if version:
            with self._lock:
                if len(self._own_versions) > 4096:
                    self._own_versions.clear()
                self._own_versions.add(version)

    def _node_owner(self, client: Client) -> dict[str, str] | None:
        """The Node as owner of our slices (garbage-collected with it); None while the
        Node object cannot be read (the slices are still published)."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Node

        if self._owner is None:
            try:
                node = client.get(Node, self.node)
            except ApiError as exc:
                if exc.status.code in (403, 404):
                    log.debug("no owner for slices: node %s: %s", self.node, exc.status.message)
                    return None
                raise
            if node.metadata is not None and node.metadata.uid:
                self._owner = {"name": self.node, "uid": node.metadata.uid}
        return self._owner

    # ---- watch --------------------------------------------------------------------- #

    def _watch(self) -> None:
        """Poke a round on every change of our slices that we did not write."""
        from lightkube.resources.resource_v1 import ResourceSlice

        backoff = BACKOFF_INITIAL_SECONDS
        while not self._stop.is_set():
            try:
                self._watch_client = self._client_factory()
                stream = self._watch_client.watch(
                    ResourceSlice, fields={"spec.nodeName": self.node, "spec.driver": self.driver}
                )
                obj: Any
                for kind, obj in stream:
                    backoff = BACKOFF_INITIAL_SECONDS
                    if self._stop.is_set():
                        return
                    version = obj.metadata.resourceVersion if obj.metadata else None
                    with self._lock:
                        ours = kind != "DELETED" and version in self._own_versions
                    if not ours:
                        log.debug("ResourceSlice %s %s by someone else", obj.metadata.name,
                                  kind.lower())
                        self.poke()
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("watching ResourceSlices failed (%s); again in %.2fs",
                          _describe(exc), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                self.poke()  # whatever happened meanwhile is not in a watch event
            finally:
                _close_quietly(self._watch_client)


def _close_quietly(client: Client | None) -> None:
    if client is None:
        return
    try:
        client.close()
    except Exception:  # closing a streaming watch from another thread may raise there
        log.debug("closing an API client", exc_info=True)


def _slice(spec: slices.SliceSpec, owner: dict[str, str] | None) -> ResourceSlice:
    from lightkube.resources.resource_v1 import ResourceSlice

    return cast(ResourceSlice, ResourceSlice.from_dict(spec.as_api(owner)))


def _describe(exc: BaseException) -> str:
    import httpx2
    from lightkube import ApiError

    if isinstance(exc, ApiError):
        return f"API error {exc.status.code} {exc.status.reason}: {exc.status.message}"
    if isinstance(exc, httpx2.HTTPError):
        return f"API server unreachable: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def publish_once(catalog: Catalog, client: Client, node: str,
                 kernel_release: str | None = None) -> PublishStats:
    """One synchronous round (no threads), for tools and tests."""
    publisher = SlicePublisher(catalog, lambda: client, node, kernel_release=kernel_release)
    publisher._client = client
    publisher.reconcile()
    return publisher.stats


__all__ = ["SlicePublisher", "publish_once", "quantity_value"]
