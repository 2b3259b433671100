"""Allocate, GetPreferredAllocation and PreStartContainer answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from device_plugin.config import parse_yaml
from device_plugin.model import DeviceNodeGrant, DeviceUnit, MountGrant, ResourceSnapshot
from device_plugin.registry import ResourceState
from plugin_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.unit.device_plugin.records import drm_node, ftdi_tty

GPU_YAML = """
resources:
  - name: gpu
    match:
      - {subsystem: drm, kernel: "card*"}
      - {subsystem: drm, kernel: "renderD*"}
    group_by: {subsystem: pci}
    container_path: "/dev/dri/{name}"
    permissions: rw
    mounts: [{host_path: /usr/lib/gpu, container_path: /opt/gpu}]
    env:
      GPU_IDS: "{ids}"
      GPU_PATHS: "{paths}"
      GPU_COUNT: "{count} of {resource}"
"""


def gpu_state(share: int = 1) -> ResourceState:
    text = GPU_YAML + (f"    share: {share}\n" if share > 1 else "")
    state = ResourceState(parse_yaml(text).resources[0])
    state.update_devices([
        drm_node("card0"), drm_node("renderD128"),
        drm_node("card1", "0000:41:00.0", numa=1), drm_node("renderD129", "0000:41:00.0", numa=1),
    ])
    return state


def test_allocate_grants_every_node_of_every_unit_with_mounts_and_envs():
    state = gpu_state()
    ids = [u.id for u in state.snapshot().units]
    answer = state.allocate(list(reversed(ids)))
    units = sorted(state.snapshot().units, key=lambda u: u.id)
    assert answer.devices == tuple(
        DeviceNodeGrant(node, node, "rw") for u in units for node in u.nodes
    )
    assert {u.nodes for u in units} == {("/dev/dri/card0", "/dev/dri/renderD128"),
                                        ("/dev/dri/card1", "/dev/dri/renderD129")}
    assert len(answer.devices) == 4
    assert answer.mounts == (MountGrant("/opt/gpu", "/usr/lib/gpu", True),)
    assert answer.envs["GPU_IDS"] == ",".join(sorted(ids))
    assert answer.envs["GPU_COUNT"] == "2 of hostkit.io/gpu"
    assert answer.envs["GPU_PATHS"].count("/dev/dri/") == 4
    assert answer.annotations == {"hostkit.io/gpu": ",".join(sorted(ids))}
    assert answer.cdi_devices == ()


def test_same_request_same_answer_whatever_the_order():
    state = gpu_state()
    ids = [u.id for u in state.snapshot().units]
    assert state.allocate(ids) == state.allocate(list(reversed(ids)))
    assert gpu_state().allocate(ids) == state.allocate(ids)


def test_shared_copies_of_one_device_grant_its_nodes_once():
    state = gpu_state(share=3)
    units = state.snapshot().units
    assert len(units) == 6
    same_gpu = [u.id for u in units if u.nodes == units[0].nodes][:2]
    answer = state.allocate(same_gpu)
    assert len(answer.devices) == 2
    assert answer.envs["GPU_COUNT"].startswith("2 ")


def test_symlinks_are_granted_when_enabled():
    config = parse_yaml("""
resources:
  - name: serial
    match: [{subsystem: tty}]
    symlinks: true
""").resources[0]
    state = ResourceState(config)
    state.update_devices([ftdi_tty(links=("/dev/serial/by-id/usb-FTDI_A10K5XYZ-if00-port0",))])
    (unit,) = state.snapshot().units
    answer = state.allocate([unit.id])
    assert [g.host_path for g in answer.devices] == [
        "/dev/ttyUSB0", "/dev/serial/by-id/usb-FTDI_A10K5XYZ-if00-port0"]
    assert all(g.permissions == "rw" for g in answer.devices)


@pytest.mark.parametrize(("ids", "error", "text"), [
    ([], InvalidArgument, "no device IDs requested"),
    (["@0", "@0"], InvalidArgument, "more than once"),
    (["nope-123"], NotFound, "hostkit.io/gpu: unknown device ID(s) 'nope-123'"),
])
def test_bad_ids_are_refused_clearly(ids, error, text):
    state = gpu_state()
    first = state.snapshot().units[0].id
    ids = [first if i == "@0" else i for i in ids]
    with pytest.raises(error) as info:
        state.allocate(ids)
    assert text in str(info.value)


def test_unhealthy_ids_fail_with_failed_precondition(tmp_path):
    attr = tmp_path / "dev"
    attr.mkdir()
    (attr / "state").write_text("broken\n")
    config = parse_yaml("""
resources:
  - name: thing
    match: [{subsystem: misc}]
    health: {probe: attribute, attribute: state, healthy_values: [ok]}
