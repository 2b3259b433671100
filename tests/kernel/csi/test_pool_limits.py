"""Out of space and capacity honesty on a tiny pool (thick by default, overcommit 2).

The pool directory is a 64 MiB tmpfs mounted by the test under the driver's
state dir (so the harness unmounts it even on failure).  Nothing is ever
provisioned successfully here, so no loop device is needed on tmpfs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver._proto import csi_pb2
from plugin_runtime import commands
from tests.grpc.csi.driver_harness import (
    DriverProcess,
    GiB,
    MiB,
    block_cap,
    expect_code,
    mount_cap,
    mounts_under,
)

POOL_BYTES = 64 * MiB
OVERCOMMIT = 2


@pytest.fixture(scope="module")
def tiny() -> Iterator[DriverProcess]:
    base = Path(tempfile.mkdtemp(prefix="csitiny", dir="/tmp"))
    pool = base / "state" / "tiny"
    pool.mkdir(parents=True)
    commands.run(["mount", "-t", "tmpfs", "-o", f"size={POOL_BYTES}", "hostkit-test", str(pool)],
                 timeout=30)
    driver = DriverProcess(base=base, node_id="node-tiny", config={
        "pools": [{"name": "tiny", "type": "image", "path": str(pool), "thin": False,
                   "overcommit_ratio": OVERCOMMIT, "reserve_percent": 0, "reserve_bytes": 0}],
    })
    try:
        driver.start()
        yield driver
    finally:
        driver.cleanup()  # unmounts the tmpfs too: it lies under the state dir
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def test_capacity_reports_the_tiny_pool(tiny: DriverProcess):
    csi = tiny.csi()
    resp = csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap()], parameters={"pool": "tiny"}),
        timeout=10)
    assert 0 < resp.available_capacity <= POOL_BYTES
    assert resp.HasField("maximum_volume_size")
    assert 0 < resp.maximum_volume_size.value <= POOL_BYTES


@pytest.mark.parametrize(
    ("parameters", "available"),
    [({"thin": "true"}, OVERCOMMIT * POOL_BYTES), ({"thin": "false"}, POOL_BYTES),
     ({}, POOL_BYTES)],
    ids=["thin", "thick", "pool-default-thick"],
)
def test_capacity_honours_the_thin_parameter(
    tiny: DriverProcess, parameters: dict[str, str], available: int
):
    """An empty tmpfs pool: thin promises (size - reserve) x overcommit, thick only the
    real free space; a single volume is bounded by the real free space either way."""
    csi = tiny.csi()
    resp = csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(volume_capabilities=[block_cap()],
                                   parameters={"pool": "tiny", **parameters}),
        timeout=10)
    assert resp.available_capacity == available
    assert resp.maximum_volume_size.value == POOL_BYTES


@pytest.mark.parametrize("cap", [mount_cap(), block_cap()], ids=["mount", "block"])
def test_out_of_space_is_resource_exhausted(tiny: DriverProcess, cap: csi_pb2.VolumeCapability):
    csi = tiny.csi()
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume,
                csi_pb2.CreateVolumeRequest(
                    name="pvc-too-big", volume_capabilities=[cap],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)))
    # Nothing was left behind by the refused request.
    pool = tiny.state_dir / "tiny"
    assert not [p for p in pool.rglob("*") if p.is_file() and p.stat().st_size >= MiB]
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert list(listed.entries) == []
