"""Registry: generations change only on real change; waits wake; catalog reloads; health."""

from __future__ import annotations

import threading
import time

import pytest

from device_plugin import registry
from device_plugin.config import parse_yaml
from device_plugin.health import HealthMonitor
from device_plugin.matching import DeviceInfo
from device_plugin.registry import Catalog, ResourceState
from tests.unit.device_plugin.records import misc

BASE = """
resources:
  - name: fuse
    match: [{subsystem: misc, kernel: fuse}]
    share: 2
  - name: tun
    match: [{subsystem: misc, kernel: tun}]
"""


def test_generation_moves_only_on_real_change():
    state = ResourceState(parse_yaml(BASE).resources[0])
    assert state.snapshot().generation == 0 and state.snapshot().units == ()
    assert state.update_devices([misc("fuse")], event_monotonic=123.0)
    snap = state.snapshot()
    assert snap.generation == 1 and len(snap.units) == 2
    assert state.last_event_monotonic == 123.0
    assert not state.update_devices([misc("fuse"), misc("tun")])  # tun is not ours
    assert state.snapshot() is snap
    assert state.update_devices([])  # vanished: it leaves the snapshot
    assert state.snapshot().generation == 2 and state.snapshot().units == ()
    assert state.last_event_monotonic is None
    state.update_devices([misc("fuse")])
    assert [u.id for u in state.snapshot().units] == [u.id for u in snap.units]  # same IDs back


def test_wait_for_change_wakes_on_change_stop_and_timeout():
    state = ResourceState(parse_yaml(BASE).resources[0])
    stop = threading.Event()
    got = []
    waiter = threading.Thread(target=lambda: got.append(state.wait_for_change(0, stop, 10)))
    waiter.start()
    state.update_devices([misc("fuse")])
    waiter.join(5)
    assert not waiter.is_alive() and got[0].generation == 1
    # stop wakes a waiter with nothing new
    waiter = threading.Thread(target=lambda: got.append(state.wait_for_change(1, stop, 10)))
    waiter.start()
    stop.set()
    state.wake()
    waiter.join(5)
    assert not waiter.is_alive() and got[1].generation == 1
    # a timeout returns the current snapshot
    assert state.wait_for_change(1, threading.Event(), 0.05).generation == 1


def test_catalog_generation_changes_on_add_remove_and_options_only():
    cat = Catalog(parse_yaml(BASE))
    cat.publish_inventory((misc("fuse"), misc("tun")))
    fuse = cat.resources()["hostkit.io/fuse"]
    assert cat.generation == 0
    # env and share change: same resource object, new snapshot, same catalog generation
    changed = parse_yaml(BASE.replace("share: 2", "share: 3\n    env: {A: '{ids}'}"))
    assert not cat.apply_config(changed)
    assert cat.resources()["hostkit.io/fuse"] is fuse
    assert len(fuse.snapshot().units) == 3 and fuse.config.env == (("A", "{ids}"),)
    # pre_start changes the advertised options
    assert cat.apply_config(parse_yaml(BASE.replace("share: 2", "pre_start: {open: true}")))
    assert cat.resources()["hostkit.io/fuse"].options.pre_start_required
    # a new resource is filled from the current inventory at once; removal drops one
    added = BASE + "  - name: kvm\n    match: [{subsystem: misc, kernel: kvm}]\n"
    cat.publish_inventory((misc("fuse"), misc("tun"), misc("kvm")))
    assert cat.apply_config(parse_yaml(added))
    assert len(cat.resources()["hostkit.io/kvm"].snapshot().units) == 1
    assert cat.apply_config(parse_yaml(BASE))
    assert set(cat.resources()) == {"hostkit.io/fuse", "hostkit.io/tun"}
    assert cat.generation == 3


def test_wait_for_catalog_change():
    cat = Catalog(parse_yaml(BASE))
    stop = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(cat.wait_for_catalog_change(0, stop, 10)))
    t.start()
    cat.apply_config(parse_yaml("resources: []\n"))
    t.join(5)
    assert result == [1]
    assert cat.wait_for_catalog_change(1, threading.Event(), 0.01) == 1