""").resources[0]
    state = ResourceState(config)
    from device_plugin.matching import DeviceInfo
    state.update_devices([DeviceInfo(str(attr), "misc", None, "thing", "/dev/thing")])
    (unit,) = state.snapshot().units
    assert not unit.healthy and "state is 'broken'" in unit.reason
    with pytest.raises(FailedPrecondition, match="Unhealthy: attribute state is 'broken'"):
        state.allocate([unit.id])


def test_cdi_allocation_names_devices_and_keeps_envs(tmp_path):
    from device_plugin.cdi import CdiWriter
    config = dataclasses.replace(parse_yaml(GPU_YAML).resources[0], cdi=True)
    state = ResourceState(config, CdiWriter(str(tmp_path), "hostkit.io"))
    state.update_devices([drm_node("card0"), drm_node("renderD128")])
    (unit,) = state.snapshot().units
    answer = state.allocate([unit.id])
    assert answer.cdi_devices == (f"hostkit.io/gpu={unit.id}",)
    assert answer.devices == () and answer.mounts == ()
    assert answer.envs["GPU_IDS"] == unit.id


# ---- GetPreferredAllocation ------------------------------------------------ #


def snapshot(
    spec: Mapping[str, tuple[int, ...]], unhealthy: tuple[str, ...] = ()
) -> ResourceSnapshot:
    return ResourceSnapshot("hostkit.io/x", 1, tuple(
        DeviceUnit(i, i not in unhealthy, numa) for i, numa in spec.items()))


class Snap:
    """A Resource-like wrapper so the tests go through ResourceState's method."""

    def __init__(self, snap: ResourceSnapshot) -> None:
        self.state = ResourceState(parse_yaml(
            "resources:\n  - {name: x, match: [{subsystem: misc}]}\n").resources[0])
        self.state._snapshot = snap
        self.state._index = snap.by_id()

    def __call__(self, available, must, size):
        return self.state.preferred_allocation(available, must, size)


SPREAD = {"a0": (0,), "a1": (0,), "b0": (1,), "b1": (1,), "b2": (1,), "n": ()}


def test_preferred_packs_on_one_numa_node_when_possible():
    pref = Snap(snapshot(SPREAD))
    assert pref(list(SPREAD), [], 2) == ["a0", "a1"]
    assert pref(list(SPREAD), [], 3) == ["b0", "b1", "b2"]


def test_preferred_honours_must_include_and_stays_on_its_node():
    pref = Snap(snapshot(SPREAD))
    assert pref(list(SPREAD), ["b2"], 2) == ["b2", "b0"]
    assert pref(list(SPREAD), ["a1"], 3) == ["a1", "a0", "b0"]


def test_preferred_uses_devices_without_topology_last_and_only_available():
    pref = Snap(snapshot(SPREAD))
    result = pref(["a0", "n", "b0"], [], 3)
    assert result[-1] == "n" and sorted(result) == ["a0", "b0", "n"]
    assert set(pref(["a1", "b1"], [], 5)) == {"a1", "b1"}


def test_preferred_skips_unhealthy_candidates():
    pref = Snap(snapshot(SPREAD, unhealthy=("a0",)))
    assert "a0" not in pref(list(SPREAD), [], 2)


@pytest.mark.parametrize(("available", "must", "size", "error", "text"), [
    (["a0"], ["a0", "a1"], 1, InvalidArgument, "smaller than the 2 must-include"),
    (["a0", "zz"], [], 1, NotFound, "unknown device ID(s) 'zz'"),
    (["a0"], ["a1"], 2, InvalidArgument, "'a1' are not among the available"),
    (["a0"], [], 0, InvalidArgument, "size must be positive"),
])
def test_preferred_errors(available, must, size, error, text):
    with pytest.raises(error) as info:
        Snap(snapshot(SPREAD))(available, must, size)
    assert text in str(info.value)


# ---- PreStartContainer ------------------------------------------------------ #


def test_pre_start_opens_every_node(tmp_path):
    good = tmp_path / "good"
    good.write_text("")
    config = parse_yaml("""
resources:
  - name: thing
    match: [{subsystem: misc}]
    pre_start: {open: true}
""").resources[0]
    assert config.pre_start_required
    state = ResourceState(config)
    from device_plugin.matching import DeviceInfo
    state.update_devices([
        DeviceInfo("/sys/a", "misc", None, "good", str(good)),
        DeviceInfo("/sys/b", "misc", None, "gone", str(tmp_path / "gone")),
    ])
    by_node = {u.nodes[0]: u.id for u in state.snapshot().units}
    state.pre_start([by_node[str(good)]])
    with pytest.raises(FailedPrecondition, match="gone does not open"):
        state.pre_start([by_node[str(tmp_path / "gone")]])
    assert state.options.pre_start_required


def test_preferred_with_devices_spanning_two_nodes():
    spec = {"x01": (0, 1), "a0": (0,), "b0": (1,), "b1": (1,)}
    pref = Snap(snapshot(spec))
    # two fit on node 1 alone
    assert pref(list(spec), [], 2) == ["b0", "b1"]
    # the spanning device forces both nodes; the rest then fit inside
    assert sorted(pref(list(spec), ["x01"], 3)) == ["a0", "b0", "x01"]
    assert sorted(pref(list(spec), [], 4)) == sorted(spec)


def test_preferred_on_ten_thousand_shared_ids_stays_on_one_node():
    spec = {f"g{n}-{i:04d}": (n,) for n in (0, 1) for i in range(5000)}
    pref = Snap(snapshot(spec))
    result = pref(list(spec), ["g1-0042"], 3)
    assert result[0] == "g1-0042" and len(result) == 3
    assert all(i.startswith("g1-") for i in result)
