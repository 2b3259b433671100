"""Subvolume volumes next to image volumes, measured side by side in one run (root).

    python -m benchmarks.csi_subvolume_volumes [--quick] [--quota-mode auto|simple|full]

One real driver (``benchmarks.csi_driver.Bench``) serves three pools: a
``subvolume`` pool on a btrfs made on a sparse 8 GiB image on a direct-I/O loop
device, and a thin and a thick ``image`` pool on /tmp's filesystem.  It prints:

1. fio through a subvolume volume vs a file on the btrfs pool filesystem
   itself: sequential 1 MiB direct writes, 4 KiB random direct reads at QD1
   (psync) and QD16 (libaio); median of 3 runs each, volume and reference
   alternating (the host is shared); goal >= 0.98 for each;
2. the same through a thin and a thick ext4 image volume, next to the pool
   filesystem and to the bare direct-I/O loop device over the pool file (the
   ceiling of any loop-backed volume); goal: within 5 % of that ceiling;
3. subvolume volumes over gRPC: CreateVolume p50 (goal 3 ms), NodeStage +
   NodePublish p50 (3 ms), CreateSnapshot p50 (5 ms), and 200 volumes
   created, staged, published, written (1 MiB), unpublished, unstaged and
   deleted by 8 workers (4 s).  csi-driver-host-path's plain directories:
   0.9-1.3 ms, 14-18 ms and 8.7-9.3 s on this kind of machine.

Everything lives under private /tmp directories and is removed at the end.  On
a host where other workloads keep creating mount namespaces (a kubelet and
containerd running tests), their copies of our mounts keep loop devices busy;
run it in a private mount namespace there:
``unshare -m --propagation private python -m benchmarks.csi_subvolume_volumes``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from benchmarks.csi_driver import Bench, bench_parallel, fio, p50
from csi_driver import btrfs, filesystems, loop, mounts
from csi_driver._proto import csi_pb2
from plugin_runtime.errors import FailedPrecondition

MiB = 1 << 20
GiB = 1 << 30
FIO_SIZE = "512M"
SUBVOL = {"pool": "subvol"}

CONFIG = """\
node_id: bench
pools:
  - name: subvol
    type: subvolume
    path: {btrfs}/pool
{quota}  - name: thin
    type: image
    path: {base}/state/pools/thin
    thin: true
  - name: thick
    type: image
    path: {base}/state/pools/thick
    thin: false
"""

CASES = (
    # 4 s like the reads (fio loops over the file): one pass of 512 MiB takes well under
    # a second here, too short to rise above the noise of a shared host.
    ("write", "1M", ["--ioengine=psync", "--runtime=4", "--time_based=1"], "MB/s",
     "seq write QD1"),
    ("randread", "4k", ["--ioengine=psync"], "IOPS", "rand read QD1"),
    ("randread", "4k", ["--ioengine=libaio", "--iodepth=16"], "IOPS", "rand read QD16"),
)


class BtrfsFs:
    """A btrfs on a sparse image on a direct-I/O loop device; ``close`` undoes it."""

    def __init__(self, size: int) -> None:
        self.root = tempfile.mkdtemp(prefix="subvfs.", dir="/tmp")
        self.image = os.path.join(self.root, "fs.img")
        self.mnt = os.path.join(self.root, "fs")
        self.device = ""
        self.mounted = False
        try:
            with open(self.image, "xb") as handle:
                handle.truncate(size)
            self.device = loop.attach(self.image)
            filesystems.make_filesystem(self.device, "btrfs")
            os.mkdir(self.mnt)
            mounts.mount(self.device, self.mnt, "btrfs")
            self.mounted = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.mounted:
            mounts.unmount(self.mnt)
            self.mounted = False
        if self.device:
            try:
                loop.detach(self.device)
            except FailedPrecondition as exc:
                # Seen here: another workload's process that made its own mount
                # namespace while the filesystem was mounted keeps a copy of the mount,
                # and so the device, until it exits.  Say so rather than hide it.
                holders = [p.split("/")[2] for p in glob.glob("/proc/[0-9]*/mountinfo")
                           if _mentions(p, self.mnt)]
                print(f"warning: {exc}; mount namespaces of pids {', '.join(holders)} still "
                      f"hold {self.mnt}; left {self.device} and {self.root} behind")
                return
            self.device = ""
        shutil.rmtree(self.root, ignore_errors=True)


def _mentions(mountinfo: str, point: str) -> bool:
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            return f" {point} " in handle.read()
    except OSError:
        return False


def _scale(value: float, unit: str) -> float:
    return value / 1e6 if unit == "MB/s" else value


def _median_runs(runs: int, paths: dict[str, Callable[[], str]], rw: str, bs: str,
                 engine: list[str]) -> dict[str, float]:
    """Median of ``runs`` fio runs per named path, the paths alternating within each round."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, where in paths.items():
            samples[name].append(fio(where(), rw, bs, FIO_SIZE, engine))
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_fio_subvolume(b: Bench, fs: BtrfsFs, runs: int) -> None:
    vid = b.create(2 * GiB, "btrfs", SUBVOL)
    staging, target = b.up(vid, "btrfs")
    volume_file = os.path.join(target, "fio")
    reference = os.path.join(fs.mnt, "fio-reference")
    try:
        print("\n1. fio, subvolume volume vs its btrfs pool filesystem "
              f"(median of {runs}; goal >= 0.98)")
        for rw, bs, engine, unit, label in CASES:
            got = _median_runs(runs, {"vol": lambda: volume_file, "fs": lambda: reference},
                               rw, bs, engine)
            print(f"   {label:15}: volume {_scale(got['vol'], unit):9.1f} {unit:4}  pool fs "
                  f"{_scale(got['fs'], unit):9.1f} {unit:4}  ratio {got['vol'] / got['fs']:.3f}",
                  flush=True)
    finally:
        for path in (volume_file, reference):
            if os.path.exists(path):
                os.unlink(path)
        b.down(vid, staging, target)
        b.delete(vid)


