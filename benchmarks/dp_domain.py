"""Device plugin domain figures (no gRPC): uevent -> snapshot, and big snapshots.

Run as root from the repository root:

    /work/venv/bin/python -m benchmarks.dp_domain [--events 100]

1. uevent -> snapshot seen by a waiter: a loop device of our own (sparse file in
   a private /tmp dir) is attached and detached repeatedly; a thread blocked in
   ``wait_for_change`` (like a ListAndWatch stream) records, for each new
   generation, now minus the time discovery read the first uevent of the burst
   (``ResourceState.last_event_monotonic``).
2. Building a snapshot of 10,000 IDs (share count) and its approximate size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.device_plugin_harness import percentile
from device_plugin.config import parse_yaml
from device_plugin.matching import DeviceInfo
from device_plugin.plugin import DevicePluginDomain
from device_plugin.registry import ResourceState
from plugin_runtime import commands


def uevent_latency(events: int) -> None:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="dpd-bench-"))
    backing = directory / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    config = parse_yaml(f"""
resync_seconds: 3600
resources:
  - name: bench-loop
    match: [{{subsystem: block, attributes: {{loop/backing_file: "{directory}/*"}}}}]
""")
    domain = DevicePluginDomain(config=config)
    domain.start()
    resource = domain.catalog.resources()["hostkit.io/bench-loop"]
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        seen = resource.snapshot().generation
        while not stop.is_set():
            snap = resource.wait_for_change(seen, stop, 1.0)
            now = time.monotonic()
            if snap.generation != seen:
                seen = snap.generation
                if resource.last_event_monotonic is not None:
                    latencies.append(now - resource.last_event_monotonic)

    watcher = threading.Thread(target=watch)
    watcher.start()
    dev = None
    try:
        for i in range(events):
            if i % 2 == 0:
                dev = commands.run(["losetup", "--find", "--show", str(backing)],
                                   timeout=30).stdout.strip()
                want = 1
            else:
                assert dev is not None
                commands.run(["losetup", "--detach", dev], timeout=30)
                dev = None
                want = 0
            deadline = time.monotonic() + 10
            while len(resource.snapshot().units) != want and time.monotonic() < deadline:
                resource.wait_for_change(resource.snapshot().generation, stop, 0.5)
    finally:
        if dev is not None:
            commands.run(["losetup", "--detach", dev], timeout=30, check=False)
        stop.set()
        resource.wake()
        watcher.join()
        domain.stop()
        shutil.rmtree(directory, ignore_errors=True)
    ms = [v * 1000 for v in latencies]
    print(f"uevent -> snapshot (waiter woke), {len(ms)} changes: "
          f"p50 {statistics.median(ms):.2f} ms, p99 {percentile(ms, 99):.2f} ms, "
          f"max {max(ms):.2f} ms")


def big_snapshot() -> None:
    config = parse_yaml("resources:\n  - {name: many, match: [{subsystem: misc}], share: 10000}\n")
    state = ResourceState(config.resources[0])
    device = DeviceInfo("/sys/devices/virtual/misc/fuse", "misc", None, "fuse", "/dev/fuse",
                        numa_node=0)
    started = time.perf_counter()
    state.update_devices([device])
    elapsed = time.perf_counter() - started
    snap = state.snapshot()
    # ListAndWatch entry: ID + "Healthy" + topology{nodes{ID}} + framing, about 12 bytes.
    approx = sum(len(u.id) + len("Healthy") + 12 for u in snap.units)
    print(f"snapshot of {len(snap.units)} IDs built in {elapsed * 1000:.1f} ms, "
          f"~{approx / 1024:.0f} KiB on the wire (limit 4096 KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100)
    args = parser.parse_args()
    big_snapshot()
    uevent_latency(args.events)


if __name__ == "__main__":
    main()
