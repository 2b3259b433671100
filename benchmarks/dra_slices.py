"""DRA ResourceSlices against a real kube-apiserver + etcd: latency, scale, writes, RSS.

Starts the end-to-end tier's control plane (etcd + kube-apiserver only, from
``tests.e2e.cluster``; root and the shared binaries needed) and prints:

1. uevent -> ResourceSlice updated in the API server, p50 / p99 (goals 50 / 200 ms):
   the real discovery + publisher on loop devices this script attaches and detaches
   (``rounds`` times each); the latency runs from the moment discovery read the
   uevent (``ResourceState.last_event_monotonic``) to the moment a separate watch
   on the API server delivers the slice with the change.  Also from ``losetup``'s
   start, which adds the tool's own run time.
2. 1,000 devices of one resource published from scratch (goal <= 1 s), and the API
   writes per change (one device added; one device's health changing).
3. RSS of ``device-plugin serve`` with DRA on (one DRA resource publishing to the
   API server) next to the same daemon with the resource on the device plugin API.

Run (root): ``python -m benchmarks.dra_slices [rounds]`` (default 40).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lightkube.resources.resource_v1 import ResourceSlice

from device_plugin.config import parse_yaml
from device_plugin.kube import ApiAccess, make_client
from device_plugin.matching import DeviceInfo
from device_plugin.plugin import DevicePluginDomain
from device_plugin.registry import Catalog
from device_plugin.slice_publisher import SlicePublisher
from plugin_runtime import commands
from tests.e2e import binaries
from tests.e2e.cluster import ControlPlane, Run

DRIVER = "dra.hostkit.io"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class SliceWatch:
    """A watch on the API server delivering (monotonic time, device count) per event."""

    def __init__(self, access: ApiAccess, node: str) -> None:
        self.events: queue.Queue[tuple[float, int]] = queue.Queue()
        self._client = make_client(access)
        self._node = node
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for kind, obj in self._client.watch(ResourceSlice,
                                                fields={"spec.nodeName": self._node}):
                if kind != "DELETED":
                    self.events.put((time.monotonic(), len(obj.spec.devices or ())))
        except Exception:  # closed at the end
            return

    def wait_count(self, count: int, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            seen, devices = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if devices == count:
                return seen

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    def close(self) -> None:
        self._client.close()


def uevent_latency(access: ApiAccess, rounds: int) -> None:
    node = f"bench-{uuid.uuid4().hex[:6]}"
    private = Path(tempfile.mkdtemp(prefix="hkdrab-", dir="/tmp"))
    backing = private / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    config = parse_yaml(f"""
resync_seconds: 3600
dra: {{driver: {DRIVER}}}
resources:
  - name: loop
    dra: true
    match: [{{subsystem: block, kernel: "loop*", attributes: {{loop/backing_file: "{private}/*"}}}}]
