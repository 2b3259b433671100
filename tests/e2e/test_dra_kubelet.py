"""The kubelet side of DRA against a real cluster: scheduler, kubelet, containerd.

Our driver runs in the test process: the real device-plugin domain (udev
discovery of ``/dev/full``), the slice publisher, and the kubelet DRA plugin
registered through the real kubelet's plugin watcher in the node's kubelet root.
A DeviceClass selects our device with CEL on our attributes; the real
kube-scheduler allocates a ResourceClaim for a pod; the real kubelet calls
NodePrepareResources, containerd injects the device from our per-claim CDI spec,
and the pod sees the device node and the environment.  The driver is restarted
while the pod runs (its checkpoint carries the claim); deleting the pod makes
the kubelet call NodeUnprepareResources on the new instance, which removes the
claim's CDI spec and checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from device_plugin.config import parse_config
from device_plugin.dra.checkpoint import CheckpointStore
from device_plugin.dra.claims import ApiClaimReader
from device_plugin.dra.devices import CatalogDevices
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.lifecycle import DraPlugin
from device_plugin.dra.prepare import ClaimPreparer
from device_plugin.kube import ApiAccess, make_client
from device_plugin.plugin import DevicePluginDomain
from device_plugin.slice_publisher import SlicePublisher
from tests.e2e import kube
from tests.e2e.cluster import Node

DRIVER = "hostkit.io"
# Generic resources: the test writes these objects as the YAML a user would.
DeviceClass: Any = create_global_resource("resource.k8s.io", "v1", "DeviceClass", "deviceclasses")
ResourceClaim: Any = create_namespaced_resource("resource.k8s.io", "v1", "ResourceClaim",
                                           "resourceclaims")
ResourceSlice: Any = create_global_resource("resource.k8s.io", "v1", "ResourceSlice",
                                       "resourceslices")


class Driver:
    """The DRA side of our daemon, built like ``device-plugin serve`` builds it."""

    def __init__(self, node: Node, domain: DevicePluginDomain) -> None:
        self.node = node
        self.domain = domain
        access = ApiAccess(str(node.cp.admin_kubeconfig))
        resources = lambda: {n: s for n, s in domain.catalog.resources().items()  # noqa: E731
                             if s.config.dra}
        devices = CatalogDevices(node.node_name, resources)
        self.checkpoints = CheckpointStore(
            str(node.kubelet_root / "plugins" / DRIVER / "claims"))
        self.reader = ApiClaimReader(make_client(access))
        self.preparer = ClaimPreparer(DRIVER, devices, self.reader,
                                      self.checkpoints, str(node.cdi_dir), "hostkit.io")
        self.feed = HealthFeed(devices)
        domain.catalog.subscribe(self.feed.changed)
        self.plugin = DraPlugin(DRIVER, self.preparer, self.feed, str(node.kubelet_root))
        self.plugin.start()

    def stop(self) -> None:
        self.feed.close()
        self.plugin.stop()
        self.reader.close()


def _config(cluster: Node, healthy_dev: str = "1:7") -> Any:
    """/dev/full through DRA; its health probe reads the sysfs ``dev`` attribute, so a
    reload with another expected value turns the device unhealthy."""
    return parse_config({
        "cdi": {"dir": str(cluster.cdi_dir)},
        "resources": [{
            "name": "memfull",
            "dra": True,
            "match": [{"subsystem": "mem", "kernel": "full"}],
            "env": {"MEMFULL_ID": "{ids}", "MEMFULL_PATHS": "{paths}"},
            "health": {"probe": "attribute", "attribute": "dev",
                       "healthy_values": [healthy_dev]},
        }],
    })


@pytest.fixture
def dra_domain(cluster: Node) -> Iterator[DevicePluginDomain]:
    domain = DevicePluginDomain(config=_config(cluster))
    domain.start()
    clients: list[Any] = []

    def client() -> Any:
        clients.append(make_client(ApiAccess(str(cluster.cp.admin_kubeconfig))))
        return clients[-1]

    publisher = SlicePublisher(domain.catalog, client, cluster.node_name)
    publisher.start()
    try:
        yield domain
    finally:
        publisher.stop()
        domain.stop()
        for made in clients:
            made.close()


def _claim_pod(name: str, claim: str) -> Any:
    pod = kube.busybox_pod(
        name, 'ls -l /dev/full; echo "id=$MEMFULL_ID paths=$MEMFULL_PATHS"; sleep 3600')
    pod.spec.resourceClaims = [{"name": "mem", "resourceClaimName": claim}]
    pod.spec.containers[0].resources = {"claims": [{"name": "mem"}]}
    return pod


def _resource_health(client: Any, cdi_id: str, health: str = "Healthy") -> dict[str, Any]:
    """The pod's ``allocatedResourcesStatus`` entry of our device once it says ``health``."""
    def entry(pod: Any) -> dict[str, Any] | None:
        for status in (pod.status.containerStatuses or []):
            for allocated in (status.allocatedResourcesStatus or []):
                for resource in allocated.resources or []:
                    if allocated.name == "claim:mem" and resource.resourceID == cdi_id:
                        return {"health": resource.health, "message": resource.message or ""}
        return None

    pod = kube.wait_for(lambda: client.get(Pod, "dra-memfull", namespace="default"),
                        lambda p: (entry(p) or {}).get("health") == health,
                        f"{cdi_id} {health} in the pod status")
    found = entry(pod)
    assert found is not None
    return found


