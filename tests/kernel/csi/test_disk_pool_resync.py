"""A disk the disk pool refused for a passing reason joins on the next resync (root).

The watcher reports a disk again only when its description changes, so a disk
refused while it was mounted (or could not be probed) would stay out of the
pool for good: nothing about the disk itself changes when it is unmounted and
wiped, and no uevent comes for it.  These tests make that refusal real (an
ext4 filesystem, mounted, on this test's own loop device), take the reason
away, and expect the resync (explicit or periodic) to bring the disk in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from csi_driver import filesystems, mounts
from csi_driver.config import PoolConfig, SelectorConfig
from csi_driver.pools.disk import DiskPool
from plugin_runtime import commands
from tests.grpc.csi.driver_harness import wait_until

from .conftest import Scratch

MiB = 1 << 20
WAIT = 20.0


def _pool(scratch: Scratch, **kwargs: float) -> DiskPool:
    config = PoolConfig(
        name="disks", type="disk", mode="volume",
        # Only loop devices backed by this test's own files: other helpers' never match.
        selector=SelectorConfig(kernel="loop*",
                                attributes={"loop/backing_file": f"{scratch.root}/*"}),
    )
    return DiskPool(config, scratch.directory("state"), image_dirs=(), **kwargs)


def _busy_disk(scratch: Scratch) -> tuple[str, str]:
    """This test's loop device, formatted and mounted: a disk no pool may take."""
    device = scratch.attach(scratch.image("busy.img", 64 * MiB))
    filesystems.make_filesystem(device, "ext4")
    return device, scratch.mount(device, "m", "ext4")


def _free(device: str, target: str) -> None:
    """Take the refusal's reason away: unmount and wipe (no uevent for the disk)."""
    mounts.unmount(target)
    commands.run(["wipefs", "-a", device], timeout=60)
    assert not filesystems.has_signature(device)


def _wait_for(predicate: Callable[[], object], timeout: float = WAIT) -> bool:
    return wait_until(predicate, timeout)


def _states(pool: DiskPool) -> list[str]:
    report = pool.describe()["disks"]
    assert isinstance(report, list)
    return [str(d["state"]) for d in report]


def _reasons(pool: DiskPool) -> list[str]:
    report = pool.describe()["disks"]
    assert isinstance(report, list)
    return [str(d["reason"]) for d in report if d["state"] == "refused"]


def test_refused_disk_joins_on_rescan_once_free_and_the_refusal_is_logged_once(
    scratch: Scratch, caplog: pytest.LogCaptureFixture
):
    device, target = _busy_disk(scratch)
    pool = _pool(scratch, resync_seconds=3600)  # only the explicit rescans below
    caplog.set_level(logging.INFO, logger="csi_driver.pools.disk")
    pool.start()
    try:
        assert _states(pool) == ["refused"]
        reason = _reasons(pool)[0]
        assert "mounted" in reason and target in reason
        assert pool.capacity(thin=False, provisioned=0).total_bytes == 0
        for _ in range(3):  # the refusal still holds: re-checked, not logged again
            assert pool.rescan(timeout=WAIT)
        assert _states(pool) == ["refused"]
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and device in refusals[0].getMessage()

        _free(device, target)
        assert pool.rescan(timeout=WAIT)
        assert _states(pool) == ["free"]
        cap = pool.capacity(thin=False, provisioned=0)
        assert (cap.total_bytes, cap.available_bytes) == (64 * MiB, 64 * MiB)
        assert pool.rescan(timeout=WAIT)  # a disk already in the pool stays, quietly
        joined = [r for r in caplog.records if "joined" in r.getMessage()]
        assert len(joined) == 1 and device in joined[0].getMessage()
    finally:
        pool.stop()


def test_periodic_resync_brings_in_a_disk_refused_while_it_was_mounted(scratch: Scratch):
    device, target = _busy_disk(scratch)
    pool = _pool(scratch, resync_seconds=1)
    pool.start()
    try:
        assert _states(pool) == ["refused"]
        _free(device, target)
        # No rescan call and no uevent for this disk: only the periodic resync can do it.
        assert _wait_for(lambda: _states(pool) == ["free"]), pool.describe()
        assert pool.capacity(thin=False, provisioned=0).total_bytes == 64 * MiB
    finally:
        pool.stop()