""")
    domain = DevicePluginDomain(config=config, watch_config=False)
    domain.start()
    publisher = SlicePublisher(domain.catalog, lambda: make_client(access), node)
    publisher.start()
    watch = SliceWatch(access, node)
    state = domain.catalog.resources()["hostkit.io/loop"]
    from_uevent: list[float] = []
    from_losetup: list[float] = []
    attached: str | None = None
    try:
        watch.wait_count(0)
        for _ in range(rounds):
            for count in (1, 0):
                watch.drain()
                started = time.monotonic()
                if count:
                    attached = commands.run(["losetup", "--find", "--show", str(backing)],
                                            timeout=30).stdout.strip()
                else:
                    assert attached is not None
                    commands.run(["losetup", "--detach", attached], timeout=30)
                    attached = None
                seen = watch.wait_count(count)
                event = state.last_event_monotonic
                if event is not None and event >= started:
                    from_uevent.append(seen - event)
                from_losetup.append(seen - started)
    finally:
        if attached is not None:
            commands.run(["losetup", "--detach", attached], timeout=30, check=False)
        watch.close()
        publisher.stop()
        domain.stop()
        shutil.rmtree(private, ignore_errors=True)
        cleanup(access, node)
    ms = [v * 1000 for v in from_uevent]
    lo = [v * 1000 for v in from_losetup]
    print(f"uevent -> ResourceSlice in the API server (watch), {len(ms)} changes "
          f"(attach + detach): p50 {statistics.median(ms):.1f} ms, p99 "
          f"{percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms  (goal <= 50 / 200 ms)")
    print(f"  from losetup's start instead: p50 {statistics.median(lo):.1f} ms, "
          f"p99 {percentile(lo, 99):.1f} ms")


def synthetic(count: int, size: str = "2048") -> tuple[DeviceInfo, ...]:
    return tuple(
        DeviceInfo(
            sys_path=f"/sys/devices/virtual/block/loop{i}", subsystem="block", devtype="disk",
            kernel=f"loop{i}", devnode=f"/dev/loop{i}",
            properties={"MAJOR": "7", "MINOR": str(i)},
            attributes={"size": size, "ro": "0", "loop/backing_file": f"/img/disk-{i}.img"},
        )
        for i in range(count)
    )


def scale(access: ApiAccess, devices: int = 1000) -> None:
    node = f"bench-{uuid.uuid4().hex[:6]}"
    config = parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: loop, dra: true, "
                        "match: [{subsystem: block}]}]")
    catalog = Catalog(config)
    publisher = SlicePublisher(catalog, lambda: make_client(access), node)
    publisher.start()
    try:
        publisher.wait_synced(30)
        times = []
        for _ in range(3):
            catalog.publish_inventory(())
            publisher.wait_synced(60)
            started = time.monotonic()
            catalog.publish_inventory(synthetic(devices))
            assert publisher.wait_synced(60), publisher.stats.last_error
            times.append(time.monotonic() - started)
            published = sum(len(s.spec.devices or ()) for s in _slices(access, node))
            assert published == devices, published
        print(f"{devices} devices of one resource published from an empty pool "
              f"({-(-devices // 128)} slices): "
              + ", ".join(f"{t * 1000:.0f} ms" for t in times) + "  (goal <= 1 s)")
        writes = publisher.stats.writes
        catalog.publish_inventory(synthetic(devices + 1))
        assert publisher.wait_synced(60)
        print(f"  one device added: {publisher.stats.writes - writes} API writes "
              f"(a new pool generation rewrites every slice of the pool)")
        writes = publisher.stats.writes
        catalog.publish_inventory(synthetic(devices + 1)[1:])
        assert publisher.wait_synced(60)
        print(f"  one device removed (vanished, or a failing health probe): "
              f"{publisher.stats.writes - writes} API writes")
        small = Catalog(parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: few, "
                                   "dra: true, match: [{subsystem: block}]}]"))
        other = f"{node}-small"
        small_pub = SlicePublisher(small, lambda: make_client(access), other)
        small_pub.start()
        small.publish_inventory(synthetic(10))
        small_pub.wait_synced(30)
        writes = small_pub.stats.writes
        small.publish_inventory(synthetic(11))
        small_pub.wait_synced(30)
        print(f"  pool of 10 devices, one added: {small_pub.stats.writes - writes} API write")
        small_pub.stop()
        cleanup(access, other)
    finally:
        publisher.stop()
        cleanup(access, node)


def _slices(access: ApiAccess, node: str) -> list[Any]:
    client = make_client(access)
    try:
        return list(client.list(ResourceSlice, fields={"spec.nodeName": node}))
    finally:
        client.close()


def cleanup(access: ApiAccess, node: str) -> None:
    client = make_client(access)
    obj: Any
    try:
        for obj in client.list(ResourceSlice, fields={"spec.nodeName": node}):
            client.delete(ResourceSlice, obj.metadata.name)
    finally:
        client.close()


def rss(access: ApiAccess) -> None:
    node = f"bench-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="hkdrar-", dir="/tmp"))
    try:
        figures = {}
        for dra in (True, False):
            config = work / f"dra-{dra}.yaml"
            config.write_text(
                f"dra: {{driver: {DRIVER}}}\nresources:\n"
                f"  - {{name: zero, dra: {str(dra).lower()}, match: [{{subsystem: mem, "
                "kernel: zero}]}\n")
            kubelet = work / f"kubelet-{dra}"
            kubelet.mkdir()
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_plugin", "serve", "--config", str(config),
                 "--kubelet-dir", str(kubelet), "--kubeconfig", str(access.kubeconfig),
                 "--node-name", node, "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            try:
                time.sleep(8)
                with open(f"/proc/{proc.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
                figures[dra] = kb / 1024
            finally:
                proc.send_signal(signal.SIGTERM)
                _out, err = proc.communicate(timeout=30)
                if proc.returncode != 0:
                    print(err.decode(errors="replace"), file=sys.stderr)
        print(f"device plugin RSS, one resource: {figures[True]:.1f} MB with DRA on "
              f"(API client, slice publisher and watch, kubelet DRA service), "
              f"{figures[False]:.1f} MB as a device-plugin "
              "resource")
    finally:
        cleanup(access, node)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark starts etcd and kube-apiserver and attaches "
                 "loop devices")
    run = Run()
    plane = ControlPlane(run, binaries.locate())
    try:
        plane.start()
        access = ApiAccess(str(plane.admin_kubeconfig))
        uevent_latency(access, rounds)
        scale(access)
        rss(access)
    finally:
        plane.stop()
        leaks: Any = run.close()
        if leaks:
            print("left behind:", leaks, file=sys.stderr)


if __name__ == "__main__":
    main()
