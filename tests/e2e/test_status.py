"""``device-plugin status`` against the real kubelet's pod-resources API (List and Get):
a pod holding one of our loop devices through the device plugin API is listed with
its namespace, pod and container; when the loop device is detached under the running
pod it is listed as vanished and counted by the metric's collector."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.core_v1 import Node as NodeObject

from device_plugin import cli
from device_plugin.config import load_config
from device_plugin.holders import device_status
from device_plugin.lifecycle import PluginManager
from device_plugin.plugin import DevicePluginDomain, catalog_devices
from device_plugin.podresources import HeldVanishedCollector
from device_plugin.registry import DevicePluginView
from plugin_runtime import commands
from tests.e2e import kube
from tests.e2e.binaries import ROOT
from tests.e2e.cluster import Node

RESOURCE = "hostkit.io/statusloop"
DeviceClass: Any = create_global_resource("resource.k8s.io", "v1", "DeviceClass",
                                          "deviceclasses")
ResourceClaim: Any = create_namespaced_resource("resource.k8s.io", "v1", "ResourceClaim",
                                                "resourceclaims")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="hkst-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _status(capsys: Any, cluster: Node, config: Path, *extra: str) -> dict[str, Any]:
    code = cli.main(["status", "--config", str(config), "--json", "--node-name",
                     cluster.node_name, "--pod-resources-socket",
                     str(cluster.pod_resources_socket), *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_status_names_the_holder_and_a_device_that_vanished_under_it(
    cluster: Node, private_dir: Path, capsys: Any, restore_logging: None
) -> None:
    client: Any = cluster.cp.client()
    backing = private_dir / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    config = private_dir / "config.yaml"
    config.write_text(f"""
resources:
  - name: statusloop
    match:
      - subsystem: block
        kernel: "loop*"
        attributes: {{loop/backing_file: "{private_dir}/*"}}
""")
    dev = commands.run(["losetup", "--find", "--show", str(backing)], timeout=30).stdout.strip()
    attached = True
    domain = DevicePluginDomain(config, watch_config=False)
    domain.start()
    manager = PluginManager(DevicePluginView(domain.catalog), str(cluster.device_plugin_dir))
    pod = f"holder-{uuid.uuid4().hex[:6]}"
    try:
        manager.start()
        kube.wait_for(lambda: client.get(NodeObject, cluster.node_name),
                      lambda n: (n.status.allocatable or {}).get(RESOURCE) == "1",
                      f"{RESOURCE} allocatable")
        client.create(kube.busybox_pod(pod, "sleep 3600", limits={RESOURCE: "1"}))
        kube.wait_running(client, pod, timeout=120)

        doc = _status(capsys, cluster, config)
        [row] = [d for d in doc["devices"] if d["resource"] == RESOURCE]
        assert row["present"] and row["api"] == "device-plugin" and row["nodes"] == [dev]
        assert row["holders"] == [{"namespace": "default", "pod": pod, "container": "main",
                                   "claim": ""}]
        assert doc["vanished_held"] == {}
        # Get, for one pod (GA in the 1.36 kubelet).
        only = _status(capsys, cluster, config, "--pod", f"default/{pod}")
        assert [d["device"] for d in only["devices"]] == [row["device"]]

        commands.run(["losetup", "--detach", dev], timeout=30)
        attached = False
        kube.wait_for(lambda: catalog_devices(domain.catalog), lambda rows: not rows,
                      "the detached device gone from the snapshot")
        doc = _status(capsys, cluster, config)
        [row] = [d for d in doc["devices"] if d["resource"] == RESOURCE]
        assert not row["present"] and row["holders"][0]["pod"] == pod
        assert doc["vanished_held"] == {RESOURCE: 1}

        loaded = load_config(config)
        collector = HeldVanishedCollector(
            lambda held: device_status(loaded, cluster.node_name,
                                       catalog_devices(domain.catalog), held),
            str(cluster.pod_resources_socket))
        [family] = list(collector.collect())
        assert {s.labels["resource"]: s.value for s in family.samples} == {RESOURCE: 1}
    finally:
        kube.delete_pod(client, pod, timeout=120)
        manager.stop()
        domain.stop()
        if attached:
            commands.run(["losetup", "--detach", dev], timeout=30, check=False)


def test_the_serving_daemon_and_status_with_both_apis_on_the_real_kubelet(
    cluster: Node, private_dir: Path, capsys: Any, restore_logging: None
) -> None:
    """``device-plugin serve`` as the DaemonSet runs it, one resource per API: a pod
    holding /dev/zero through the device plugin API and /dev/full through a claim the
    real scheduler allocated against our slices; ``status`` names the pod for both,
    the DRA one with its claim."""
    client: Any = cluster.cp.client()
    config = private_dir / "config.yaml"
    config.write_text(f"""
