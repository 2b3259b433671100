"""The DRA kubelet plugin over real devices: loop devices attached and detached here.

Real udev discovery (kernel uevents) feeds the catalog; the DRA plugin is
registered with the plugin-watcher stand-in.  A claim for the loop device is
prepared with a CDI spec naming its device node; when the device is detached,
the health stream drops it and a new claim for it fails, while the prepared
claim still unprepares.  Claims come from a fake reader (tests/e2e reads real
ones); only loop devices backed in this test's directory are matched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.dra_kubelet import PluginWatcherStandIn
from device_plugin.dra.checkpoint import CheckpointStore
from device_plugin.dra.devices import CatalogDevices, device_name, pool_name
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.lifecycle import DraPlugin
from device_plugin.dra.prepare import ClaimPreparer
from device_plugin.plugin import DevicePluginDomain
from tests.grpc.dra.doubles import FakeClaims, claim_object
from tests.kernel.device_plugin.test_loop_hotplug import WAIT, config_for, wait_until
from tests.loop_devices import LoopDevices, sparse_file

DRIVER = "hostkit.io"
NODE = "kernel-node"


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="drk-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loops() -> Iterator[LoopDevices]:
    devices = LoopDevices()
    try:
        yield devices
    finally:
        devices.cleanup()


def test_a_loop_device_is_prepared_and_its_detach_reaches_the_kubelet(root, loops):
    domain = DevicePluginDomain(config=config_for(root, "    dra: true"))
    domain.start(ready_timeout=WAIT)
    (resource,) = domain.catalog.resources().values()
    assert resource.config.dra
    devices = CatalogDevices(NODE, lambda: domain.catalog.resources())
    feed = HealthFeed(devices)
    domain.catalog.subscribe(feed.changed)
    claims = FakeClaims()
    preparer = ClaimPreparer(DRIVER, devices, claims, CheckpointStore(str(root / "claims")),
                             str(root / "cdi"), "hostkit.io")
    plugin = DraPlugin(DRIVER, preparer, feed, str(root / "kubelet"))
    watcher = PluginWatcherStandIn(str(root / "kubelet"))
    watcher.start()
    plugin.start()
    watch = None
    try:
        watcher.wait_registered(DRIVER)
        watch = watcher.watch_health(DRIVER)
        watch.wait_for(lambda w: w.lists >= 1)
        dev = loops.attach(sparse_file(root))
        (unit,) = wait_until(resource, lambda s: len(s.units) == 1, f"{dev} to appear").units
        name, pool = device_name(unit.id), pool_name(NODE, resource.config)
        listed = watch.wait_for(lambda w: any(d.device.device_name == name for d in w.devices))
        assert [(d.device.pool_name, d.health) for d in listed] == [(pool, 1)]

        claims.put(claim_object("disk", "uid-disk", [name], pool=pool, driver=DRIVER))
        response = watcher.prepare(DRIVER, [("default", "disk", "uid-disk")])
        assert response.claims["uid-disk"].error == ""
        with open(root / "cdi" / "hostkit.io-claim_uid-disk.json") as handle:
            spec = json.load(handle)
        (node,) = spec["devices"][0]["containerEdits"]["deviceNodes"]
        assert (node["hostPath"], node["permissions"]) == (dev, "rwm")

        loops.detach(dev)
        wait_until(resource, lambda s: s.units == (), f"{dev} to leave")
        watch.wait_for(lambda w: not any(d.device.device_name == name for d in w.devices))
        claims.put(claim_object("again", "uid-again", [name], pool=pool, driver=DRIVER))
        error = watcher.prepare(DRIVER, [("default", "again", "uid-again")]).claims[
            "uid-again"].error
        assert "not on this node now" in error
        assert watcher.unprepare(DRIVER, [("default", "disk", "uid-disk")]).claims[
            "uid-disk"].error == ""
        assert os.listdir(root / "cdi") == []
    finally:
        if watch is not None:
            watch.cancel()
        feed.close()
        plugin.stop()
        watcher.stop()
        domain.stop()
