"""Property-based robustness: random and malformed requests at every CSI RPC.

Hypothesis builds requests from a mix of valid pieces (the id, staging and
target paths of a real, staged and published volume) and hostile ones
(path traversal, absolute paths elsewhere, NUL bytes, huge strings, unknown
enum values, negative sizes, unknown parameters).  For every request:

* the status is never UNKNOWN and never INTERNAL (malformed input is the
  client's fault: INVALID_ARGUMENT, NOT_FOUND, ...);
* the driver process stays alive;
* nothing is created, removed or modified in sentinel directories outside the
  driver's roots, which the hostile paths point at.

Bounded: ``max_examples`` per RPC, no deadline (real mounts vary in speed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    POOL_KINDS,
    SUBVOLUME_POOL,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    mount_cap,
    mounts_under,
    running_driver,
)

EXAMPLES = 100
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class World:
    driver: DriverProcess
    csi: Csi
    volume_id: str
    staging: str
    target: str
    sentinels: list[Path]
    valid_parameters: list[dict[str, str]]

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every entry under the sentinels with (mode, size, mtime_ns)."""
        seen: dict[str, tuple[int, int, int]] = {}
        for root in self.sentinels:
            for dirpath, dirnames, filenames in os.walk(root):
                for name in [*dirnames, *filenames, "."]:
                    path = os.path.join(dirpath, name)
                    st_ = os.lstat(path)
                    seen[path] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
        return seen


# Valid StorageClass parameters per pool kind (the success path of CreateVolume).
VALID_PARAMETERS = {
    "image": [{}, {"pool": "default"}, {"fsType": "ext4", "thin": "true"}],
    "subvolume": [{}, {"pool": SUBVOLUME_POOL}, {"nocow": "true", "thin": "false"}],
}


@pytest.fixture(scope="module", params=POOL_KINDS)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    SEEN.clear()
    sentinel_base = Path(tempfile.mkdtemp(prefix="csi-sentinel", dir="/tmp"))
    (sentinel_base / "dir").mkdir()
    (sentinel_base / "dir" / "file").write_text("do not touch\n")
    (sentinel_base / "mount").mkdir()
    with running_driver(node_id="node-fuzz", pool_kind=request.param) as driver:
        # The driver's own base dir (outside its roots) is a sentinel too.
        outside = driver.base / "outside"
        outside.mkdir()
        (outside / "keep").write_text("keep\n")
        csi = driver.csi()
        layout = KubeletLayout(driver.kubelet_root)
        vol = csi.create("pvc-fuzz-real", size=64 * MiB)
        staging = layout.staging_dir(vol.volume_id)
        target = layout.target_dir("pod-fuzz", "pvc-fuzz-real")
        csi.stage(vol.volume_id, staging, mount_cap())
        csi.publish(vol.volume_id, staging, target, mount_cap())
        Path(target, "data").write_text("fuzz survivor\n")
        w = World(driver, csi, vol.volume_id, staging, target, [sentinel_base, outside],
                  VALID_PARAMETERS[request.param])
        before = w.snapshot()
        try:
            yield w
        finally:
            after = w.snapshot()
            # Clean up what the fuzzer may have created (volumes, snapshots, mounts).
            with contextlib.suppress(grpc.RpcError):
                _delete_everything(csi, w)
    shutil.rmtree(sentinel_base, ignore_errors=True)
    assert after == before, "paths outside the driver's roots were touched"


def _delete_everything(csi: Csi, w: World) -> None:
    for entry in csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30).entries:
        csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=entry.snapshot.snapshot_id), timeout=60)


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

TEXT = st.text(max_size=40)
HOSTILE = st.sampled_from([
    "", ".", "..", "../..", "../../etc", "/etc/passwd", "a/b", "a\x00b", "-rf", "*",
    "pvc-fuzz-real/../x", " ", "\n", "x" * 300, "é" * 100, "${HOME}", "$(reboot)",
])


def ids(w: World) -> st.SearchStrategy[str]:
    return st.one_of(st.just(w.volume_id), HOSTILE, TEXT,
                     st.sampled_from(["pvc-fuzz-a", "pvc-fuzz-b"]))


