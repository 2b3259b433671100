"""The device plugin against the real kubelet, scheduler and containerd.

Two host processes built from the ``hostkit-device-plugin`` DaemonSet of
``daemonsets/overlays/default`` (``tests/e2e/daemonsets.py``), after its
Namespace, ServiceAccount and ConfigMap were applied to the cluster.  They run in
the node's mount namespace and use the DaemonSet's /var/lib/kubelet/device-plugins
as is (the kubelet's fixed directory, bound to the run's own there):

* ``default``: the DaemonSet as rendered, with its ConfigMap (fuse, tun, kvm);
* ``loop``: the same container with the ConfigMap replaced by
  ``examples/device-plugin/loop-devices.yaml``, narrowed to loop devices backed by
  files in this run's directory (other runs attach loop devices too), with CDI on
  and a mount and an environment variable that only the CDI spec / Allocate
  answer can put into a container.

Figures printed (not asserted): pod with a device from creation to Running, and
kubelet restart to the resources back in the node's allocatable.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from lightkube import Client
from lightkube.resources.core_v1 import ConfigMap, Node, Pod

from device_plugin import api
from plugin_runtime import commands
from tests.e2e import host, kube
from tests.e2e.binaries import ROOT
from tests.e2e.cluster import Node as ClusterNode
from tests.e2e.daemonsets import HostPod, apply_objects, render
from tests.e2e.processes import Daemon
from tests.loop_devices import LoopDevices, sparse_file

DS = "hostkit-device-plugin"
CONTAINER = "device-plugin"
FUSE = "hostkit.io/fuse"
TUN = "hostkit.io/tun"
KVM = "hostkit.io/kvm"
LOOP = "hostkit.io/loop"
CDI_PROBE = "/hostkit-cdi-probe"
WAIT = 60.0


class Plugins:
    """The two device-plugin host processes of the module."""

    def __init__(self, cluster: ClusterNode, loops: LoopDevices, loop_dir: Path) -> None:
        self.cluster = cluster
        self.client: Client = cluster.cp.client()
        self.loops = loops
        self.loop_dir = loop_dir  # the backing files of the loop devices the config matches
        run = cluster.run
        docs = render(cluster.binaries["kubectl"])
        apply_objects(self.client, docs, ["Namespace", "ServiceAccount", "ConfigMap"])
        # The kubelet root moves; its device-plugin directory does not (the node's mount
        # namespace binds the run's directory there, see Node._start_mount_namespace).
        host_paths = {"/var/lib/kubelet": cluster.kubelet_root,
                      host.KUBELET_DEVICE_PLUGIN_DIR: Path(host.KUBELET_DEVICE_PLUGIN_DIR),
                      "/var/run/cdi": cluster.cdi_dir}
        self.cdi_probe = run.directory / "cdi-probe"
        self.cdi_probe.mkdir()
        (self.cdi_probe / "marker").write_text("cdi-edits-applied\n")

        self.default_pod = HostPod(docs, DS, directory=run.directory / "dp-default",
                                   host_paths=host_paths, node_name=cluster.node_name)
        # The ConfigMap as the cluster serves it, like the kubelet's configMap volume.
        config_volume = next(v for v in self.default_pod.spec["volumes"] if "configMap" in v)
        served = self.client.get(ConfigMap, config_volume["configMap"]["name"],
                                 namespace=self.default_pod.namespace)
        self.default_pod.override_config(config_volume["name"], dict(served.data or {}))
        self.default = self.default_pod.daemon(CONTAINER, run.logs, process_name="dp-default",
                                              prefix=cluster.in_node())

        self.loop_pod = HostPod(docs, DS, directory=run.directory / "dp-loop",
                                host_paths=host_paths, node_name=cluster.node_name)
        self.loop_pod.override_config(config_volume["name"],
                                      {"config.yaml": self._loop_config()})
        self.loop = self.loop_pod.daemon(CONTAINER, run.logs, process_name="dp-loop",
                                        prefix=cluster.in_node())

    def _loop_config(self) -> str:
        config = yaml.safe_load((ROOT / "examples/device-plugin/loop-devices.yaml").read_text())
        (resource,) = config["resources"]
        for match in resource["match"]:
            match["attributes"]["loop/backing_file"] = f"{self.loop_dir}/*"
        resource["mounts"] = [{"host_path": str(self.cdi_probe), "container_path": CDI_PROBE,
                               "read_only": True}]
        resource["env"] = {"HOSTKIT_LOOP_IDS": "{ids}"}
        config["cdi"] = {"enabled": True}
        return yaml.safe_dump(config)

    def start(self, daemon: Daemon, pod: HostPod) -> None:
        daemon.start()
        daemon.wait_until(lambda: _http_ok(pod.probe_url(CONTAINER)), "/healthz 200", WAIT)

    def stop(self) -> None:
        for daemon in (self.default, self.loop):
            daemon.stop()


def registrations(pod: HostPod) -> dict[str, float]:
    """``hostkit_device_plugin_registrations_total{result="ok"}`` by resource, scraped
    from the metrics port the DaemonSet declares (mapped like every port)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    metrics_port = pod.ports[next(p["containerPort"] for p in pod.container(CONTAINER)["ports"]
                                  if p["name"] == "metrics")]
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "hostkit_device_plugin_registrations":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["result"] == "ok":
                    out[sample.labels["resource"]] = sample.value
    return out


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@pytest.fixture(scope="module")
def plugins(cluster: ClusterNode) -> Iterator[Plugins]:
    loops, loop_dir = LoopDevices(), cluster.run.directory / "loops"
    loop_dir.mkdir(exist_ok=True)
    started = None
    try:
        loops.attach(sparse_file(loop_dir, "disk1.img"))
        started = Plugins(cluster, loops, loop_dir)
        started.start(started.default, started.default_pod)
        started.start(started.loop, started.loop_pod)
        yield started
    finally:
        if started is not None:
            _delete_all_pods(cluster.cp.client())
            started.stop()
        loops.cleanup()


