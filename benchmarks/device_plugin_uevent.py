"""Kernel uevent -> updated snapshot at the kubelet stand-in (goal p50 <= 20 ms, p99 <= 100 ms).

Needs root.  Creates a 1 MiB loop device of its own and runs the real daemon
(``python -m device_plugin serve``, kernel uevent source when udevd is absent)
with a config matching only that loop device, whose health probe reads the
device's sysfs ``ro`` attribute.  Each event flips the device's read-only flag
(BLKROSET) and writes ``change`` to /sys/class/block/loopN/uevent: a real kernel
uevent, which the daemon turns into a re-read of that one device (not of the
whole block subsystem), a health flip and a new full snapshot.  Timed from just
before the flip to the stand-in receiving the snapshot.  The loop device is
detached in every case.

Run: ``python -m benchmarks.device_plugin_uevent [events]`` (default 150, bounded
to about 60 s).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import tempfile
import time

from benchmarks.device_plugin_harness import daemon, percentile, table
from demo.kubelet import Snapshot
from plugin_runtime import commands

BLKROSET = 0x125D
NAME = "hostkit.io/bench-loop"


def _config(kernel: str) -> str:
    return f"""\
domain: hostkit.io
resync_seconds: 3600
resources:
  - name: bench-loop
    match: [{{subsystem: block, kernel: "{kernel}"}}]
    health: {{probe: attribute, attribute: ro, healthy_values: ["0"], interval_seconds: 3600}}
"""


def main(events: int = 150) -> None:
    backing_dir = tempfile.mkdtemp(prefix="dpu", dir="/tmp")
    backing = os.path.join(backing_dir, "loop.img")
    with open(backing, "wb") as img:
        img.truncate(1024 * 1024)
    device = commands.run(["losetup", "-f", "--show", backing], timeout=10).stdout.strip()
    kernel = os.path.basename(device)
    latencies: list[float] = []
    fd = -1
    try:
        fd = os.open(device, os.O_RDONLY)
        uevent = f"/sys/class/block/{kernel}/uevent"
        with daemon(_config(kernel), [NAME]) as run:
            kubelet = run.kubelet
            first = kubelet.wait_snapshot(NAME, lambda s: len(s.devices) == 1, timeout=10)
            (device_id,) = first.devices
            readonly = False
            deadline = time.monotonic() + 60
            for _ in range(events):
                readonly = not readonly
                want = "Unhealthy" if readonly else "Healthy"
                started = time.monotonic()
                fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(readonly)))
                with open(uevent, "w") as f:
                    f.write("change")

                def flipped(s: Snapshot, w: str = want) -> bool:
                    return s.devices.get(device_id, ("", ()))[0] == w

                snap = kubelet.wait_snapshot(NAME, flipped, timeout=10)
                latencies.append(snap.received - started)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
    finally:
        if fd >= 0:
            fcntl.ioctl(fd, BLKROSET, struct.pack("i", 0))
            os.close(fd)
        commands.run(["losetup", "-d", device], timeout=10)
        os.unlink(backing)
        os.rmdir(backing_dir)
    ms = [v * 1000 for v in latencies]
    print(f"uevent -> snapshot at the kubelet stand-in, {len(ms)} events on {device}")
    print(table([
        ("p50", f"{percentile(ms, 50):.1f} ms", "<= 20 ms"),
        ("p90", f"{percentile(ms, 90):.1f} ms", "-"),
        ("p99", f"{percentile(ms, 99):.1f} ms", "<= 100 ms"),
        ("max", f"{max(ms):.1f} ms", "-"),
    ]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