def bench_fio_images(b: Bench, runs: int) -> None:
    volumes = {}
    try:
        for pool in ("thin", "thick"):
            vid = b.create(2 * GiB, "ext4", {"pool": pool})
            volumes[pool] = (vid, *b.up(vid, "ext4"))
        pool_file = str(b.state / "pools/thin/fio-reference")
        print(f"\n2. fio, ext4 image volumes vs the pool filesystem and the bare direct-I/O loop "
              f"device over the pool file (median of {runs}; goal: volume >= 0.95 of bare loop)")
        devices: list[str] = []

        def bare() -> str:
            # A fresh attach per run, so the runs do not share one device's cache state.
            while devices:
                loop.detach(devices.pop())
            devices.append(loop.attach(pool_file, direct_io=True))
            return devices[-1]

        paths = {
            "thin": lambda: os.path.join(volumes["thin"][2], "fio"),
            "thick": lambda: os.path.join(volumes["thick"][2], "fio"),
            "fs": lambda: pool_file,
            "bare": bare,
        }
        for rw, bs, engine, unit, label in CASES:
            try:
                got = _median_runs(runs, paths, rw, bs, engine)
            finally:
                while devices:
                    loop.detach(devices.pop())
            print(f"   {label:15}: pool fs {_scale(got['fs'], unit):9.1f} {unit:4}  bare loop "
                  f"{_scale(got['bare'], unit):9.1f} ({got['bare'] / got['fs']:.3f} of fs)",
                  flush=True)
            for pool in ("thin", "thick"):
                print(f"   {'':15}  {pool:5} volume {_scale(got[pool], unit):9.1f} {unit:4}  "
                      f"{got[pool] / got['fs']:.3f} of pool fs, "
                      f"{got[pool] / got['bare']:.3f} of bare loop", flush=True)
    finally:
        reference = b.state / "pools/thin/fio-reference"
        if reference.exists():
            reference.unlink()
        for vid, staging, target in volumes.values():
            fio_file = os.path.join(target, "fio")
            if os.path.exists(fio_file):
                os.unlink(fio_file)
            b.down(vid, staging, target)
            b.delete(vid)


def bench_latencies(b: Bench, n: int, churn: int) -> None:
    print("\n3. subvolume volumes over gRPC")
    times = []
    for _ in range(n):
        started = time.perf_counter()
        vid = b.create(GiB, "btrfs", SUBVOL)
        times.append(time.perf_counter() - started)
        b.delete(vid)
    print(f"   CreateVolume 1 GiB       : p50 {p50(times):6.2f} ms (goal <= 3 ms; "
          f"host-path 0.9-1.3 ms)", flush=True)

    times = []
    for _ in range(n):
        vid = b.create(GiB, "btrfs", SUBVOL)
        where = b.paths(vid)  # the kubelet makes these before it calls NodeStage
        started = time.perf_counter()
        staging, target = b.up(vid, "btrfs", where)
        times.append(time.perf_counter() - started)
        b.down(vid, staging, target)
        b.delete(vid)
    print(f"   NodeStage+NodePublish    : p50 {p50(times):6.2f} ms (goal <= 3 ms; "
          f"host-path 14-18 ms)", flush=True)

    vid = b.create(GiB, "btrfs", SUBVOL)
    staging, target = b.up(vid, "btrfs")
    with open(os.path.join(target, "data"), "wb") as handle:
        handle.write(os.urandom(4 * MiB))
        handle.flush()
        os.fsync(handle.fileno())
    times = []
    snapshots = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            resp = b.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                source_volume_id=vid, name=f"snap-{uuid.uuid4()}"), timeout=120)
            times.append(time.perf_counter() - started)
            snapshots.append(resp.snapshot.snapshot_id)
    finally:
        for snapshot_id in snapshots:
            b.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id),
                                 timeout=120)
        b.down(vid, staging, target)
        b.delete(vid)
    print(f"   CreateSnapshot (4 MiB, published): p50 {p50(times):6.2f} ms (goal <= 5 ms)",
          flush=True)

    print("   ", end="")
    bench_parallel(b, churn, 8, fs="btrfs", parameters=SUBVOL, goal="4 s; host-path 8.7-9.3 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--quota-mode", choices=("auto", "simple", "full"), default=None,
                        help="the subvolume pool's quota_mode (default: the pool's default)")
    parser.add_argument("--only", choices=("fio-subvolume", "fio-images", "latency"),
                        action="append", help="run only these parts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mounts, btrfs ioctls)")
    parts = set(args.only or ("fio-subvolume", "fio-images", "latency"))
    fs = BtrfsFs(8 * GiB)
    b = None
    try:
        quota = f"    quota_mode: {args.quota_mode}\n" if args.quota_mode else ""
        b = Bench(CONFIG.replace("{btrfs}", fs.mnt).replace("{quota}", quota))
        status = btrfs.quota_status(fs.mnt)
        print(f"btrfs pool: {fs.mnt} on {fs.device}, quotas {status.mode.value}; "
              f"image pools on {btrfs.filesystem_name(str(b.state))[1]} ({b.state}/pools)")
        runs = 1 if args.quick else 3
        if "fio-subvolume" in parts:
            bench_fio_subvolume(b, fs, runs)
        if "fio-images" in parts:
            bench_fio_images(b, runs)
        if "latency" in parts:
            bench_latencies(b, 5 if args.quick else 21, 40 if args.quick else 200)
    finally:
        if b is not None:
            b.close()
        fs.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
