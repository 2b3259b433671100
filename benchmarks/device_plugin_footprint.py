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

It also measures the floor under the RSS goal: a bare process of the same
interpreter that imports only the runtime dependencies the issue prescribes
(grpcio, protobuf, pyudev, psutil, prometheus-client, PyYAML, grpc health) and
serves three idle gRPC servers with the health service, no hostkit code at all.
Whatever the daemon does, its RSS cannot go below that figure.

Run: ``python -m benchmarks.device_plugin_footprint [seconds]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


def _floor_child() -> None:
    """The bare process: prescribed imports, three idle servers, print RSS in kB."""
    import asyncio
    import threading
    from concurrent import futures

    import grpc
    import prometheus_client  # noqa: F401
    import yaml  # noqa: F401
    from grpc_health.v1 import health, health_pb2_grpc

    directory = tempfile.mkdtemp(prefix="dpf", dir="/tmp")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def serve() -> list[grpc.aio.Server]:
        servers = []
        for index in range(3):
            server = grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(4))
            servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            server.add_insecure_port(f"unix://{directory}/{index}.sock")
            await server.start()
            servers.append(server)
        return servers

    servers = asyncio.run_coroutine_threadsafe(serve(), loop).result(30)
    time.sleep(2.0)
    print(psutil.Process().memory_info().rss // 1000, len(servers))
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


def floor_rss_mb() -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_plugin_footprint", "--floor-child"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    return int(out[0]) / 1000


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
        ("RSS floor: prescribed imports + 3 idle servers", f"{floor_rss_mb():.1f} MB", "-"),
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
    if sys.argv[1:] == ["--floor-child"]:
        _floor_child()
    else:
        main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
