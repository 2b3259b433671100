"""One resource with 10,000 IDs: build and send a snapshot (goal <= 100 ms, < 4 MiB).

The real domain (config with ``share: 10000`` on /dev/null) behind the real wire
layer, in one process with the kubelet stand-in.  Each round hands the catalog
an inventory with /dev/null (10,000 IDs) or without it (0 IDs), the way
discovery does after a uevent, and times publish -> the stand-in holding the
parsed 10,000-device snapshot.  That covers the domain's unit building, the
encoding, gRPC and the stand-in's parsing (sharing this process's GIL, so it
is an upper bound).  The encoding alone and the message size are printed too.

Run: ``python -m benchmarks.device_plugin_snapshot [rounds]`` (default 20).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

import pyudev

from benchmarks.device_plugin_harness import percentile, table
from demo.kubelet import KubeletStandIn
from device_plugin import api
from device_plugin.config import parse_yaml
from device_plugin.discovery import enumerate_devices
from device_plugin.lifecycle import PluginManager
from device_plugin.matching import attribute_needs
from device_plugin.registry import Catalog
from device_plugin.servicer import encode_snapshot

CONFIG = """\
domain: hostkit.io
resources:
  - name: shared-null
    match: [{subsystem: mem, kernel: "null"}]
    share: 10000
"""
NAME = "hostkit.io/shared-null"


def main(rounds: int = 20) -> None:
    config = parse_yaml(CONFIG, "<benchmark>")
    inventory = enumerate_devices(pyudev.Context(), config.subsystems(), attribute_needs(config))
    with_null = tuple(d for group in inventory.values() for d in group)
    without = tuple(d for d in with_null if d.devnode != "/dev/null")
    directory = tempfile.mkdtemp(prefix="dps", dir="/tmp")
    kubelet = KubeletStandIn(directory)
    kubelet.start()
    catalog = Catalog(config)
    catalog.publish_inventory(with_null)
    manager = PluginManager(catalog, directory)
    sends: list[float] = []
    encodes: list[float] = []
    size = 0
    try:
        manager.start()
        kubelet.wait_registered(NAME, timeout=30)
        for _ in range(rounds):
            catalog.publish_inventory(without)
            kubelet.wait_snapshot(NAME, lambda s: not s.devices, timeout=30)
            started = time.monotonic()
            catalog.publish_inventory(with_null, started)
            snap = kubelet.wait_snapshot(NAME, lambda s: len(s.devices) == 10_000, timeout=30)
            sends.append(snap.received - started)
        snapshot = catalog.resources()[NAME].snapshot()
        for _ in range(rounds):
            encoded = encode_snapshot(NAME, snapshot)
            encodes.append(encoded.build_seconds)
            size = encoded.size
    finally:
        manager.stop()
        kubelet.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"one resource with {len(snapshot.units)} IDs, {rounds} rounds")
    print(table([
        ("publish -> stand-in has it, p50", f"{percentile(sends, 50) * 1000:.1f} ms", "<= 100 ms"),
        ("publish -> stand-in has it, max", f"{max(sends) * 1000:.1f} ms", "-"),
        ("encode only (message + size), p50", f"{percentile(encodes, 50) * 1000:.1f} ms", "-"),
        ("message size", f"{size} bytes ({size / 1024:.0f} KiB)",
         f"< {api.MAX_MESSAGE_BYTES} bytes"),
    ]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
