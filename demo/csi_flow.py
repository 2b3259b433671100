"""Demo part 2: the CSI driver, with the demo playing provisioner and kubelet.

Starts the real driver on its embedded default (one thin image-file pool under a
temporary state dir) and walks one volume through its life exactly as the
sidecars and the kubelet would: CreateVolume with this node's topology,
NodeStage into the kubelet's global mount path, NodePublish into a pod's volume
dir, a write and read back through the mount, a snapshot, an online expansion,
a restore of the snapshot checked by checksum, then teardown.  The volume is
xfs because xfs grows online with plain root; a mounted ext4 also needs
CAP_SYS_RESOURCE, which some sandboxes withhold even from root.  Afterwards it
checks that no mount, loop device or socket is left.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import grpc

from csi_driver import DRIVER_NAME
from csi_driver._proto import csi_pb2, csi_pb2_grpc
from demo.processes import Daemon, start_daemon, wait_for_path
from demo.steps import Steps

MiB = 1 << 20


def _mount_capability(fs_type: str = "xfs") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )


def _checksum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fs_bytes(node: csi_pb2_grpc.NodeStub, volume_id: str, path: str) -> int:
    stats = node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path), timeout=30
    )
    return int(next(u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES))


class _Kubelet:
    """Paths laid out the way the kubelet lays them out (pkg/volume/csi)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def staging_path(self, volume_id: str) -> str:
        digest = hashlib.sha256(volume_id.encode()).hexdigest()
        path = os.path.join(
            self.root, "plugins/kubernetes.io/csi", DRIVER_NAME, digest, "globalmount"
        )
        os.makedirs(path, mode=0o750, exist_ok=True)  # the kubelet creates it
        return path

    def target_path(self, pod_uid: str, pv_name: str) -> str:
        parent = os.path.join(self.root, "pods", pod_uid, "volumes/kubernetes.io~csi", pv_name)
        os.makedirs(parent, mode=0o750, exist_ok=True)  # the kubelet creates the parent only
        return os.path.join(parent, "mount")


def leftovers(workdir: str) -> list[str]:
    """Mounts under ``workdir`` and loop devices backed by files under it."""
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(workdir.rstrip("/") + "/"):
                found.append(f"mount {mount_point}")
    sys_block = "/sys/block"
    for name in sorted(os.listdir(sys_block)):
        backing = os.path.join(sys_block, name, "loop", "backing_file")
        try:
            with open(backing, encoding="utf-8") as fh:
                target = fh.read().strip()
        except OSError:
            continue
        if target.startswith(workdir.rstrip("/") + "/"):
            found.append(f"/dev/{name} -> {target}")
    return found


