"""Test doubles of the device plugin's domain (``model.Resource``/``ResourceCatalog``).

They implement the seam's contract honestly (generations, full snapshots, the
error classes the domain raises) so the wire tests exercise the real servicer,
lifecycle and gRPC against a kubelet stand-in without udev.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from device_plugin import model
from plugin_runtime import errors


def unit(
    uid: str, healthy: bool = True, numa: tuple[int, ...] = (), nodes: tuple[str, ...] = ()
) -> model.DeviceUnit:
    return model.DeviceUnit(uid, healthy, numa, nodes or (f"/dev/fake-{uid}",))


class FakeResource:
    def __init__(
        self,
        name: str,
        units: Iterable[model.DeviceUnit],
        options: model.ResourceOptions | None = None,
    ) -> None:
        self._name = name
        self._options = options or model.ResourceOptions()
        self._cond = threading.Condition()
        self._snapshot = model.ResourceSnapshot(name, 1, tuple(units))
        self.pre_started: list[list[str]] = []
        self.allocations = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def options(self) -> model.ResourceOptions:
        return self._options

    def snapshot(self) -> model.ResourceSnapshot:
        with self._cond:
            return self._snapshot

    def set_units(self, units: Iterable[model.DeviceUnit]) -> int:
        with self._cond:
            generation = self._snapshot.generation + 1
            self._snapshot = model.ResourceSnapshot(self._name, generation, tuple(units))
            self._cond.notify_all()
            return generation

    def wait_for_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> model.ResourceSnapshot:
        # ``stop`` cannot notify our condition, so re-check it every 50 ms; the
        # servicer must not rely on this for a cancelled stream.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._snapshot.generation == seen_generation and not stop.is_set():
                step = 0.05
                if deadline is not None:
                    step = min(step, deadline - time.monotonic())
                    if step <= 0:
                        break
                self._cond.wait(step)
            return self._snapshot

    def _check(self, ids: Sequence[str]) -> dict[str, model.DeviceUnit]:
        by_id = self.snapshot().by_id()
        for i in ids:
            if i not in by_id:
                raise errors.NotFound(f"{self._name}: unknown device ID {i!r}")
            if not by_id[i].healthy:
                raise errors.FailedPrecondition(f"{self._name}: device {i!r} is unhealthy")
        return dict(by_id)

    def allocate(self, ids: Sequence[str]) -> model.ContainerAllocation:
        by_id = self._check(ids)
        self.allocations += 1
        grants = []
        for i in ids:
            for node in by_id[i].nodes:
                grants.append(model.DeviceNodeGrant(node, node, "rw"))
        return model.ContainerAllocation(
            devices=tuple(grants),
            mounts=(model.MountGrant("/etc/fake", "/tmp/fake", True),),
            envs={"FAKE_IDS": ",".join(ids)},
            annotations={"fake.hostkit.io/ids": ",".join(ids)},
            cdi_devices=tuple(f"hostkit.io/fake={i}" for i in ids),
        )

    def preferred_allocation(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        self._check([*available, *must_include])
        chosen = list(dict.fromkeys(must_include))
        for i in available:
            if len(chosen) >= size:
                break
            if i not in chosen:
                chosen.append(i)
        return chosen

    def pre_start(self, ids: Sequence[str]) -> None:
        self._check(ids)
        self.pre_started.append(list(ids))


class FakeCatalog:
    def __init__(self, resources: Iterable[FakeResource]) -> None:
        self._cond = threading.Condition()
        self._resources: dict[str, model.Resource] = {r.name: r for r in resources}
        self._generation = 1

    def resources(self) -> Mapping[str, model.Resource]:
        with self._cond:
            return dict(self._resources)

    def set_resources(self, resources: Iterable[FakeResource]) -> None:
        with self._cond:
            self._resources = {r.name: r for r in resources}
            self._generation += 1
            self._cond.notify_all()

    def wait_for_catalog_change(
        self, seen_generation: int, stop: threading.Event, timeout: float | None = None
    ) -> int:
        with self._cond:
            self._cond.wait_for(
                lambda: self._generation != seen_generation or stop.is_set(), timeout=timeout
            )
            return self._generation

    def wake(self) -> None:
        """Like the registry's Catalog: PluginManager.stop releases the follower."""
        with self._cond:
            self._cond.notify_all()
