"""Subvolume pool: each volume is a btrfs subvolume whose qgroup limit is its capacity.

Layout under the pool path (a directory of a mounted btrfs filesystem)::

    volumes/<volume-id>       one subvolume per volume, limit max_rfer = capacity
    volumes/.creating-<id>    a new volume's subvolume while it is made (below)
    snapshots/<snapshot-id>   one read-only snapshot subvolume per snapshot

Everything goes through the kernel's btrfs ioctls (``csi_driver.btrfs``): a
create is one ``SUBVOL_CREATE_V2`` carrying its limit, a snapshot one
``SNAP_CREATE_V2`` (atomic: no freeze, and a name that exists is complete),
expansion one ``QGROUP_LIMIT`` that writers see at once, so there is no node
step.  A new subvolume, a limit and a deletion are durable only at the next
transaction commit, so each create/delete commits before the record moves on;
after a crash the wanted limits are applied again at start from the records.

A new empty volume carries its own record (``carries_record``): its subvolume
is made as ``.creating-<id>``, given its limit, no-CoW flag and the record in
the ``trusted.hostkit.record`` xattr of its root, then renamed to ``<id>``, and
one commit makes all of it durable.  So ``volumes/<id>`` never exists
incomplete, and that commit is the create's only durability wait: the
"creating" record stays in memory and the ready record file is written without
fsync (the two fsyncs were 0.5-1 ms of the 3 ms budget, more on a busy disk).
A crash before the commit leaves nothing durable, or a ``.creating-`` leftover
that start removes (it was never handed out).  A crash after it, or a power
loss that takes the unsynced record file (or leaves it empty), leaves a
subvolume that says which volume it is: at start the driver writes its record
again (``carried_records``), ready, with the limit in force as its capacity if
that is larger (an expansion since; a limit that is gone is set again), and the
CO's retry gets that volume.  Every later change of the record (expansion,
deletion) is fsynced as for any volume.  Only root with CAP_SYS_ADMIN reads or
writes ``trusted.`` xattrs, so a pod cannot forge one; a snapshot keeps its
source's xattr, whose id then differs from the copy's own and is ignored.
Copies (restores, clones) keep the durable "creating" record: a snapshot ioctl
commits by itself, so there is no single step to put the record in.

Quotas: at start the pool enables them on the filesystem if they are off.
The default ``quota_mode: full`` enables full qgroups; ``auto`` picks simple
quotas where the kernel has them (6.7+) and full qgroups otherwise; quotas that
are already on keep their mode (switching would drop every limit).  Why full by
default: a volume's capacity must bound what it holds, restores and clones
included, and its stats must say what it holds.  Measured here, simple quotas
charge every extent once, to the volume that wrote it: a clone with a 10 MiB
limit on 8 MiB of shared data accepted 10 MiB more (18 MiB visible) and its
stats showed only what it wrote; the filesystem also gets the ``simple_quota``
incompat bit (kernels before 6.7 cannot mount it).  What full qgroups cost:
25-30 % fewer random-write IOPS on a volume after a snapshot of it.  Operators
who prefer that speed and accept the looser bound choose ``simple``.  The mode
in force and the reason are shown by ``csi-driver pools``.

Node side: staging is a bind mount of the subvolume (read-only by a second
remount, flag options as for any bind), publishing a bind of the stage.  Bind
rather than a ``subvolid=`` mount: it needs no device node, works on any
btrfs (one or several devices), keeps the operator's mount options of the
pool filesystem (compression, ...), and costs a fifth of a subvolid mount.
The mounts of a volume are recognised by the pool filesystem's device numbers
plus ``subvolid=<id>`` in the super options (a deleted-but-mounted subvolume
shows an empty directory, so deletion refuses a mounted one).

Capacity: the pool filesystem's size and free space (statvfs), with the same
thin/thick arithmetic as image pools.  A thick volume cannot be preallocated,
so its unused limit (limit - referenced) is counted as taken: the free space
given to ``compute_capacity`` is the real free space minus what thick volumes
may still write.  Stats: bytes from the qgroup (referenced + not yet committed
reservations), capacity = the limit; inodes as statvfs reports them (btrfs
allocates inodes dynamically and reports 0).  Raw block volumes are not
possible (INVALID_ARGUMENT naming the pool and its kind).

Leaves room for a project-quota kind on xfs/ext4 (directories with a project
quota): it would be another pool module with the same protocol.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager
from dataclasses import dataclass

from csi_driver import btrfs, filesystems, mounts
from csi_driver.config import PoolConfig
from csi_driver.faults import crash_point
from csi_driver.pools.base import (
    HEALTHY,
    Capacity,
    Condition,
    Orphan,
    SaveRecord,
    VolumeUsage,
    pool_capacity,
)
from csi_driver.store import (
    READY,
    SnapshotRecord,
    Staging,
    VolumeRecord,
    decode_volume,
    encode_volume,
    is_valid_id,
)
from plugin_runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger(__name__)

PARAM_NOCOW = "nocow"
# The smallest useful limit: metadata is charged too, in 16 KiB nodes.
MIN_SUBVOLUME_BYTES = 1 << 20
RECORD_XATTR = "trusted.hostkit.record"
# An xattr must fit one btrfs leaf item (under 4 KiB with the smallest node size); a
# record with more parameters than that takes the durable "creating" record instead.
MAX_CARRIED_BYTES = 2048
CREATING_PREFIX = ".creating-"
_MODES = {"simple": btrfs.QuotaMode.SIMPLE, "full": btrfs.QuotaMode.FULL}


def _holder(path: str, table: Sequence[mounts.MountEntry]) -> mounts.MountEntry | None:
    """The mount that holds ``path`` (the longest mount point above it)."""
    real = os.path.realpath(path)
    best = None
    for entry in table:
        point = entry.mount_point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = entry
    return best


@dataclass
class SubvolumeMounts:
    """Identifies mounts of one subvolume volume (a ``MountOwner``)."""

    fs_device: tuple[int, int]
    subvolume_id: int
    device: str = ""

    def matches(self, entry: mounts.MountEntry) -> bool:
        return entry.fs_type == "btrfs" and (entry.major, entry.minor) == self.fs_device \
            and f"subvolid={self.subvolume_id}" in entry.super_options

    def mounts(self) -> list[mounts.MountEntry]:
        return [e for e in mounts.read_mounts(f"subvolid={self.subvolume_id}")
                if self.matches(e)]


class SubvolumePool:
    kind = "subvolume"
    supports_snapshots = True
    shares_space = True
    own_filesystem = False
    records_backing = False  # volumes/<id>: derivable from the id
    atomic_snapshots = True
    fs_types: tuple[str, ...] = ("btrfs",)
    parameters: tuple[str, ...] = (PARAM_NOCOW,)

    def __init__(self, config: PoolConfig, path: str | None = None) -> None:
        self.name = config.name
        self.config = config
        self.path = path or config.path
        self.volume_dir = os.path.join(self.path, "volumes")
        self.snapshot_dir = os.path.join(self.path, "snapshots")
        self.alloc_lock = threading.Lock()
        self._ready = False
        self._records: list[VolumeRecord] = []
        self.quota: btrfs.QuotaStatus | None = None
        self.quota_reason = ""
        self.problem = ""
        self._fs_device_cache: tuple[tuple[int, int], tuple[int, int]] | None = None

    # ----------------------------------------------------------- lifecycle
    def adopt(self, records: list[VolumeRecord]) -> None:
        """The records at start: their limits are applied again (a crash may have lost one)."""
        self._records = [r for r in records if r.pool == self.name]

    def _check_filesystem(self) -> None:
        parent = self.path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        btrfs.require_btrfs(parent, f"subvolume pool {self.name} (path {self.path})")

    def start(self) -> None:
        try:
            self._check_filesystem()
            for d in (self.path, self.volume_dir, self.snapshot_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
            setup = btrfs.enable_quotas(self.path, self._wanted())
            self.quota, self.quota_reason = setup.status, setup.reason
            if setup.status.inconsistent and setup.status.mode is btrfs.QuotaMode.FULL:
                log.warning("pool %s: qgroups are inconsistent; rescanning", self.name)
                btrfs.rescan_quotas(self.path, wait=True)
                self.quota = btrfs.quota_status(self.path)
            self._reapply_limits()
            self._remove_unfinished()
            with contextlib.suppress(DomainError):
                btrfs.remove_stale_qgroups(self.path)
        except (DomainError, OSError) as exc:
            self.problem = str(exc)
            raise
        self.problem = ""
        self._ready = True
        log.info("pool %s: subvolumes under %s, quotas %s (%s)", self.name, self.path,
                 self.quota.mode.value if self.quota else "?", self.quota_reason)

    def inspect(self) -> None:
        """Read-only look for ``csi-driver pools``: filesystem and quota state, no changes."""
        try:
            self._check_filesystem()
            self.quota = btrfs.quota_status(self.path) if os.path.isdir(self.path) else None
            self._ready = self.quota is not None and self.quota.enabled
            if not self._ready:
                self.problem = "quotas are off (the driver enables them when it starts)"
            elif self.quota is not None:
                self.quota_reason = self._in_force(self.quota.mode)
        except DomainError as exc:
            self.problem = str(exc)
            self._ready = False

    def _wanted(self) -> btrfs.QuotaMode:
        """The mode ``quota_mode`` asks for on this kernel."""
        want = _MODES.get(self.config.quota_mode)
        if want is not None:
            return want
        return btrfs.QuotaMode.SIMPLE if btrfs.simple_quotas_supported() \
            else btrfs.QuotaMode.FULL

    def _in_force(self, mode: btrfs.QuotaMode) -> str:
        want = self._wanted()
        if mode is want:
            return f"{mode.value}: what quota_mode {self.config.quota_mode} asks for here"
        return (f"{mode.value} was on already; quota_mode {self.config.quota_mode} asks for "
                f"{want.value}, not switched because that would drop every limit")

    def _reapply_limits(self) -> None:
        for rec in self._records:
            if rec.state != READY:
                continue
            path = self.volume_path(rec.id)
            if btrfs.is_subvolume(path):
                btrfs.set_limit(self.path, btrfs.subvolume_id(path), rec.capacity_bytes)
        self._records = []

    def _remove_unfinished(self) -> None:
        """Delete the ``.creating-`` subvolumes a crash left: made, never renamed into place,
        so never handed out or recorded (the next create of that id makes a new one)."""
        removed = False
        for entry in sorted(os.listdir(self.volume_dir)):
            if not entry.startswith(CREATING_PREFIX):
                continue
            path = os.path.join(self.volume_dir, entry)
            try:
                btrfs.delete_subvolume(path, check_mounts=False)
            except DomainError as exc:
                log.warning("pool %s: cannot remove %s, left by an interrupted create: %s",
                            self.name, path, exc)
                continue
            log.warning("pool %s: removed %s, the subvolume of a create a crash interrupted "
                        "before it was complete (never handed out)", self.name, path)
            removed = True
        if removed:
            btrfs.commit(self.path)

    def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def describe(self) -> dict[str, object]:
        detail: dict[str, object] = {
            "path": self.path,
            "quota_mode": self.quota.mode.value if self.quota else "unknown",
        }
        if self.quota is not None and self.quota.inconsistent:
            detail["quota_inconsistent"] = True
        if self.quota_reason:
            detail["quota_reason"] = self.quota_reason
        if self.problem:
            detail["problem"] = self.problem
        return detail

    # -------------------------------------------------------------- paths
    def volume_path(self, volume_id: str) -> str:
        return os.path.join(self.volume_dir, volume_id)

    def snapshot_path(self, snapshot_id: str, source: VolumeRecord) -> str:
        return os.path.join(self.snapshot_dir, snapshot_id)

    def data_path(self, rec: VolumeRecord) -> str:
        return self.volume_path(rec.id)

    # ----------------------------------------------------------- capacity
    def fs_stats(self) -> tuple[int, int]:
        """(size, free bytes) of the pool filesystem."""
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def space(self, records: Sequence[VolumeRecord] = ()) -> tuple[int, int]:
        """(size, free bytes) for new volumes: a thick volume cannot be preallocated,
        so what it may still write is taken from the filesystem's free space."""
        total, free = self.fs_stats()
        return total, max(0, free - self.promised_to_thick(records))

    def capacity(
        self, thin: bool, provisioned: int, records: Sequence[VolumeRecord] = ()
    ) -> Capacity:
        return pool_capacity(self.config, self.space(records), thin=thin,
                             provisioned=provisioned)

    def promised_to_thick(self, records: Sequence[VolumeRecord]) -> int:
        """What thick volumes may still write (limit - referenced), counted as taken."""
        thick = [r for r in records if not r.thin and r.state == READY]
        if not thick:
            return 0
        usage = btrfs.list_qgroups(self.path, live=False)  # the tree alone: 0.6 ms, not 15
        promised = 0
        for rec in thick:
            try:
                used = usage.get(btrfs.subvolume_id(self.volume_path(rec.id)))
            except NotFound:
                continue
            promised += max(0, rec.capacity_bytes - (used.referenced if used else 0))
        return promised

    def minimum_size(self, fs_type: str) -> int:
        return MIN_SUBVOLUME_BYTES

    def check_access(self, block: bool) -> None:
        if block:
            raise InvalidArgument(
                f"pool {self.name} is a {self.kind} pool (btrfs subvolumes): it cannot give "
                "raw block volumes; use an image or disk pool for block access"
            )

    def check_parameters(self, parameters: dict[str, str]) -> None:
        value = parameters.get(PARAM_NOCOW, "")
        if value and value.lower() not in ("true", "false"):
            raise InvalidArgument(f"parameter {PARAM_NOCOW}: expected 'true' or 'false', "
                                  f"got {value!r}")

    # ------------------------------------------------------------ backing
    def carries_record(self, rec: VolumeRecord) -> bool:
        return self._carried_bytes(rec) is not None

    @staticmethod
    def _carried_bytes(rec: VolumeRecord) -> bytes | None:
        """The record as the new subvolume carries it; None for copies and records too
        large for an xattr."""
        if rec.source_snapshot or rec.source_volume:
            return None
        payload = encode_volume(rec)
        return payload if len(payload) <= MAX_CARRIED_BYTES else None

    def allocate(self, rec: VolumeRecord, source: str | None = None) -> str:
        path = self.volume_path(rec.id)
        if btrfs.is_subvolume(path):  # a retry after a crash: complete by construction
            btrfs.set_limit(self.path, btrfs.subvolume_id(path), rec.capacity_bytes)
        elif source is None:
            self._create(rec, path)
        else:
            # Restores and clones are writable snapshots; each gets its own limit.
            btrfs.snapshot(source, self.volume_dir, rec.id, read_only=False,
                           limit=rec.capacity_bytes)
        btrfs.commit(self.path)  # the subvolume and its limit survive a crash from here
        return path

    def _create(self, rec: VolumeRecord, path: str) -> None:
        """The empty subvolume of ``rec`` made under a temporary name with its limit, its
        no-CoW flag and (``carries_record``) its record, then renamed to ``path``: the
        volume's name only ever holds a complete subvolume (see the module docstring)."""
        name = CREATING_PREFIX + rec.id
        unfinished = os.path.join(self.volume_dir, name)
        with contextlib.suppress(btrfs.SubvolumeNotFound):
            btrfs.delete_subvolume(unfinished, check_mounts=False)  # an earlier attempt's
        btrfs.create_subvolume(self.volume_dir, name, limit=rec.capacity_bytes)
        try:
            payload = self._carried_bytes(rec)
            if payload is not None:
                os.setxattr(unfinished, RECORD_XATTR, payload)
            if rec.parameters.get(PARAM_NOCOW, "").lower() == "true":
                btrfs.set_nocow(unfinished)  # empty: everything made in it inherits no-CoW
            crash_point("create.before_subvolume_named")
            os.rename(unfinished, path)
        except BaseException:
            with contextlib.suppress(DomainError, OSError):
                btrfs.delete_subvolume(unfinished, check_mounts=False)
            raise

    def carried_records(self, known: AbstractSet[str]) -> list[VolumeRecord]:
        found = []
        for entry in sorted(os.listdir(self.volume_dir)):
            if entry in known or not is_valid_id(entry, "vol"):
                continue
            rec = self._carried(os.path.join(self.volume_dir, entry))
            if rec is None or rec.id != entry:
                continue  # none, or a snapshot's source's: an orphan (``orphans``)
            if rec.pool != self.name:
                log.warning("pool %s: subvolume %s carries the record of volume %s of pool "
                            "%s; not recorded again here", self.name, entry, rec.id, rec.pool)
                continue
            # ``volumes/<id>`` only ever holds a complete, committed subvolume, so the
            # volume is ready; its size is what was promised, or more if it was expanded
            # since (the limit in force).
            path = self.volume_path(rec.id)
            try:
                subvolume = btrfs.subvolume_id(path)
                limit = btrfs.qgroup_usage(self.path, subvolume).max_referenced
                rec.capacity_bytes = max(rec.capacity_bytes, limit or 0)
                if limit != rec.capacity_bytes:  # lost with quotas turned off, or a crash
                    btrfs.set_limit(self.path, subvolume, rec.capacity_bytes)
            except DomainError as exc:
                log.warning("pool %s: cannot read or set the limit of %s: %s", self.name,
                            path, exc)
            rec.state, rec.backing = READY, path
            rec.staging, rec.publications = None, {}
            found.append(rec)
        return found

    def _carried(self, path: str) -> VolumeRecord | None:
        """The record the subvolume at ``path`` carries, None when it carries none."""
        try:
            return decode_volume(os.getxattr(path, RECORD_XATTR))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOENT, errno.ENOTDIR):
                log.warning("cannot read the record %s carries: %s", path, exc)
            return None
        except ValueError as exc:
            log.warning("the record %s carries is damaged: %s", path, exc)
            return None

    def release(self, rec: VolumeRecord) -> None:
        path = self.volume_path(rec.id)
        with contextlib.suppress(btrfs.SubvolumeNotFound):
            btrfs.delete_subvolume(path)
            btrfs.commit(self.path)

    def backing_exists(self, rec: VolumeRecord) -> bool:
        return btrfs.is_subvolume(self.volume_path(rec.id))

    def format_new(self, rec: VolumeRecord) -> None:
        """Nothing to format: a subvolume lives in the pool's own filesystem (never called,
        ``own_filesystem`` is False)."""

    def grow(self, rec: VolumeRecord, new_size: int) -> int:
        path = self.volume_path(rec.id)
        if not btrfs.is_subvolume(path):
            raise NotFound(f"subvolume of volume {rec.id} is missing ({path})")
        btrfs.set_limit(self.path, btrfs.subvolume_id(path), new_size)
        return new_size

    def detach(self, rec: VolumeRecord) -> None:
        """Nothing is attached: a subvolume is reached through the pool's mount."""

    def refresh(self, rec: VolumeRecord) -> None:
        """Nothing to refresh: a raised limit applies to writers at once."""

    def needs_node_expansion(self, rec: VolumeRecord) -> bool:
        return False

    def take_snapshot(
        self, source: VolumeRecord, snap: SnapshotRecord,
        quiesce: AbstractContextManager[None],
    ) -> None:
        if not btrfs.is_subvolume(snap.backing):
            btrfs.snapshot(self.volume_path(source.id), self.snapshot_dir,
                           os.path.basename(snap.backing), read_only=True)
        btrfs.commit(self.path)

    def remove_snapshot(self, snap: SnapshotRecord) -> None:
        if not snap.backing:
            return
        with contextlib.suppress(btrfs.SubvolumeNotFound):
            btrfs.delete_subvolume(snap.backing)
            btrfs.commit(self.path)

    # ------------------------------------------------------------- node side
    def owner(self, rec: VolumeRecord) -> SubvolumeMounts | None:
        path = self.volume_path(rec.id)
        try:
            subvolume_id = btrfs.subvolume_id(path)
        except NotFound:
            return None
        fs_device = self._fs_device()
        if fs_device is None:
            return None
        return SubvolumeMounts(fs_device, subvolume_id)

    def _pool_mount(self) -> mounts.MountEntry | None:
        return _holder(self.path, mounts.read_mounts(" - btrfs "))

    def _fs_device(self) -> tuple[int, int] | None:
        """The device numbers mountinfo gives the pool filesystem (not ``st_dev``: btrfs
        gives each subvolume its own).  Looked up once per pool-path inode and device,
        as every node RPC asks: a remount of the pool filesystem changes the ``st_dev``
        of the path and so looks it up again."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        cached = self._fs_device_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        holder = self._pool_mount()
        if holder is None:
            return None
        self._fs_device_cache = (key, (holder.major, holder.minor))
        return holder.major, holder.minor

    def stage(self, rec: VolumeRecord, staging: Staging, save: SaveRecord) -> str:
        self.check_access(staging.block)
        ours = self.owner(rec)
        if ours is None or not btrfs.is_subvolume(self.volume_path(rec.id)):
            raise FailedPrecondition(
                f"the subvolume of volume {rec.id} is missing ({self.volume_path(rec.id)})"
            )
        path = staging.path
        current = mounts.find_mount(path) if os.path.exists(path) else None
        if current is not None:
            if ours.matches(current):
                return ""
            raise AlreadyExists(f"something else ({current.source}) is mounted at {path}")
        os.makedirs(path, mode=0o750, exist_ok=True)
        mounts.bind_mount(self.volume_path(rec.id), path, read_only=staging.read_only,
                          options=staging.mount_flags)
        crash_point("stage.after_mount")
        return ""

    def unstage(self, rec: VolumeRecord, path: str) -> None:
        ours = self.owner(rec)
        if ours is None:
            # The subvolume was deleted behind the driver's back (the kernel allows it
            # while mounted): its stage is then an empty btrfs mount of the pool's
            # filesystem at the path the record gives; take that away.
            pool_fs = self._fs_device()
            if pool_fs is not None and rec.staging is not None and rec.staging.path == path:
                mounts.unmount_matching(path, lambda e: e.fs_type == "btrfs"
                                        and (e.major, e.minor) == pool_fs)
            return
        mounts.unmount_matching(path, ours.matches)
        crash_point("unstage.after_unmount")
        others = ours.mounts()
        if others:
            raise FailedPrecondition(
                f"volume {rec.id} is still mounted at {others[0].mount_point}"
            )

    def usage(self, rec: VolumeRecord, path: str, block: bool) -> VolumeUsage:
        st = filesystems.fs_usage(path)
        try:
            used = btrfs.qgroup_usage(self.path, btrfs.subvolume_id(self.volume_path(rec.id)))
        except (btrfs.QuotasDisabled, NotFound):
            # No accounting: the filesystem's figures (the condition says why).
            return VolumeUsage(False, st.bytes_total, st.bytes_used, st.bytes_available,
                               st.inodes_total, st.inodes_used, st.inodes_free)
        total = used.max_referenced if used.max_referenced is not None else rec.capacity_bytes
        in_use = used.referenced + used.reserved
        available = max(0, min(total - in_use, st.bytes_available))
        return VolumeUsage(False, total, in_use, available, st.inodes_total, st.inodes_used,
                           st.inodes_free)

    def expand_on_node(self, rec: VolumeRecord, save: SaveRecord) -> None:
        """No node step: ControllerExpandVolume raised the limit, which applies at once."""

    def condition(self, rec: VolumeRecord) -> Condition:
        path = self.volume_path(rec.id)
        if not btrfs.is_subvolume(path):
            return Condition(True, f"the subvolume of volume {rec.id} is missing ({path})")
        try:
            status = btrfs.quota_status(self.path)
            if not status.enabled:
                return Condition(True, f"quotas are off on the btrfs filesystem of pool "
                                       f"{self.name}: the volume's limit is not enforced")
            usage = btrfs.qgroup_usage(self.path, btrfs.subvolume_id(path))
            if usage.max_referenced is None:
                return Condition(True, f"volume {rec.id} has no quota limit (it should be "
                                       f"{rec.capacity_bytes} bytes)")
        except DomainError as exc:
            return Condition(True, f"cannot read the quota of volume {rec.id}: {exc}")
        holder = self._pool_mount()
        if holder is not None:
            problem = filesystems.filesystem_error(
                holder.source, "btrfs", rec.staging.path if rec.staging else path)
            if problem:
                return Condition(True, problem)
        return HEALTHY

    def recover(self, rec: VolumeRecord) -> str | None:
        return "" if btrfs.is_subvolume(self.volume_path(rec.id)) else None

    # ------------------------------------------------------------ reports
    def orphans(self, records: list[VolumeRecord], snapshot_paths: set[str]) -> list[Orphan]:
        found: list[Orphan] = []
        mine = {self.volume_path(r.id): r for r in records if r.pool == self.name
                and (not r.backing or r.backing.startswith(self.path + "/"))}
        for directory, known, what in ((self.volume_dir, set(mine), "subvolume"),
                                       (self.snapshot_dir, snapshot_paths, "snapshot")):
            try:
                entries = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                path = os.path.join(directory, entry)
                if path not in known:
                    detail = self._unrecorded_detail(path, entry) if what == "subvolume" else ""
                    found.append(Orphan(f"{what}-without-record", self.name, path, detail))
        for path, rec in mine.items():
            if rec.state == READY and not btrfs.is_subvolume(path):
                found.append(Orphan("record-without-subvolume", self.name, path,
                                    f"volume {rec.id} ({rec.name})"))
        return found

    def _unrecorded_detail(self, path: str, entry: str) -> str:
        if entry.startswith(CREATING_PREFIX):
            return "an interrupted create's; the driver removes it when it starts"
        carried = self._carried(path)
        if carried is None:
            return ""
        return f"it carries the record of volume {carried.id} (name {carried.name}, " \
               f"pool {carried.pool})"
