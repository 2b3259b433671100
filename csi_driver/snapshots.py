"""Snapshots: the rules of the snapshot RPCs, and quiescing a source while it is copied.

How a snapshot is made is the pool's (``Pool.take_snapshot``): for image pools
a file copy of the volume's image in the pool's ``snapshots/`` directory (a
reflink where the pool filesystem shares extents, a sparse copy otherwise).
When the kind's snapshots are not atomic and the source is staged with a
filesystem, it is frozen (FIFREEZE on the staging mount) for the duration of
the copy, so the snapshot is a consistent, journal-clean filesystem; clones of
a staged volume are taken the same way.

Snapshots are independent of their source: they survive the deletion of their source
volume, and restoring one copies it into a new volume of the same or a larger
size (the filesystem grows at that volume's first stage).  CreateSnapshot is
idempotent on the name (same name + same source = the same snapshot, other
source = ALREADY_EXISTS); DeleteSnapshot of an unknown id is OK.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

from csi_driver import filesystems
from csi_driver.faults import crash_point
from csi_driver.store import (
    CREATING,
    DELETING,
    READY,
    SnapshotRecord,
    VolumeRecord,
    is_valid_id,
    new_snapshot_id,
    validate_name,
)
from csi_driver.volumes import VolumeService, parse_token
from plugin_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)


class SnapshotService:
    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes
        self.store = volumes.store
        self.locks = volumes.locks
        volumes.copy_source = self.frozen_clone_source

    def frozen_clone_source(self, rec: VolumeRecord) -> contextlib.AbstractContextManager[None]:
        """``frozen_source`` for a clone (CreateVolume from a volume)."""
        return self.frozen_source(rec, "clone.after_freeze")

    @contextlib.contextmanager
    def frozen_source(
        self, rec: VolumeRecord, step: str = "snapshot.after_freeze"
    ) -> Iterator[None]:
        """Keep ``rec``'s filesystem frozen while its image is read, if it is mounted.

        ``step`` names the crash point reached once it is frozen."""
        staging = rec.staging
        if staging is None or staging.block or not rec.fs_type:
            yield
            return
        from csi_driver import mounts

        if not mounts.is_mountpoint(staging.path):
            yield
            return
        with filesystems.frozen(staging.path):
            crash_point(step)
            yield

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> SnapshotRecord:
        validate_name(name, "name")
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        for key in parameters:
            if not key.startswith("csi.storage.k8s.io/"):
                raise InvalidArgument(f"unknown snapshot parameter {key!r} (none are supported)")
        with self.locks.hold(f"snapname:{name}"):
            existing = self.store.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume != source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists ({existing.id}) of volume "
                        f"{existing.source_volume}, not {source_volume_id}"
                    )
                if existing.state == READY:
                    return existing
            with self.locks.hold(f"vol:{source_volume_id}"):
                src = self.store.volume(source_volume_id) if is_valid_id(
                    source_volume_id, "vol") else None
                if src is None or src.state != READY:
                    if existing is not None:
                        self._drop(existing)
                    raise NotFound(f"source volume {source_volume_id} does not exist")
                pool = self.volumes.pool_of(src)
                if not pool.supports_snapshots:
                    raise InvalidArgument(
                        f"pool {pool.name} ({pool.kind}) does not support snapshots"
                    )
                snap = existing or SnapshotRecord(
                    id=new_snapshot_id(),
                    name=name,
                    source_volume=src.id,
                    pool=src.pool,
                    size_bytes=src.capacity_bytes,
                    fs_type=src.fs_type,
                    block=src.block,
                    state=CREATING,
                    created_at=time.time(),
                )
                snap.backing = snap.backing or pool.snapshot_path(snap.id, src)
                self.store.put_snapshot(snap)
                crash_point("snapshot.after_record")
                self._copy(src, snap)
                crash_point("snapshot.after_copy")
                snap.state = READY
                self.store.put_snapshot(snap)
                crash_point("snapshot.after_ready")
                log.info("snapshot %s (%s) of volume %s: %d bytes", snap.id, name, src.id,
                         snap.size_bytes, extra={"volume_id": src.id})
                return snap

    def _copy(self, src: VolumeRecord, snap: SnapshotRecord) -> None:
        pool = self.volumes.pool_of(src)
        quiesce = (contextlib.nullcontext() if pool.atomic_snapshots
                   else self.frozen_source(src))
        pool.take_snapshot(src, snap, quiesce)

    def _remove_data(self, snap: SnapshotRecord) -> None:
        pool = self.volumes.pools.get(snap.pool)
        if pool is None:
            raise FailedPrecondition(
                f"snapshot {snap.id} is in pool {snap.pool!r}, which is not configured on "
                "this node; configure the pool again to delete it"
            )
        pool.remove_snapshot(snap)

    def _drop(self, snap: SnapshotRecord) -> None:
        self._remove_data(snap)
        self.store.remove_snapshot(snap.id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not is_valid_id(snapshot_id, "snap"):
            return
        with self.locks.hold(f"snap:{snapshot_id}"):
            snap = self.store.snapshot(snapshot_id)
            if snap is None:
                return
            if snap.state != DELETING:
                snap.state = DELETING
                self.store.put_snapshot(snap)
            crash_point("delete_snapshot.after_mark")
            self._remove_data(snap)
            crash_point("delete_snapshot.after_remove_image")
            self.store.remove_snapshot(snapshot_id)
            log.info("deleted snapshot %s (%s)", snap.id, snap.name)

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        snap = self.store.snapshot(snapshot_id) if is_valid_id(snapshot_id, "snap") else None
        if snap is None or snap.state == DELETING:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return snap

    def list_snapshots(
        self,
        max_entries: int,
        starting_token: str,
        snapshot_id: str = "",
        source_volume_id: str = "",
    ) -> tuple[list[SnapshotRecord], str]:
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        snaps = [s for s in self.store.snapshots() if s.state != DELETING]
        if snapshot_id:
            snaps = [s for s in snaps if s.id == snapshot_id]
        if source_volume_id:
            snaps = [s for s in snaps if s.source_volume == source_volume_id]
        start = parse_token(starting_token, len(snaps))
        end = len(snaps) if max_entries == 0 else min(len(snaps), start + max_entries)
        return snaps[start:end], (str(end) if end < len(snaps) else "")

