"""Allocate round trip, kubelet stand-in -> real daemon -> back (goal p50 <= 0.6 ms, p99 <= 1.5 ms).

Run: ``python -m benchmarks.device_plugin_allocate [calls]`` (default 2000, bounded
to about 30 s).
"""

from __future__ import annotations

import sys
import time

from benchmarks.device_plugin_harness import MEM_CONFIG, MEM_RESOURCES, daemon, percentile, table


def main(calls: int = 2000) -> None:
    with daemon(MEM_CONFIG, MEM_RESOURCES) as run:
        endpoint = run.kubelet.wait_registered("hostkit.io/null")
        ids = sorted(endpoint.snapshots[-1].healthy())
        for _ in range(200):  # warm up the channel and both interpreters
            run.kubelet.allocate("hostkit.io/null", ids[:1])
        samples: list[float] = []
        deadline = time.monotonic() + 30
        for i in range(calls):
            started = time.perf_counter()
            run.kubelet.allocate("hostkit.io/null", [ids[i % len(ids)]])
            samples.append(time.perf_counter() - started)
            if time.monotonic() > deadline:
                break
    ms = [s * 1000 for s in samples]
    print(f"Allocate round trip over {len(ms)} calls (one container request, real daemon)")
    print(table([
        ("Allocate p50", f"{percentile(ms, 50):.3f} ms", "<= 0.6 ms"),
        ("Allocate p99", f"{percentile(ms, 99):.3f} ms", "<= 1.5 ms"),
        ("Allocate max", f"{max(ms):.3f} ms", "-"),
    ]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