def test_a_pod_gets_the_claimed_device_through_the_real_kubelet(cluster: Node, dra_domain):
    client: Any = cluster.cp.client()
    (state,) = dra_domain.catalog.resources().values()
    (unit,) = state.units
    client.create(DeviceClass(
        metadata={"name": "hostkit-memfull"},
        spec={"selectors": [{"cel": {"expression":
            f'device.driver == "{DRIVER}" && '
            f'device.attributes["{DRIVER}"].subsystem == "mem" && '
            f'"kernelName" in device.attributes["{DRIVER}"] && '
            f'device.attributes["{DRIVER}"].kernelName == "full"'}}]},
    ))
    client.create(ResourceClaim(
        metadata={"name": "memfull", "namespace": "default"},
        spec={"devices": {"requests": [
            {"name": "mem", "exactly": {"deviceClassName": "hostkit-memfull"}}]}},
    ))
    driver = Driver(cluster, dra_domain)
    restarted: Driver | None = None
    try:
        kube.wait_for(
            lambda: client.list(ResourceSlice, fields={"spec.driver": DRIVER}),
            lambda slices: any(s.spec["devices"] for s in slices), "our ResourceSlice")
        # Registered before the pod exists: a pod synced while no driver is
        # registered waits for the kubelet's next retry (about a minute).
        kube.wait_for(lambda: driver.plugin.registered, bool, "the kubelet's registration")
        client.create(_claim_pod("dra-memfull", "memfull"))
        kube.wait_running(client, "dra-memfull", timeout=120)
        log = kube.wait_log(client, "dra-memfull", "id=")
        assert f"id={unit.id} paths=/dev/full" in log
        assert "crw" in log  # /dev/full is a character device in the container

        claim: Any = client.get(ResourceClaim, "memfull", namespace="default")
        (result,) = claim.status["allocation"]["devices"]["results"]
        assert result["driver"] == DRIVER and result["pool"] == f"{cluster.node_name}-memfull"
        uid = claim.metadata.uid
        spec = cluster.cdi_dir / f"hostkit.io-claim_{uid}.json"
        assert spec.exists()
        assert [c.uid for c in driver.preparer.prepared()] == [uid]

        # The kubelet follows our health stream into the pod's status, by the
        # device's CDI ID: Healthy, then Unhealthy with our reason after a reload
        # whose probe fails.
        cdi_id = f"hostkit.io/claim={uid}-{result['device']}"
        assert _resource_health(client, cdi_id)["health"] == "Healthy"
        dra_domain.catalog.apply_config(_config(cluster, healthy_dev="0:0"))
        unhealthy = _resource_health(client, cdi_id, "Unhealthy")
        assert "attribute dev is '1:7'" in unhealthy.get("message", "")
        dra_domain.catalog.apply_config(_config(cluster))
        _resource_health(client, cdi_id, "Healthy")

        # A driver restart while the pod runs changes nothing: the checkpoint carries it.
        driver.stop()
        driver = restarted = Driver(cluster, dra_domain)
        kube.wait_for(lambda: restarted.plugin.registered, bool, "re-registration")
        assert kube.phase(client, "dra-memfull") == "Running"

        kube.delete_pod(client, "dra-memfull", timeout=120)
        kube.wait_for(lambda: spec.exists(), lambda e: not e, "the claim's CDI spec removed")
        assert restarted.preparer.prepared() == []
    finally:
        kube.delete_pod(client, "dra-memfull", timeout=120)
        driver.stop()
        for kind, name, ns in ((ResourceClaim, "memfull", "default"),
                               (DeviceClass, "hostkit-memfull", None)):
            with contextlib.suppress(Exception):  # best-effort cleanup of a failed test
                client.delete(kind, name, namespace=ns) if ns else client.delete(kind, name)