def _delete_all_pods(client: Client) -> None:
    for pod in client.list(Pod, namespace="default"):
        kube.delete_pod(client, str(pod.metadata.name))


@pytest.fixture
def clean_pods(plugins: Plugins) -> Iterator[Client]:
    yield plugins.client
    _delete_all_pods(plugins.client)


def node_status(client: Client, name: str) -> tuple[dict[str, str], dict[str, str]]:
    status = client.get(Node, name).status
    return dict(status.capacity or {}), dict(status.allocatable or {})


def wait_allocatable(client: Client, node: str, want: dict[str, str],
                     capacity: dict[str, str] | None = None, timeout: float = WAIT) -> None:
    def ok(st: tuple[dict[str, str], dict[str, str]]) -> bool:
        cap, alloc = st
        return all(alloc.get(k) == v for k, v in want.items()) and all(
            cap.get(k) == v for k, v in (capacity or {}).items())

    kube.wait_for(lambda: node_status(client, node), ok,
                  f"allocatable {want} capacity {capacity or {}}", timeout)


def misc_present(name: str) -> bool:
    return os.path.exists(f"/dev/{name}")


def default_resources() -> dict[str, str]:
    """fuse, tun, kvm: ten shares of the one device, or 0 where the device is absent."""
    return {r: "10" if misc_present(dev) else "0"
            for r, dev in ((FUSE, "fuse"), (TUN, "net/tun"), (KVM, "kvm"))}


# --------------------------------------------------------------------- scenarios

def test_daemonset_and_loop_config_register(plugins: Plugins, cluster: ClusterNode):
    wait_allocatable(plugins.client, cluster.node_name, {**default_resources(), LOOP: "1"})
    sockets = [p.name for p in cluster.device_plugin_dir.iterdir() if p.is_socket()]
    assert "kubelet.sock" in sockets and len(sockets) >= 1 + len(default_resources()) + 1


def test_embedded_default_configuration_registers(plugins: Plugins, cluster: ClusterNode):
    """Without --config the plugin serves its embedded default: the same resources."""
    client = plugins.client
    plugins.default.stop()
    assert default_resources()[FUSE] == "10", "this scenario needs /dev/fuse"
    wait_allocatable(client, cluster.node_name, {FUSE: "0"})  # the kubelet marks it unhealthy
    embedded = plugins.default_pod.daemon(CONTAINER, cluster.run.logs,
                                          process_name="dp-embedded", drop_args=("--config",),
                                          prefix=cluster.in_node())
    assert not any(a.startswith("--config") for a in embedded.argv)
    try:
        plugins.start(embedded, plugins.default_pod)
        wait_allocatable(client, cluster.node_name, default_resources())
    finally:
        embedded.stop()
        # The kubelet must have seen this plugin go before the next one registers,
        # or its late disconnect could race the next scenario's admission.
        wait_allocatable(client, cluster.node_name, {FUSE: "0"})
        plugins.start(plugins.default, plugins.default_pod)
    wait_allocatable(client, cluster.node_name, default_resources())


