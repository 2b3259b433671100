"""Kubernetes objects of the CSI scenarios, created and awaited with lightkube.

Owns what the CSI tests say to the API server: applying the shared snapshot
CRDs, the ServiceAccount token the sidecars use, and small builders and bounded
waits for PVCs, pods, snapshots, events and CSIStorageCapacity.
Pods are the tier's busybox pods (``tests.e2e.kube``) with a claim mounted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from lightkube import Client, codecs
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.core_v1 import (
    PersistentVolumeClaimVolumeSource,
    Volume,
    VolumeDevice,
    VolumeMount,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import (
    Event,
    PersistentVolume,
    PersistentVolumeClaim,
    Pod,
    ServiceAccountToken,
)
from lightkube.resources.storage_v1 import CSIStorageCapacity

from tests.e2e.kube import busybox_pod, wait_for

VolumeSnapshot = create_namespaced_resource(
    "snapshot.storage.k8s.io", "v1", "VolumeSnapshot", "volumesnapshots")
VolumeSnapshotContent = create_global_resource(
    "snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent", "volumesnapshotcontents")
VolumeSnapshotClass = create_global_resource(
    "snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass", "volumesnapshotclasses")

DRIVER_NAME = "local.csi.hostkit.io"
TOPOLOGY_KEY = "topology.local.csi.hostkit.io/node"


def apply_crds(client: Client, crd_dir: Path) -> None:
    """The snapshot CRDs of the shared folder, applied and Established."""
    names = []
    for path in sorted(crd_dir.glob("snapshot.storage.k8s.io_*.yaml")):
        for obj in codecs.load_all_yaml(path.read_text()):
            client.apply(obj, force=True)
            assert obj.metadata is not None and obj.metadata.name is not None
            names.append(obj.metadata.name)
    assert names, f"no snapshot CRDs in {crd_dir}"
    for name in names:
        client.wait(CustomResourceDefinition, name, for_conditions=["Established"])


def sidecar_kubeconfig(client: Client, path: Path, server: str, ca: Path, *,
                       service_account: str, namespace: str, pod: Pod) -> Path:
    """A kubeconfig holding a token of the DaemonSet's ServiceAccount, bound to ``pod``."""
    assert pod.metadata is not None
    request = ServiceAccountToken(metadata=ObjectMeta(namespace=namespace), spec=TokenRequestSpec(
        audiences=[], expirationSeconds=3600,
        boundObjectRef=BoundObjectReference(kind="Pod", apiVersion="v1",
                                            name=pod.metadata.name, uid=pod.metadata.uid)))
    issued = client.create(request, service_account, namespace=namespace)
    assert issued.status is not None
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server,
                                                 "certificate-authority": str(ca)}}],
        "users": [{"name": service_account, "user": {"token": issued.status.token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": service_account}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def volume_pod(name: str, namespace: str, script: str, pvc: str, *,
               block: bool = False) -> Pod:
    """The tier's busybox pod with claim ``pvc`` at /data (or the device /dev/xvda)."""
    pod = busybox_pod(name, script, namespace=namespace)
    pod.spec.volumes = [Volume(name="vol",
                               persistentVolumeClaim=PersistentVolumeClaimVolumeSource(
                                   claimName=pvc))]
    main = pod.spec.containers[0]
    if block:
        main.volumeDevices = [VolumeDevice(name="vol", devicePath="/dev/xvda")]
    else:
        main.volumeMounts = [VolumeMount(name="vol", mountPath="/data")]
    return pod


def standin_pod(name: str, namespace: str, template: dict[str, Any]) -> Pod:
    """A ``sleep`` pod with the DaemonSet template's labels and ServiceAccount."""
    pod = busybox_pod(name, "exec sleep 86400", namespace=namespace)
    pod.metadata.labels = dict(template["metadata"]["labels"])
    pod.spec.serviceAccountName = template["spec"]["serviceAccountName"]
    return pod


def pvc_object(name: str, namespace: str, storage_class: str, size: str, *,
               block: bool = False, snapshot: str | None = None) -> PersistentVolumeClaim:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
        "volumeMode": "Block" if block else "Filesystem",
        "resources": {"requests": {"storage": size}},
    }
    if snapshot is not None:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                              "name": snapshot}
    pvc = codecs.from_dict({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    assert isinstance(pvc, PersistentVolumeClaim)
    return pvc


def delete_and_wait(client: Client, kind: Any, name: str, namespace: str | None,
                    timeout: float = 60.0) -> None:
    """Delete (if present) and wait until the API server no longer has it."""
    with contextlib.suppress(ApiError):
        if namespace is None:
            client.delete(kind, name)
        else:
            client.delete(kind, name, namespace=namespace)

    def gone() -> bool:
        try:
            if namespace is None:
                client.get(kind, name)
            else:
                client.get(kind, name, namespace=namespace)
        except ApiError as exc:
            return exc.status.code == 404
        return False
    wait_for(gone, bool, f"{kind.__name__} {name} deleted", timeout)


def log_values(client: Client, name: str, namespace: str, key: str) -> list[str]:
    """The values of the ``key:value`` lines the pod printed, in order."""
    return [line.rstrip("\n")[len(key) + 1:] for line in client.log(name, namespace=namespace)
            if line.startswith(key + ":")]


def bound_pv(client: Client, pvc: str, namespace: str) -> PersistentVolume:
    claim = client.get(PersistentVolumeClaim, pvc, namespace=namespace)
    assert claim.status is not None and claim.status.phase == "Bound", claim.status
    assert claim.spec is not None and claim.spec.volumeName
    return client.get(PersistentVolume, claim.spec.volumeName)


def capacity_of(client: Client, namespace: str, storage_class: str, node: str) -> int | None:
    """Bytes the node's CSIStorageCapacity object for ``storage_class`` publishes."""
    for cap in client.list(CSIStorageCapacity, namespace=namespace):
        terms = cap.nodeTopology.matchLabels if cap.nodeTopology else None
        if cap.storageClassName == storage_class and terms == {TOPOLOGY_KEY: node}:
            return None if cap.capacity is None else quantity_bytes(str(cap.capacity))
    return None


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes quantity as the API server writes sizes (``64Mi``, ``1k``)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
    for suffix in sorted(units, key=len, reverse=True):
        if quantity.endswith(suffix):
            return int(float(quantity[:-len(suffix)]) * units[suffix])
    return int(quantity)


def events_about(client: Client, namespace: str, name: str) -> list[Event]:
    return [e for e in client.list(Event, namespace=namespace)
            if e.involvedObject.name == name]


def occurrences(event: Event) -> int:
    if event.series is not None and event.series.count:
        return int(event.series.count)
    return int(event.count or 1)
