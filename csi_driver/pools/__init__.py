"""Pools: the kinds of volume (image files, whole disks, btrfs subvolumes).

``build_pools`` turns the validated configuration into pool objects; the
``Pool`` protocol in ``base`` is all the VolumeService sees of them.  It is
also where a disk pool learns the directories of every image pool, so none of
them can take a loop device backed by one of the driver's own images.
"""

from __future__ import annotations

from csi_driver.config import DriverConfig
from csi_driver.pools.base import Pool
from csi_driver.pools.imagefile import ImagePool


def build_pools(config: DriverConfig, state_dir: str) -> list[Pool]:
    pools: list[Pool] = []
    # Directories holding volumes: a disk pool never takes a disk (or a loop device
    # backed by a file) under one of them.
    image_dirs = tuple(pc.path for pc in config.pools if pc.type in ("image", "subvolume"))
    for pc in config.pools:
        if pc.type == "image":
            pools.append(ImagePool(pc))
        elif pc.type == "subvolume":
            from csi_driver.pools.subvolume import SubvolumePool

            pools.append(SubvolumePool(pc))
        else:
            from csi_driver.pools.disk import DiskPool

            pools.append(DiskPool(pc, state_dir, image_dirs=image_dirs))
    return pools