dra: {{driver: hostkit.io}}
cdi: {{enabled: true, dir: {cluster.cdi_dir}}}
resources:
  - name: statuszero
    match: [{{subsystem: mem, kernel: zero}}]
  - name: statusfull
    dra: true
    match: [{{subsystem: mem, kernel: full}}]
""")
    log = open(private_dir / "serve.log", "w")  # noqa: SIM115 - closed in finally
    daemon = subprocess.Popen(
        [sys.executable, "-m", "device_plugin", "serve", "--config", str(config),
         "--kubelet-dir", str(cluster.device_plugin_dir), "--cdi-dir", str(cluster.cdi_dir),
         "--kubeconfig", str(cluster.cp.admin_kubeconfig), "--node-name", cluster.node_name,
         "--log-format", "json"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    pod = f"both-{uuid.uuid4().hex[:6]}"
    claim = f"statusfull-{uuid.uuid4().hex[:6]}"
    try:
        client.create(DeviceClass(metadata={"name": claim}, spec={"selectors": [{"cel": {
            "expression": 'device.driver == "hostkit.io" && '
                          'device.attributes["hostkit.io"].resource == "hostkit.io/statusfull"'
        }}]}))
        client.create(ResourceClaim(
            metadata={"name": claim, "namespace": "default"},
            spec={"devices": {"requests": [{"name": "mem", "exactly": {
                "deviceClassName": claim}}]}}))
        kube.wait_for(lambda: client.get(NodeObject, cluster.node_name),
                      lambda n: (n.status.allocatable or {}).get("hostkit.io/statuszero") == "1",
                      "hostkit.io/statuszero allocatable")
        spec = kube.busybox_pod(pod, "ls -l /dev/zero /dev/full; sleep 3600")
        spec.spec.resourceClaims = [{"name": "mem", "resourceClaimName": claim}]
        spec.spec.containers[0].resources = {"limits": {"hostkit.io/statuszero": "1"},
                                             "claims": [{"name": "mem"}]}
        client.create(spec)
        kube.wait_running(client, pod, timeout=120)

        doc = _status(capsys, cluster, config)
        rows = {d["resource"]: d for d in doc["devices"]}
        holder = {"namespace": "default", "pod": pod, "container": "main"}
        assert rows["hostkit.io/statuszero"]["holders"] == [{**holder, "claim": ""}]
        dra = rows["hostkit.io/statusfull"]
        assert dra["api"] == "dra" and dra["present"]
        assert dra["pool"] == f"{cluster.node_name}-statusfull"
        assert dra["holders"] == [{**holder, "claim": f"default/{claim}"}]
    finally:
        kube.delete_pod(client, pod, timeout=120)
        for kind, name, namespace in ((ResourceClaim, claim, "default"),
                                      (DeviceClass, claim, None)):
            with contextlib.suppress(Exception):
                client.delete(kind, name, namespace=namespace) if namespace else \
                    client.delete(kind, name)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=10)
            log.close()
        print((private_dir / "serve.log").read_text()[-3000:])
