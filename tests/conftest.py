"""Suite-wide rules: kernel tests need root and never skip silently.

Tests under tests/kernel/ (or marked ``kernel``) use real loop devices, mounts
and kernel uevents.  Without root they *fail*, unless SKIP_KERNEL_TESTS=1 is
set explicitly, so CI (which runs as root) can never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    if os.geteuid() == 0:
        return
    if os.environ.get("SKIP_KERNEL_TESTS") == "1":
        pytest.skip("kernel test skipped: SKIP_KERNEL_TESTS=1 and not root")
    pytest.fail("kernel tests need root (set SKIP_KERNEL_TESTS=1 to skip them explicitly)")
