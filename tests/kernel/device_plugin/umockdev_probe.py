"""Runs inside ``umockdev-run``: start the domain on a config, print what it serves as JSON.

Used by test_umockdev.py; the umockdev testbed replaces /sys and /dev for this
process only, so the real discovery code (pyudev, sysfs reads, node stat and
open) runs unchanged against the recorded device tree.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from device_plugin.plugin import DevicePluginDomain, discover


def main(config_path: str) -> None:
    domain = DevicePluginDomain(config_path, watch_config=False)
    domain.start(ready_timeout=20)
    try:
        resources: dict[str, list[dict[str, Any]]] = {}
        out: dict[str, Any] = {"source": domain.discovery.source, "resources": resources}
        for name, resource in domain.catalog.resources().items():
            units = []
            for unit in resource.snapshot().units:
                entry: dict[str, Any] = {
                    "id": unit.id, "healthy": unit.healthy, "reason": unit.reason,
                    "nodes": list(unit.nodes), "numa": list(unit.numa_nodes),
                }
                if unit.healthy:
                    answer = resource.allocate([unit.id])
                    entry["grants"] = [[g.container_path, g.host_path, g.permissions]
                                       for g in answer.devices]
                    entry["envs"] = dict(answer.envs)
                units.append(entry)
            resources[name] = units
        out["discover"] = [row.as_dict() for row in discover(config_path)]
    finally:
        domain.stop()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
