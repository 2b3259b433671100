"""The DaemonSets themselves on the real cluster, and the examples against them.

The project's image is built from the Dockerfile without a Docker daemon
(``tests.e2e.product_image``: buildah over a Debian-built stand-in of the base
image), the sidecar images are the shared release binaries under the exact
names the manifests use (``tests.e2e.daemonset_images``), all imported into the
node's containerd.  ``daemonsets/overlays/default`` is applied with ``kubectl
apply -k`` through an overlay of the run (``tests.e2e.node_overlay``: the
kubelet root, no udevd, free ports, the API server address, the run's state
and CDI directories) with ``components/subvolumes`` added (the node gets a
btrfs at ``<state dir>/btrfs`` as the operator guide prepares one, on a loop
device), and the files of ``daemonsets/examples`` are applied unchanged into a
namespace, as the examples' README says: a device in a pod, a PVC with data, a
snapshot and its restore, a raw block claim, a generic ephemeral volume, a
subvolume claim that is then expanded.

This is what the host-process scenarios cannot show: the containers' mount
propagation (the driver's Bidirectional mounts must reach the kubelet and the
pods), hostPath and socket paths as seen inside containers, the RBAC of each
sidecar (it talks to the API server with its pod's ServiceAccount token), and
the probes.  The snapshot-controller is not ours: it runs as a host process, as
in the CSI scenarios.  Figures (image build, rollout, example pods) are printed,
never asserted.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client, codecs
from lightkube.core.exceptions import ApiError
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import DaemonSet
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Node as NodeResource
from lightkube.resources.core_v1 import PersistentVolume, PersistentVolumeClaim, Pod
from lightkube.resources.storage_v1 import CSIStorageCapacity

from plugin_runtime import commands
from tests.deploy.manifests import DAEMONSETS
from tests.e2e import binaries, daemonset_images, host, node_overlay, product_image
from tests.e2e.cluster import Node, free_port
from tests.e2e.csi_node import Supervised, holders
from tests.e2e.csi_objects import (
    DRIVER_NAME,
    VolumeSnapshot,
    VolumeSnapshotContent,
    delete_and_wait,
    events_about,
    quantity_bytes,
)
from tests.e2e.images import BUSYBOX
from tests.e2e.kube import wait_for, wait_log, wait_running
from tests.e2e.processes import Daemon
from tests.loop_devices import LoopDevices, sparse_file

SYSTEM_NS = "hostkit-system"
NS = "examples"
EXAMPLES = DAEMONSETS / "examples"
SUBVOLUMES = DAEMONSETS / "components" / "subvolumes"
REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30
# What the node's btrfs says of one subvolume volume (run in the node's mount
# namespace, where the pool filesystem is mounted): its limit and carried record.
SUBVOLUME_FACTS = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from csi_driver import btrfs
path, pool = sys.argv[1:3]
usage = btrfs.qgroup_usage(pool, btrfs.subvolume_id(path))
print(json.dumps({{"limit": usage.max_referenced,
                  "record": json.loads(os.getxattr(path, "trusted.hostkit.record"))}}))
"""
DAEMONSETS_NAMES = ("hostkit-device-plugin", "hostkit-csi-node")
ROLLOUT_TIMEOUT = 180.0
EXAMPLE_TIMEOUT = 120.0


