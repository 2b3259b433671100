"""What a pool is to the volume services, and the capacity arithmetic all pools share.

A pool is one *kind* of volume: it owns everything that differs between kinds
(how a volume is made, copied, grown, snapshotted, reached on the node,
mounted and measured).  It knows nothing about names, idempotency, staging
records or publications: those rules live in ``csi_driver.provisioning``
(controller side) and ``csi_driver.node_volumes`` (node side), which talk to
every kind through the ``Pool`` protocol below.  Every method is idempotent on
the record it is given.

Kinds today: volumes that are block devices with a filesystem of their own
(``image`` files on loop devices, whole ``disk``s; their node side is shared in
``pools.devices``).  A kind whose volumes share the pool's filesystem (btrfs
subvolumes; later directories with a project quota on xfs/ext4) implements the
same protocol with ``own_filesystem = False``: no attach, bind mounts for
staging, the limit in the filesystem's quota, no node step on expansion.

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
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from csi_driver import filesystems, mounts
from csi_driver.config import PoolConfig
from csi_driver.store import SnapshotRecord, Staging, VolumeRecord

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


def pool_capacity(
    config: PoolConfig, space: tuple[int, int], *, thin: bool, provisioned: int
) -> Capacity:
    """``compute_capacity`` for a pool of ``config`` whose ``space`` is (size, free bytes
    new volumes can use)."""
    total, free = space
    return compute_capacity(
        total=total,
        free=free,
        reserve_bytes=config.reserve_bytes,
        reserve_percent=config.reserve_percent,
        thin=thin,
        overcommit_ratio=config.overcommit_ratio,
        provisioned=provisioned,
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


@dataclass(frozen=True)
class Condition:
    """VolumeCondition: abnormal or not, and why."""

    abnormal: bool
    message: str


HEALTHY = Condition(False, "healthy")


@dataclass(frozen=True)
class VolumeUsage:
    """NodeGetVolumeStats figures (bytes only for raw block volumes)."""

    block: bool
    bytes_total: int
    bytes_used: int = 0
    bytes_available: int = 0
    inodes_total: int = 0
    inodes_used: int = 0
    inodes_free: int = 0


class MountOwner(Protocol):
    """Tells the mounts of one volume from every other mount of the node."""

    device: str  # the block device of the volume ("" for kinds without one)

    def matches(self, entry: mounts.MountEntry) -> bool:
        """True when ``entry`` is a mount of this volume (its stage or a publication)."""

    def mounts(self) -> list[mounts.MountEntry]:
        """Every mount of this volume on the node now."""


SaveRecord = Callable[[VolumeRecord], None]


class Pool(Protocol):
    """A source of volume backing.  All methods are idempotent on the record."""

    name: str
    config: PoolConfig
    kind: str  # "image" or "disk"
    supports_snapshots: bool
    shares_space: bool  # volumes share one filesystem's space (images), not whole disks
    alloc_lock: threading.Lock  # held across "check capacity, then allocate or grow"
    # Each volume carries a filesystem of its own (made at create, grown on the node).
    own_filesystem: bool
    # The backing locator is not derivable from the volume id (which disk holds it):
    # the record is made durable before the backing is written.  When False,
    # ``allocate`` returns ``data_path(rec)`` (CreateVolume relies on it to write the
    # ready record while the backing is made).
    records_backing: bool
    # Snapshots and clones are atomic by construction: no freeze of the source needed.
    atomic_snapshots: bool
    fs_types: tuple[str, ...]  # filesystems its volumes can carry (first: the kind's own)
    parameters: tuple[str, ...]  # StorageClass parameters of this kind (checked below)
    # Why the pool cannot serve: set by a failed ``start`` (the operator's words: what
    # is wrong and what to do), "" while it is starting or serving.
    problem: str

    def start(self) -> None:
        """Prepare the pool (directories, disk mounts); safe to call again.  When it
        cannot, set ``problem`` and raise: the pool stays not ready, the others serve."""

    def stop(self) -> None:
        """Release background resources (watchers); volumes stay as they are."""

    @property
    def ready(self) -> bool:
        """True once the pool can serve volumes."""

    def capacity(
        self, thin: bool, provisioned: int, records: Sequence[VolumeRecord] = ()
    ) -> Capacity:
        """Capacity figures given what is already promised to volumes of this pool
        (``provisioned`` bytes in total; ``records``: those volumes, the store's own
        objects: read them, never change them)."""

    def allocate(self, rec: VolumeRecord, source: str | None = None) -> str:
        """Create the backing of ``rec`` (size ``rec.capacity_bytes``), optionally with the
        data of ``source`` (a snapshot or volume image), and return its locator.

        Raises ResourceExhausted when there is no room.  Existing backing of the right
        size is kept (a retry after a crash)."""

    def carries_record(self, rec: VolumeRecord) -> bool:
        """True when ``allocate(rec)`` writes ``rec`` (``store.encode_volume``) into the
        backing it makes, durable in the same step as the backing, and a backing under
        the volume's name is always complete.  CreateVolume then keeps the "creating"
        record in memory (``Store.hold_volume``) and writes the ready one without fsync:
        a crash or power loss leaves no backing, or one that says what it is
        (``carried_records``)."""

    def carried_records(self, known: AbstractSet[str]) -> list[VolumeRecord]:
        """After ``start``: the records that backings carry for volume ids ``known`` lacks
        (a crash or power loss took the record file), ready to serve."""

    def release(self, rec: VolumeRecord) -> None:
        """Delete the backing; absent is fine.  Detaches stray loop devices first."""

    def backing_exists(self, rec: VolumeRecord) -> bool:
        """True when the image file or disk of ``rec`` is present."""

    def format_new(self, rec: VolumeRecord) -> None:
        """Put ``rec.fs_type`` on the freshly allocated backing (idempotent: a backing
        that already carries that filesystem is left alone)."""

    def data_path(self, rec: VolumeRecord) -> str:
        """Where the data of ``rec`` is read to copy it (image file, disk node)."""

    def minimum_size(self, fs_type: str) -> int:
        """The smallest volume of ``fs_type`` ("" = raw block) this pool can make."""

    def check_access(self, block: bool) -> None:
        """InvalidArgument when the pool cannot give volumes of that access type."""

    def check_parameters(self, parameters: dict[str, str]) -> None:
        """InvalidArgument naming a bad value of one of this kind's ``parameters``."""

    def grow(self, rec: VolumeRecord, new_size: int) -> int:
        """Grow the backing to at least ``new_size``; return the new size.
        OutOfRange when the medium cannot grow that far."""

    def detach(self, rec: VolumeRecord) -> None:
        """Detach whatever makes ``rec`` reachable on the node (loop devices); none is fine."""

    def refresh(self, rec: VolumeRecord) -> None:
        """Make what is attached see the backing's current size (a no-op if nothing is)."""

    def needs_node_expansion(self, rec: VolumeRecord) -> bool:
        """After the backing grew: must NodeExpandVolume finish the job (grow a mounted fs)?"""

    def snapshot_path(self, snapshot_id: str, source: VolumeRecord) -> str:
        """Where the snapshot of ``source`` lives in this pool."""

    def take_snapshot(
        self, source: VolumeRecord, snap: SnapshotRecord,
        quiesce: AbstractContextManager[None],
    ) -> None:
        """Make ``snap.backing`` a point-in-time copy of ``source`` (reading it inside
        ``quiesce``, unless the kind's snapshots are atomic).  A partial copy left by a
        crash is replaced; a complete one is never observed half-made."""

    def remove_snapshot(self, snap: SnapshotRecord) -> None:
        """Delete the snapshot's data and any partial copy; absent is fine."""

    # ------------------------------------------------------------- node side
    def stage(self, rec: VolumeRecord, staging: Staging, save: SaveRecord) -> str:
        """Make ``rec`` reachable at ``staging.path`` (a mounted filesystem, or for block
        access the device ready to bind); return its block device ("" if the kind has
        none).  Repeating it is fine; a failed first stage leaves nothing attached.
        ``save`` persists ``rec`` when the pool changed it (a filesystem grown)."""

    def unstage(self, rec: VolumeRecord, path: str) -> None:
        """Undo ``stage`` at ``path``; FailedPrecondition while other mounts of the volume
        remain.  Not staged is fine."""

    def owner(self, rec: VolumeRecord) -> MountOwner | None:
        """What the mounts of ``rec`` look like; None when a staged volume cannot be
        reached now (its loop device is gone)."""

    def usage(self, rec: VolumeRecord, path: str, block: bool) -> VolumeUsage:
        """NodeGetVolumeStats figures of ``rec`` published or staged at ``path``."""

    def expand_on_node(self, rec: VolumeRecord, save: SaveRecord) -> None:
        """NodeExpandVolume's part once the backing is grown (grow a mounted filesystem)."""

    def condition(self, rec: VolumeRecord) -> Condition:
        """VolumeCondition of ``rec`` (backing gone, detached, filesystem errors...)."""

    def recover(self, rec: VolumeRecord) -> str | None:
        """At start-up, make a volume recorded as staged reachable again (thaw a frozen
        stage, re-attach its device); return its device, None when its backing is gone."""

    def orphans(self, records: list[VolumeRecord], snapshot_paths: set[str]) -> list[Orphan]:
        """Backing found on the host that no record explains, and records without backing."""