def paths(w: World) -> st.SearchStrategy[str]:
    kroot = str(w.driver.kubelet_root)
    targets = [str(s) for s in w.sentinels] + [str(s / "x") for s in w.sentinels]
    traversal = st.builds(
        lambda n, t: kroot + "/" + "../" * n + t.lstrip("/"), st.integers(1, 8),
        st.sampled_from(targets))
    under_root = st.builds(lambda a, b: f"{kroot}/{a}/{b}",
                           st.sampled_from(["pods", "plugins", "pods/p/volumes"]),
                           st.text(alphabet="abc./-_", min_size=1, max_size=20))
    return st.one_of(
        st.just(w.staging), st.just(w.target), st.just(os.path.dirname(w.target) + "/other"),
        st.sampled_from(targets), traversal, under_root, HOSTILE, TEXT,
        st.just(w.target + "/../../../../../../" + str(w.sentinels[0]).lstrip("/")),
    )


INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(
    [0, 1, -1, 4095, 4096, MiB, 64 * MiB, 2**40, 2**62]))
SIZES = st.one_of(st.sampled_from([0, -1, 1, 4096, MiB, 2**50, 2**63 - 1]),
                  st.integers(-(2**63), 2**63 - 1))
MAPS = st.dictionaries(st.one_of(TEXT, st.sampled_from(
    ["pool", "fsType", "thin", "csi.storage.k8s.io/fstype", "colour"])),
    st.one_of(TEXT, st.sampled_from(["default", "ext4", "xfs", "true", "false", "ntfs"])),
    max_size=4)


@st.composite
def capabilities(draw: Any) -> Any:
    cap = csi_pb2.VolumeCapability()
    kind = draw(st.sampled_from(["mount", "block", "none"]))
    if kind == "mount":
        cap.mount.fs_type = draw(st.one_of(st.sampled_from(["", "ext4", "xfs", "btrfs"]), TEXT))
        cap.mount.mount_flags.extend(draw(st.lists(st.one_of(
            st.sampled_from(["ro", "rw", "noatime", "bind", "remount", "suid", "dev", "exec",
                             "loop", "x-mount.mkdir", "context=\"system_u:object_r:x\"", ""]),
            TEXT), max_size=3)))
        cap.mount.volume_mount_group = draw(st.one_of(st.sampled_from(["", "0", "1000", "-1"]),
                                                      TEXT))
    elif kind == "block":
        cap.block.SetInParent()
    if draw(st.booleans()):
        cap.access_mode.mode = draw(st.integers(-3, 12))  # includes unknown enum values
    return cap


def caps_or_none() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), capabilities())


def ranges() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.builds(
        lambda r, lim: csi_pb2.CapacityRange(required_bytes=r, limit_bytes=lim), SIZES, SIZES))


def _set(msg: Any, field: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, dict):
        getattr(msg, field).update(value)
    elif isinstance(value, list):
        getattr(msg, field).extend(value)
    elif hasattr(value, "DESCRIPTOR"):
        getattr(msg, field).CopyFrom(value)
    else:
        setattr(msg, field, value)


# RPC name -> codes seen, to prove the properties were not vacuous.
SEEN: dict[str, Counter[str]] = defaultdict(Counter)


def _check(w: World, call: Callable[..., Any], request: Any) -> None:
    rpc = type(request).__name__.removesuffix("Request")
    try:
        result = call(request, timeout=60)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
        SEEN[rpc]["OK"] += 1
    except grpc.RpcError as err:
        SEEN[rpc][err.code().name] += 1
        assert err.code() not in FORBIDDEN, f"{err.code().name}: {err.details()} for {request}"
        assert err.code() != grpc.StatusCode.UNAVAILABLE, f"driver gone: {err.details()}"
    assert w.driver.alive(), f"driver died on {request}:\n{w.driver.log_tail()}"


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# One property per RPC
# ---------------------------------------------------------------------------


