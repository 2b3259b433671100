"""``device-plugin status``: who holds which device, from a pod-resources server on a
real unix socket (the kubelet's List and Get, extended-resource and DRA allocations),
held devices that vanished shown and counted, and the metric the daemon exports."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent import futures

import grpc
import pytest

from device_plugin import api, cli
from device_plugin.config import load_config
from device_plugin.dra.devices import device_name
from device_plugin.holders import device_status
from device_plugin.plugin import discover
from device_plugin.podresources import HeldVanishedCollector

CONFIG = """\
dra: {driver: dra.hostkit.io}
resources:
  - name: zero
    share: 2
    match: [{subsystem: mem, kernel: zero}]
  - name: "null"
    dra: true
    match: [{subsystem: mem, kernel: "null"}]
"""
NODE = "n1"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class PodResources:
    """The kubelet's side of pod-resources v1, answering from a fixed list of pods."""

    def __init__(self, pods, serve_get: bool = True) -> None:
        self.pods = pods
        self.serve_get = serve_get
        self.calls: list[str] = []

    def List(self, request, context):
        self.calls.append("List")
        pb, _ = api.pod_resources_api()
        return pb.ListPodResourcesResponse(pod_resources=self.pods)

    def Get(self, request, context):
        self.calls.append("Get")
        if not self.serve_get:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Get is not enabled")
        pb, _ = api.pod_resources_api()
        for pod in self.pods:
            if (pod.namespace, pod.name) == (request.pod_namespace, request.pod_name):
                return pb.GetPodResourcesResponse(pod_resources=pod)
        context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_name} not found")

    def GetAllocatableResources(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")


@pytest.fixture
def workdir():
    directory = tempfile.mkdtemp(prefix="dps", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def config_path(workdir):
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as f:
        f.write(CONFIG)
    return path


@pytest.fixture
def ids(config_path):
    rows = discover(config_path)
    zero = sorted(r.id for r in rows if r.resource == "hostkit.io/zero")
    null = [r.id for r in rows if r.resource == "hostkit.io/null"]
    assert len(zero) == 2 and len(null) == 1
    return {"zero": zero, "null": device_name(null[0])}


def pods(ids):
    pb, _ = api.pod_resources_api()
    claim = pb.DynamicResource(claim_name="gpu-claim", claim_namespace="b", claim_resources=[
        pb.ClaimResource(driver_name="dra.hostkit.io", pool_name=f"{NODE}-null",
                         device_name=ids["null"],
                         cdi_devices=[pb.CDIDevice(name="dra.hostkit.io/null=x")]),
        pb.ClaimResource(driver_name="other.example.com", pool_name="p", device_name="d"),
    ])
    gone_claim = pb.DynamicResource(claim_name="old", claim_namespace="c", claim_resources=[
        pb.ClaimResource(driver_name="dra.hostkit.io", pool_name=f"{NODE}-null",
                         device_name="mem-gone00000000"),
    ])
    return [
        pb.PodResources(name="p1", namespace="a", containers=[
            pb.ContainerResources(name="c1", devices=[
                pb.ContainerDevices(resource_name="hostkit.io/zero", device_ids=[ids["zero"][0]]),
                pb.ContainerDevices(resource_name="example.com/other", device_ids=["x"]),
            ]),
        ]),
        pb.PodResources(name="p2", namespace="b", containers=[
            pb.ContainerResources(name="c2", dynamic_resources=[claim]),
        ]),
        pb.PodResources(name="p3", namespace="c", containers=[
            pb.ContainerResources(name="c3", devices=[
                pb.ContainerDevices(resource_name="hostkit.io/zero",
                                    device_ids=["mem-vanished0000-1"]),
            ], dynamic_resources=[gone_claim]),
        ]),
    ]


@pytest.fixture
def kubelet(workdir, ids):
    """Returns a function starting the pod-resources server; stopped at the end."""
    servers = []

    def start(serve_get: bool = True):
        _, pb_grpc = api.pod_resources_api()
        socket = os.path.join(workdir, "kubelet.sock")
        servicer = PodResources(pods(ids), serve_get)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{socket}")
        server.start()
        servers.append(server)
        return socket, servicer

    yield start
    for server in servers:
        server.stop(None).wait(5)


def run_status(capsys, *argv):
    code = cli.main(["status", "--node-name", NODE, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_lists_holders_of_both_apis_and_held_devices_that_vanished(
    kubelet, config_path, ids, capsys, restore_logging
):
    socket, servicer = kubelet()
    code, out, _ = run_status(capsys, "--config", config_path, "--pod-resources-socket", socket,
                              "--json")
    assert code == 0
    doc = json.loads(out)
    rows = {(d["resource"], d["device"]): d for d in doc["devices"]}
    held = rows[("hostkit.io/zero", ids["zero"][0])]
    assert held["present"] and held["api"] == "device-plugin"
    assert held["holders"] == [{"namespace": "a", "pod": "p1", "container": "c1", "claim": ""}]
    assert rows[("hostkit.io/zero", ids["zero"][1])]["holders"] == []
    dra = rows[("hostkit.io/null", ids["null"])]
    assert dra["api"] == "dra" and dra["pool"] == f"{NODE}-null" and dra["present"]
    assert dra["holders"] == [{"namespace": "b", "pod": "p2", "container": "c2",
                               "claim": "b/gpu-claim"}]
    vanished_dp = rows[("hostkit.io/zero", "mem-vanished0000-1")]
    vanished_dra = rows[("hostkit.io/null", "mem-gone00000000")]
    assert not vanished_dp["present"] and not vanished_dra["present"]
    assert vanished_dra["holders"][0]["claim"] == "c/old"
    assert doc["vanished_held"] == {"hostkit.io/zero": 1, "hostkit.io/null": 1}
    assert not any(d["resource"] == "example.com/other" or d["device"] == "d"
                   for d in doc["devices"])
    assert servicer.calls == ["List"]
    # The table says the same.
    code, out, err = run_status(capsys, "--config", config_path, "--pod-resources-socket",
                                socket)
    assert code == 0
    assert "VANISHED" in out and "b/p2/c2 (claim b/gpu-claim)" in out
    assert "2 held device(s) no longer present" in err


@pytest.mark.parametrize("serve_get", [True, False], ids=["Get", "List-fallback"])
def test_status_of_one_pod_uses_get_where_available(
    kubelet, config_path, ids, capsys, restore_logging, serve_get
):
    socket, servicer = kubelet(serve_get)
    code, out, _ = run_status(capsys, "--config", config_path, "--pod-resources-socket", socket,
                              "--pod", "b/p2", "--json")
    assert code == 0
    devices = json.loads(out)["devices"]
    assert [(d["resource"], d["device"]) for d in devices] == [("hostkit.io/null", ids["null"])]
    assert servicer.calls == (["Get"] if serve_get else ["Get", "List"])


def test_status_without_a_kubelet_fails_naming_the_socket(config_path, workdir, capsys,
                                                          restore_logging):
    missing = os.path.join(workdir, "none.sock")
    code, _, err = run_status(capsys, "--config", config_path, "--pod-resources-socket",
                              missing)
    assert code == 1
    assert missing in err


def test_the_metric_counts_held_devices_that_vanished(kubelet, config_path, ids):
    socket, _ = kubelet()
    config = load_config(config_path)
    present = discover(config)
    collector = HeldVanishedCollector(
        lambda held: device_status(config, NODE, present, held), socket)
    [family] = list(collector.collect())
    assert family.name == "hostkit_device_plugin_held_devices_vanished"
    assert {s.labels["resource"]: s.value for s in family.samples} == {
        "hostkit.io/zero": 1, "hostkit.io/null": 1}


def test_the_default_socket_matches_the_api_constant():
    assert cli.DEFAULT_POD_RESOURCES_SOCKET == api.POD_RESOURCES_SOCKET
