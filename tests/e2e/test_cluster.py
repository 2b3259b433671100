"""The fixture itself: both layers come up and serve what the scenarios rely on."""

from __future__ import annotations

from lightkube.resources.core_v1 import Namespace, Node

from tests.e2e import host, kube
from tests.e2e.cluster import ControlPlane
from tests.e2e.cluster import Node as ClusterNode


def test_control_plane_serves_the_api(control_plane: ControlPlane):
    names = {ns.metadata.name for ns in control_plane.client().list(Namespace)}
    assert {"default", "kube-system"} <= names


def test_node_is_ready_with_its_own_address(cluster: ClusterNode):
    node = cluster.cp.client().get(Node, cluster.node_name)
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == cluster.node_ip
    assert node.status.nodeInfo.containerRuntimeVersion.startswith("containerd://2.")


def test_a_busybox_pod_runs_from_the_imported_image(cluster: ClusterNode):
    client = cluster.cp.client()
    client.create(kube.busybox_pod("e2e-hello", "echo hello-from-e2e; sleep 3600"))
    try:
        kube.wait_running(client, "e2e-hello")
        assert "hello-from-e2e" in kube.wait_log(client, "e2e-hello", "hello-from-e2e")
        # The container's root filesystem is mounted where the node sees it, and only
        # there: the node's mounts stay in its own namespace.
        containerd_state = cluster.containerd_dir / "state"
        assert any(m.endswith("/rootfs") for m in cluster.mounts(containerd_state))
        assert host.mounts_under(cluster.run.directory) == []
    finally:
        kube.delete_pod(client, "e2e-hello")
