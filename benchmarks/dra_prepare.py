"""NodePrepareResources for one claim, including the claim read (goal p50 <= 10 ms).

The driver's kubelet side (``DraPlugin`` over ``ClaimPreparer`` reading claims
from a real kube-apiserver through lightkube) is called by the plugin-watcher
stand-in over its registered unix socket, as the kubelet calls it.  Each round
unprepares the claim first, so every timed prepare reads the claim, maps the
device, writes the CDI spec and the checkpoint.  The repeat of a prepared claim
(answered from the checkpoint, no read) is shown too.

Run: ``python -m benchmarks.dra_prepare [rounds] [--kubeconfig FILE]`` (default 200
rounds).  Without ``--kubeconfig`` it starts etcd and kube-apiserver with the
end-to-end tier's control plane (root and the shared Kubernetes binaries).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.device_plugin_harness import percentile, table
from demo.dra_kubelet import PluginWatcherStandIn
from device_plugin.config import parse_config
from device_plugin.dra.checkpoint import CheckpointStore
from device_plugin.dra.claims import ApiClaimReader
from device_plugin.dra.devices import CatalogDevices, device_name, pool_name
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.lifecycle import DraPlugin
from device_plugin.dra.prepare import ClaimPreparer
from device_plugin.kube import ApiAccess, make_client
from device_plugin.matching import DeviceInfo
from device_plugin.registry import ResourceState

DRIVER = "hostkit.io"
NODE = "bench-node"


@contextlib.contextmanager
def api_server(kubeconfig: str | None) -> Iterator[str]:
    if kubeconfig is not None:
        yield kubeconfig
        return
    from tests.e2e import binaries
    from tests.e2e.cluster import ControlPlane, Run

    run = Run()
    plane = ControlPlane(run, binaries.locate())
    try:
        plane.start()
        yield str(plane.admin_kubeconfig)
    finally:
        plane.stop()
        run.close()


def main(rounds: int, kubeconfig: str | None) -> None:
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.types import PatchType

    claim_kind: Any = create_namespaced_resource(
        "resource.k8s.io", "v1", "ResourceClaim", "resourceclaims")
    root = tempfile.mkdtemp(prefix="drab", dir="/tmp")
    node = Path(root) / "widget0"
    node.touch()
    config = parse_config({"resources": [{
        "name": "widget", "dra": True, "match": [{"subsystem": "misc", "kernel": "widget*"}],
        "env": {"WIDGET": "{ids}"}}]})
    resource = config.resources[0]
    state = ResourceState(resource)
    state.update_devices([DeviceInfo("/sys/devices/virtual/misc/widget0", "misc", None,
                                     "widget0", str(node))])
    (unit,) = state.units
    with api_server(kubeconfig) as kubeconfig_path:
        access = ApiAccess(kubeconfig_path)
        admin = make_client(access)
        reader = ApiClaimReader(make_client(access))
        claim = claim_kind(metadata={"name": "bench", "namespace": "default"}, spec={
            "devices": {"requests": [{"name": "dev", "exactly": {"deviceClassName": "x"}}]}})
        uid = admin.create(claim).metadata.uid
        # What the scheduler writes: the allocation, through the status subresource.
        admin.patch(claim_kind.Status, "bench", {"status": {"allocation": {"devices": {
            "results": [{"request": "dev", "driver": DRIVER, "pool": pool_name(NODE, resource),
                         "device": device_name(unit.id)}]}}}},
            namespace="default", patch_type=PatchType.MERGE)
        devices = CatalogDevices(NODE, lambda: {resource.name: state})
        preparer = ClaimPreparer(DRIVER, devices, reader,
                                 CheckpointStore(f"{root}/claims"), f"{root}/cdi", "hostkit.io")
        feed = HealthFeed(devices)
        plugin = DraPlugin(DRIVER, preparer, feed, root)
        watcher = PluginWatcherStandIn(root)
        watcher.start()
        plugin.start()
        ref = [("default", "bench", uid)]
        fresh: list[float] = []
        repeat: list[float] = []
        try:
            watcher.wait_registered(DRIVER)
            for i in range(rounds + 20):
                watcher.unprepare(DRIVER, ref)
                started = time.perf_counter()
                response = watcher.prepare(DRIVER, ref)
                elapsed = time.perf_counter() - started
                assert response.claims[uid].error == "", response.claims[uid].error
                started = time.perf_counter()
                watcher.prepare(DRIVER, ref)
                again = time.perf_counter() - started
                if i >= 20:  # warm-up rounds: connections, caches
                    fresh.append(elapsed * 1000)
                    repeat.append(again * 1000)
        finally:
            watcher.unprepare(DRIVER, ref)
            plugin.stop()
            watcher.stop()
            feed.close()
            admin.delete(claim_kind, "bench", namespace="default")
            reader.close()
            admin.close()
            shutil.rmtree(root, ignore_errors=True)
    print(f"NodePrepareResources for one claim over {len(fresh)} rounds "
          "(kubelet stand-in -> DRA socket -> claim GET from kube-apiserver -> CDI spec + "
          "checkpoint)")
    print(table([
        ("prepare incl. claim read, p50", f"{percentile(fresh, 50):.2f} ms", "<= 10 ms"),
        ("prepare incl. claim read, p99", f"{percentile(fresh, 99):.2f} ms", "-"),
        ("repeat of a prepared claim, p50", f"{percentile(repeat, 50):.2f} ms", "-"),
    ]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=200)
    parser.add_argument("--kubeconfig", help="a running API server (default: start one)")
    args = parser.parse_args()
    main(args.rounds, args.kubeconfig)
