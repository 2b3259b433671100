"""Kubelet restart -> every resource registered again (goal p50 <= 0.2 s).

Each round restarts the kubelet stand-in the way the real kubelet restarts: it
stops (every plugin stream drops), deletes every socket in the directory, and
serves kubelet.sock again.  Measured from the new kubelet.sock being served to
the Register call of each resource and to its first ListAndWatch snapshot.

Run: ``python -m benchmarks.device_plugin_restart [rounds]`` (default 30).
"""

from __future__ import annotations

import sys
import time

from benchmarks.device_plugin_harness import MEM_CONFIG, MEM_RESOURCES, daemon, percentile, table


def main(rounds: int = 30) -> None:
    register: list[float] = []
    snapshot: list[float] = []
    all_back: list[float] = []
    with daemon(MEM_CONFIG, MEM_RESOURCES) as run:
        kubelet = run.kubelet
        for _ in range(rounds):
            old = {name: kubelet.wait_registered(name).socket for name in MEM_RESOURCES}
            kubelet.stop()
            kubelet.wipe_sockets()
            with kubelet._cond:
                kubelet.endpoints.clear()
            started = time.monotonic()
            kubelet.start()
            for name in MEM_RESOURCES:
                endpoint = kubelet.wait_registered(name, timeout=20, not_socket=old[name])
                register.append(endpoint.registered_at - started)
                snapshot.append(endpoint.snapshots[0].received - started)
            all_back.append(time.monotonic() - started)
            time.sleep(0.05)
    print(
        f"kubelet restart -> registered again, {rounds} restarts x "
        f"{len(MEM_RESOURCES)} resources"
    )
    print(table([
        ("Register received p50", f"{percentile(register, 50) * 1000:.1f} ms", "<= 200 ms"),
        ("Register received p99", f"{percentile(register, 99) * 1000:.1f} ms", "-"),
        ("first snapshot p50", f"{percentile(snapshot, 50) * 1000:.1f} ms", "-"),
        ("all 3 resources back p50", f"{percentile(all_back, 50) * 1000:.1f} ms", "-"),
        ("all 3 resources back max", f"{max(all_back) * 1000:.1f} ms", "-"),
    ]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
