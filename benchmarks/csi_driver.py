"""CSI driver benchmark: prints figures, asserts nothing.  Needs root.

Runs the real driver (``python -m csi_driver serve``) on a unix socket with a
private state dir and kubelet root under /tmp, and measures over gRPC:

1. CreateVolume 1 GiB, p50, for ext4, xfs and block (goals 150 / 60 / 9 ms);
2. NodeStage + NodePublish p50 of an ext4 volume (goal 18 ms);
3. 200 volumes created, staged, published, written (1 MiB), unpublished,
   unstaged and deleted by 8 parallel workers (goal 19 s);
4. fio: sequential 1 MiB direct writes and 4 KiB random direct reads through a
   published volume vs a file on the pool's own filesystem (goal >= 95 %), and,
   as the ceiling any loop-backed volume can reach on this machine, a bare
   direct-I/O loop device over that very file (no filesystem, no driver);
5. the driver's RSS with 100 volumes staged and published (goal 50 MB).

Usage: sudo python benchmarks/csi_driver.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csi_driver import loop, mounts  # noqa: E402
from csi_driver._proto import csi_pb2, csi_pb2_grpc  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def cap(fs: str) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if not fs:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=mode)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
                                    access_mode=mode)


class Bench:
    """The real driver on a private socket, state dir and kubelet root under /tmp.

    ``config`` (the text of a driver config file) replaces the default single
    image pool; it is written to ``<base>/config.yaml`` and ``{base}`` in it is
    replaced by the private directory first.
    """

    def __init__(self, config: str | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="csib", dir="/tmp"))
        self.sock = self.base / "csi.sock"
        self.kubelet = self.base / "kubelet"
        self.state = self.base / "state"
        self.kubelet.mkdir()
        argv = [sys.executable, "-m", "csi_driver", "serve", "--endpoint", f"unix://{self.sock}",
                "--node-id", "bench", "--state-dir", str(self.state),
                "--kubelet-root", str(self.kubelet), "--log-level", "warning"]
        if config is not None:
            config_path = self.base / "config.yaml"
            config_path.write_text(config.replace("{base}", str(self.base)))
            argv += ["--config", str(config_path)]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        ident = csi_pb2_grpc.IdentityStub(self.channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if ident.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise SystemExit("driver did not become ready")

    def create(self, size: int, fs: str, parameters: dict[str, str] | None = None,
               source: csi_pb2.VolumeContentSource | None = None) -> str:
        resp = self.ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"pvc-{uuid.uuid4()}", capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[cap(fs)], parameters=parameters or {},
            volume_content_source=source), timeout=120)
        return str(resp.volume.volume_id)

    def paths(self, vid: str) -> tuple[str, str]:
        staging = self.kubelet / "plugins/kubernetes.io/csi/drv" / vid / "globalmount"
        staging.mkdir(parents=True, exist_ok=True)
        parent = self.kubelet / "pods" / vid / "volumes/kubernetes.io~csi/pv"
        parent.mkdir(parents=True, exist_ok=True)
        return str(staging), str(parent / "mount")

    def up(self, vid: str, fs: str, paths: tuple[str, str] | None = None) -> tuple[str, str]:
        """NodeStage + NodePublish; ``paths`` from ``self.paths`` made beforehand (the
        kubelet's directories are not the driver's time)."""
        staging, target = paths or self.paths(vid)
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap(fs)), timeout=120)
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target,
            volume_capability=cap(fs)), timeout=120)
        return staging, target

    def down(self, vid: str, staging: str, target: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target), timeout=120)
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging), timeout=120)

    def delete(self, vid: str) -> None:
        self.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=120)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        # A run that failed half-way can leave mounts and loop devices of its own
        # volumes behind; undo them (deepest mount first) before removing the files.
        prefix = f"{self.base}/"
        for entry in sorted(mounts.read_mounts(), key=lambda e: -len(e.mount_point)):
            if entry.mount_point.startswith(prefix):
                with contextlib.suppress(Exception):
                    mounts.unmount(entry.mount_point)
        for info in loop.list_attached():
            if (info.backing_file or "").startswith(prefix):
                with contextlib.suppress(Exception):
                    loop.detach(info.device)
        shutil.rmtree(self.base, ignore_errors=True)


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_create(b: Bench, n: int) -> None:
    for fs, goal in (("ext4", 150), ("xfs", 60), ("", 9)):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            vid = b.create(GiB, fs)
            times.append(time.perf_counter() - t)
            b.delete(vid)
        print(f"CreateVolume 1 GiB {fs or 'block':5}: p50 {p50(times):7.1f} ms "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; goal <= {goal} ms)")


def bench_stage_publish(b: Bench, n: int) -> None:
    times = []
    for _ in range(n):
        vid = b.create(GiB, "ext4")
        where = b.paths(vid)  # the kubelet makes these before it calls NodeStage
        t = time.perf_counter()
        staging, target = b.up(vid, "ext4", where)
        times.append(time.perf_counter() - t)
        b.down(vid, staging, target)
        b.delete(vid)
    print(f"NodeStage+NodePublish ext4: p50 {p50(times):7.1f} ms (goal <= 18 ms)")


def bench_parallel(b: Bench, count: int, workers: int, fs: str = "ext4",
                   parameters: dict[str, str] | None = None, goal: str = "19 s") -> None:
    block = os.urandom(MiB)

    def one(_: int) -> None:
        vid = b.create(64 * MiB, fs, parameters)
        staging, target = b.up(vid, fs)
        with open(os.path.join(target, "data"), "wb") as f:
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
        b.down(vid, staging, target)
        b.delete(vid)

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(count)))
    print(f"{count} volumes full cycle, {workers} workers: {time.perf_counter() - t:6.2f} s "
          f"(goal <= {goal})", flush=True)


def fio(path: str, rw: str, bs: str, size: str, engine: list[str]) -> float:
    argv = ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            f"--size={size}", "--direct=1", "--output-format=json", "--invalidate=1", *engine]
    if rw == "randread":
        argv += ["--runtime=4", "--time_based=1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["bw_bytes"]) if bs == "1M" else float(side["iops"])


def bench_fio(b: Bench) -> None:
    """Volume vs pool filesystem, alternating, best of 3 each (the host is shared)."""
    if shutil.which("fio") is None:
        print("fio: not installed, skipped")
        return
    size = "512M"
    vid = b.create(GiB, "ext4")
    staging, target = b.up(vid, "ext4")
    pool_file = str(b.state / "pools/default/fio-reference")
    cases = (
        ("write", "1M", ["--ioengine=psync"], "MB/s", "psync"),
        ("randread", "4k", ["--ioengine=psync"], "IOPS", "psync qd1"),
        ("randread", "4k", ["--ioengine=libaio", "--iodepth=16"], "IOPS", "libaio qd16"),
    )
    try:
        for rw, bs, engine, unit, label in cases:
            vol = ref = bare = 0.0
            for _ in range(3):
                vol = max(vol, fio(os.path.join(target, "fio"), rw, bs, size, engine))
                ref = max(ref, fio(pool_file, rw, bs, size, engine))
                device = loop.attach(pool_file, direct_io=True)
                try:
                    bare = max(bare, fio(device, rw, bs, size, engine))
                finally:
                    loop.detach(device)
            scale = 1e6 if unit == "MB/s" else 1
            print(f"fio {rw:8} {bs:3} {label:11}: volume {vol / scale:9.1f} {unit}, pool fs "
                  f"{ref / scale:9.1f} {unit} -> {100 * vol / ref:5.1f} % (goal >= 95 %); "
                  f"bare loop device on the pool file {100 * bare / ref:5.1f} %")
    finally:
        for p in (pool_file, os.path.join(target, "fio")):
            if os.path.exists(p):
                os.unlink(p)
        b.down(vid, staging, target)
        b.delete(vid)


def bench_rss(b: Bench, count: int) -> None:
    vols = []
    for _ in range(count):
        vid = b.create(64 * MiB, "ext4")
        vols.append((vid, *b.up(vid, "ext4")))
    rss = b.rss_mb()
    for vid, staging, target in vols:
        b.down(vid, staging, target)
        b.delete(vid)
    print(f"RSS with {count} volumes staged and published: {rss:.1f} MB (goal <= 50 MB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--only", choices=("create", "stage", "parallel", "fio", "rss"),
                        action="append", help="run only these parts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices and mounts)")
    b = Bench()
    try:
        n = 5 if args.quick else 21
        parts = set(args.only or ("create", "stage", "parallel", "fio", "rss"))
        print(f"driver RSS at start: {b.rss_mb():.1f} MB")
        if "create" in parts:
            bench_create(b, n)
        if "stage" in parts:
            bench_stage_publish(b, n)
        if "parallel" in parts:
            bench_parallel(b, 40 if args.quick else 200, 8)
        if "fio" in parts:
            bench_fio(b)
        if "rss" in parts:
            bench_rss(b, 20 if args.quick else 100)
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