def test_pod_gets_the_device_node(plugins: Plugins, cluster: ClusterNode, clean_pods: Client,
                                  figure):
    client = clean_pods
    wait_allocatable(client, cluster.node_name, default_resources())
    seconds = []
    for i in range(3):
        created = time.monotonic()
        client.create(kube.busybox_pod(
            f"fuse-user-{i}", "stat -c 'fuse %F %t:%T' /dev/fuse; echo done; sleep 3600",
            limits={FUSE: "1"}))
        kube.wait_running(client, f"fuse-user-{i}", interval=0.02)
        seconds.append(time.monotonic() - created)
        log = kube.wait_log(client, f"fuse-user-{i}", "done")
        assert "fuse character special file a:e5" in log  # misc 10:229
    figure(f"pod with {FUSE} from creation to Running (3 pods): "
           + ", ".join(f"{s:.2f}" for s in seconds) + " s")

    client.create(kube.busybox_pod(
        "no-device", "test -e /dev/fuse && echo present || echo absent; sleep 3600"))
    kube.wait_running(client, "no-device")
    assert "absent" in kube.wait_log(client, "no-device", "sent")


def test_loop_pod_gets_device_and_cdi_edits(plugins: Plugins, cluster: ClusterNode,
                                            clean_pods: Client):
    client = clean_pods
    (dev,) = plugins.loops.attached
    specs = list(cluster.cdi_dir.glob("*.json"))
    assert [p.name for p in specs] == ["hostkit.io-loop.json"]
    spec = json.loads(specs[0].read_text())
    assert spec["kind"] == LOOP
    client.create(kube.busybox_pod(
        "loop-user",
        f"stat -c 'node %F' {dev}; cat {CDI_PROBE}/marker; "
        "echo ids=$HOSTKIT_LOOP_IDS; echo done; sleep 3600",
        limits={LOOP: "1"}))
    kube.wait_running(client, "loop-user")
    log = kube.wait_log(client, "loop-user", "done")
    assert "node block special file" in log
    assert "cdi-edits-applied" in log  # the mount exists only in the CDI spec
    (device,) = spec["devices"]
    assert f"ids={device['name']}" in log


def test_more_than_exist_stays_pending_with_the_schedulers_reason(
        plugins: Plugins, cluster: ClusterNode, clean_pods: Client):
    client = clean_pods
    client.create(kube.busybox_pod("too-many", "sleep 3600", limits={LOOP: "5"}))

    def unschedulable(pod: Pod) -> bool:
        return any(c.type == "PodScheduled" and c.status == "False"
                   and c.reason == "Unschedulable" for c in pod.status.conditions or [])

    pod = kube.wait_for(lambda: client.get(Pod, "too-many"), unschedulable,
                        "PodScheduled=False/Unschedulable")
    (condition,) = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert f"Insufficient {LOOP}" in (condition.message or "")
    assert pod.status.phase == "Pending" and pod.spec.nodeName is None


def test_kubelet_restart(plugins: Plugins, cluster: ClusterNode, clean_pods: Client, figure):
    client = clean_pods
    want = {**default_resources(), LOOP: "1"}
    wait_allocatable(client, cluster.node_name, want)
    client.create(kube.busybox_pod(
        "keeps-device",
        "while test -c /dev/fuse; do echo tick; sleep 1; done; echo lost; sleep 3600",
        limits={FUSE: "1"}))
    kube.wait_running(client, "keeps-device")
    before = {p.name for p in cluster.device_plugin_dir.iterdir() if p.is_socket()}
    counted = {**registrations(plugins.default_pod), **registrations(plugins.loop_pod)}

    old_version = client.get(Node, cluster.node_name).metadata.resourceVersion
    wall = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    started = cluster.restart_kubelet()

    def fresh_and_back(node: Node) -> bool:
        """A status posted by the new kubelet (a stale one would read the same)."""
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        alloc = node.status.allocatable or {}
        heartbeat = ready.lastHeartbeatTime
        return (node.metadata.resourceVersion != old_version
                and heartbeat is not None and heartbeat >= wall
                and all(alloc.get(k) == v for k, v in want.items()))

    kube.wait_for(lambda: client.get(Node, cluster.node_name), fresh_and_back,
                  "allocatable restored after the kubelet restart", WAIT, interval=0.05)
    figure(f"kubelet restart (process start) -> {', '.join(sorted(want))} back in the "
           f"Node's allocatable: {time.monotonic() - started:.2f} s")
    after = {p.name for p in cluster.device_plugin_dir.iterdir() if p.is_socket()}
    new = after - before - {"kubelet.sock"}
    assert len(new) == len(want), f"re-registered sockets {new}, before {before}"
    recounted = {**registrations(plugins.default_pod), **registrations(plugins.loop_pod)}
    assert all(recounted[r] >= counted[r] + 1 for r in want), (counted, recounted)

    pod = client.get(Pod, "keeps-device")
    assert pod.status.phase == "Running"
    assert (pod.status.containerStatuses or [])[0].restartCount == 0
    def log() -> str:
        return "".join(client.log("keeps-device"))

    ticks = kube.wait_for(log, lambda t: True, "the log after the restart").count("tick")
    kube.wait_for(log,
                  lambda t: t.count("tick") > ticks + 1 and "lost" not in t,
                  "the running pod still sees its device")

    # The new kubelet rebuilt the allocation from its checkpoint.
    assert len(held_devices(cluster, "keeps-device").get(FUSE, [])) == 1

    client.create(kube.busybox_pod("admitted-after", "echo ok; sleep 3600",
                                   limits={FUSE: "1", LOOP: "1"}))
    kube.wait_running(client, "admitted-after")


