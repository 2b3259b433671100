"""The CSI driver against the real kubelet, scheduler, PV controller and sidecars.

The driver and its sidecars run as host processes with the rendered
DaemonSet's arguments (``tests.e2e.csi_node``); the cluster objects are the
rendered manifests and the shared snapshot CRDs, and the CSI examples of
``daemonsets/examples`` run as written but for image and host network.  Every
scenario cleans up its pods and claims and checks that the kubelet and the
driver left no mount and no loop device of its volumes; the module's teardown
checks the same for the whole pool.  Figures (PVC with WaitForFirstConsumer,
pod creation to Running) go to the tier's figure summary, never asserted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, codecs
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node as NodeResource
from lightkube.resources.core_v1 import PersistentVolume, PersistentVolumeClaim, Pod

from tests.deploy.manifests import DAEMONSETS, load_all
from tests.e2e import binaries
from tests.e2e.cluster import Node
from tests.e2e.csi_node import (
    STANDIN_POD,
    CsiNode,
    backing_file,
    holders,
    loop_devices_under,
)
from tests.e2e.csi_objects import (
    DRIVER_NAME,
    VolumeSnapshot,
    VolumeSnapshotContent,
    apply_crds,
    bound_pv,
    capacity_of,
    delete_and_wait,
    events_about,
    log_values,
    pvc_object,
    quantity_bytes,
    sidecar_kubeconfig,
    standin_pod,
    volume_pod,
)
from tests.e2e.daemonsets import apply_objects, render
from tests.e2e.images import BUSYBOX
from tests.e2e.kube import phase, wait_for, wait_running

SYSTEM_NS = "hostkit-system"
# The driver's metrics containerPort (--metrics-address=:9501), a loopback port here.
METRICS_PORT = 9501
NS = "csi-e2e"
MI = 1 << 20
CLASSES = {"ext4": "hostkit-ext4", "xfs": "hostkit-xfs", "block": "hostkit-block"}
# Smallest sizes that each kind accepts comfortably (xfs needs 300 MiB).
SIZES = {"ext4": 64 * MI, "xfs": 320 * MI, "block": 16 * MI}

FS_SCRIPT = (
    'if [ -n "$TOKEN" ] && [ ! -f /data/token ]; then echo "$TOKEN" > /data/token; sync; fi; '
    'while :; do echo "read:$(cat /data/token 2>&1)"; '
    "echo \"df:$(df -k /data | tail -n1 | awk '{print $2}')\"; sleep 1 & wait $!; done"
)
BLOCK_SCRIPT = (
    'if [ -n "$TOKEN" ]; then printf "%s" "$TOKEN" | dd of=/dev/xvda conv=notrunc 2>/dev/null; '
    "sync; fi; "
    'while :; do echo "read:$(dd if=/dev/xvda bs=32 count=1 2>/dev/null | tr -d "\\000")"; '
    "sleep 1 & wait $!; done"
)
# Pods stop on SIGTERM at once and are deleted gracefully: the API object goes only
# after the kubelet has stopped the container, as for real workloads.
GRACE = 5
TRAP = "trap 'exit 0' TERM; "


@dataclass
class Csi:
    client: Client
    node: CsiNode
    cluster: Node
    empty_capacity: int = 0

    @property
    def node_name(self) -> str:
        return self.cluster.node_name

    def values(self, pod: str, key: str) -> list[str]:
        """Every ``key:value`` the pod printed, in order."""
        return log_values(self.client, pod, NS, key)

    def last(self, pod: str, key: str) -> str | None:
        """The last ``key:value`` the pod printed."""
        values = self.values(pod, key)
        return values[-1] if values else None

    def rpc_count(self, method: str, code: str) -> int:
        """``hostkit_rpc_total`` of the driver's /metrics (its --metrics-address)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.node.port(METRICS_PORT)}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if (line.startswith("hostkit_rpc_total{") and f'method="{method}"' in line
                    and f'code="{code}"' in line):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def df(self, pod: str) -> int:
        """The size in KiB of /data as the pod's last ``df`` saw it (0 before any)."""
        return int(self.last(pod, "df") or 0)

    def capacity(self, storage_class: str) -> int | None:
        return capacity_of(self.client, SYSTEM_NS, storage_class, self.node_name)

    def pod(self, name: str, pvc: str, *, block: bool = False, token: str = "") -> Pod:
        script = BLOCK_SCRIPT if block else FS_SCRIPT
        pod = volume_pod(name, NS, f'{TRAP}TOKEN="{token}"; {script}', pvc, block=block)
        pod.spec.terminationGracePeriodSeconds = GRACE
        return self.client.create(pod)

    def volume_mounts(self, pv: PersistentVolume) -> list[str]:
        """Mounts of ``pv`` in the node: staging and pod targets, filesystem or block.

        The kubelet stages a filesystem volume at ``<sha256 of the handle>/globalmount``
        and names everything else (targets, block staging and publish files) by the PV.
        """
        name = str(pv.metadata.name)
        digest = hashlib.sha256(str(pv.spec.csi.volumeHandle).encode()).hexdigest()
        root = self.cluster.kubelet_root
        return [m for m in self.cluster.mounts(root / "pods") + self.cluster.mounts(
                    root / "plugins")
                if f"/{name}/" in m or m.endswith(f"/{name}") or f"/{digest}/" in m]

    def image_of(self, volume_id: str) -> list[Path]:
        return list(self.node.pool_dir.rglob(f"{volume_id}.img"))

    def remove_pod(self, name: str) -> None:
        delete_and_wait(self.client, Pod, name, NS, timeout=90)

    def wait_unstaged(self, pv: PersistentVolume) -> None:
        """The kubelet unpublished and unstaged ``pv``: no mount, no loop device of it."""
        name, handle = str(pv.metadata.name), str(pv.spec.csi.volumeHandle)

        def left() -> list[str]:
            images = self.image_of(handle)
            loops = [d for d in loop_devices_under(self.node.pool_dir)
                     if any(backing_file(d) == str(i) for i in images)]
            return self.volume_mounts(pv) + loops
        try:
            wait_for(left, lambda found: not found, f"{name} unpublished and unstaged", 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{holders(handle, name)}") from None

    def clean(self) -> None:
        """Delete every pod, claim and snapshot of the test namespace, and wait for it."""
        for pod in self.client.list(Pod, namespace=NS):
            assert pod.metadata is not None and pod.metadata.name is not None
            self.remove_pod(pod.metadata.name)
        for claim in self.client.list(PersistentVolumeClaim, namespace=NS):
            assert claim.metadata is not None and claim.metadata.name is not None
            self.remove_pvc(claim.metadata.name)
        for snap in self.client.list(VolumeSnapshot, namespace=NS):
            delete_and_wait(self.client, VolumeSnapshot, str(snap.metadata.name), NS)

    def remove_pvc(self, name: str) -> None:
        """Delete the claim and wait for its PV (reclaimPolicy Delete) to go too."""
        try:
            claim = self.client.get(PersistentVolumeClaim, name, namespace=NS)
            pv_name = claim.spec.volumeName if claim.spec else None
        except ApiError:
            pv_name = None
        delete_and_wait(self.client, PersistentVolumeClaim, name, NS, timeout=60)
        if pv_name:
            delete_and_wait(self.client, PersistentVolume, pv_name, None, timeout=60)


@pytest.fixture(scope="module")
def csi(cluster: Node, e2e_binaries: binaries.Binaries) -> Iterator[Csi]:
    client = cluster.cp.client()
    run_dir = cluster.run.directory
    docs = render(e2e_binaries["kubectl"])
    apply_crds(client, binaries.bin_dir().parent / "crds")
    # Everything the overlay renders but the DaemonSets, which run as host processes.
    apply_objects(client, docs, list(dict.fromkeys(
        d["kind"] for d in docs if d["kind"] != "DaemonSet")))
    client.apply(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": NS}}), force=True)
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet"
                     and d["metadata"]["name"] == "hostkit-csi-node")
    template = daemonset["spec"]["template"]
    client.create(standin_pod(STANDIN_POD, SYSTEM_NS, template))
    wait_running(client, STANDIN_POD, SYSTEM_NS)
    standin = client.get(Pod, STANDIN_POD, namespace=SYSTEM_NS)
    csi_dir = run_dir / "csi"
    csi_dir.mkdir()
    node = CsiNode(
        docs, directory=csi_dir, kubelet_root=cluster.kubelet_root,
        node_name=cluster.node_name, log_dir=cluster.run.logs,
        sidecar_binary=e2e_binaries.sidecar,
        sidecar_kubeconfig=sidecar_kubeconfig(
            client, csi_dir / "sidecars.kubeconfig", cluster.cp.server, cluster.cp.ca.cert,
            service_account=template["spec"]["serviceAccountName"], namespace=SYSTEM_NS,
            pod=standin),
        admin_kubeconfig=cluster.cp.admin_kubeconfig, in_node=cluster.in_node())
    state = Csi(client=client, node=node, cluster=cluster)
    try:
        node.start()

        def registered() -> bool:
            # The kubelet records a registered CSI driver in this Node annotation (and
            # in CSINode, whose empty driver list lightkube's model cannot read).
            node_obj = client.get(NodeResource, cluster.node_name)
            ids = (node_obj.metadata.annotations or {}).get("csi.volume.kubernetes.io/nodeid")
            return bool(ids) and DRIVER_NAME in json.loads(str(ids))
        wait_for(registered, bool, "the driver registered (node-driver-registrar)", 60)
        published = [wait_for(partial(state.capacity, storage_class), bool,
                              f"CSIStorageCapacity for {storage_class}", 60)
                     for storage_class in CLASSES.values()]
        assert len(set(published)) == 1, f"one pool, one capacity: {published}"
        state.empty_capacity = int(published[0] or 0)
        # Every sidecar accepted the manifests' flags and started once: a flag the
        # release does not know would show here as an exit, not as a later timeout.
        for name, sidecar in node.sidecars.items():
            starts = sidecar.daemon.log.read_text(errors="replace").count("==== start")
            assert sidecar.daemon.running() and starts == 1, \
                f"{name} exited ({starts} starts):\n{sidecar.daemon.tail()}"
        yield state
    finally:
        try:
            state.clean()
        finally:
            node.stop()
        leaks = loop_devices_under(node.state_dir)
        leaks += cluster.mounts(node.state_dir)
        leaks += [m for m in cluster.mounts(cluster.kubelet_root)
                  if "kubernetes.io~csi" in m or "/kubernetes.io/csi/" in m]
        assert not leaks, f"CSI volumes left behind: {leaks}"
        images_left = sorted(p.name for p in node.state_dir.rglob("*.img"))
        assert not images_left, f"volume or snapshot images left in the pool: {images_left}"


@pytest.fixture(autouse=True)
def _clean_namespace(csi: Csi) -> Iterator[None]:
    """Each scenario starts from an empty namespace, whatever the previous one left."""
    yield
    csi.clean()


def _provision(csi: Csi, kind: str, name: str, token: str) -> tuple[float, PersistentVolume]:
    """PVC (WaitForFirstConsumer) + pod; returns pod creation->Running seconds and the PV."""
    block = kind == "block"
    csi.client.create(pvc_object(name, NS, CLASSES[kind], str(SIZES[kind]), block=block))
    time.sleep(0.5)
    claim = csi.client.get(PersistentVolumeClaim, name, namespace=NS)
    assert claim.status is not None and claim.status.phase == "Pending", \
        "WaitForFirstConsumer: no volume before a pod uses the claim"
    started = time.monotonic()
    csi.pod(name, name, block=block, token=token)
    wait_running(csi.client, name, NS, timeout=90)
    elapsed = time.monotonic() - started
    return elapsed, bound_pv(csi.client, name, NS)


def _read(csi: Csi, pod: str, expected: str) -> None:
    wait_for(lambda: csi.last(pod, "read") == expected, bool,
             f"pod {pod} reading back {expected}", 30)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_dynamic_provisioning(csi: Csi, kind: str, figure: Callable[[str], None]) -> None:
    storage_class = CLASSES[kind]
    name = f"prov-{kind}"
    # What the driver reports for the empty pool.  The object of one class is
    # refreshed right after a volume of that class comes or goes, the others only
    # at the 1-minute poll, so the value read now may be stale.
    before = csi.empty_capacity
    token = secrets.token_hex(16)
    elapsed, pv = _provision(csi, kind, name, token)
    figure(f"PVC {storage_class} (WaitForFirstConsumer), pod creation -> Running: "
           f"{elapsed:.2f} s")
    assert pv.spec is not None and pv.spec.csi is not None
    assert pv.spec.csi.driver == DRIVER_NAME
    terms = pv.spec.nodeAffinity.required.nodeSelectorTerms  # type: ignore[union-attr]
    assert terms[0].matchExpressions[0].values == [csi.node_name]  # type: ignore[index]
    _read(csi, name, token)
    volume_id = pv.spec.csi.volumeHandle
    assert csi.image_of(volume_id), "the volume's image is in the tier's pool"
    wait_for(lambda: csi.capacity(storage_class) == before - SIZES[kind], bool,
             f"{storage_class} capacity down by {SIZES[kind]} (was {before})", 30)
    assert csi.volume_mounts(pv), "the volume is staged and published"

    csi.remove_pod(name)
    csi.wait_unstaged(pv)
    assert not loop_devices_under(csi.node.pool_dir)
    csi.remove_pvc(name)
    assert not csi.image_of(volume_id), "PVC deletion deleted the volume"
    wait_for(lambda: csi.capacity(storage_class) == before, bool,
             f"{storage_class} capacity back to {before}", 30)


def test_claim_larger_than_the_pool_stays_pending(csi: Csi) -> None:
    storage_class = CLASSES["ext4"]
    available = csi.capacity(storage_class)
    assert available is not None
    name = "too-big"
    size = f"{(available >> 30) + 64}Gi"
    csi.client.create(pvc_object(name, NS, storage_class, size))
    csi.pod(name, name)

    def unschedulable() -> str | None:
        pod = csi.client.get(Pod, name, namespace=NS)
        for cond in (pod.status.conditions or []) if pod.status else []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.message:
                return cond.message
        return None
    message = str(wait_for(unschedulable, bool, "scheduler's reason for the pod", 30))
    assert "storage capacity" in message or "free storage" in message, message
    time.sleep(2)
    assert phase(csi.client, name, NS) == "Pending"
    claim = csi.client.get(PersistentVolumeClaim, name, namespace=NS)
    assert claim.status is not None and claim.status.phase == "Pending"
    assert not list(csi.client.list(PersistentVolume)), "no volume was created"
    csi.remove_pod(name)
    csi.remove_pvc(name)
    assert not list(csi.node.pool_dir.rglob("*.img")), "nothing left in the pool"


def _resize(csi: Csi, name: str, size: int) -> None:
    csi.client.patch(PersistentVolumeClaim, name, namespace=NS,
                     obj={"spec": {"resources": {"requests": {"storage": str(size)}}}})


def _claim_capacity(csi: Csi, name: str) -> int:
    claim = csi.client.get(PersistentVolumeClaim, name, namespace=NS)
    assert claim.status is not None and claim.status.capacity is not None
    return quantity_bytes(str(claim.status.capacity["storage"]))


def test_online_expansion_xfs(csi: Csi) -> None:
    name = "grow-xfs"
    _provision(csi, "xfs", name, secrets.token_hex(16))
    before = wait_for(lambda: csi.df(name), bool, "df", 30)
    target = SIZES["xfs"] + 160 * MI
    _resize(csi, name, target)
    # The kubelet grows a mounted volume at its next sync of the pod (about a minute).
    wait_for(lambda: _claim_capacity(csi, name) == target, bool,
             "PVC capacity at the new size", 120)
    wait_for(lambda: csi.df(name) > before + 150 * 1024, bool,
             f"the pod seeing the grown filesystem (was {before} KiB)", 30)
    csi.remove_pod(name)
    csi.remove_pvc(name)


def test_ext4_expansion_fails_online_and_succeeds_offline(csi: Csi) -> None:
    """No CAP_SYS_RESOURCE here: a mounted ext4 cannot grow (shared README).

    The driver answers NodeExpandVolume FAILED_PRECONDITION with a message that
    says why; the kubelet reports it and, as it does for that code, retries at
    the volume's next mount.  The next pod's NodeStage grows the filesystem
    offline, the retried NodeExpandVolume succeeds and the claim shows the size.
    """
    name = "grow-ext4"
    token = secrets.token_hex(16)
    _, pv = _provision(csi, "ext4", name, token)
    before = wait_for(lambda: csi.df(name), bool, "df", 30)
    target = 2 * SIZES["ext4"]
    _resize(csi, name, target)

    def driver_error_reported() -> list[str]:
        """The driver's message where the kubelet puts it: claim conditions or events."""
        claim = csi.client.get(PersistentVolumeClaim, name, namespace=NS)
        conditions = (claim.status.conditions or []) if claim.status else []
        found = [f"condition {c.type}: {c.message}" for c in conditions]
        found += [f"event {e.reason}: {e.message}" for e in events_about(csi.client, NS, name)]
        return [f for f in found if "CAP_SYS_RESOURCE" in f]
    # The kubelet tries a mounted volume at its next sync of the pod (about a minute).
    reported = wait_for(driver_error_reported, bool,
                        "the driver's CAP_SYS_RESOURCE error on the claim or in an event", 150)
    print(f"\n[e2e] ext4 online growth refused: {reported[0]}")
    assert _claim_capacity(csi, name) == SIZES["ext4"], "the claim keeps its old size"
    assert csi.df(name) == before, "the pod still sees the old size"
    refused = csi.rpc_count("NodeExpandVolume", "FAILED_PRECONDITION")
    assert refused >= 1
    grown = csi.rpc_count("NodeExpandVolume", "OK")

    csi.remove_pod(name)
    csi.wait_unstaged(pv)  # offline from here: the next stage grows the filesystem
    csi.pod(name, name)
    wait_running(csi.client, name, NS)
    wait_for(lambda: _claim_capacity(csi, name) == target, bool,
             "claim capacity at the new size", 60)
    assert csi.rpc_count("NodeExpandVolume", "OK") > grown, \
        "the kubelet retried NodeExpandVolume at the new mount, and it succeeded"
    wait_for(lambda: csi.df(name) > before * 3 // 2, bool,
             f"the new pod seeing the grown ext4 (was {before} KiB)", 30)
    _read(csi, name, token)


def test_snapshot_and_restore(csi: Csi) -> None:
    source, restored, snap = "snap-src", "snap-restored", "snap-1"
    token = secrets.token_hex(16)
    _provision(csi, "ext4", source, token)
    _read(csi, source, token)
    csi.client.create(codecs.from_dict({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": snap, "namespace": NS},
        "spec": {"volumeSnapshotClassName": "hostkit-snapshots",
                 "source": {"persistentVolumeClaimName": source}}}))

    def ready() -> bool:
        obj = csi.client.get(VolumeSnapshot, snap, namespace=NS)
        status = obj.status
        return isinstance(status, dict) and status.get("readyToUse") is True
    wait_for(ready, bool, f"VolumeSnapshot {snap} readyToUse", 60)
    csi.client.create(pvc_object(restored, NS, CLASSES["ext4"], str(SIZES["ext4"]),
                                 snapshot=snap))
    csi.pod(restored, restored)
    wait_running(csi.client, restored, NS, timeout=90)
    _read(csi, restored, token)
    content = csi.client.get(VolumeSnapshot, snap, namespace=NS)["status"][
        "boundVolumeSnapshotContentName"]
    handle = csi.client.get(VolumeSnapshotContent, content)["status"]["snapshotHandle"]
    assert csi.image_of(handle), "the snapshot is an image in the tier's pool"
    for pod in (source, restored):
        csi.remove_pod(pod)
    for claim in (source, restored):
        csi.remove_pvc(claim)
    delete_and_wait(csi.client, VolumeSnapshot, snap, NS)
    delete_and_wait(csi.client, VolumeSnapshotContent, content, None)
    assert not csi.image_of(handle), "deleting the VolumeSnapshot deleted the snapshot"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _read_again(csi: Csi, pod: str, expected: str) -> None:
    """The pod reads its data again (a new line, not one printed before) and it is intact."""
    # Right after a kubelet restart its log endpoint may not answer yet.
    seen = len(wait_for(lambda: csi.values(pod, "read"), bool, f"log of {pod}", 30))
    wait_for(lambda: csi.values(pod, "read")[seen:], bool, f"pod {pod} reading again", 30)
    assert csi.values(pod, "read")[-1] == expected, f"{pod}: data changed"


def test_kubelet_and_driver_restarts_keep_volumes(csi: Csi) -> None:
    pods = {"keep-ext4": "ext4", "keep-block": "block"}
    tokens = {}
    pvs = {}
    for name, kind in pods.items():
        tokens[name] = secrets.token_hex(16)
        _, pvs[name] = _provision(csi, kind, name, tokens[name])
        _read(csi, name, tokens[name])

    csi.cluster.restart_kubelet()
    wait_for(lambda: all(phase(csi.client, n, NS) == "Running" for n in pods), bool,
             "pods Running after the kubelet restart", 60)
    for name in pods:
        _read_again(csi, name, tokens[name])

    csi.node.restart_driver()
    # The probes the DaemonSet declares: the driver's (served by livenessprobe, which
    # calls the driver's Probe) and the registrar's.
    for cont in ("csi-driver", "node-driver-registrar"):
        url = csi.node.url(cont, "livenessProbe")
        wait_for(partial(_healthy, url), bool, f"{cont} livenessProbe {url}", 30)
    for name in pods:
        assert phase(csi.client, name, NS) == "Running"
        _read_again(csi, name, tokens[name])
    # The sidecars that lost the driver's socket exited and were restarted: a new
    # claim is provisioned, staged and published after both restarts.
    _provision(csi, "ext4", "after-restarts", tokens["keep-ext4"])
    _read(csi, "after-restarts", tokens["keep-ext4"])

    for name in pods:
        csi.remove_pod(name)
        csi.wait_unstaged(pvs[name])
        csi.remove_pvc(name)
    csi.clean()
    assert not loop_devices_under(csi.node.pool_dir)
    assert not list(csi.node.pool_dir.rglob("*.img"))


def _example(name: str) -> list[Any]:
    """The objects of ``daemonsets/examples/<name>`` in the test namespace.

    Only what this machine needs changes in the pods: the tier's busybox image
    (pull policy Never), the host network, and a 1 s grace period (``sleep`` as
    PID 1 ignores SIGTERM).
    """
    objects = []
    for doc in load_all((DAEMONSETS / "examples" / name).read_text()):
        doc["metadata"]["namespace"] = NS
        if doc["kind"] == "Pod":
            doc["spec"]["hostNetwork"] = True
            doc["spec"]["terminationGracePeriodSeconds"] = 1
            for cont in doc["spec"]["containers"]:
                cont["image"], cont["imagePullPolicy"] = BUSYBOX, "Never"
        objects.append(codecs.from_dict(doc))
    return objects


def _log(csi: Csi, pod: str) -> str:
    return "".join(csi.client.log(pod, namespace=NS)).strip()


def test_examples(csi: Csi) -> None:
    """The CSI examples as an operator applies them: fsGroup, snapshot, block, ephemeral."""
    for obj in _example("pvc-pod.yaml"):
        csi.client.create(obj)
    wait_running(csi.client, "data-writer", NS, timeout=90)
    # As uid 1000 with fsGroup 1000: the driver made the volume root group-writable.
    written = wait_for(partial(_log, csi, "data-writer"), bool, "data-writer's output", 30)
    assert "Permission denied" not in written, written

    for obj in _example("snapshot-restore.yaml"):
        csi.client.create(obj)
    wait_running(csi.client, "data-reader", NS, timeout=120)
    read = wait_for(partial(_log, csi, "data-reader"), bool, "data-reader's output", 30)
    assert read == written, "the restored volume holds what the writer wrote"

    for obj in _example("block-pod.yaml"):
        csi.client.create(obj)
    wait_running(csi.client, "raw-user", NS, timeout=90)
    size = wait_for(partial(_log, csi, "raw-user"), bool, "raw-user's output", 30)
    assert size == str(1 << 30), f"the raw device is the claim's 1Gi: {size}"

    for obj in _example("ephemeral-pod.yaml"):
        csi.client.create(obj)
    wait_running(csi.client, "scratch-user", NS, timeout=90)
    df = wait_for(partial(_log, csi, "scratch-user"), bool, "scratch-user's output", 30)
    assert df.splitlines()[-1].endswith("/scratch"), df
    claim = csi.client.get(PersistentVolumeClaim, "scratch-user-scratch", namespace=NS)
    assert claim.status.phase == "Bound", "the generic ephemeral volume's claim is bound"
