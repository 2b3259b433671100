"""A pool that failed to start, next to one that serves, on the real driver.

The failed pools here need no root and no btrfs: a ``subvolume`` pool whose path is
on /tmp's filesystem (not btrfs) and an ``image`` pool whose path lies under a
regular file.  Each must answer FAILED_PRECONDITION with its own problem (the text
``csi-driver pools`` shows), never the "still starting" UNAVAILABLE, while the
healthy image pool creates volumes and Probe says ready.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import btrfs
from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    DriverProcess,
    MiB,
    cap_for,
    expect_code,
    running_driver,
)

Code = grpc.StatusCode


def _config(base: Path) -> dict[str, Any]:
    magic = btrfs.filesystem_name(str(base))[0]
    assert magic != btrfs.BTRFS_SUPER_MAGIC, f"{base} is on btrfs: this test needs another fs"
    (base / "file").write_text("a regular file, not a directory\n")
    return {"pools": [
        {"name": "img", "type": "image", "path": str(base / "state" / "img")},
        {"name": "sub", "type": "subvolume", "path": str(base / "plain" / "pool")},
        {"name": "broken", "type": "image", "path": str(base / "file" / "pool")},
    ]}


@pytest.fixture(scope="module")
def mixed() -> Iterator[DriverProcess]:
    """Started and Probe-ready although two of its three pools failed."""
    with running_driver(config=_config) as proc:
        yield proc


def _create(name: str, pool: str) -> Any:
    # Subvolumes are filesystems only; raw block keeps the image pools' creates cheap.
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[cap_for("mount" if pool == "sub" else "block")],
        parameters={"pool": pool})


def _problems(driver: DriverProcess) -> dict[str, str]:
    """``csi-driver pools``: the problem of each pool that is not ready."""
    pools = driver.pools_json()["pools"]
    return {p["name"]: str(p.get("problem", "")) for p in pools if not p["ready"]}


def test_probe_is_ready_while_a_healthy_pool_serves(mixed: DriverProcess):
    probe = mixed.csi().identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert probe.ready.value
    assert set(_problems(mixed)) == {"sub", "broken"}


def test_a_failed_pool_answers_failed_precondition_with_its_problem(mixed: DriverProcess):
    problems = _problems(mixed)
    base = mixed.base
    # The nearest existing directory on the way to the pool's path is base itself.
    assert problems["sub"].startswith(f"{base} is on "), problems
    assert f"not btrfs: subvolume pool sub (path {base / 'plain' / 'pool'})" in problems["sub"]
    assert f"{base / 'file' / 'pool'} of image pool broken: Not a directory" \
        in problems["broken"]
    controller = mixed.csi().controller
    for pool in ("sub", "broken"):
        message = expect_code(Code.FAILED_PRECONDITION, controller.CreateVolume,
                              _create(f"pvc-{pool}", pool))
        assert message == (f"pool {pool} failed to start and serves no volumes until the "
                           f"driver restarts: {problems[pool]}")
    log = mixed.log_path.read_text(errors="replace")
    assert "pool sub failed to start" in log and "not btrfs" in log, mixed.log_tail()
    assert "driver ready: pools img (failed: sub, broken)" in log, mixed.log_tail()


def test_the_healthy_pool_still_creates_volumes(mixed: DriverProcess):
    csi = mixed.csi()
    volume = csi.controller.CreateVolume(_create("pvc-img", "img"), timeout=60).volume
    try:
        assert volume.capacity_bytes == 16 * MiB
        assert (mixed.base / "state" / "img" / "volumes" / f"{volume.volume_id}.img").exists()
    finally:
        csi.delete(volume.volume_id)