def test_fuzz_create_volume(world: World):
    @FUZZ
    @given(data=st.data())
    def prop(data: Any) -> None:
        if data.draw(st.integers(0, 3)) == 0:
            # A valid request now and then, so the success path is exercised too.
            valid = csi_pb2.CreateVolumeRequest(
                name=data.draw(st.sampled_from(["pvc-fuzz-a", "pvc-fuzz-b"])),
                volume_capabilities=[mount_cap()],
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                parameters=data.draw(st.sampled_from(world.valid_parameters)))
            _check(world, world.csi.controller.CreateVolume, valid)
            return
        req = csi_pb2.CreateVolumeRequest()
        _set(req, "name", data.draw(st.one_of(HOSTILE, TEXT,
                                              st.sampled_from(["pvc-fuzz-a", "pvc-fuzz-b"]))))
        _set(req, "capacity_range", data.draw(ranges()))
        _set(req, "volume_capabilities", data.draw(st.lists(capabilities(), max_size=2)))
        _set(req, "parameters", data.draw(MAPS))
        _set(req, "secrets", data.draw(MAPS))
        _set(req, "mutable_parameters", data.draw(MAPS))
        if data.draw(st.booleans()):
            src = data.draw(st.sampled_from(["snapshot", "volume"]))
            if src == "snapshot":
                req.volume_content_source.snapshot.snapshot_id = data.draw(ids(world))
            else:
                req.volume_content_source.volume.volume_id = data.draw(ids(world))
        if data.draw(st.booleans()):
            req.accessibility_requirements.requisite.add().segments.update(data.draw(MAPS))
        _check(world, world.csi.controller.CreateVolume, req)

    try:
        prop()
    finally:
        # Delete whatever succeeded so later properties see a small world.
        for name_vol in world.csi.controller.ListVolumes(
                csi_pb2.ListVolumesRequest(), timeout=30).entries:
            if name_vol.volume.volume_id != world.volume_id:
                with contextlib.suppress(grpc.RpcError):
                    world.csi.delete(name_vol.volume.volume_id)


def _unary(name: str, service: str, method: str,
           build: Callable[[World, Any], Any]) -> Callable[[World], None]:
    def test(world: World) -> None:
        @FUZZ
        @given(data=st.data())
        def prop(data: Any) -> None:
            _check(world, getattr(getattr(world.csi, service), method), build(world, data))

        prop()

    test.__name__ = name
    return test


def _b(message: Any, **fields: Callable[[World], st.SearchStrategy[Any]]
       ) -> Callable[[World, Any], Any]:
    def build(w: World, data: Any) -> Any:
        msg = message()
        for field, strategy in fields.items():
            if data.draw(st.integers(0, 4)) == 0:
                continue  # leave the field unset now and then
            _set(msg, field, data.draw(strategy(w)))
        return msg

    return build


def _const(s: st.SearchStrategy[Any]) -> Callable[[World], st.SearchStrategy[Any]]:
    return lambda _w: s


test_fuzz_delete_volume = _unary("test_fuzz_delete_volume", "controller", "DeleteVolume", _b(
    csi_pb2.DeleteVolumeRequest, volume_id=lambda w: st.one_of(HOSTILE, TEXT),
    secrets=_const(MAPS)))
test_fuzz_validate = _unary("test_fuzz_validate", "controller", "ValidateVolumeCapabilities", _b(
    csi_pb2.ValidateVolumeCapabilitiesRequest, volume_id=ids, volume_context=_const(MAPS),
    volume_capabilities=lambda w: st.lists(capabilities(), max_size=2),
    parameters=_const(MAPS)))
test_fuzz_list_volumes = _unary("test_fuzz_list_volumes", "controller", "ListVolumes", _b(
    csi_pb2.ListVolumesRequest, max_entries=_const(st.integers(-(2**31), 2**31 - 1)),
    starting_token=_const(st.one_of(TEXT, HOSTILE, st.sampled_from(["0", "1", "-1", "999"])))))
test_fuzz_get_capacity = _unary("test_fuzz_get_capacity", "controller", "GetCapacity", _b(
    csi_pb2.GetCapacityRequest,
    volume_capabilities=lambda w: st.lists(capabilities(), max_size=2),
    parameters=_const(MAPS),
    accessible_topology=_const(st.builds(lambda m: csi_pb2.Topology(segments=m), MAPS))))
test_fuzz_get_volume = _unary("test_fuzz_get_volume", "controller", "ControllerGetVolume", _b(
    csi_pb2.ControllerGetVolumeRequest, volume_id=ids))
test_fuzz_create_snapshot = _unary(
    "test_fuzz_create_snapshot", "controller", "CreateSnapshot", _b(
        csi_pb2.CreateSnapshotRequest,
        source_volume_id=lambda w: st.one_of(HOSTILE, TEXT),  # never the real one: no copies
        name=_const(st.one_of(HOSTILE, TEXT)), parameters=_const(MAPS)))
