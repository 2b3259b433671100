"""Loop devices a test attaches with ``losetup`` over files of its own (root).

One helper for every tier that needs real block devices to come and go (kernel
uevents, device plugin hotplug, DRA slices): files are made sparse in the
test's directory, and ``cleanup`` detaches whatever is still attached, made
writable again first (a test may have set a device read-only), even after a
failure.
"""

from __future__ import annotations

from pathlib import Path

from plugin_runtime import commands

MiB = 1 << 20


def sparse_file(directory: Path, name: str = "disk.img", size_mib: int = 16) -> Path:
    """A sparse file of ``size_mib`` MiB in ``directory``."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    return path


class LoopDevices:
    """Loop devices this test attached; ``cleanup`` detaches what is left."""

    def __init__(self) -> None:
        self.attached: list[str] = []

    def attach(self, backing: Path, *, read_only: bool = False) -> str:
        argv = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []),
                str(backing)]
        dev = commands.run(argv, timeout=30).stdout.strip()
        self.attached.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        commands.run(["losetup", "--detach", dev], timeout=30)
        self.attached.remove(dev)

    def cleanup(self) -> None:
        for dev in list(self.attached):
            commands.run(["blockdev", "--setrw", dev], timeout=30, check=False)
            commands.run(["losetup", "--detach", dev], timeout=30, check=False)
            self.attached.remove(dev)
