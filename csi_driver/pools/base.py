"""What a pool is to the VolumeService, and the capacity arithmetic all pools share.

A pool owns the *backing* of volumes (an image file, or a whole disk) and how
that backing becomes a block device on this node.  It knows nothing about
names, idempotency, staging or publications: those rules live in
``csi_driver.volumes``.  Every method is idempotent on the record it is given.

Capacity is reported honestly (``compute_capacity``):

- thick (preallocated) volumes: available = real free space - reserve
  (preallocated images are already counted as used by the pool filesystem);
- thin (sparse) volumes: available = (pool size - reserve) x overcommit_ratio
  - sum of the sizes already promised to volumes of the pool, and the largest
  single volume is further bounded by the real free space minus the reserve.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol

from csi_driver import filesystems
from csi_driver.config import PoolConfig
from csi_driver.store import VolumeRecord

GIB = 1 << 30

# Smallest volume per fs type: what each mkfs accepts (measured in filesystems.py);
# block volumes ("" fs type): one 4 KiB block.
MIN_FS_BYTES = {**filesystems.MIN_FILESYSTEM_SIZE, "": 4096}
ALIGNMENT = 4096  # loop devices with direct I/O need sizes in whole 4 KiB blocks


@dataclass(frozen=True)
class Capacity:
    """GetCapacity figures for one pool and one provisioning mode."""

    total_bytes: int  # the pool's own size (filesystem or disks)
    available_bytes: int  # what can still be provisioned
    maximum_volume_bytes: int  # the largest single volume that can be created now
    free_bytes: int  # real free space (before the reserve)
    reserve_bytes: int
    provisioned_bytes: int  # sum of the capacities promised to volumes


def reserve_for(total: int, reserve_bytes: int, reserve_percent: float) -> int:
    return max(reserve_bytes, math.ceil(total * reserve_percent / 100.0))


def compute_capacity(
    *,
    total: int,
    free: int,
    reserve_bytes: int,
    reserve_percent: float,
    thin: bool,
    overcommit_ratio: float,
    provisioned: int,
) -> Capacity:
    """Pure capacity arithmetic (unit-tested); all figures in bytes, never negative."""
    reserve = reserve_for(total, reserve_bytes, reserve_percent)
    real = max(0, free - reserve)
    if thin:
        logical = int((total - reserve) * overcommit_ratio) - provisioned
        available = max(0, logical)
        maximum = min(available, real)
    else:
        available = real
        maximum = real
    return Capacity(
        total_bytes=total,
        available_bytes=available,
        maximum_volume_bytes=maximum,
        free_bytes=free,
        reserve_bytes=reserve,
        provisioned_bytes=provisioned,
    )


def align_up(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


@dataclass(frozen=True)
class Orphan:
    """Something found on the host that no record explains (never deleted by us)."""

    kind: str  # "image-without-record", "record-without-backing", "loop-not-staged", ...
    pool: str
    path: str
    detail: str = ""


class Pool(Protocol):
    """A source of volume backing.  All methods are idempotent on the record."""

    name: str
    config: PoolConfig
    kind: str  # "image" or "disk"
    supports_snapshots: bool
    shares_space: bool  # volumes share one filesystem's space (images), not whole disks
    alloc_lock: threading.Lock  # held across "check capacity, then allocate or grow"

    def start(self) -> None:
        """Prepare the pool (directories, disk mounts); safe to call again."""

    def stop(self) -> None:
        """Release background resources (watchers); volumes stay as they are."""

    @property
    def ready(self) -> bool:
        """True once the pool can serve volumes."""

    def capacity(self, thin: bool, provisioned: int) -> Capacity:
        """Capacity figures given what is already promised to volumes of this pool."""

    def allocate(self, rec: VolumeRecord, source: str | None = None) -> str:
        """Create the backing of ``rec`` (size ``rec.capacity_bytes``), optionally with the
        data of ``source`` (a snapshot or volume image), and return its locator.

        Raises ResourceExhausted when there is no room.  Existing backing of the right
        size is kept (a retry after a crash)."""

    def release(self, rec: VolumeRecord) -> None:
        """Delete the backing; absent is fine.  Detaches stray loop devices first."""

    def backing_exists(self, rec: VolumeRecord) -> bool:
        """True when the image file or disk of ``rec`` is present."""

    def format_new(self, rec: VolumeRecord) -> None:
        """Put ``rec.fs_type`` on the freshly allocated backing (idempotent: a backing
        that already carries that filesystem is left alone)."""

    def format_target(self, rec: VolumeRecord) -> str:
        """Path mkfs can format without attaching (image file or disk node)."""

    def grow(self, rec: VolumeRecord, new_size: int) -> int:
        """Grow the backing to at least ``new_size``; return the new size.
        OutOfRange when the medium cannot grow that far."""

    def attach(self, rec: VolumeRecord, *, checked: bool = False) -> str:
        """Return the block device of ``rec``, attaching a loop device if needed (reusing
        one already backed by the image).  ``checked``: the caller has just seen that
        none is attached (under the volume's lock), so the lookup is skipped."""

    def attached_device(self, rec: VolumeRecord) -> str | None:
        """The block device of ``rec`` if it is attached now, else None."""

    def detach(self, rec: VolumeRecord) -> None:
        """Detach every loop device backed by ``rec``'s image; none is fine."""

    def refresh(self, rec: VolumeRecord) -> None:
        """Make the attached block device see the backing's current size."""

    def snapshot_path(self, snapshot_id: str, source: VolumeRecord) -> str:
        """Where the image of a snapshot of ``source`` lives in this pool."""

    def orphans(self, records: list[VolumeRecord], snapshot_paths: set[str]) -> list[Orphan]:
        """Backing found on the host that no record explains, and records without backing."""
