"""``device-plugin status`` against the real kubelet's pod-resources API (List and Get):
a pod holding one of our loop devices through the device plugin API is listed with
its namespace, pod and container; when the loop device is detached under the running
pod it is listed as vanished and counted by the metric's collector."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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
from tests.e2e.cluster import Node

RESOURCE = "hostkit.io/statusloop"


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