test_fuzz_delete_snapshot = _unary(
    "test_fuzz_delete_snapshot", "controller", "DeleteSnapshot", _b(
        csi_pb2.DeleteSnapshotRequest, snapshot_id=_const(st.one_of(HOSTILE, TEXT))))
test_fuzz_list_snapshots = _unary("test_fuzz_list_snapshots", "controller", "ListSnapshots", _b(
    csi_pb2.ListSnapshotsRequest, max_entries=_const(st.integers(-(2**31), 2**31 - 1)),
    starting_token=_const(st.one_of(TEXT, HOSTILE)), source_volume_id=ids,
    snapshot_id=_const(st.one_of(TEXT, HOSTILE))))
test_fuzz_get_snapshot = _unary("test_fuzz_get_snapshot", "controller", "GetSnapshot", _b(
    csi_pb2.GetSnapshotRequest, snapshot_id=_const(st.one_of(TEXT, HOSTILE))))
test_fuzz_controller_expand = _unary(
    "test_fuzz_controller_expand", "controller", "ControllerExpandVolume", _b(
        csi_pb2.ControllerExpandVolumeRequest,
        volume_id=lambda w: st.one_of(HOSTILE, TEXT),  # growing the real volume is legal
        capacity_range=lambda w: ranges(), volume_capability=lambda w: caps_or_none()))
test_fuzz_node_stage = _unary("test_fuzz_node_stage", "node", "NodeStageVolume", _b(
    csi_pb2.NodeStageVolumeRequest, volume_id=ids, staging_target_path=paths,
    volume_capability=lambda w: caps_or_none(), publish_context=_const(MAPS),
    volume_context=_const(MAPS), secrets=_const(MAPS)))
test_fuzz_node_publish = _unary("test_fuzz_node_publish", "node", "NodePublishVolume", _b(
    csi_pb2.NodePublishVolumeRequest, volume_id=ids, staging_target_path=paths,
    target_path=paths, volume_capability=lambda w: caps_or_none(),
    readonly=_const(st.booleans()), volume_context=_const(MAPS)))
test_fuzz_node_get_stats = _unary("test_fuzz_node_get_stats", "node", "NodeGetVolumeStats", _b(
    csi_pb2.NodeGetVolumeStatsRequest, volume_id=ids, volume_path=paths,
    staging_target_path=paths))
test_fuzz_node_expand = _unary("test_fuzz_node_expand", "node", "NodeExpandVolume", _b(
    csi_pb2.NodeExpandVolumeRequest, volume_id=lambda w: st.one_of(HOSTILE, TEXT),
    volume_path=paths, staging_target_path=paths, capacity_range=lambda w: ranges(),
    volume_capability=lambda w: caps_or_none()))
# Unpublish/unstage last: with the real id and paths they may legitimately tear
# the real volume down, which the earlier properties rely on.
test_fuzz_node_unpublish = _unary(
    "test_fuzz_node_unpublish", "node", "NodeUnpublishVolume", _b(
        csi_pb2.NodeUnpublishVolumeRequest, volume_id=lambda w: st.one_of(HOSTILE, TEXT),
        target_path=paths))
test_fuzz_node_unstage = _unary("test_fuzz_node_unstage", "node", "NodeUnstageVolume", _b(
    csi_pb2.NodeUnstageVolumeRequest, volume_id=lambda w: st.one_of(HOSTILE, TEXT),
    staging_target_path=paths))


def test_real_volume_survived(world: World):
    assert Path(world.target, "data").read_text() == "fuzz survivor\n"
    assert world.driver.alive()
    # Nothing got mounted outside the driver's roots.
    assert mounts_under(*world.sentinels) == []


def test_the_properties_reached_the_driver(world: World):
    """Guard against vacuous properties: hostile input was refused, valid input accepted."""
    for rpc in ("CreateVolume", "NodeStageVolume", "NodePublishVolume", "NodeGetVolumeStats",
                "NodeExpandVolume", "NodeUnpublishVolume", "NodeUnstageVolume"):
        assert SEEN[rpc]["INVALID_ARGUMENT"] > 0, (rpc, SEEN[rpc])
    assert SEEN["CreateVolume"]["OK"] > 0, SEEN["CreateVolume"]
    assert SEEN["NodeGetVolumeStats"]["OK"] > 0, SEEN["NodeGetVolumeStats"]
    assert sum(SEEN["ListVolumes"].values()) >= EXAMPLES
