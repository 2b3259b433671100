"""Fixtures for the CSI kernel-primitive tests: own tmp dirs, own loop devices, own mounts.

Everything a test creates is registered here and torn down in reverse order
even when the test fails: mounts first (never lazily), then loop devices, then
the directory (only when nothing is still mounted below it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from csi_driver import loop, mounts


@dataclass
class Scratch:
    """A private /tmp directory plus the loop devices and mounts made in it.

    ``devices`` and ``mount_points`` may be appended to directly; teardown undoes
    everything in the reverse order of creation (a loop device backed by a file
    on a mounted filesystem goes before that filesystem's unmount).
    """

    root: str
    devices: list[str] = field(default_factory=list)
    mount_points: list[str] = field(default_factory=list)
    _order: list[tuple[str, str]] = field(default_factory=list)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def image(self, name: str, size: int) -> str:
        path = self.path(name)
        with open(path, "xb") as handle:
            handle.truncate(size)
        return path

    def attach(self, image: str, **kwargs: Any) -> str:
        device = loop.attach(image, **kwargs)
        self.devices.append(device)
        self._order.append(("loop", device))
        return device

    def directory(self, name: str) -> str:
        path = self.path(name)
        os.makedirs(path, exist_ok=True)
        return path

    def mount(self, device: str, name: str, fs_type: str, options: tuple[str, ...] = ()) -> str:
        target = self.directory(name)
        mounts.mount(device, target, fs_type, options)
        self.mount_points.append(target)
        self._order.append(("mount", target))
        return target

    def bind(self, source: str, name: str, *, read_only: bool = False) -> str:
        target = self.directory(name)
        mounts.bind_mount(source, target, read_only=read_only)
        self.mount_points.append(target)
        self._order.append(("mount", target))
        return target

    def _undo(self, kind: str, name: str, problems: list[str]) -> None:
        try:
            if kind == "loop":
                loop.detach(name)
                return
            while mounts.is_mountpoint(name):
                mounts.unmount(name)
        except Exception as exc:
            problems.append(f"{kind} {name}: {exc}")

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        ordered = list(self._order)
        # Things registered by appending to the public lists directly come first.
        ordered += [("mount", m) for m in self.mount_points if ("mount", m) not in self._order]
        ordered += [("loop", d) for d in self.devices if ("loop", d) not in self._order]
        for kind, name in reversed(ordered):
            self._undo(kind, name, [])
        # Second pass reports what still could not be undone (ordering across kinds).
        for kind, name in reversed(ordered):
            self._undo(kind, name, problems)
        prefix = self.root + "/"
        if any(e.mount_point.startswith(prefix) for e in mounts.read_mounts()):
            problems.append(f"mounts left under {self.root}; not removing it")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    box = Scratch(tempfile.mkdtemp(prefix="csip.", dir="/tmp"))
    try:
        yield box
    finally:
        problems = box.cleanup()
    assert not problems, problems


@contextlib.contextmanager
def open_fd(path: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


# Fixtures of the driver-level kernel suites (shared with tests/grpc/csi).
from tests.grpc.csi.driver_harness import csi, driver, kubelet, unique  # noqa: E402

__all__ = ["Scratch", "csi", "driver", "kubelet", "open_fd", "scratch", "unique"]
