"""Random lifecycle sequences checked against a model of the CSI spec.

A hypothesis state machine drives the real driver through random orders of
CreateVolume, DeleteVolume, NodeStage/Unstage, NodePublish/Unpublish (two pods),
ControllerExpandVolume, CreateSnapshot and DeleteSnapshot on two volumes (one
filesystem, one raw block; two filesystems on a subvolume pool), for each kind of
pool.  A small model predicts each answer from csi.md 1.3:
idempotent repeats are OK, publish before stage is FAILED_PRECONDITION, deleting
a staged volume is FAILED_PRECONDITION, a snapshot name reused for another
source is ALREADY_EXISTS, calls on deleted volumes are NOT_FOUND (or OK where the
spec makes them idempotent).  After every step the driver's view (ListVolumes
capacities, ListSnapshots, the targets on disk) must equal the model's.

Bounded: few examples of a few dozen steps, no shrinking (each step is real I/O).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    POOL_KINDS,
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    cap_for,
    loops_backed_by,
    mounts_under,
    running_driver,
)

Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
SIZE = 64 * MiB
STEP = 8 * MiB
NAMES = ("pv-model-fs", "pv-model-blk")
# Access kind of each volume per pool kind: subvolume pools give no raw block volumes,
# so both of theirs are filesystems.
KINDS = {
    "image": {"pv-model-fs": "mount", "pv-model-blk": "block"},
    "subvolume": {"pv-model-fs": "mount", "pv-model-blk": "mount"},
}
PODS = ("pod-one", "pod-two")


@dataclass
class VolModel:
    kind: str
    id: str = ""
    exists: bool = False
    staged: bool = False
    size: int = SIZE
    published: set[str] = field(default_factory=set)
    old_ids: list[str] = field(default_factory=list)


def _code(call: Any, request: Any) -> Code:
    try:
        call(request, timeout=120)
    except grpc.RpcError as err:
        code: Code = err.code()
        return code
    return Code.OK


class Lifecycle(RuleBasedStateMachine):
    driver: ClassVar[DriverProcess]
    pool_kind: ClassVar[str] = "image"

    def __init__(self) -> None:
        super().__init__()
        self.csi: Csi = self.driver.csi()
        self.kubelet = KubeletLayout(self.driver.kubelet_root)
        self.vols = {name: VolModel(kind) for name, kind in KINDS[self.pool_kind].items()}
        self.snaps: dict[str, tuple[str, str]] = {}  # name -> (snapshot id, source id)

    # ------------------------------------------------------------ helpers
    def cap(self, name: str) -> Any:
        # SINGLE_NODE_MULTI_WRITER: several pods on this node may publish it.
        return cap_for(self.vols[name].kind, mode=Mode.SINGLE_NODE_MULTI_WRITER)

    def staging(self, name: str) -> str:
        vol = self.vols[name]
        if vol.kind == "block":
            return self.kubelet.block_staging(name)
        return self.kubelet.staging_dir(vol.id)

    def target(self, name: str, pod: str) -> str:
        if self.vols[name].kind == "block":
            return self.kubelet.block_target(name, pod)
        return self.kubelet.target_dir(pod, name)

    # ------------------------------------------------------------ rules
    @rule(name=st.sampled_from(sorted(NAMES)))
    def create(self, name: str) -> None:
        vol = self.vols[name]
        resp = self.csi.create(name, size=vol.size if vol.exists else SIZE, kind=vol.kind)
        if vol.exists:
            assert resp.volume_id == vol.id, "a repeated CreateVolume made a new volume"
        else:
            vol.id, vol.exists, vol.size = resp.volume_id, True, SIZE
        assert resp.capacity_bytes == vol.size

    @rule(name=st.sampled_from(sorted(NAMES)))
    def delete(self, name: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            for old in vol.old_ids[-1:]:
                assert _code(self.csi.controller.DeleteVolume,
                             csi_pb2.DeleteVolumeRequest(volume_id=old)) == Code.OK
            return
        code = _code(self.csi.controller.DeleteVolume,
                     csi_pb2.DeleteVolumeRequest(volume_id=vol.id))
        if vol.staged or vol.published:
            assert code == Code.FAILED_PRECONDITION, f"deleting an in-use volume: {code}"
            return
        assert code == Code.OK
        vol.old_ids.append(vol.id)
        vol.exists, vol.id, vol.size = False, "", SIZE

    @precondition(lambda self: any(v.exists for v in self.vols.values()))
    @rule(name=st.sampled_from(sorted(NAMES)))
    def stage(self, name: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            return
        code = _code(self.csi.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.id, staging_target_path=self.staging(name),
            volume_capability=self.cap(name)))
        assert code == Code.OK, f"NodeStage: {code}"
        vol.staged = True

    @rule(name=st.sampled_from(sorted(NAMES)))
    def unstage(self, name: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            if vol.old_ids:
                code = _code(self.csi.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vol.old_ids[-1], staging_target_path="/".join(
                        [str(self.kubelet.root), "plugins", "gone"])))
                assert code in (Code.OK, Code.NOT_FOUND), code
            return
        if vol.published:
            return  # the CO must unpublish first; the spec leaves this undefined
        code = _code(self.csi.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.id, staging_target_path=self.staging(name)))
        assert code == Code.OK, f"NodeUnstage: {code}"
        vol.staged = False

    @rule(name=st.sampled_from(sorted(NAMES)), pod=st.sampled_from(PODS))
    def publish(self, name: str, pod: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            return
        target = self.target(name, pod)
        code = _code(self.csi.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.id, staging_target_path=self.staging(name), target_path=target,
            volume_capability=self.cap(name)))
        if not vol.staged:
            assert code == Code.FAILED_PRECONDITION, f"publish before stage: {code}"
            return
        assert code == Code.OK, f"NodePublish: {code}"
        vol.published.add(pod)

    @rule(name=st.sampled_from(sorted(NAMES)), pod=st.sampled_from(PODS))
    def unpublish(self, name: str, pod: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            return
        code = _code(self.csi.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.id, target_path=self.target(name, pod)))
        assert code == Code.OK, f"NodeUnpublish: {code}"
        vol.published.discard(pod)

    @rule(name=st.sampled_from(sorted(NAMES)), grow=st.integers(0, 2))
    def expand(self, name: str, grow: int) -> None:
        vol = self.vols[name]
        volume_id = vol.id if vol.exists else (vol.old_ids[-1] if vol.old_ids else "")
        if not volume_id:
            return
        wanted = vol.size + grow * STEP
        request = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=wanted),
            volume_capability=self.cap(name))
        if not vol.exists:
            assert _code(self.csi.controller.ControllerExpandVolume, request) == Code.NOT_FOUND
            return
        resp = self.csi.controller.ControllerExpandVolume(request, timeout=120)
        assert resp.capacity_bytes == wanted
        vol.size = wanted

    @rule(name=st.sampled_from(sorted(NAMES)), snap=st.sampled_from(["snap-x", "snap-y"]))
    def snapshot(self, name: str, snap: str) -> None:
        vol = self.vols[name]
        if not vol.exists:
            return
        request = csi_pb2.CreateSnapshotRequest(source_volume_id=vol.id, name=snap)
        if snap in self.snaps and self.snaps[snap][1] != vol.id:
            assert _code(self.csi.controller.CreateSnapshot, request) == Code.ALREADY_EXISTS
            return
        resp = self.csi.controller.CreateSnapshot(request, timeout=120).snapshot
        assert resp.ready_to_use and resp.source_volume_id == vol.id
        if snap in self.snaps:
            assert resp.snapshot_id == self.snaps[snap][0], "a repeated snapshot is new"
        self.snaps[snap] = (resp.snapshot_id, vol.id)

    @rule(snap=st.sampled_from(["snap-x", "snap-y"]))
    def delete_snapshot(self, snap: str) -> None:
        if snap not in self.snaps:
            return
        snap_id = self.snaps[snap][0]
        for _ in range(2):
            self.csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id), timeout=60)
        del self.snaps[snap]

    # ------------------------------------------------------------ invariants
    @invariant()
    def driver_matches_model(self) -> None:
        assert self.driver.alive()
        listed = self.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
        got = {e.volume.volume_id: e.volume.capacity_bytes for e in listed.entries}
        want = {v.id: v.size for v in self.vols.values() if v.exists}
        assert got == want
        snaps = self.csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30)
        assert {e.snapshot.snapshot_id for e in snaps.entries} == {
            sid for sid, _ in self.snaps.values()}
        for name, vol in self.vols.items():
            if not vol.exists:
                continue
            for pod in PODS:
                present = os.path.lexists(self.target(name, pod))
                assert present == (pod in vol.published), (name, pod, present)

    def teardown(self) -> None:
        for name, vol in self.vols.items():
            if not vol.exists:
                continue
            for pod in sorted(vol.published):
                self.csi.unpublish(vol.id, self.target(name, pod))
            if vol.staged:
                self.csi.unstage(vol.id, self.staging(name))
            self.csi.delete(vol.id)
        for snap_id, _ in self.snaps.values():
            self.csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id), timeout=60)
        assert mounts_under(self.driver.kubelet_root, self.driver.state_dir) == []
        assert loops_backed_by(self.driver.state_dir) == []


@pytest.fixture(scope="module", params=POOL_KINDS)
def model_driver(request: pytest.FixtureRequest) -> Iterator[DriverProcess]:
    with running_driver(node_id="node-model", pool_kind=request.param) as driver:
        Lifecycle.pool_kind = request.param
        yield driver


def test_random_lifecycles_follow_the_spec(model_driver: DriverProcess):
    Lifecycle.driver = model_driver
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=25, stateful_step_count=40, deadline=None, derandomize=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    ))
