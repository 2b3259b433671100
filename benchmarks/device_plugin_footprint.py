"""RSS and idle CPU of the real daemon serving three resources (goal <= 40 MB, < 0.1 %).

Starts ``python -m device_plugin serve`` with three resources registered with the
kubelet stand-in, lets it settle, then samples its RSS (and USS/PSS) and the CPU
time it uses while idle over ``seconds`` (default 10).  Also lists its threads.

Run: ``python -m benchmarks.device_plugin_footprint [seconds]``.
"""

from __future__ import annotations

import sys
import time

import psutil

from benchmarks.device_plugin_harness import MEM_CONFIG, MEM_RESOURCES, daemon, table


def main(seconds: float = 10.0) -> None:
    with daemon(MEM_CONFIG, MEM_RESOURCES) as run:
        proc = psutil.Process(run.proc.pid)
        time.sleep(2.0)  # settle: first snapshots sent, import-time garbage collected
        before = proc.cpu_times()
        wall = time.monotonic()
        time.sleep(seconds)
        after = proc.cpu_times()
        elapsed = time.monotonic() - wall
        memory = proc.memory_full_info()
        threads = proc.num_threads()
    cpu = (after.user + after.system - before.user - before.system) / elapsed * 100
    print(f"daemon footprint, 3 resources registered, idle for {elapsed:.1f} s")
    print(table([
        ("RSS", f"{memory.rss / 1e6:.1f} MB", "<= 40 MB"),
        ("USS (private)", f"{memory.uss / 1e6:.1f} MB", "-"),
        ("idle CPU", f"{cpu:.3f} %", "< 0.1 %"),
        ("threads", str(threads), "-"),
    ]))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