def run(steps: Steps, workdir: str) -> None:
    steps.section("CSI driver (the demo plays external-provisioner and the kubelet)")
    state_dir = os.path.join(workdir, "state")
    kubelet = _Kubelet(os.path.join(workdir, "kubelet"))
    socket = os.path.join(workdir, "csi.sock")
    daemon: Daemon | None = None
    channel: grpc.Channel | None = None
    staged: list[tuple[str, str]] = []
    published: list[tuple[str, str]] = []
    volumes: list[str] = []
    snapshots: list[str] = []
    try:
        with steps.step("driver starts on the embedded default pool"):
            os.makedirs(kubelet.root, exist_ok=True)
            daemon = start_daemon(
                "csi-driver",
                "csi_driver",
                [
                    "--endpoint", f"unix://{socket}",
                    "--node-id", "demo-node",
                    "--state-dir", state_dir,
                    "--kubelet-root", kubelet.root,
                ],
                workdir,
            )
            wait_for_path(socket, daemon, timeout=30)
            channel = grpc.insecure_channel(f"unix://{socket}")
            identity = csi_pb2_grpc.IdentityStub(channel)
            controller = csi_pb2_grpc.ControllerStub(channel)
            node = csi_pb2_grpc.NodeStub(channel)
            deadline = time.monotonic() + 30
            while not identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value:
                if time.monotonic() > deadline:
                    raise TimeoutError("Probe did not report ready within 30 s")
                time.sleep(0.1)
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
            steps.detail(f"{info.name} {info.vendor_version}, state in {state_dir}")
        with steps.step("NodeGetInfo and GetCapacity"):
            node_info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            topology = node_info.accessible_topology
            segments = dict(topology.segments)
            capacity = controller.GetCapacity(
                csi_pb2.GetCapacityRequest(
                    volume_capabilities=[_mount_capability()], accessible_topology=topology
                ),
                timeout=10,
            )
            steps.detail(f"node {node_info.node_id}, topology {segments}")
            steps.detail(
                f"available {capacity.available_capacity / MiB:.0f} MiB, largest volume "
                f"{capacity.maximum_volume_size.value / MiB:.0f} MiB"
            )
        with steps.step("CreateVolume pvc-demo: 320 MiB xfs"):
            created = controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-demo",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MiB),
                    volume_capabilities=[_mount_capability()],
                    accessibility_requirements=csi_pb2.TopologyRequirement(
                        requisite=[topology], preferred=[topology]
                    ),
                ),
                timeout=60,
            ).volume
            volumes.append(created.volume_id)
            steps.detail(f"{created.volume_id}: {created.capacity_bytes / MiB:.0f} MiB")
        volume_id = created.volume_id
        staging = kubelet.staging_path(volume_id)
        target = kubelet.target_path(str(uuid.uuid4()), "pvc-demo")
        with steps.step("NodeStageVolume into the kubelet's global mount"):
            node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=staging,
                    volume_capability=_mount_capability(),
                ),
                timeout=120,
            )
            staged.append((volume_id, staging))
            steps.detail(staging)
        with steps.step("NodePublishVolume into the pod's volume dir"):
            node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=staging,
                    target_path=target,
                    volume_capability=_mount_capability(),
                ),
                timeout=120,
            )
            published.append((volume_id, target))
            steps.detail(target)
        data_path = os.path.join(target, "hello.bin")
        with steps.step("write 8 MiB through the volume and read it back"):
            payload = os.urandom(8 * MiB)
            with open(data_path, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            written = hashlib.sha256(payload).hexdigest()
            if _checksum(data_path) != written:
                raise RuntimeError("read back different data")
            steps.detail(f"sha256 {written[:16]}... matches")
        with steps.step("CreateSnapshot snap-demo (filesystem frozen while copied)"):
            snapshot = controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name="snap-demo"),
                timeout=120,
            ).snapshot
            snapshots.append(snapshot.snapshot_id)
            steps.detail(
                f"{snapshot.snapshot_id}: {snapshot.size_bytes / MiB:.0f} MiB, "
                f"ready={snapshot.ready_to_use}"
            )
        with steps.step("expand online to 512 MiB (controller, then node)"):
            before = _fs_bytes(node, volume_id, target)
            expanded = controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB),
                    volume_capability=_mount_capability(),
                ),
                timeout=120,
            )
            if expanded.node_expansion_required:
                node.NodeExpandVolume(
                    csi_pb2.NodeExpandVolumeRequest(
                        volume_id=volume_id,
                        volume_path=target,
                        staging_target_path=staging,
                        capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB),
                        volume_capability=_mount_capability(),
                    ),
                    timeout=120,
                )
            total = _fs_bytes(node, volume_id, target)
            steps.detail(
                f"filesystem grew from {before / MiB:.0f} to {total / MiB:.0f} MiB while mounted"
            )
            if total - before < 150 * MiB:
                raise RuntimeError(f"filesystem did not grow: {before} -> {total} bytes")
        with steps.step("restore the snapshot into a new volume and compare"):
            restored = controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-demo-restore",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MiB),
                    volume_capabilities=[_mount_capability()],
                    volume_content_source=csi_pb2.VolumeContentSource(
                        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                            snapshot_id=snapshot.snapshot_id
                        )
                    ),
                    accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[topology]),
                ),
                timeout=120,
            ).volume
            volumes.append(restored.volume_id)
            restore_staging = kubelet.staging_path(restored.volume_id)
            node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=restored.volume_id,
                    staging_target_path=restore_staging,
                    volume_capability=_mount_capability(),
                ),
                timeout=120,
            )
            staged.append((restored.volume_id, restore_staging))
            restore_target = kubelet.target_path(str(uuid.uuid4()), "pvc-demo-restore")
            node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=restored.volume_id,
                    staging_target_path=restore_staging,
                    target_path=restore_target,
                    volume_capability=_mount_capability(),
                    readonly=True,
                ),
                timeout=120,
            )
            published.append((restored.volume_id, restore_target))
            if _checksum(os.path.join(restore_target, "hello.bin")) != written:
                raise RuntimeError("restored data differs from the snapshot source")
            steps.detail(f"{restored.volume_id}: hello.bin identical (read-only publish)")
    finally:
        if channel is not None and daemon is not None and daemon.alive():
            _teardown(steps, channel, staged, published, volumes, snapshots)
        if channel is not None:
            channel.close()
        if daemon is not None:
            with steps.step("driver stops on SIGTERM"):
                if not daemon.stop():
                    raise RuntimeError("driver did not exit cleanly:\n" + daemon.log_tail())
    with steps.step("nothing left behind (mounts, loop devices, socket)"):
        left = leftovers(workdir)
        if os.path.exists(socket):
            left.append(socket)
        if left:
            raise RuntimeError("left behind: " + ", ".join(left))


def _teardown(
    steps: Steps,
    channel: grpc.Channel,
    staged: list[tuple[str, str]],
    published: list[tuple[str, str]],
    volumes: list[str],
    snapshots: list[str],
) -> None:
    controller = csi_pb2_grpc.ControllerStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    with steps.step("teardown: unpublish, unstage, delete snapshot and volumes"):
        for volume_id, target in reversed(published):
            node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
                timeout=120,
            )
        for volume_id, staging in reversed(staged):
            node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
                timeout=120,
            )
        for snapshot_id in snapshots:
            controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=60
            )
        for volume_id in volumes:
            controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)
