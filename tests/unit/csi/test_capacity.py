"""Capacity arithmetic: thin vs thick, reserve, overcommit, never negative."""

from __future__ import annotations

from typing import Any

from csi_driver.pools.base import Capacity, align_up, compute_capacity, reserve_for

GiB = 1 << 30


def cap(**kw: Any) -> Capacity:
    args: dict[str, Any] = {"total": 100 * GiB, "free": 60 * GiB, "reserve_bytes": 0,
            "reserve_percent": 0.0,
            "thin": False, "overcommit_ratio": 1.0, "provisioned": 0}
    args.update(kw)
    return compute_capacity(**args)


def test_thick_is_free_space_minus_reserve():
    c = cap(reserve_bytes=10 * GiB)
    assert c.available_bytes == 50 * GiB
    assert c.maximum_volume_bytes == 50 * GiB
    assert c.reserve_bytes == 10 * GiB


def test_reserve_is_the_larger_of_bytes_and_percent():
    assert reserve_for(100 * GiB, 1 * GiB, 5.0) == 5 * GiB
    assert reserve_for(100 * GiB, 7 * GiB, 5.0) == 7 * GiB
    assert cap(reserve_percent=5.0, reserve_bytes=1 * GiB).available_bytes == 55 * GiB


def test_thin_promises_overcommitted_pool_size_minus_provisioned():
    c = cap(thin=True, overcommit_ratio=2.0, provisioned=150 * GiB, reserve_bytes=10 * GiB)
    # (100 - 10) * 2 - 150 = 30
    assert c.available_bytes == 30 * GiB
    assert c.maximum_volume_bytes == 30 * GiB
    assert c.provisioned_bytes == 150 * GiB


def test_thin_maximum_is_bounded_by_real_free_space():
    c = cap(thin=True, overcommit_ratio=3.0, free=20 * GiB, reserve_bytes=5 * GiB)
    assert c.available_bytes == 285 * GiB  # (100 - 5) * 3
    assert c.maximum_volume_bytes == 15 * GiB


def test_never_negative():
    c = cap(thin=True, overcommit_ratio=1.0, provisioned=500 * GiB)
    assert c.available_bytes == 0 and c.maximum_volume_bytes == 0
    c = cap(free=1 * GiB, reserve_bytes=5 * GiB)
    assert c.available_bytes == 0 and c.maximum_volume_bytes == 0


def test_alignment_rounds_up_to_whole_blocks_only():
    assert align_up(1) == 4096
    assert align_up(4096) == 4096
    assert align_up(GiB) == GiB
    assert align_up(GiB + 1) == GiB + 4096