@dataclass
class Deployed:
    client: Client
    cluster: Node
    kubectl: Callable[..., str]
    state_dir: Path
    handles: set[str]
    btrfs: Path  # the node's btrfs for the subvolume pool (mounted in the node only)
    loops: LoopDevices

    @property
    def subvolume_pool(self) -> Path:
        return self.btrfs / "hostkit"  # the path components/subvolumes/config.yaml names

    def in_node(self, *argv: str) -> str:
        return commands.run([*self.cluster.in_node(), *argv], timeout=60).stdout

    def subvolume(self, handle: str) -> dict[str, Any]:
        """The limit and the carried record of volume ``handle``'s subvolume."""
        return dict(json.loads(self.in_node(
            sys.executable, "-c", SUBVOLUME_FACTS,
            str(self.subvolume_pool / "volumes" / handle), str(self.subvolume_pool))))

    @property
    def node_pid(self) -> int:
        """A process in the node's mount namespace (the kubelet's mounts)."""
        return self.cluster.daemons["mount-namespace"].pid

    def node_mounts(self, directory: Path) -> list[str]:
        return host.mounts_under(directory, self.node_pid)

    def pods_of(self, daemonset: str) -> list[Pod]:
        return list(self.client.list(Pod, namespace=SYSTEM_NS,
                                     labels={"app.kubernetes.io/name": daemonset}))

    def apply_example(self, name: str) -> None:
        self.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / name))

    def remember_volume(self, claim: str) -> PersistentVolume:
        pvc = self.client.get(PersistentVolumeClaim, claim, namespace=NS)
        assert pvc.spec is not None and pvc.spec.volumeName, pvc.status
        pv = self.client.get(PersistentVolume, pvc.spec.volumeName)
        assert pv.spec is not None and pv.spec.csi is not None
        assert pv.spec.csi.driver == DRIVER_NAME
        self.handles.add(pv.spec.csi.volumeHandle)
        return pv


def _example_images() -> set[str]:
    """The images the examples name, as containerd names them (docker.io/library/...)."""
    names = set()
    for path in EXAMPLES.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Pod":
                names |= {c["image"] for c in doc["spec"]["containers"]}
    return {n if "/" in n else f"docker.io/library/{n}" for n in names}


def _ready(pod: Pod) -> bool:
    conditions = pod.status.conditions if pod.status is not None else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])


def _containers(pods: list[Pod]) -> str:
    """Each container's readiness, restarts and current or last state, briefly."""
    out = []
    for pod in pods:
        for st in (pod.status.containerStatuses if pod.status else None) or []:
            out.append(f"{st.name}: ready={st.ready} restarts={st.restartCount} "
                       f"state={st.state} last={st.lastState}")
    return "\n  ".join(["", *out]) if out else f"no container status in {len(pods)} pod(s)"


