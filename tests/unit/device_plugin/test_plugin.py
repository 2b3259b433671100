"""The domain facade: configuration transform on start and on reload."""

from __future__ import annotations

import dataclasses

from device_plugin.config import Config
from device_plugin.plugin import DevicePluginDomain, DiscoveredDevice


def test_transform_applies_to_first_and_reloaded_configs(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text("resources:\n  - {name: a, match: [{subsystem: misc, kernel: a}]}\n")

    def override(config: Config) -> Config:
        return dataclasses.replace(config, cdi=dataclasses.replace(config.cdi, dir="/x/cdi"))

    domain = DevicePluginDomain(path, transform=override)
    try:
        assert domain.config.cdi.dir == "/x/cdi"
        path.write_text("resources:\n  - {name: b, match: [{subsystem: misc, kernel: b}]}\n")
        assert domain.reloader is not None and domain.reloader.reload_now()
        assert domain.config.cdi.dir == "/x/cdi"
        assert set(domain.catalog.resources()) == {"hostkit.io/b"}
    finally:
        domain.stop()


def test_embedded_default_has_no_reload_watcher():
    domain = DevicePluginDomain(None)
    try:
        assert domain.reloader is None
        assert len(domain.catalog.resources()) == 3
    finally:
        domain.stop()


def test_discovered_device_as_dict():
    row = DiscoveredDevice("hostkit.io/a", "a-1", ("/dev/a",), "Healthy", (0,))
    assert row.as_dict() == {"resource": "hostkit.io/a", "id": "a-1", "nodes": ["/dev/a"],
                             "health": "Healthy", "numa_nodes": [0], "reason": ""}