def test_hotplug_changes_capacity_and_unhealthy_leaves_allocatable(
        plugins: Plugins, cluster: ClusterNode, clean_pods: Client, figure):
    client = clean_pods
    node = cluster.node_name
    wait_allocatable(client, node, {LOOP: "1"}, capacity={LOOP: "1"})
    attached = time.monotonic()
    second = plugins.loops.attach(sparse_file(plugins.loop_dir, "disk2.img"))
    wait_allocatable(client, node, {LOOP: "2"}, capacity={LOOP: "2"})
    figure(f"loop device attached -> in the Node's capacity: {time.monotonic() - attached:.1f} s "
           "(the kubelet posts node status every 10 s)")
    commands.run(["blockdev", "--setro", second], timeout=30)
    try:
        wait_allocatable(client, node, {LOOP: "1"}, capacity={LOOP: "2"})
    finally:
        commands.run(["blockdev", "--setrw", second], timeout=30)
    wait_allocatable(client, node, {LOOP: "2"}, capacity={LOOP: "2"})
    plugins.loops.detach(second)
    wait_allocatable(client, node, {LOOP: "1"}, capacity={LOOP: "1"})


def held_devices(cluster: ClusterNode, pod: str) -> dict[str, list[str]]:
    """Device IDs by resource that the kubelet's pod-resources API lists for ``pod``."""
    pb, stubs = api.pod_resources_api()
    with grpc.insecure_channel(f"unix://{cluster.pod_resources_socket}") as channel:
        listed = stubs.PodResourcesListerStub(channel).List(pb.ListPodResourcesRequest(),
                                                            timeout=10)
    held: dict[str, list[str]] = {}
    for entry in listed.pod_resources:
        if entry.name == pod:
            for container in entry.containers:
                for devices in container.devices:  # one entry per resource and NUMA node
                    held.setdefault(devices.resource_name, []).extend(devices.device_ids)
    return held


def test_pod_resources_api_reports_who_holds_which_device(
        plugins: Plugins, cluster: ClusterNode, clean_pods: Client):
    client = clean_pods
    client.create(kube.busybox_pod("holder", "echo ids=$HOSTKIT_LOOP_IDS; sleep 3600",
                                   limits={LOOP: "1", FUSE: "2"}))
    kube.wait_running(client, "holder")
    log = kube.wait_log(client, "holder", "ids=")
    loop_id = log.split("ids=", 1)[1].split()[0]

    held = held_devices(cluster, "holder")
    assert held[LOOP] == [loop_id]
    assert len(held[FUSE]) == 2

    pb, stubs = api.pod_resources_api()
    with grpc.insecure_channel(f"unix://{cluster.pod_resources_socket}") as channel:
        stub = stubs.PodResourcesListerStub(channel)
        listed = stub.List(pb.ListPodResourcesRequest(), timeout=10)
        allocatable = stub.GetAllocatableResources(pb.AllocatableResourcesRequest(),
                                                   timeout=10)
    offered: dict[str, set[str]] = {}
    for entry in allocatable.devices:
        offered.setdefault(entry.resource_name, set()).update(entry.device_ids)
    assert loop_id in offered[LOOP] and set(held[FUSE]) <= offered[FUSE]
    others = [p for p in listed.pod_resources if p.name != "holder"
              for c in p.containers for d in c.devices if d.resource_name == LOOP]
    assert others == []
