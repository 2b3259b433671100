"""Pools: where volume backing comes from (image files, whole disks).

``build_pools`` turns the validated configuration into pool objects; the
``Pool`` protocol in ``base`` is all the VolumeService sees of them.
"""

from __future__ import annotations

from csi_driver.config import DriverConfig
from csi_driver.pools.base import Pool
from csi_driver.pools.imagefile import ImagePool


def build_pools(config: DriverConfig, state_dir: str) -> list[Pool]:
    pools: list[Pool] = []
    for pc in config.pools:
        if pc.type == "image":
            pools.append(ImagePool(pc))
        else:
            from csi_driver.pools.disk import DiskPool

            pools.append(DiskPool(pc, state_dir))
    return pools