def _loops_of(handles: set[str]) -> list[str]:
    """Loop devices whose backing file is a volume or snapshot image of ``handles``
    (the path is the one inside the driver's container)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = Path(backing.read_text().strip().removesuffix(" (deleted)")).name
            if any(name.startswith(h) for h in handles):
                found.append(f"/dev/{backing.parent.parent.name} ({name})")
    return found


def _apply_crds(client: Client, crd_dir: Path) -> None:
    """The shared snapshot CRDs, applied and Established (polled: they may exist from
    an earlier module, and a watch from the new resourceVersion can run ahead of the
    API server's watch cache, which answers ResourceVersionTooLarge)."""
    names = []
    for path in sorted(crd_dir.glob("snapshot.storage.k8s.io_*.yaml")):
        for obj in codecs.load_all_yaml(path.read_text()):
            client.apply(obj, force=True)
            names.append(str(obj.metadata.name))
    assert names, f"no snapshot CRDs in {crd_dir}"

    def established(crd: CustomResourceDefinition) -> bool:
        conditions = crd.status.conditions if crd.status is not None else None
        return any(c.type == "Established" and c.status == "True" for c in conditions or [])
    for name in names:
        wait_for(lambda name=name: client.get(CustomResourceDefinition, name),  # type: ignore[misc]
                 established, f"CRD {name} Established", 30)


@pytest.fixture(scope="module")
def deployed(cluster: Node, e2e_binaries: binaries.Binaries,
             figure: Callable[[str], None]) -> Iterator[Deployed]:
    client = cluster.cp.client()
    run_dir = cluster.run.directory
    kubectl_bin = e2e_binaries["kubectl"]

    def kubectl(*args: str, timeout: float = 120) -> str:
        return commands.run([kubectl_bin, f"--kubeconfig={cluster.cp.admin_kubeconfig}",
                             *args], timeout=timeout).stdout

    state_dir = run_dir / "csi-state"
    state_dir.mkdir()
    # The state dir is mounted Bidirectional; containerd refuses that unless the
    # host path is on a shared mount, as everything is on a systemd host.  The
    # node's mount namespace is private, so the dir is made a shared mount there
    # (the kubelet does the same with its root).
    commands.run([*cluster.in_node(), "mount", "--bind", str(state_dir), str(state_dir)],
                 timeout=30)
    commands.run([*cluster.in_node(), "mount", "--make-rshared", str(state_dir)], timeout=30)
    docs = node_overlay.write(
        run_dir / "overlay",
        lambda d: commands.run([kubectl_bin, "kustomize", str(d)], timeout=60).stdout,
        kubelet_root=cluster.kubelet_root, node_ip=str(cluster.node_ip),
        api=("127.0.0.1", cluster.cp.api_port),
        paths={"/var/lib/hostkit-csi": state_dir, "/var/run/cdi": cluster.cdi_dir},
        free_port=free_port, components=[SUBVOLUMES])

    # Images: ours from the Dockerfile, the sidecars from the shared binaries.
    wanted = daemonset_images.images_of(docs)
    names = {wanted[c] for c in ("device-plugin", "csi-driver")}
    assert len(names) == 1, f"both daemons run one image: {names}"
    started = time.monotonic()
    built = product_image.build(names.pop())
    figure(f"hostkit image {built.name} from the Dockerfile (buildah, stand-in base): "
           + (f"built in {built.seconds:.0f} s (stand-in base {built.standin_seconds:.0f} s)"
              if built.seconds else "taken from the cache"))
    sidecars = daemonset_images.sidecar_archive(
        docs, e2e_binaries.sidecar, binaries.bin_dir().parent / "README.md")
    for archive in (built.archive, sidecars):
        cluster.ctr("images", "import", str(archive))
    for name in _example_images():
        cluster.ctr("images", "tag", "--force", BUSYBOX, name)
    figure(f"DaemonSet images ready and imported: {time.monotonic() - started:.1f} s")

    _apply_crds(client, binaries.bin_dir().parent / "crds")
    # The CSI scenarios' stand-in pod carries the DaemonSet's labels; the
    # DaemonSet controller would adopt it as this node's pod.
    for pod in client.list(Pod, namespace=SYSTEM_NS):
        if pod.metadata is not None and not pod.metadata.ownerReferences:
            delete_and_wait(client, Pod, str(pod.metadata.name), SYSTEM_NS, timeout=90)
    controller = Supervised(Daemon(
        "snapshot-controller",
        [e2e_binaries.sidecar("snapshot-controller"),
         f"--kubeconfig={cluster.cp.admin_kubeconfig}", "--enable-distributed-snapshotting",
         "--v=2"], cluster.run.logs))
    # The subvolume pool's filesystem, prepared as the operator guide says: a btrfs
    # mounted at <state dir>/btrfs before the DaemonSet starts.  4 GiB (sparse): the
    # scheduler's capacity tracking bounds a thin volume by the real free space, which
    # on a fresh 1 GiB btrfs is less than the example's 1Gi claim.
    loops = LoopDevices()
    btrfs_dir = state_dir / "btrfs"
    btrfs_dir.mkdir()
    try:
        device = loops.attach(sparse_file(run_dir, "node-btrfs.img", size_mib=4096))
        commands.run(["mkfs.btrfs", "-q", device], timeout=60)
        commands.run([*cluster.in_node(), "mount", device, str(btrfs_dir)], timeout=30)
    except BaseException:
        _unmount_btrfs(cluster, btrfs_dir, loops)
        raise
    state = Deployed(client=client, cluster=cluster, kubectl=kubectl, state_dir=state_dir,
                     handles=set(), btrfs=btrfs_dir, loops=loops)
    try:
        started = time.monotonic()
        kubectl("apply", "--server-side", "--force-conflicts", "-k", str(run_dir / "overlay"))
        controller.start()
        client.apply(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": NS}}), force=True)
        for ds in DAEMONSETS_NAMES:
            try:
                wait_for(lambda ds=ds: state.pods_of(ds),  # type: ignore[misc]
                         lambda pods: len(pods) == 1 and _ready(pods[0]),
                         f"the pod of DaemonSet {ds} Ready", ROLLOUT_TIMEOUT, interval=0.5)
            except AssertionError:
                raise AssertionError(f"the pod of DaemonSet {ds} not Ready within "
                                     f"{ROLLOUT_TIMEOUT:g} s: {_containers(state.pods_of(ds))}"
                                     ) from None
        figure(f"kubectl apply -k (default overlay, node fit) -> both DaemonSet pods Ready: "
               f"{time.monotonic() - started:.1f} s")
        yield state
    finally:
        _teardown(state, controller)


def _teardown(state: Deployed, controller: Supervised) -> None:
    """Examples first (the driver must unstage and delete), then the DaemonSets."""
    client = state.client
    try:
        for pod in client.list(Pod, namespace=NS):
            delete_and_wait(client, Pod, str(pod.metadata.name), NS, timeout=90)
        for snap in client.list(VolumeSnapshot, namespace=NS):
            delete_and_wait(client, VolumeSnapshot, str(snap.metadata.name), NS, timeout=90)
        for claim in client.list(PersistentVolumeClaim, namespace=NS):
            pv = claim.spec.volumeName if claim.spec else None
            delete_and_wait(client, PersistentVolumeClaim, str(claim.metadata.name), NS)
            if pv:
                delete_and_wait(client, PersistentVolume, pv, None, timeout=90)
    finally:
        controller.stop()
        for ds in DAEMONSETS_NAMES:
            with contextlib.suppress(ApiError):
                client.delete(DaemonSet, ds, namespace=SYSTEM_NS)
        try:
            for ds in DAEMONSETS_NAMES:
                wait_for(lambda ds=ds: state.pods_of(ds),  # type: ignore[misc]
                         lambda pods: not pods, f"the pods of {ds} gone", 90)
            subvolumes = [f"{d}/{name}" for d in ("volumes", "snapshots")
                          for name in state.in_node("ls", "-A", str(state.subvolume_pool / d)
                                                    ).split()]
        finally:
            _unmount_btrfs(state.cluster, state.btrfs, state.loops)
    assert not subvolumes, f"subvolumes left in the node's btrfs pool: {subvolumes}"
    leaks = _loops_of(state.handles)
    leaks += host.loops_backed_under(state.state_dir)
    leaks += [m for m in state.node_mounts(state.state_dir)
              if m != str(state.state_dir)]
    commands.run([*state.cluster.in_node(), "umount", str(state.state_dir)], timeout=30,
                 check=False)
    leaks += [m for m in state.node_mounts(state.cluster.kubelet_root)
              if "kubernetes.io~csi" in m or "/kubernetes.io/csi/" in m]
    assert not leaks, f"volumes of the DaemonSet run left behind: {leaks}"
    images = sorted(p.name for p in state.state_dir.rglob("*.img"))
    assert not images, f"volume or snapshot images left in the pool: {images}"


def _unmount_btrfs(cluster: Node, mount_point: Path, loops: LoopDevices) -> None:
    commands.run([*cluster.in_node(), "umount", str(mount_point)], timeout=30, check=False)
    loops.cleanup()


def _probe_urls(pod: Pod, node_ip: str) -> dict[str, str]:
    """``container/probe`` -> the URL the kubelet probes (a named port resolved over
    the pod's containers, the host address of a host-network pod)."""
    assert pod.spec is not None
    ports = {p.name: p.containerPort for c in pod.spec.containers for p in c.ports or []}
    urls = {}
    for cont in pod.spec.containers:
        for kind in ("livenessProbe", "readinessProbe"):
            probe = getattr(cont, kind)
            if probe is not None and probe.httpGet is not None:
                port = probe.httpGet.port
                number = ports[port] if isinstance(port, str) else int(port)
                urls[f"{cont.name}/{kind}"] = f"http://{node_ip}:{number}{probe.httpGet.path}"
    return urls


def _restarts(deployed: Deployed) -> dict[str, int]:
    return {f"{ds}/{st.name}": st.restartCount
            for ds in DAEMONSETS_NAMES for pod in deployed.pods_of(ds)
            for st in (pod.status.containerStatuses if pod.status else None) or []}


def test_daemonset_pods_pass_their_probes_and_register(deployed: Deployed) -> None:
    """Every container Ready; each liveness and readiness URL answers 200 where the
    kubelet asks it (the ports the containers listen on, through the pod's named
    ports); the device plugin's resources and the CSI driver reach the kubelet from
    inside their containers (socket paths, hostPaths)."""
    client = deployed.client
    for ds in DAEMONSETS_NAMES:
        (pod,) = deployed.pods_of(ds)
        assert pod.status is not None and pod.status.containerStatuses
        for status in pod.status.containerStatuses:
            assert status.ready, f"{ds}/{status.name} not ready: {status.state}"
        urls = _probe_urls(pod, str(deployed.cluster.node_ip))
        assert urls, f"{ds} has HTTP probes"
        for what, url in urls.items():
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200, f"{ds} {what}: {url} -> {response.status}"
    assert set(_restarts(deployed).values()) == {0}, _restarts(deployed)

    def allocatable() -> dict[str, str]:
        node = client.get(NodeResource, deployed.cluster.node_name)
        assert node.status is not None
        return dict(node.status.allocatable or {})
    found = wait_for(allocatable, lambda a: a.get("hostkit.io/fuse") == "10",
                     "hostkit.io/fuse (share 10) in the node's allocatable", 60)
    assert found.get("hostkit.io/tun") == "10"

    def registered() -> bool:
        node = client.get(NodeResource, deployed.cluster.node_name)
        ids = (node.metadata.annotations or {}).get("csi.volume.kubernetes.io/nodeid")
        return bool(ids) and DRIVER_NAME in json.loads(str(ids))
    wait_for(registered, bool, "the CSI driver registered by node-driver-registrar", 60)


def test_sidecars_act_with_their_service_account(deployed: Deployed) -> None:
    """RBAC of the sidecars as deployed: the provisioner publishes capacity owned by
    its pod, the resizer holds its leader lease."""
    client = deployed.client
    (pod,) = deployed.pods_of("hostkit-csi-node")
    assert pod.metadata is not None

    def capacities() -> list[CSIStorageCapacity]:
        return [c for c in client.list(CSIStorageCapacity, namespace=SYSTEM_NS)
                if any(o.name == pod.metadata.name for o in c.metadata.ownerReferences or [])]
    caps = wait_for(capacities, lambda found: len(found) >= 3,
                    "CSIStorageCapacity objects owned by the DaemonSet's pod", 60)
    assert all(c.capacity is not None for c in caps)
    leases = wait_for(lambda: list(client.list(Lease, namespace=SYSTEM_NS)),
                      lambda found: any("resizer" in str(x.metadata.name) for x in found),
                      "the csi-resizer's leader lease", 60)
    holder = next(x for x in leases if "resizer" in str(x.metadata.name))
    assert holder.spec is not None and holder.spec.holderIdentity


def test_device_example(deployed: Deployed, figure: Callable[[str], None]) -> None:
    """examples/device-pod.yaml: the pod gets /dev/fuse from the containerised plugin."""
    started = time.monotonic()
    deployed.apply_example("device-pod.yaml")
    wait_running(deployed.client, "fuse-user", NS, timeout=EXAMPLE_TIMEOUT)
    figure(f"device example (device-pod.yaml) creation -> Running: "
           f"{time.monotonic() - started:.2f} s")
    text = wait_log(deployed.client, "fuse-user", "/dev/fuse", NS)
    assert text.startswith("c"), f"a character device: {text!r}"


@pytest.fixture(scope="module")
def data_example(deployed: Deployed, figure: Callable[[str], None]) -> str:
    """examples/pvc-pod.yaml applied; the line the writer put in its volume."""
    started = time.monotonic()
    deployed.apply_example("pvc-pod.yaml")
    wait_running(deployed.client, "data-writer", NS, timeout=EXAMPLE_TIMEOUT)
    figure(f"PVC example (pvc-pod.yaml, WaitForFirstConsumer) creation -> Running: "
           f"{time.monotonic() - started:.2f} s")
    text = wait_for(lambda: "".join(deployed.client.log("data-writer", namespace=NS)),
                    lambda t: t.strip() != "", "the writer's first line", 30)
    return text.strip().splitlines()[0]


def test_pvc_example(deployed: Deployed, data_example: str) -> None:
    """The writer (uid 1000, fsGroup 1000) wrote into its volume, which the driver
    mounted inside its container and the kubelet sees (Bidirectional propagation)."""
    assert "UTC" in data_example or data_example[:3].isalpha(), data_example
    pv = deployed.remember_volume("data")
    root = deployed.cluster.kubelet_root
    published = [m for m in deployed.node_mounts(root / "pods")
                 if f"/volumes/kubernetes.io~csi/{pv.metadata.name}/" in m]
    assert published, "the driver's publish mount reached the node's mount table"
    # Staging paths are named by a hash of the handle; this is the only volume.
    staged = [m for m in deployed.node_mounts(root / "plugins" / "kubernetes.io" / "csi" /
                                          DRIVER_NAME) if m.endswith("/globalmount")]
    assert len(staged) == 1, f"the staging mount in the node's mount table: {staged}"


def test_snapshot_example(deployed: Deployed, data_example: str) -> None:
    """examples/snapshot-restore.yaml: snapshot of the claim, a claim restored from it,
    and a reader that sees the writer's data."""
    client = deployed.client
    deployed.apply_example("snapshot-restore.yaml")
    def ready() -> bool:
        status = client.get(VolumeSnapshot, "data-snap", namespace=NS).status
        return isinstance(status, dict) and status.get("readyToUse") is True
    wait_for(ready, bool, "VolumeSnapshot data-snap readyToUse", EXAMPLE_TIMEOUT, interval=0.5)
    content = client.get(VolumeSnapshot, "data-snap", namespace=NS)["status"][
        "boundVolumeSnapshotContentName"]
    handle = client.get(VolumeSnapshotContent, content)["status"]["snapshotHandle"]
    assert handle, content
    deployed.handles.add(str(handle))
    wait_running(client, "data-reader", NS, timeout=EXAMPLE_TIMEOUT)
    deployed.remember_volume("data-restored")
    try:
        text = wait_log(client, "data-reader", data_example, NS, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{holders('data-restored')}") from None
    assert text.strip().splitlines()[0] == data_example


def test_block_example(deployed: Deployed) -> None:
    """examples/block-pod.yaml: a raw block claim handed to the pod as /dev/xvda (the
    driver's publish file under the kubelet's plugins dir, Bidirectional)."""
    deployed.apply_example("block-pod.yaml")
    wait_running(deployed.client, "raw-user", NS, timeout=EXAMPLE_TIMEOUT)
    deployed.remember_volume("raw")
    text = wait_for(lambda: "".join(deployed.client.log("raw-user", namespace=NS)),
                    lambda t: t.strip() != "", "the size the pod printed", 30)
    assert text.split() == [str(1 << 30)], text


def test_ephemeral_example(deployed: Deployed) -> None:
    """examples/ephemeral-pod.yaml: the claim comes with the pod, its volume is
    mounted, and it goes with the pod (PVC and PV deleted)."""
    client = deployed.client
    deployed.apply_example("ephemeral-pod.yaml")
    wait_running(client, "scratch-user", NS, timeout=EXAMPLE_TIMEOUT)
    pv = deployed.remember_volume("scratch-user-scratch")
    wait_log(client, "scratch-user", "/scratch", NS)
    delete_and_wait(client, Pod, "scratch-user", NS, timeout=90)

    def gone(get: Callable[[], object]) -> bool:
        try:
            get()
        except ApiError as exc:
            return exc.status.code == 404
        return False
    # Nobody deletes them but the garbage collector (owner: the pod) and the driver.
    wait_for(lambda: gone(lambda: client.get(PersistentVolumeClaim, "scratch-user-scratch",
                                             namespace=NS)),
             bool, "the ephemeral claim deleted with its pod", 90)
    wait_for(lambda: gone(lambda: client.get(PersistentVolume, str(pv.metadata.name))),
             bool, "its volume deleted", 90)


def test_subvolume_example(deployed: Deployed, figure: Callable[[str], None]) -> None:
    """examples/subvol-pod.yaml with components/subvolumes: the claim is a subvolume of
    the node's btrfs whose qgroup limit is its size and which carries its own record;
    the writer (uid 1000, fsGroup 1000) writes into it; expanding the claim raises the
    limit with no node step (the claim is resized by the controller side alone)."""
    client = deployed.client
    started = time.monotonic()
    deployed.apply_example("subvol-pod.yaml")
    wait_running(client, "subvol-writer", NS, timeout=EXAMPLE_TIMEOUT)
    figure(f"subvolume example (subvol-pod.yaml) creation -> Running: "
           f"{time.monotonic() - started:.2f} s")
    wait_for(lambda: "".join(client.log("subvol-writer", namespace=NS)),
             lambda t: t.strip() != "", "the writer's first line", 30)
    pv = deployed.remember_volume("subvol-data")
    assert pv.spec is not None and pv.spec.csi is not None
    handle = str(pv.spec.csi.volumeHandle)
    facts = deployed.subvolume(handle)
    assert facts["limit"] == GiB, facts
    assert (facts["record"]["id"], facts["record"]["pool"]) == (handle, "subvol"), facts

    started = time.monotonic()
    client.patch(PersistentVolumeClaim, "subvol-data", namespace=NS,
                 obj={"spec": {"resources": {"requests": {"storage": "2Gi"}}}})

    def claim() -> PersistentVolumeClaim:
        return client.get(PersistentVolumeClaim, "subvol-data", namespace=NS)
    grown = wait_for(claim, lambda c: c.status is not None and c.status.capacity is not None
                     and quantity_bytes(str(c.status.capacity["storage"])) == 2 * GiB,
                     "the claim at 2Gi", 90, interval=0.5)
    figure(f"subvolume claim 1Gi -> 2Gi (no node step): {time.monotonic() - started:.2f} s")
    assert deployed.subvolume(handle)["limit"] == 2 * GiB
    pending = [c.type for c in (grown.status.conditions or []) if grown.status is not None]
    assert "FileSystemResizePending" not in pending, pending


def test_no_container_restarted(deployed: Deployed) -> None:
    """After all examples (the liveness probes have run many times by now): no
    container of the DaemonSets was restarted, and no probe failure was reported."""
    restarts = _restarts(deployed)
    events = [f"{e.reason}: {e.message}" for ds in DAEMONSETS_NAMES
              for pod in deployed.pods_of(ds)
              for e in events_about(deployed.client, SYSTEM_NS, str(pod.metadata.name))
              if e.reason in ("Unhealthy", "BackOff", "Killing")]
    assert set(restarts.values()) == {0}, f"{restarts}; events: {events}"


def test_sidecars_were_never_denied(deployed: Deployed) -> None:
    """After provisioning, snapshotting, restoring and deleting: no request of any
    container was refused by the API server's RBAC (its log would say "forbidden")."""
    denied, silent = {}, []
    for ds in DAEMONSETS_NAMES:
        for pod in deployed.pods_of(ds):
            assert pod.spec is not None and pod.metadata is not None
            for cont in pod.spec.containers:
                log = list(deployed.client.log(str(pod.metadata.name), namespace=SYSTEM_NS,
                                               container=cont.name))
                if not log:
                    silent.append(f"{ds}/{cont.name}")
                lines = [line for line in log if "forbidden" in line.lower()]
                if lines:
                    denied[f"{ds}/{cont.name}"] = lines[:3]
    assert not denied, denied
    # The API-using sidecars log at --v=2; an empty log would make this check vacuous.
    assert not {f"hostkit-csi-node/{c}" for c in
                ("csi-provisioner", "csi-snapshotter", "csi-resizer")} & set(silent), silent
