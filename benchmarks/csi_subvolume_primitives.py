"""Benchmark of the btrfs subvolume primitives: prints p50/p90 per operation (root).

    python -m benchmarks.csi_subvolume_primitives [--iterations N]

Makes a 2 GiB btrfs on a direct-I/O loop device under a private /tmp
directory, once with full qgroups and once with simple quotas, and measures the
ioctls the subvolume pool kind builds on (``csi_driver.btrfs``): create, create
with its limit, the commit that makes it durable, raising a limit, read-only
snapshot and writable clone of a volume holding 4 MiB, delete (with and without
the mount check), the usage and status queries, and a read-only bind mount of a
subvolume.  Everything is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from csi_driver import btrfs, filesystems, loop, mounts
from csi_driver.btrfs import QuotaMode

MiB = 1 << 20
GiB = 1 << 30


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"p50 {statistics.median(ordered) * 1000:7.3f} ms   p90 {p90 * 1000:7.3f} ms"


def _timed(action: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def create_durable(parent: str, name: str) -> None:
    btrfs.create_subvolume(parent, name, limit=GiB)
    btrfs.commit(parent)


def bind_read_only(source: str, target: str) -> None:
    mounts.bind_mount(source, target, read_only=True)
    mounts.unmount(target)


class Pool:
    """A btrfs on a loop device, mounted under ``root``; ``close`` undoes it."""

    def __init__(self, root: str, mode: QuotaMode) -> None:
        self.image = os.path.join(root, f"{mode.value}.img")
        with open(self.image, "xb") as handle:
            handle.truncate(2 * GiB)
        self.device = loop.attach(self.image)
        self.mnt = os.path.join(root, mode.value)
        os.mkdir(self.mnt)
        self.mounted = False
        filesystems.make_filesystem(self.device, "btrfs")
        mounts.mount(self.device, self.mnt, "btrfs")
        self.mounted = True
        setup = btrfs.enable_quotas(self.mnt, mode)
        print(f"\n== {mode.value}: {setup.reason}", flush=True)

    def close(self) -> None:
        if self.mounted:
            mounts.unmount(self.mnt)
        loop.detach(self.device)


def _fill(path: str, size: int) -> None:
    with open(path, "wb") as handle:
        handle.write(b"s" * size)
        handle.flush()
        os.fsync(handle.fileno())


def run_pool(pool: Pool, n: int) -> None:
    mnt = pool.mnt
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    source = btrfs.create_subvolume(mnt, "source", limit=64 * MiB)
    _fill(os.path.join(source.path, "data"), 4 * MiB)
    btrfs.commit(mnt)
    target = os.path.join(os.path.dirname(mnt), f"bind-{os.path.basename(mnt)}")
    os.mkdir(target)
    for i in range(n):
        plain = os.path.join(mnt, f"plain{i}")
        limited = os.path.join(mnt, f"lim{i}")
        snap = os.path.join(mnt, f"snap{i}")
        record("create_subvolume (no limit)", _timed(btrfs.create_subvolume, mnt, f"plain{i}"))
        record("create_subvolume with limit",
               _timed(btrfs.create_subvolume, mnt, f"lim{i}", limit=GiB))
        subvol_id = btrfs.subvolume_id(limited)
        record("commit (START_SYNC+WAIT_SYNC)", _timed(btrfs.commit, mnt))
        record("create with limit + commit", _timed(create_durable, mnt, f"dur{i}"))
        record("set_limit (raise)", _timed(btrfs.set_limit, mnt, subvol_id, 2 * GiB))
        record("snapshot read-only (4 MiB volume)",
               _timed(btrfs.snapshot, source.path, mnt, f"snap{i}", read_only=True))
        record("snapshot writable + limit (clone)",
               _timed(btrfs.snapshot, snap, mnt, f"clone{i}", read_only=False, limit=GiB))
        record("qgroup_usage", _timed(btrfs.qgroup_usage, mnt, subvol_id))
        record("quota_status", _timed(btrfs.quota_status, mnt))
        record("bind mount read-only + unmount", _timed(bind_read_only, limited, target))
        record("delete_subvolume (mount check)", _timed(btrfs.delete_subvolume, limited))
        record("delete_subvolume (no mount check)",
               _timed(btrfs.delete_subvolume, plain, check_mounts=False))
    count = len(btrfs.list_qgroups(mnt))
    record(f"list_qgroups ({count} qgroups)", _timed(btrfs.list_qgroups, mnt))
    record(f"list_qgroups live=False ({count})", _timed(btrfs.list_qgroups, mnt, live=False))
    record("remove_stale_qgroups", _timed(btrfs.remove_stale_qgroups, mnt))
    os.rmdir(target)
    for name, samples in results.items():
        print(f"{name:<40} {_percentiles(samples)}   (n={len(samples)})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mounts, btrfs ioctls)")
    root = tempfile.mkdtemp(prefix="subvbench.", dir="/tmp")
    pools: list[Pool] = []
    try:
        for mode in (QuotaMode.FULL, QuotaMode.SIMPLE):
            pools.append(Pool(root, mode))
            run_pool(pools[-1], args.iterations)
    finally:
        for pool in reversed(pools):
            pool.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
