"""Benchmark of the CSI kernel primitives: prints p50/p90 per operation (root).

    /work/venv/bin/python -m benchmarks.csi_primitives [--iterations N]

Measures loop attach+detach by ioctl (vs losetup), mkfs of ext4/xfs/btrfs on a
fresh 1 GiB sparse image on a direct-I/O loop device (the mkfs alone and
``make_filesystem`` with its emptiness check), a volume-create-like sequence
(sparse file + attach + make_filesystem), blkid probing, and mount+unmount by
mount(2) vs the mount(8)/umount(8) tools.  Everything is created under a private
/tmp directory and removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from csi_driver import filesystems, loop, mounts
from plugin_runtime import commands

GiB = 1 << 30


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"p50 {statistics.median(ordered) * 1000:8.2f} ms   p90 {p90 * 1000:8.2f} ms"


def _measure(name: str, iterations: int, step: Callable[[int], float]) -> None:
    samples = [step(i) for i in range(iterations)]
    print(f"{name:<44} {_percentiles(samples)}   (n={iterations})", flush=True)


class Bench:
    def __init__(self, root: str) -> None:
        self.root = root
        self.devices: list[str] = []
        self.targets: list[str] = []

    def image(self, name: str, size: int = GiB) -> str:
        path = os.path.join(self.root, name)
        with open(path, "xb") as handle:
            handle.truncate(size)
        return path

    def attach(self, path: str) -> str:
        device = loop.attach(path)
        self.devices.append(device)
        return device

    def detach(self, device: str) -> None:
        loop.detach(device)
        self.devices.remove(device)

    def cleanup(self) -> None:
        for target in reversed(self.targets):
            while mounts.is_mountpoint(target):
                mounts.unmount(target)
        for device in reversed(self.devices):
            loop.detach(device)
        shutil.rmtree(self.root, ignore_errors=True)


def run(iterations: int) -> None:
    bench = Bench(tempfile.mkdtemp(prefix="csibench.", dir="/tmp"))
    try:
        image = bench.image("attach.img")

        def attach_detach(_: int) -> float:
            started = time.perf_counter()
            device = loop.attach(image)
            loop.detach(device)
            return time.perf_counter() - started

        def losetup_attach_detach(_: int) -> float:
            started = time.perf_counter()
            device = commands.run(
                ["losetup", "--direct-io=on", "-f", "--show", image], timeout=30
            ).stdout.strip()
            commands.run(["losetup", "-d", device], timeout=30)
            return time.perf_counter() - started

        _measure("loop attach+detach (ioctl)", iterations, attach_detach)
        _measure("loop attach+detach (losetup tool)", iterations, losetup_attach_detach)

        for fs_type in filesystems.SUPPORTED_FILESYSTEMS:

            def mkfs_only(i: int, fs_type: str = fs_type) -> float:
                device = bench.attach(bench.image(f"mk-{fs_type}-{i}.img"))
                argv = filesystems.mkfs_argv(device, fs_type)
                started = time.perf_counter()
                commands.run(argv, timeout=120)
                elapsed = time.perf_counter() - started
                bench.detach(device)
                return elapsed

            def make_fs(i: int, fs_type: str = fs_type) -> float:
                device = bench.attach(bench.image(f"mf-{fs_type}-{i}.img"))
                started = time.perf_counter()
                filesystems.make_filesystem(device, fs_type)
                elapsed = time.perf_counter() - started
                bench.detach(device)
                return elapsed

            def create_like(i: int, fs_type: str = fs_type) -> float:
                started = time.perf_counter()
                device = bench.attach(bench.image(f"cv-{fs_type}-{i}.img"))
                filesystems.make_filesystem(device, fs_type)
                elapsed = time.perf_counter() - started
                bench.detach(device)
                return elapsed

            _measure(f"mkfs {fs_type} 1 GiB sparse loop (tool only)", iterations, mkfs_only)
            _measure(f"make_filesystem {fs_type} (blkid check + mkfs)", iterations, make_fs)
            _measure(f"sparse file + attach + make_filesystem {fs_type}", iterations, create_like)

        device = bench.attach(bench.image("mount.img"))
        filesystems.make_filesystem(device, "ext4")
        target = os.path.join(bench.root, "mnt")
        os.mkdir(target)
        bench.targets.append(target)
        bind_target = os.path.join(bench.root, "bind")
        os.mkdir(bind_target)
        bench.targets.append(bind_target)

        def probe(_: int) -> float:
            started = time.perf_counter()
            filesystems.probe_filesystem(device)
            return time.perf_counter() - started

        def mount_syscall(_: int) -> float:
            started = time.perf_counter()
            mounts.mount(device, target, "ext4", ["noatime"])
            mounts.unmount(target)
            return time.perf_counter() - started

        def mount_tool(_: int) -> float:
            started = time.perf_counter()
            commands.run(["mount", "-t", "ext4", "-o", "noatime", device, target], timeout=30)
            commands.run(["umount", target], timeout=30)
            return time.perf_counter() - started

        def stage_publish_like(_: int) -> float:
            started = time.perf_counter()
            mounts.mount(device, target, "ext4", ["noatime"])
            mounts.bind_mount(target, bind_target, read_only=True)
            elapsed = time.perf_counter() - started
            mounts.unmount(bind_target)
            mounts.unmount(target)
            return elapsed

        def identify(_: int) -> float:
            started = time.perf_counter()
            filesystems.identify_filesystem(device)
            return time.perf_counter() - started

        _measure("blkid probe (probe_filesystem)", iterations, probe)
        _measure("superblock magic (identify_filesystem)", iterations, identify)
        _measure("mount+unmount ext4 (mount(2))", iterations, mount_syscall)
        _measure("mount+unmount ext4 (mount(8)/umount(8))", iterations, mount_tool)
        _measure("mount ext4 + read-only bind (mount(2))", iterations, stage_publish_like)
    finally:
        bench.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mkfs, mount)")
    run(args.iterations)


if __name__ == "__main__":
    main()
