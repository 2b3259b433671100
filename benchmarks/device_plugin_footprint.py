"""RSS and idle CPU of the real daemon serving three resources (goal <= 40 MB, < 0.1 %).

Starts ``python -m device_plugin serve`` with three resources registered with the
kubelet stand-in and, like the DaemonSet, the metrics and /healthz endpoints on
(on ephemeral loopback ports), lets it settle, then samples its RSS (and USS) and the CPU time
it uses while idle over ``seconds`` (default 10), both from the kernel's
tick-sampled process times (steps of 0.1 % over 10 s, too coarse near the goal)
and as the sum of the threads' scheduler run times (nanoseconds, from
/proc/PID/task/TID/schedstat).  The machine is shared: kernel uevents of other
processes' devices (loop devices of concurrent tests) reach the daemon's
kernel-source monitor too, so the uevents seen machine-wide in the window are
counted and the busiest threads are listed (CPU from schedstat, wakeups from
voluntary context switches).

Run: ``python -m benchmarks.device_plugin_footprint [seconds]``.
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pyudev

from benchmarks.device_plugin_harness import MEM_CONFIG, MEM_RESOURCES, daemon, table


def _threads(pid: int) -> dict[str, tuple[str, int, int]]:
    out: dict[str, tuple[str, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = next(
                    int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt")
                )
        except (OSError, StopIteration):
            continue
        out[tid] = (comm, run_ns, switches)
    return out


def main(seconds: float = 10.0) -> None:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.start()
    endpoints = ("--metrics-address", "127.0.0.1:0", "--health-address", "127.0.0.1:0")
    with daemon(MEM_CONFIG, MEM_RESOURCES, extra_args=endpoints) as run:
        proc = psutil.Process(run.proc.pid)
        time.sleep(2.0)  # settle: first snapshots sent, import-time garbage collected
        while monitor.poll(timeout=0) is not None:
            pass
        before = proc.cpu_times()
        threads_before = _threads(proc.pid)
        wall = time.monotonic()
        uevents = 0
        while (left := seconds - (time.monotonic() - wall)) > 0:
            if monitor.poll(timeout=left) is not None:
                uevents += 1
        after = proc.cpu_times()
        threads_after = _threads(proc.pid)
        elapsed = time.monotonic() - wall
        memory = proc.memory_full_info()
    cpu = (after.user + after.system - before.user - before.system) / elapsed * 100
    busiest = sorted(
        (
            (a[1] - threads_before[tid][1], a[2] - threads_before[tid][2], tid, a[0])
            for tid, a in threads_after.items()
            if tid in threads_before
        ),
        reverse=True,
    )
    run_total = sum(b[0] for b in busiest)
    print(f"daemon footprint, 3 resources registered, metrics and /healthz on, "
          f"idle for {elapsed:.1f} s")
    print(table([
        ("RSS", f"{memory.rss / 1e6:.1f} MB", "<= 40 MB"),
        ("USS (private)", f"{memory.uss / 1e6:.1f} MB", "-"),
        ("idle CPU", f"{cpu:.3f} %", "< 0.1 %"),
        ("idle CPU, threads' run time", f"{run_total / 1e9 / elapsed * 100:.3f} %", "< 0.1 %"),
        ("threads", str(len(threads_after)), "-"),
        ("kernel uevents machine-wide in the window", str(uevents), "-"),
    ]))
    total_wakeups = sum(b[1] for b in busiest)
    rest = sum(b[0] for b in busiest[1:]) / 1e9 / elapsed * 100
    print(f"busiest threads (of {total_wakeups / elapsed:.1f} wakeups/s in all):")
    for run_ns, wakeups, tid, comm in busiest[:5]:
        print(f"  tid {tid} {comm:16s} {run_ns / 1e9 / elapsed * 100:.3f} % CPU "
              f"{wakeups / elapsed:.1f} wakeups/s")
    print(f"all threads but the busiest: {rest:.3f} % CPU")

if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
