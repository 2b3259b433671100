"""Disk pool: whole disks found through udev by a selector.

Two modes (``mode`` in the pool config):

- ``volume``: each disk is one volume, raw (block) or formatted (mount).  A
  create takes the smallest free disk that is at least the requested size; the
  volume's backing is the disk's stable id (WWN, serial, loop backing file...),
  never its kernel name, so it survives renumbering.  DeleteVolume wipes the
  signatures (``wipefs -a``) so the disk becomes free again.  Snapshots and
  clones are not offered (there is nowhere to put the copy).
- ``backing``: every matched disk is formatted with ``backing_fs_type`` (xfs
  or btrfs, so snapshots are reflinks), labelled as ours, and mounted under
  ``<state-dir>/disks/<disk-id>``; each mount is an image-file pool
  (``ImagePool``), or with ``volume_kind: subvolume`` (btrfs only) a subvolume
  pool (``SubvolumePool``), and a new volume goes to the disk with the most
  free space.  Everything about a volume is then its disk's pool's business:
  this class only picks the disk.

A disk is taken only if ``disks.unsafe_reason`` finds nothing wrong (no
partitions, signature, holders, mounts; not the disk under /, the state dir
or an image pool's directory; not a loop device backed by a file under the
state dir or an image pool's directory, i.e. one of the driver's own images:
formatting it would destroy a volume).  Disks already in use by this pool (a
volume's disk, a backing disk with our label) are recognised and kept.  A
``DiskWatcher`` adds disks that appear later; a disk that vanishes makes its
volumes' condition abnormal (``backing_exists`` is false), and nothing is
deleted.  A refused disk is not
refused for good: the watcher's periodic resync (and ``rescan``) offers it
again, so a disk that was mounted, held or could not be probed when it was
first seen joins once that is over, without a uevent of its own.  A refusal
is logged when it starts or its reason changes, not on every resync.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager

from csi_driver import disks, filesystems, mounts
from csi_driver.config import PoolConfig
from csi_driver.pools.base import (
    Capacity,
    Condition,
    MountOwner,
    Orphan,
    SaveRecord,
    VolumeUsage,
    pool_capacity,
)
from csi_driver.pools.devices import BlockDevicePool
from csi_driver.pools.imagefile import ImagePool, remove_image_snapshot
from csi_driver.pools.subvolume import SubvolumePool
from csi_driver.store import READY, SnapshotRecord, Staging, VolumeRecord
from plugin_runtime import commands
from plugin_runtime.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

LABEL_PREFIX = "hk-"  # xfs labels hold 12 characters


def _label(pool: str) -> str:
    return (LABEL_PREFIX + pool)[:12]


def _selector(config: PoolConfig) -> disks.DiskSelector:
    sel = config.selector
    assert sel is not None
    return disks.DiskSelector(
        properties=dict(sel.properties),
        attributes=dict(sel.attributes),
        kernel_names=(sel.kernel,) if sel.kernel else (),
        min_size=max(1, sel.min_size),
        max_size=sel.max_size or None,
    )


def _fs_label(device: str) -> str | None:
    result = commands.run(["blkid", "-p", "-o", "value", "-s", "LABEL", device],
                          timeout=15, check=False)
    return result.stdout.strip() or None if result.returncode == 0 else None


class DiskPool(BlockDevicePool):
    kind = "disk"
    records_backing = True  # which disk holds a volume is not derivable from its id

    def __init__(
        self,
        config: PoolConfig,
        state_dir: str,
        *,
        image_dirs: Sequence[str],
        resync_seconds: float = 60.0,
    ) -> None:
        """``image_dirs``: the directory of every image pool of the driver (the state
        dir, which holds the backing-mode mounts, is always added)."""
        self.name = config.name
        self.config = config
        self.state_dir = state_dir
        self.image_dirs = tuple(dict.fromkeys((state_dir, *image_dirs)))
        self.protected_paths = tuple(dict.fromkeys(("/", *self.image_dirs)))
        self.mode = config.mode
        self.supports_snapshots = self.mode == "backing"
        self.shares_space = self.mode == "backing"
        self.selector = _selector(config)
        self.mount_root = os.path.join(state_dir, "disks")
        self.resync_seconds = resync_seconds
        self.alloc_lock = threading.Lock()
        self._lock = threading.RLock()
        self._disks: dict[str, disks.Disk] = {}  # present and (free or ours)
        self._refused: dict[str, str] = {}  # disk id -> why it is not used
        self._claimed: set[str] = set()  # volume mode: disk ids holding volumes
        # backing mode: disk id -> the pool on its filesystem
        self._backing: dict[str, ImagePool | SubvolumePool] = {}
        self._records: list[VolumeRecord] = []
        self.subvolumes = self.mode == "backing" and config.volume_kind == "subvolume"
        if self.subvolumes:
            self.own_filesystem = False
            self.atomic_snapshots = True
            self.fs_types = SubvolumePool.fs_types
            self.parameters = SubvolumePool.parameters
        self._watcher: disks.DiskWatcher | None = None
        self._ready = False
        self.problem = ""

    # ----------------------------------------------------------- lifecycle
    def adopt(self, records: list[VolumeRecord]) -> None:
        """Remember which disks hold volumes (volume mode), before discovery starts."""
        with self._lock:
            self._claimed = {r.backing for r in records if r.pool == self.name and r.backing}
            self._records = [r for r in records if r.pool == self.name]

    def start(self) -> None:
        if self._watcher is not None:
            return
        watcher = disks.DiskWatcher(self.selector, self._on_change,
                                    resync_seconds=self.resync_seconds)
        try:
            watcher.start()
        except DomainError as exc:
            self.problem = str(exc)
            raise
        self.problem = ""
        self._watcher = watcher
        self._ready = True

    def rescan(self, timeout: float | None = None) -> bool:
        """Offer every present disk again now (refused ones are re-evaluated).

        With ``timeout``, wait (bounded) for the pass; False if it did not run in time.
        """
        watcher = self._watcher
        return watcher.rescan(timeout) if watcher is not None else False

    def inspect(self) -> None:
        """One discovery pass without side effects (for ``csi-driver pools``)."""
        for disk in disks.find_disks(self.selector):
            reason = self._reason(disk)
            with self._lock:
                if reason is None or disk.disk_id in self._claimed:
                    self._disks[disk.disk_id] = disk
                else:
                    self._refused[disk.disk_id] = reason
            if self.mode == "backing":
                self._adopt_backing_mount(disk, inspect=True)
        self._ready = True

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def _reason(self, disk: disks.Disk) -> str | None:
        return disks.unsafe_reason(
            disk, protected_paths=self.protected_paths, image_dirs=self.image_dirs
        )

    def _on_change(self, added: list[disks.Disk], removed: list[str]) -> None:
        for disk in added:
            if self._holds(disk):
                continue  # a resync offering a disk that is already ours, unchanged
            try:
                self._join(disk)
            except Exception as exc:
                self._refuse(disk, str(exc), failed=True)
        for disk_id in removed:
            with self._lock:
                gone = self._disks.pop(disk_id, None)
                self._refused.pop(disk_id, None)
            if gone is not None:
                log.warning("pool %s: disk %s (%s) vanished; its volumes are abnormal",
                            self.name, gone.devnode, disk_id)

    def _holds(self, disk: disks.Disk) -> bool:
        """``disk`` is in the pool already, with this very description."""
        with self._lock:
            if self._disks.get(disk.disk_id) != disk:
                return False
            return self.mode == "volume" or disk.disk_id in self._backing

    def _refuse(self, disk: disks.Disk, reason: str, *, failed: bool = False) -> None:
        """Record why ``disk`` is not used; log only a new refusal or a new reason."""
        with self._lock:
            previous = self._refused.get(disk.disk_id)
            self._refused[disk.disk_id] = reason
            # A disk claimed (or mounted as backing) since the check began stays.
            if disk.disk_id not in self._claimed and disk.disk_id not in self._backing:
                self._disks.pop(disk.disk_id, None)
        if previous == reason:
            return
        if failed:
            log.error("pool %s: cannot use disk %s: %s", self.name, disk.devnode, reason)
        else:
            log.warning("pool %s: disk %s (%s) refused: %s", self.name, disk.devnode,
                        disk.disk_id, reason)

    def _join(self, disk: disks.Disk) -> None:
        with self._lock:
            claimed = disk.disk_id in self._claimed
        if self.mode == "volume":
            reason = None if claimed else self._reason(disk)
            if reason is not None:
                self._refuse(disk, reason)
                return
            with self._lock:
                self._disks[disk.disk_id] = disk
                self._refused.pop(disk.disk_id, None)
            log.info("pool %s: disk %s (%s, %d bytes) joined", self.name, disk.devnode,
                     disk.disk_id, disk.size_bytes)
            return
        if self._adopt_backing_mount(disk):
            return
        target = os.path.join(self.mount_root, disk.disk_id)
        if filesystems.probe_filesystem(disk.devnode) == self.config.backing_fs_type and \
                _fs_label(disk.devnode) == _label(self.name):
            pass  # formatted by us before; mount it again
        else:
            reason = self._reason(disk)
            if reason is not None:
                self._refuse(disk, reason)
                return
            filesystems.make_filesystem(disk.devnode, self.config.backing_fs_type,
                                        label=_label(self.name))
        os.makedirs(target, mode=0o700, exist_ok=True)
        mounts.mount(disk.devnode, target, self.config.backing_fs_type, ("noatime",))
        self._add_backing(disk, target)

    def _adopt_backing_mount(self, disk: disks.Disk, *, inspect: bool = False) -> bool:
        target = os.path.join(self.mount_root, disk.disk_id)
        entry = mounts.find_mount(target) if os.path.isdir(target) else None
        if entry is None or entry.source != disk.devnode:
            return False
        self._add_backing(disk, target, inspect=inspect)
        return True

    def _add_backing(self, disk: disks.Disk, target: str, *, inspect: bool = False) -> None:
        sub: ImagePool | SubvolumePool
        if self.subvolumes:
            sub = SubvolumePool(self.config, path=target)
            sub.adopt([r for r in self._records if r.backing.startswith(target + "/")])
            if inspect:
                sub.inspect()  # no quota changes from `csi-driver pools`
            else:
                sub.start()
        else:
            sub = ImagePool(self.config, path=target)
            sub.start()
        with self._lock:
            self._disks[disk.disk_id] = disk
            self._backing[disk.disk_id] = sub
            self._refused.pop(disk.disk_id, None)
        log.info("pool %s: disk %s backs %s at %s", self.name, disk.devnode,
                 "subvolumes" if self.subvolumes else "images", target)

    # ------------------------------------------------------------ helpers
    def _sub_of(self, rec: VolumeRecord) -> ImagePool | SubvolumePool:
        with self._lock:
            subs = dict(self._backing)
        for sub in subs.values():
            if rec.backing.startswith(sub.path + "/") or (
                not rec.backing and os.path.exists(sub.data_path(rec))
            ):
                return sub
        raise NotFound(f"the disk backing volume {rec.id} is not present")

    def _image_sub_of(self, rec: VolumeRecord) -> ImagePool:
        sub = self._sub_of(rec)
        if not isinstance(sub, ImagePool):
            raise FailedPrecondition(f"volume {rec.id} is a subvolume: it has no block device")
        return sub

    def _disk_of(self, rec: VolumeRecord) -> disks.Disk:
        with self._lock:
            disk = self._disks.get(rec.backing)
        if disk is None:
            raise NotFound(f"disk {rec.backing or '?'} of volume {rec.id} is not present")
        return disk

    def _free_disks(self) -> list[disks.Disk]:
        with self._lock:
            return sorted((d for k, d in self._disks.items() if k not in self._claimed),
                          key=lambda d: (d.size_bytes, d.kernel_name))

    def describe(self) -> dict[str, object]:
        with self._lock:
            used = [{"id": k, "device": d.devnode, "size_bytes": d.size_bytes,
                     "state": "in use" if k in self._claimed or k in self._backing else "free"}
                    for k, d in sorted(self._disks.items())]
            refused = [{"id": k, "state": "refused", "reason": r}
                       for k, r in sorted(self._refused.items())]
        detail: dict[str, object] = {"mode": self.mode, "disks": used + refused}
        if self.problem:
            detail["problem"] = self.problem
        if self.subvolumes:
            detail["volume_kind"] = "subvolume"
            with self._lock:
                subs = list(self._backing.values())
            modes = sorted({str(sub.describe()["quota_mode"]) for sub in subs
                            if isinstance(sub, SubvolumePool)})
            detail["quota_mode"] = ", ".join(modes) or "unknown"
        return detail

    # ----------------------------------------------------------- capacity
    def capacity(
        self, thin: bool, provisioned: int, records: Sequence[VolumeRecord] = ()
    ) -> Capacity:
        if self.mode == "backing":
            with self._lock:
                subs = list(self._backing.values())
            total = free = 0
            for sub in subs:
                t, f = sub.space(self._on(sub, records))
                total += t
                free += f
            cap = pool_capacity(self.config, (total, free), thin=thin, provisioned=provisioned)
            biggest = max((sub.capacity(thin, 0, self._on(sub, records)).maximum_volume_bytes
                           for sub in subs), default=0)
            return Capacity(cap.total_bytes, cap.available_bytes,
                            min(cap.maximum_volume_bytes, biggest), cap.free_bytes,
                            cap.reserve_bytes, cap.provisioned_bytes)
        with self._lock:
            total = sum(d.size_bytes for d in self._disks.values())
        free_disks = self._free_disks()
        available = sum(d.size_bytes for d in free_disks)
        biggest = max((d.size_bytes for d in free_disks), default=0)
        return Capacity(total, available, biggest, available, 0, provisioned)

    # ------------------------------------------------------------ backing
    def allocate(self, rec: VolumeRecord, source: str | None = None) -> str:
        if self.mode == "backing":
            if rec.backing:
                return self._sub_of(rec).allocate(rec, source)
            with self._lock:
                subs = list(self._backing.values())
            if not subs:
                raise ResourceExhausted(f"pool {self.name} has no disks")
            # A copy goes to its source's disk (a reflink there), a new volume to the
            # disk with the most free space.
            near = [s for s in subs if source is not None and source.startswith(s.path + "/")]
            best = near[0] if near else max(subs, key=lambda s: s.fs_stats()[1])
            return best.allocate(rec, source)
        if source is not None:
            raise InvalidArgument(f"pool {self.name} gives whole disks: no snapshots or clones")
        if rec.backing:
            self._disk_of(rec)
            return rec.backing
        for disk in self._free_disks():
            if disk.size_bytes >= rec.capacity_bytes:
                if self._reason(disk) is not None:
                    continue  # changed since discovery
                with self._lock:
                    self._claimed.add(disk.disk_id)
                log.info("pool %s: disk %s (%s) holds volume %s", self.name, disk.devnode,
                         disk.disk_id, rec.id)
                return disk.disk_id
        raise ResourceExhausted(
            f"pool {self.name} has no free disk of at least {rec.capacity_bytes} bytes"
        )

    def release(self, rec: VolumeRecord) -> None:
        if self.mode == "backing":
            try:
                self._sub_of(rec).release(rec)
            except NotFound:
                log.warning("volume %s: its backing disk is gone; forgetting it", rec.id)
            return
        if not rec.backing:
            return
        with self._lock:
            disk = self._disks.get(rec.backing)
        if disk is not None:
            commands.run(["wipefs", "-a", disk.devnode], timeout=60)
        with self._lock:
            self._claimed.discard(rec.backing)

    def backing_exists(self, rec: VolumeRecord) -> bool:
        if self.mode == "backing":
            try:
                return self._sub_of(rec).backing_exists(rec)
            except NotFound:
                return False
        with self._lock:
            disk = self._disks.get(rec.backing)
        return disk is not None and os.path.exists(disk.devnode)

    def format_new(self, rec: VolumeRecord) -> None:
        if self.mode == "backing":
            self._sub_of(rec).format_new(rec)
            return
        filesystems.make_filesystem(self._disk_of(rec).devnode, rec.fs_type, check_empty=False)

    def data_path(self, rec: VolumeRecord) -> str:
        if self.mode == "backing":
            return self._sub_of(rec).data_path(rec)
        return self._disk_of(rec).devnode

    def grow(self, rec: VolumeRecord, new_size: int) -> int:
        if self.mode == "backing":
            return self._sub_of(rec).grow(rec, new_size)
        disk = self._disk_of(rec)
        if new_size > disk.size_bytes:
            raise OutOfRange(
                f"volume {rec.id} is a whole disk of {disk.size_bytes} bytes; it cannot grow "
                f"to {new_size}"
            )
        return new_size

    def attach(self, rec: VolumeRecord, *, checked: bool = False) -> str:
        if self.mode == "backing":
            return self._image_sub_of(rec).attach(rec, checked=checked)
        return self._disk_of(rec).devnode

    def attached_device(self, rec: VolumeRecord) -> str | None:
        if self.mode == "backing":
            try:
                return self._image_sub_of(rec).attached_device(rec)
            except (NotFound, FailedPrecondition):
                return None
        with self._lock:
            disk = self._disks.get(rec.backing)
        return disk.devnode if disk is not None else None

    def detach(self, rec: VolumeRecord) -> None:
        if self.mode == "backing":
            try:
                self._sub_of(rec).detach(rec)
            except NotFound:
                return

    def refresh(self, rec: VolumeRecord) -> None:
        if self.mode == "backing":
            self._sub_of(rec).refresh(rec)

    def snapshot_path(self, snapshot_id: str, source: VolumeRecord) -> str:
        """On the disk of ``source``, so the copy can be a reflink."""
        if self.mode != "backing":
            raise FailedPrecondition(f"pool {self.name} does not support snapshots")
        return self._sub_of(source).snapshot_path(snapshot_id, source)

    def take_snapshot(
        self, source: VolumeRecord, snap: SnapshotRecord,
        quiesce: AbstractContextManager[None],
    ) -> None:
        if self.mode != "backing":
            raise FailedPrecondition(f"pool {self.name} does not support snapshots")
        self._sub_of(source).take_snapshot(source, snap, quiesce)

    def remove_snapshot(self, snap: SnapshotRecord) -> None:
        with self._lock:
            subs = list(self._backing.values())
        for sub in subs:
            if snap.backing.startswith(sub.path + "/"):
                sub.remove_snapshot(snap)
                return
        if self.subvolumes and snap.backing:
            raise FailedPrecondition(f"the disk holding snapshot {snap.id} is not present")
        remove_image_snapshot(snap)

    @staticmethod
    def _on(sub: ImagePool | SubvolumePool, records: Sequence[VolumeRecord]
            ) -> list[VolumeRecord]:
        return [r for r in records if r.backing.startswith(sub.path + "/")]

    # -------------------------------------------- subvolume volumes on the disks
    # With volume_kind: subvolume the disks' pools decide what a volume is; the
    # block-device behaviour inherited from BlockDevicePool applies otherwise.
    def minimum_size(self, fs_type: str) -> int:
        if self.subvolumes:
            return self._template().minimum_size(fs_type)
        return super().minimum_size(fs_type)

    def _template(self) -> SubvolumePool:
        """A subvolume pool object for the checks that need no disk."""
        return SubvolumePool(self.config, path=self.mount_root)

    def check_access(self, block: bool) -> None:
        if self.subvolumes and block:
            raise InvalidArgument(
                f"pool {self.name} is a disk pool whose volumes are btrfs subvolumes "
                "(volume_kind: subvolume): it cannot give raw block volumes; use a disk "
                "pool in volume mode or an image pool for block access"
            )

    def check_parameters(self, parameters: dict[str, str]) -> None:
        if self.subvolumes:
            self._template().check_parameters(parameters)

    def needs_node_expansion(self, rec: VolumeRecord) -> bool:
        if self.subvolumes:
            return False
        return super().needs_node_expansion(rec)

    def owner(self, rec: VolumeRecord) -> MountOwner | None:
        if self.subvolumes:
            try:
                return self._sub_of(rec).owner(rec)
            except NotFound:
                return None
        return super().owner(rec)

    def stage(self, rec: VolumeRecord, staging: Staging, save: SaveRecord) -> str:
        if self.subvolumes:
            return self._sub_of(rec).stage(rec, staging, save)
        return super().stage(rec, staging, save)

    def unstage(self, rec: VolumeRecord, path: str) -> None:
        if self.subvolumes:
            try:
                self._sub_of(rec).unstage(rec, path)
            except NotFound:
                mounts.unmount(path)  # the disk is gone: only the stage's mount is left
            return
        super().unstage(rec, path)

    def usage(self, rec: VolumeRecord, path: str, block: bool) -> VolumeUsage:
        if self.subvolumes:
            return self._sub_of(rec).usage(rec, path, block)
        return super().usage(rec, path, block)

    def expand_on_node(self, rec: VolumeRecord, save: SaveRecord) -> None:
        if self.subvolumes:
            return
        super().expand_on_node(rec, save)

    def condition(self, rec: VolumeRecord) -> Condition:
        if self.subvolumes:
            try:
                return self._sub_of(rec).condition(rec)
            except NotFound as exc:
                return Condition(True, str(exc))
        return super().condition(rec)

    def recover(self, rec: VolumeRecord) -> str | None:
        if self.subvolumes:
            try:
                return self._sub_of(rec).recover(rec)
            except NotFound:
                return None
        return super().recover(rec)

    def orphans(self, records: list[VolumeRecord], snapshot_paths: set[str]) -> list[Orphan]:
        found: list[Orphan] = []
        mine = [r for r in records if r.pool == self.name]
        if self.mode == "backing":
            with self._lock:
                subs = list(self._backing.values())
            for sub in subs:
                found += sub.orphans(records, snapshot_paths)
            return found
        for rec in mine:
            if rec.state == READY and not self.backing_exists(rec):
                found.append(Orphan("record-without-disk", self.name, rec.backing,
                                    f"volume {rec.id} ({rec.name})"))
        return found
