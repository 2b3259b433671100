"""Start-up reconciliation: make the host match the records where that is safe,
and report everything else.  It never deletes data.

What it does:

- records again what a crash or power loss took and the backing itself
  carries (``Pool.carried_records``: a subvolume made and committed, whose
  record file was not written yet, or not yet synced), ready, so the CO's
  retry or the pod gets that volume rather than an orphan; never over a record
  it cannot read (an empty file, what a power loss leaves of an unsynced
  write, excepted) or a name another record holds;
- asks the pool of every volume recorded as staged to make it reachable again
  (``Pool.recover``): for block-device kinds that thaws the staging mount (a
  crash during a snapshot can leave one frozen, which would hang every
  writer) and re-attaches a loop device that is gone (after a reboot), so the
  kubelet's NodeStage finds it and mounts the data again; the record's device
  path is updated.

What it reports (log lines, ``csi-driver pools``, the hostkit_csi_orphans gauge):

- image files without a record, records whose backing is missing, loop
  devices backed by pool files of volumes that are not staged, partial images;
- records left "creating" or "deleting" by a crash (the CO's retry finishes them);
- publications whose target is no longer mounted.
"""

from __future__ import annotations

import logging
import os

from csi_driver import mounts
from csi_driver.pools.base import Orphan
from csi_driver.store import CREATING, DELETING, Store, VolumeRecord
from csi_driver.volumes import VolumeService
from plugin_runtime.errors import DomainError

log = logging.getLogger(__name__)


def find_orphans(volumes: VolumeService) -> list[Orphan]:
    store: Store = volumes.store
    records = store.volumes()
    snapshot_paths = {s.backing for s in store.snapshots() if s.backing}
    found: list[Orphan] = []
    for pool in volumes.pools.values():
        if not pool.ready:
            continue
        try:
            found += pool.orphans(records, snapshot_paths)
        except (OSError, DomainError) as exc:
            log.warning("cannot scan pool %s for orphans: %s", pool.name, exc)
    for rec in records:
        if rec.state == CREATING:
            found.append(Orphan("incomplete-create", rec.pool, rec.id,
                                f"name {rec.name}; a CreateVolume retry finishes it"))
        elif rec.state == DELETING:
            found.append(Orphan("incomplete-delete", rec.pool, rec.id,
                                f"name {rec.name}; a DeleteVolume retry finishes it"))
        for target in rec.publications:
            if not mounts.is_mountpoint(target):
                found.append(Orphan("stale-publication", rec.pool, target, f"volume {rec.id}"))
    for snap in store.snapshots():
        if snap.state == CREATING:
            found.append(Orphan("incomplete-snapshot", snap.pool, snap.id,
                                f"name {snap.name}; a CreateSnapshot retry finishes it"))
        elif snap.state == DELETING:
            found.append(Orphan("incomplete-snapshot-delete", snap.pool, snap.id,
                                f"name {snap.name}; a DeleteSnapshot retry finishes it"))
    for path in store.unreadable:
        found.append(Orphan("unreadable-record", "", path))
    return found


def restore_carried_records(volumes: VolumeService) -> list[VolumeRecord]:
    """Write the records that backings carry and the store lacks; return them."""
    store: Store = volumes.store
    # An empty record file is what a power loss leaves of a write that was not synced
    # yet; anything else unreadable is left for the operator.
    unreadable = {os.path.basename(p)[: -len(".json")] for p in store.unreadable
                  if not _is_empty(p)}
    restored: list[VolumeRecord] = []
    for pool in volumes.pools.values():
        if not pool.ready:
            continue
        known = {r.id for r in store.volumes()} | unreadable
        try:
            carried = pool.carried_records(known)
        except (OSError, DomainError) as exc:
            log.warning("cannot look for records the volumes of pool %s carry: %s",
                        pool.name, exc)
            continue
        for rec in carried:
            holder = store.volume_by_name(rec.name)
            if holder is not None:
                log.warning("volume %s carries a record for name %s, which volume %s holds; "
                            "left as it is", rec.id, rec.name, holder.id,
                            extra={"volume_id": rec.id})
                continue
            store.put_volume(rec)
            restored.append(rec)
            log.warning("volume %s (name %s): its record was lost (a crash or power loss "
                        "before it was synced); recorded again from its backing", rec.id,
                        rec.name, extra={"volume_id": rec.id})
    return restored


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def reconcile(volumes: VolumeService) -> list[Orphan]:
    """Record what the backings carry, re-attach staged volumes, thaw their mounts, and
    return what does not add up."""
    store = volumes.store
    restored = restore_carried_records(volumes)
    for rec in store.volumes():
        if rec.staging is None or rec.state != "ready":
            continue
        pool = volumes.pools.get(rec.pool)
        if pool is None or not pool.ready:
            continue
        try:
            with volumes.locks.hold(f"vol:{rec.id}"):
                device = pool.recover(rec)
                if device is None:
                    log.error("volume %s is staged but its backing is gone", rec.id,
                              extra={"volume_id": rec.id})
                    continue
                if rec.staging.device != device:
                    rec.staging.device = device
                    store.put_node(rec)
        except (OSError, DomainError) as exc:
            log.error("cannot reconcile volume %s: %s", rec.id, exc, extra={"volume_id": rec.id})
    orphans = [Orphan("record-restored", r.pool, r.id,
                      f"name {r.name}; its record was lost and is written again from its backing")
               for r in restored] + find_orphans(volumes)
    for orphan in orphans:
        log.warning("reconcile: %s in pool %s: %s %s", orphan.kind, orphan.pool or "-",
                    orphan.path, orphan.detail)
    log.info("reconcile done: %d volumes, %d snapshots, %d findings",
             len(store.volumes()), len(store.snapshots()), len(orphans))
    return orphans


