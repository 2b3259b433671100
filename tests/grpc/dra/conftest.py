"""Fixtures for the DRA wire tests: a kubelet root, the plugin-watcher stand-in, a driver.

The driver is the real one (``DraPlugin`` over ``ClaimPreparer``, the device
plugin's ``ResourceState`` and ``HealthFeed``) on real unix sockets; the only
fake is the API server's side, ``doubles.FakeClaims`` (tests/e2e covers a real one).
Device nodes are plain files under a temporary directory, so the ``open`` health
probe can be made to fail by removing one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from demo.dra_kubelet import PluginWatcherStandIn
from device_plugin.config import parse_config
from device_plugin.dra.checkpoint import CheckpointStore
from device_plugin.dra.devices import CatalogDevices, device_name, pool_name
from device_plugin.dra.health import HealthFeed
from device_plugin.dra.lifecycle import DraPlugin
from device_plugin.dra.prepare import ClaimPreparer
from device_plugin.registry import ResourceState
from tests.grpc.dra.doubles import DRIVER, FakeClaims
from tests.unit.device_plugin.records import misc

NODE = "node-a"


@dataclass
class Driver:
    root: str
    dev_dir: Path
    state: ResourceState
    claims: FakeClaims
    watcher: PluginWatcherStandIn
    plugin: DraPlugin
    preparer: ClaimPreparer
    feed: HealthFeed
    cdi_dir: str
    pool: str
    names: list[str] = field(default_factory=list)  # DRA device names, node order

    def device(self, i: int) -> str:
        return self.names[i]


@pytest.fixture
def kubelet_root() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="dra", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_driver(kubelet_root: str) -> Iterator[Callable[..., Driver]]:
    started: list[tuple[DraPlugin, HealthFeed, PluginWatcherStandIn | None]] = []
    dev_dir = Path(kubelet_root) / "dev"
    dev_dir.mkdir(exist_ok=True)
    nodes = [dev_dir / f"hk{i}" for i in range(2)]
    for node in nodes:
        node.touch()
    config = parse_config({
        "resources": [{
            "name": "widget",
            "match": [{"subsystem": "misc", "kernel": "hk*"}],
            "env": {"WIDGET": "{ids}", "WIDGET_PATHS": "{paths}"},
            "mounts": [{"host_path": "/usr/share", "container_path": "/opt/share",
                        "read_only": True}],
            "health": {"probe": "open", "interval_seconds": 3600},
        }],
    })
    resource = config.resources[0]
    feeds: list[HealthFeed] = []  # every started driver's feed hears of changes

    def changed() -> None:
        for feed in feeds:
            feed.changed()

    state = ResourceState(resource, on_change=changed)
    state.update_devices([misc(n.name, str(n)) for n in nodes])
    claims = FakeClaims()

    def start(*, watcher: PluginWatcherStandIn | None = None,
              known_versions: tuple[str, ...] | None = None, **plugin_args: Any) -> Driver:
        if watcher is None:
            watcher = PluginWatcherStandIn(kubelet_root, *(
                (known_versions,) if known_versions else ()))
            watcher.start()
            own_watcher: PluginWatcherStandIn | None = watcher
        else:
            own_watcher = None
        devices = CatalogDevices(NODE, lambda: {resource.name: state})
        cdi_dir = str(Path(kubelet_root) / "cdi")
        preparer = ClaimPreparer(
            DRIVER, devices, claims, CheckpointStore(str(Path(kubelet_root) / "claims")),
            cdi_dir, "hostkit.io")
        feed = HealthFeed(devices, resend_seconds=0.5)
        feeds.append(feed)
        plugin = DraPlugin(DRIVER, preparer, feed, kubelet_root,
                           **{"retry_seconds": 0.1, **plugin_args})
        plugin.start()
        started.append((plugin, feed, own_watcher))
        names = [device_name(u.id) for u in sorted(state.units, key=lambda u: u.nodes)]
        return Driver(kubelet_root, dev_dir, state, claims, watcher, plugin, preparer, feed,
                      cdi_dir, pool_name(NODE, resource), names)

    try:
        yield start
    finally:
        for plugin, feed, watcher in reversed(started):
            feed.close()
            plugin.stop()
            if watcher is not None:
                watcher.stop()