class _RecordingCondition(threading.Condition):
    """A condition that records the timeout of every wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


def _idle_waiters():
    """(object whose ``_cond`` the wait uses, a wait with no timeout on it) pairs."""
    state = ResourceState(parse_yaml(BASE).resources[0])
    catalog = Catalog(parse_yaml(BASE))
    return [
        (state, lambda stop: state.wait_for_change(0, stop)),
        (catalog, lambda stop: catalog.wait_for_catalog_change(0, stop)),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["resource", "catalog"])
def test_an_idle_wait_blocks_without_polling_until_woken(which):
    # The idle daemon spends its life in these waits (a feed per resource, the
    # catalog follower): they must not wake up every fraction of a second.
    owner, wait = _idle_waiters()[which]
    cond = _RecordingCondition()
    owner._cond = cond
    stop = threading.Event()
    waiter = threading.Thread(target=wait, args=(stop,))
    waiter.start()
    deadline = time.monotonic() + 5
    while not cond.timeouts:
        assert time.monotonic() < deadline, "the waiter never blocked"
        time.sleep(0.01)
    stop.set()
    owner.wake()
    waiter.join(5)
    assert not waiter.is_alive()
    assert registry.SAFETY_SLICE_SECONDS >= 10
    assert cond.timeouts and all(t == registry.SAFETY_SLICE_SECONDS for t in cond.timeouts)


@pytest.mark.parametrize("which", [0, 1], ids=["resource", "catalog"])
def test_a_stop_set_without_wake_is_still_noticed(monkeypatch, which):
    # The Protocol contract: stop ends the wait even when nobody calls wake()
    # (within the safety slice, shortened here so the test is quick).
    monkeypatch.setattr(registry, "SAFETY_SLICE_SECONDS", 0.05)
    _owner, wait = _idle_waiters()[which]
    stop = threading.Event()
    waiter = threading.Thread(target=wait, args=(stop,))
    waiter.start()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive()


def test_probe_turns_unhealthy_and_back(tmp_path):
    (tmp_path / "state").write_text("ok\n")
    config = parse_yaml("""
resources:
  - name: thing
    match: [{subsystem: misc}]
    health: {probe: attribute, attribute: state, healthy_values: ["ok", "fine*"],
             interval_seconds: 0.1}
""")
    cat = Catalog(config)
    cat.publish_inventory((DeviceInfo(str(tmp_path), "misc", None, "thing", "/dev/thing"),))
    state = cat.resources()["hostkit.io/thing"]
    assert state.snapshot().units[0].healthy
    gen = state.snapshot().generation
    assert not state.reprobe()  # nothing changed: same generation
    assert state.snapshot().generation == gen

    monitor = HealthMonitor(lambda: cat.resources().values())
    monitor.start()
    try:
        (tmp_path / "state").write_text("degraded\n")
        snap = state.wait_for_change(gen, threading.Event(), 10)
        assert not snap.units[0].healthy and "degraded" in snap.units[0].reason
        (tmp_path / "state").write_text("fine, thanks\n")
        snap = state.wait_for_change(snap.generation, threading.Event(), 10)
        assert snap.units[0].healthy and snap.units[0].reason == ""
    finally:
        monitor.stop()


def test_health_monitor_schedules_by_interval():
    calls = []

    class Fake:
        probe_interval = 5.0

        def reprobe(self):
            calls.append(time.monotonic())
            return False

    fake = Fake()
    monitor = HealthMonitor(lambda: [fake])
    assert monitor.run_once(now=100.0) == 5.0
    assert calls == []
    assert monitor.run_once(now=105.0) == 5.0
    assert len(calls) == 1


def test_a_slow_probe_never_brings_back_stale_units():
    state = ResourceState(parse_yaml(BASE).resources[0])
    state.update_devices([misc("fuse")])
    slow_probe = state._begin(None)  # a health probe starts on the old inventory...
    assert state.update_devices([])  # ...discovery publishes that the device left...
    assert not state._rebuild(slow_probe, None)  # ...and the probe's result is dropped
    assert state.snapshot().units == ()


def test_open_probe_marks_a_node_that_no_longer_opens(tmp_path):
    node = tmp_path / "node"
    node.write_text("")
    config = parse_yaml("""
resources:
  - name: thing
    match: [{subsystem: misc}]
    health: {probe: open}
""")
    state = ResourceState(config.resources[0])
    state.update_devices([DeviceInfo("/sys/x", "misc", None, "thing", str(node))])
    assert state.snapshot().units[0].healthy
    node.unlink()
    assert state.reprobe()
    unit = state.snapshot().units[0]
    assert not unit.healthy and unit.reason.startswith(f"{node} does not open")
    node.write_text("")
    assert state.reprobe() and state.snapshot().units[0].healthy


def test_registry_implements_the_model_protocols() -> None:
    from device_plugin.model import Resource, ResourceCatalog

    # mypy checks these assignments structurally against the seam's Protocols.
    catalog: ResourceCatalog = Catalog(parse_yaml(BASE))
    resource: Resource = catalog.resources()["hostkit.io/fuse"]
    assert resource.name == "hostkit.io/fuse"
    assert resource.options.get_preferred_allocation_available
    assert not resource.options.pre_start_required
