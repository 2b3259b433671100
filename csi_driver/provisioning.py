"""Provisioning: the controller-side CSI rules, free of gRPC and of any kind of volume.

CreateVolume, DeleteVolume, Controller/NodeExpandVolume's backing growth,
GetCapacity, ValidateVolumeCapabilities, ListVolumes and ControllerGetVolume.
Everything the spec says about idempotency, compatibility and error codes on
this side is decided here; what a pool does to make, copy, grow or remove a
volume is the pool's (``pools.base.Pool``):

- CreateVolume is idempotent on the name (same name + compatible request =
  the existing volume; incompatible = ALREADY_EXISTS), resumes a create that
  a crash interrupted, and returns exactly the capacity asked for (rounded up
  only to the 4 KiB granularity of every kind).
- DeleteVolume of an unknown volume is OK; of a staged/published one is
  FAILED_PRECONDITION; snapshots survive it.
- A CreateVolume travels: parameters -> ``placement`` (pool, fs type, thin) ->
  size and capacity check under the pool's ``alloc_lock`` -> a "creating"
  record (durable, or in memory where the pool writes it into the backing it
  makes: ``Pool.carries_record``) -> ``pool.allocate`` (empty, or a copy) ->
  ``pool.format_new`` for kinds with a filesystem per volume -> "ready".
  Where nothing comes between allocate and "ready" and the backing is where
  the id says (subvolumes, block image volumes, copies), the "ready" record is
  written and fsynced while the pool allocates and is renamed into place after
  it (``_create_and_record``): the two durability waits overlap.  Where the
  backing carries its record, the backing's commit is the only wait: the ready
  record is written without fsync (``Pool.carries_record``).

Volumes whose kind has a filesystem of their own get it at CreateVolume
(``format_new``): NodeStage then only attaches and mounts, which keeps staging
fast.  Per-volume and per-name locks (``locks.KeyedLocks``) serialize
operations; a caller that waits too long gets ABORTED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

from csi_driver import mounts
from csi_driver.config import FS_TYPES
from csi_driver.faults import crash_point
from csi_driver.pools.base import Capacity, Pool, align_up
from csi_driver.store import (
    CREATING,
    DELETING,
    READY,
    VolumeRecord,
    home_tag,
    is_valid_id,
    new_volume_id,
    node_tag,
    validate_name,
)
from csi_driver.volumes import (
    DEFAULT_SIZE,
    K8S_PREFIX,
    PARAM_FS,
    PARAM_K8S_FS,
    PARAM_POOL,
    PARAM_THIN,
    SINGLE_NODE_MODES,
    TOPOLOGY_KEY,
    Capability,
    Condition,
    CreateRequest,
    Placement,
    VolumeService,
    check_ready,
    parse_token,
)
from plugin_runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

log = logging.getLogger(__name__)


class Provisioner:
    """The controller side of the volumes of ``volumes``."""

    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes
        self.store = volumes.store
        self.locks = volumes.locks
        self.node_id = volumes.node_id

    # ------------------------------------------------------------ parameters
    def placement(
        self, parameters: Mapping[str, str], capabilities: Sequence[Capability]
    ) -> Placement:
        """Pool, filesystem and provisioning mode from StorageClass parameters + capabilities."""
        pool_name = parameters.get(PARAM_POOL) or self.volumes.default_pool
        pool = self.volumes.pools.get(pool_name)
        if pool is None:
            raise InvalidArgument(
                f"parameter pool: no pool named {pool_name!r} "
                f"(known: {', '.join(self.volumes.pools)})"
            )
        for key in parameters:
            if key in (PARAM_POOL, PARAM_FS, PARAM_K8S_FS, PARAM_THIN) or key in pool.parameters:
                continue
            if key.startswith(K8S_PREFIX):
                continue  # pvc/name, pvc/namespace, pv/name from --extra-create-metadata
            known = ", ".join((PARAM_POOL, PARAM_FS, PARAM_THIN, *pool.parameters))
            raise InvalidArgument(
                f"unknown parameter {key!r} (known for pool {pool.name}, {pool.kind}: {known})"
            )
        pool.check_parameters(dict(parameters))
        thin_text = parameters.get(PARAM_THIN)
        if thin_text is None or thin_text == "":
            thin = pool.config.thin
        elif thin_text.lower() in ("true", "false"):
            thin = thin_text.lower() == "true"
        else:
            raise InvalidArgument(f"parameter thin: expected 'true' or 'false', got {thin_text!r}")
        block = all(c.block for c in capabilities) if capabilities else False
        pool.check_access(any(c.block for c in capabilities))
        fs_type = ""
        if not block:
            requested = {c.fs_type for c in capabilities if not c.block and c.fs_type}
            if len(requested) > 1:
                raise InvalidArgument(f"capabilities ask for several fs types: {sorted(requested)}")
            param_fs = parameters.get(PARAM_FS) or parameters.get(PARAM_K8S_FS) or ""
            fs_type = (requested.pop() if requested else "") or param_fs
            fs_type = fs_type or pool.config.default_fs_type
            if param_fs and fs_type != param_fs:
                raise InvalidArgument(
                    f"the capability asks for {fs_type} but parameter fsType is {param_fs}"
                )
            if fs_type not in pool.fs_types:
                raise InvalidArgument(
                    f"fs type {fs_type!r} is not supported by pool {pool.name} ({pool.kind}; "
                    f"supported: {', '.join(pool.fs_types)})"
                )
        return Placement(pool, fs_type, thin)

    def check_capabilities(self, capabilities: Sequence[Capability]) -> None:
        if not capabilities:
            raise InvalidArgument("volume_capabilities are required")
        for cap in capabilities:
            if cap.access_mode not in SINGLE_NODE_MODES:
                raise InvalidArgument(
                    f"access mode {cap.access_mode} is not supported: volumes are node-local "
                    f"(supported: {', '.join(sorted(SINGLE_NODE_MODES))})"
                )
            if not cap.block and cap.fs_type and cap.fs_type not in FS_TYPES:
                raise InvalidArgument(f"fs type {cap.fs_type!r} is not supported")
            if cap.mount_flags:
                mounts.validate_mount_options(cap.mount_flags)

    def _size(self, required: int, limit: int, fs_type: str, pool: Pool | None = None) -> int:
        """The size to create from a capacity range (``pool``: the default pool if None)."""
        minimum = (pool or self.volumes.pools[self.volumes.default_pool]).minimum_size(fs_type)
        if required < 0 or limit < 0:
            raise OutOfRange("capacity_range bytes must not be negative")
        if limit and required > limit:
            raise OutOfRange(f"required_bytes {required} is larger than limit_bytes {limit}")
        size = required or limit or DEFAULT_SIZE
        if not required and not limit:
            size = max(size, minimum)
        size = align_up(size)
        if limit and size > limit:
            raise OutOfRange(
                f"limit_bytes {limit} is below the 4 KiB granularity of the volume "
                f"(smallest possible: {size})"
            )
        if size < minimum:
            raise OutOfRange(
                f"{fs_type or 'block'} volumes must be at least {minimum} bytes, got {size}"
            )
        return size

    def _check_topology(self, req: CreateRequest) -> None:
        if not req.requisite:
            return
        for segment in req.requisite:
            if dict(segment) == {TOPOLOGY_KEY: self.node_id}:
                return
        raise ResourceExhausted(
            f"cannot provision in the requested topology: this driver serves only "
            f"{TOPOLOGY_KEY}={self.node_id}"
        )

    # ------------------------------------------------------------ controller
    def create_volume(self, req: CreateRequest) -> VolumeRecord:
        validate_name(req.name, "name")
        self.check_capabilities(req.capabilities)
        if req.source_snapshot and req.source_volume:
            raise InvalidArgument("volume_content_source names both a snapshot and a volume")
        parameters = dict(req.parameters)
        source_pool = self._source_pool(req)
        if source_pool and PARAM_POOL not in parameters:
            parameters[PARAM_POOL] = source_pool  # copies stay next to their source
        place = self.placement(parameters, req.capabilities)
        check_ready(place.pool)
        size = self._size(req.required_bytes, req.limit_bytes, place.fs_type, place.pool)
        self._check_topology(req)
        with self.locks.hold(f"name:{req.name}"):
            existing = self.store.volume_by_name(req.name)
            if existing is not None:
                self._check_compatible(existing, req, place)
                if existing.state == READY:
                    return existing
                if existing.state == DELETING:
                    raise FailedPrecondition(
                        f"volume {existing.id} with name {req.name!r} is being deleted; retry"
                    )
                rec = existing
            else:
                rec = self._new_record(req, place, size)
            keys = [f"vol:{rec.id}"]
            if rec.source_volume:
                keys.append(f"vol:{rec.source_volume}")
            if rec.source_snapshot:
                keys.append(f"snap:{rec.source_snapshot}")
            with self.locks.hold_all(*keys):
                return self._finish_create(rec, place)

    def _source_pool(self, req: CreateRequest) -> str:
        if req.source_snapshot and is_valid_id(req.source_snapshot, "snap"):
            snap = self.store.snapshot(req.source_snapshot)
            return snap.pool if snap is not None else ""
        if req.source_volume and is_valid_id(req.source_volume, "vol"):
            src = self.store.volume(req.source_volume)
            return src.pool if src is not None else ""
        return ""

    def _check_compatible(self, rec: VolumeRecord, req: CreateRequest, place: Placement) -> None:
        problems = []
        if rec.capacity_bytes < req.required_bytes or (
            req.limit_bytes and rec.capacity_bytes > req.limit_bytes
        ):
            problems.append(f"capacity {rec.capacity_bytes}")
        if rec.pool != place.pool.name:
            problems.append(f"pool {rec.pool}")
        if rec.fs_type != place.fs_type or rec.block != (place.fs_type == ""):
            problems.append(f"fs type {rec.fs_type or 'block'}")
        if rec.thin != place.thin:
            problems.append(f"thin={str(rec.thin).lower()}")
        if rec.source_snapshot != req.source_snapshot or rec.source_volume != req.source_volume:
            problems.append("content source")
        if problems:
            raise AlreadyExists(
                f"volume {req.name!r} already exists ({rec.id}) with other "
                + ", ".join(problems)
            )

    def _new_record(self, req: CreateRequest, place: Placement, size: int) -> VolumeRecord:
        source_size = 0
        if req.source_snapshot:
            snap = self.store.snapshot(req.source_snapshot) if is_valid_id(
                req.source_snapshot, "snap") else None
            if snap is None or snap.state != READY:
                raise NotFound(f"source snapshot {req.source_snapshot} does not exist")
            source_size = snap.size_bytes
            self._check_source(snap.pool, snap.fs_type, snap.block, place, "snapshot")
        if req.source_volume:
            src = self.store.volume(req.source_volume) if is_valid_id(
                req.source_volume, "vol") else None
            if src is None or src.state != READY:
                raise NotFound(f"source volume {req.source_volume} does not exist")
            source_size = src.capacity_bytes
            self._check_source(src.pool, src.fs_type, src.block, place, "volume")
        if (req.source_snapshot or req.source_volume) and not place.pool.supports_snapshots:
            raise InvalidArgument(
                f"pool {place.pool.name} hands out whole disks: it cannot restore or clone"
            )
        if source_size and not req.required_bytes and not req.limit_bytes:
            size = source_size  # no size asked: the copy is as large as its source
        if source_size > size:
            if req.limit_bytes and source_size > req.limit_bytes:
                raise OutOfRange(
                    f"the source is {source_size} bytes, larger than limit_bytes {req.limit_bytes}"
                )
            if req.required_bytes:
                raise OutOfRange(
                    f"the source is {source_size} bytes, larger than the requested {size}"
                )
            size = source_size
        pool = place.pool
        with pool.alloc_lock:
            cap = self.volumes.capacity(pool, place.thin)
            if size > cap.maximum_volume_bytes:
                raise ResourceExhausted(
                    f"pool {pool.name} cannot hold {size} bytes "
                    f"({'thin' if place.thin else 'thick'}: at most {cap.maximum_volume_bytes} "
                    "bytes available now)"
                )
            params = {k: v for k, v in req.parameters.items() if not k.startswith(K8S_PREFIX)}
            rec = VolumeRecord(
                id=new_volume_id(self.node_id),
                name=req.name,
                pool=pool.name,
                capacity_bytes=size,
                block=place.fs_type == "",
                fs_type=place.fs_type,
                thin=place.thin,
                state=CREATING,
                parameters=params,
                source_snapshot=req.source_snapshot,
                source_volume=req.source_volume,
                nouuid=place.fs_type == "xfs" and bool(req.source_snapshot or req.source_volume),
                created_at=time.time(),
            )
            if pool.carries_record(rec):
                self.store.hold_volume(rec)  # durable with the backing, in one commit
            else:
                self.store.put_volume(rec)
        crash_point("create.after_record")
        return rec

    def _check_source(
        self, pool: str, fs_type: str, block: bool, place: Placement, what: str
    ) -> None:
        if pool != place.pool.name:
            raise InvalidArgument(
                f"the source {what} is in pool {pool}; copies stay in the same pool"
            )
        if not block and place.fs_type and fs_type != place.fs_type:
            raise InvalidArgument(
                f"the source {what} holds {fs_type}, the request asks for {place.fs_type}"
            )
        if block and place.fs_type:
            raise InvalidArgument(f"the source {what} is a raw block volume, "
                                  f"the request asks for {place.fs_type}")

    def _finish_create(self, rec: VolumeRecord, place: Placement) -> VolumeRecord:
        pool = place.pool
        source: str | None = None
        copying: AbstractContextManager[None] | None = None
        if rec.source_snapshot:
            snap = self.store.snapshot(rec.source_snapshot)
            if snap is None or snap.state != READY:
                self._abandon(rec)
                raise NotFound(f"source snapshot {rec.source_snapshot} does not exist")
            source = snap.backing
        elif rec.source_volume:
            src = self.store.volume(rec.source_volume)
            if src is None or src.state != READY:
                self._abandon(rec)
                raise NotFound(f"source volume {rec.source_volume} does not exist")
            src_pool = self.volumes.pool_of(src)
            source = src_pool.data_path(src)
            if self.volumes.copy_source is not None and not src_pool.atomic_snapshots:
                copying = self.volumes.copy_source(src)
        if copying is None and not pool.records_backing and not (
                pool.own_filesystem and rec.fs_type and source is None):
            return self._create_and_record(rec, pool, source)
        try:
            if copying is not None:
                with copying:
                    rec.backing = pool.allocate(rec, source)
            else:
                rec.backing = pool.allocate(rec, source)
        except DomainError:
            self._abandon(rec)
            raise
        if pool.records_backing:
            # Which disk holds the volume is not derivable from the id: make it durable
            # before the disk is written, so a crash cannot leave an unclaimed formatted disk.
            self.store.put_volume(rec)
        crash_point("create.after_copy" if source else "create.after_image")
        rec.fs_grow_pending = _grows_at_stage(rec, pool, source)
        if pool.own_filesystem and rec.fs_type and not rec.formatted and source is None:
            pool.format_new(rec)
            rec.formatted = True
            crash_point("create.after_mkfs")
        rec.state = READY
        self.store.put_volume(rec)
        crash_point("create.after_ready")
        _log_created(rec)
        return rec

    def _create_and_record(self, rec: VolumeRecord, pool: Pool, source: str | None
                           ) -> VolumeRecord:
        """The backing made and the record made ready, the record's durable write
        overlapping the backing's (``Store.put_volume_after``).  Only for kinds whose
        backing is where the id says (``records_backing`` False: ``allocate`` returns
        ``data_path``) and that need nothing between allocate and ready (no mkfs)."""
        ready = rec.copy()
        ready.backing = pool.data_path(rec)
        ready.state = READY
        ready.fs_grow_pending = _grows_at_stage(rec, pool, source)

        def allocate() -> None:
            backing = pool.allocate(rec, source)
            if backing != ready.backing:
                raise Internal(f"pool {pool.name} made volume {rec.id} at {backing}, "
                               f"not at {ready.backing} where its id says")
            crash_point("create.after_copy" if source else "create.after_image")

        try:
            self.store.put_volume_after(ready, allocate, durable=not pool.carries_record(rec))
        except DomainError:
            self._abandon(rec)
            raise
        crash_point("create.after_ready")
        _log_created(ready)
        return ready

    def _abandon(self, rec: VolumeRecord) -> None:
        """Undo a create that cannot finish (no space, source gone): nothing is left behind."""
        try:
            self.volumes.pool_of(rec).release(rec)
        finally:
            self.store.remove_volume(rec.id)

    def delete_volume(self, volume_id: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not is_valid_id(volume_id, "vol"):
            return  # never one of ours: nothing to delete
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.store.volume(volume_id)
            if rec is None:
                return
            if rec.staging is not None or rec.publications:
                where = rec.staging.path if rec.staging else next(iter(rec.publications))
                raise FailedPrecondition(
                    f"volume {volume_id} is still in use on this node (at {where}); "
                    "unpublish and unstage it first"
                )
            pool = self.volumes.pool_of(rec)
            owner = pool.owner(rec)
            if owner is not None:
                users = owner.mounts()
                if users:
                    raise FailedPrecondition(
                        f"volume {volume_id} is mounted at {users[0].mount_point} "
                        "although no stage is recorded; unmount it first"
                    )
            if rec.state != DELETING:
                rec.state = DELETING
                self.store.put_volume(rec)
            crash_point("delete.after_mark")
            pool.detach(rec)
            crash_point("delete.after_detach")
            pool.release(rec)
            crash_point("delete.after_remove_image")
            self.store.remove_volume(volume_id)
            log.info("deleted volume %s (%s)", rec.id, rec.name, extra={"volume_id": rec.id})

    def get_volume(self, volume_id: str) -> tuple[VolumeRecord, Condition]:
        rec = self.volumes.volume(volume_id)
        return rec, self.volumes.condition(rec)

    def validate_capabilities(
        self,
        volume_id: str,
        capabilities: Sequence[Capability],
        parameters: Mapping[str, str],
    ) -> str:
        """'' when the volume supports all ``capabilities`` (and ``parameters``), else why not."""
        rec = self.volumes.volume(volume_id)
        if not capabilities:
            raise InvalidArgument("volume_capabilities are required")
        pool = self.volumes.pools.get(rec.pool)
        for cap in capabilities:
            if cap.access_mode not in SINGLE_NODE_MODES:
                return f"access mode {cap.access_mode} is not supported"
            if pool is not None:
                try:
                    pool.check_access(cap.block)
                except InvalidArgument as exc:
                    return str(exc)
            if not cap.block and rec.block and cap.fs_type:
                return "a raw block volume cannot be mounted with a given fs type"
            if not cap.block and cap.fs_type and rec.fs_type and cap.fs_type != rec.fs_type:
                return f"volume holds {rec.fs_type}, not {cap.fs_type}"
            if cap.mount_flags:
                try:
                    mounts.validate_mount_options(cap.mount_flags)
                except InvalidArgument as exc:
                    return str(exc)
        if parameters:
            try:
                place = self.placement(parameters, capabilities)
            except InvalidArgument as exc:
                return str(exc)
            if place.pool.name != rec.pool:
                return f"volume is in pool {rec.pool}, not {place.pool.name}"
        return ""

    def list_volumes(
        self, max_entries: int, starting_token: str
    ) -> tuple[list[tuple[VolumeRecord, Condition]], str]:
        recs = [r for r in self.store.volumes() if r.state == READY]
        start = parse_token(starting_token, len(recs))
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        end = len(recs) if max_entries == 0 else min(len(recs), start + max_entries)
        page = [(r, self.volumes.condition(r)) for r in recs[start:end]]
        return page, (str(end) if end < len(recs) else "")

    def get_capacity(
        self,
        parameters: Mapping[str, str],
        capabilities: Sequence[Capability],
        topology: Mapping[str, str] | None,
    ) -> tuple[Capacity | None, int]:
        """(capacity, minimum volume size) for a StorageClass; None when not served here."""
        if topology and dict(topology) != {TOPOLOGY_KEY: self.node_id}:
            return None, 0
        if capabilities:
            self.check_capabilities(capabilities)
        place = self.placement(parameters, capabilities)
        if not place.pool.ready:
            return None, 0
        return (self.volumes.capacity(place.pool, place.thin),
                place.pool.minimum_size(place.fs_type))

    def controller_expand(
        self, volume_id: str, required: int, limit: int, capability: Capability | None
    ) -> tuple[int, bool]:
        """Grow the backing; return (capacity, node_expansion_required)."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if (
            is_valid_id(volume_id, "vol")
            and home_tag(volume_id) != node_tag(self.node_id)
            and self.store.volume(volume_id) is None
        ):
            return self._expand_elsewhere(volume_id, required, limit)
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
            if capability is not None:
                self.check_cap_fits(rec, capability)
            size = self.grow_backing(rec, required, limit)
            pool = self.volumes.pool_of(rec)
            node_needed = pool.needs_node_expansion(rec)
            if rec.staging is not None:
                pool.refresh(rec)
                crash_point("expand.after_refresh")
            return size, node_needed

    @staticmethod
    def _expansion_target(required: int, limit: int) -> int:
        """The size an expansion asks for, checked against its range."""
        if required < 0 or limit < 0 or (limit and required > limit):
            raise OutOfRange(f"invalid capacity range: required {required}, limit {limit}")
        if not required and not limit:
            raise InvalidArgument("capacity_range is required")
        wanted = align_up(required or limit)
        if limit and wanted > limit:
            raise OutOfRange(f"limit_bytes {limit} is below the 4 KiB granularity")
        return wanted

    def _expand_elsewhere(self, volume_id: str, required: int, limit: int) -> tuple[int, bool]:
        """ControllerExpandVolume for a volume created on another node.

        external-resizer has no per-node mode, so one elected resizer sends every
        ControllerExpandVolume to the driver beside it.  A volume whose ID carries
        another node's tag lives there: its node grows image, loop device and
        filesystem in NodeExpandVolume, which the kubelet calls on that node.
        """
        wanted = self._expansion_target(required, limit)
        log.info(
            "volume %s lives on another node; its NodeExpandVolume grows it to %d bytes",
            volume_id,
            wanted,
        )
        return wanted, True

    def check_cap_fits(self, rec: VolumeRecord, cap: Capability) -> None:
        if cap.access_mode and cap.access_mode not in SINGLE_NODE_MODES:
            raise InvalidArgument(f"access mode {cap.access_mode} is not supported")
        if not cap.block and cap.fs_type and rec.fs_type and cap.fs_type != rec.fs_type:
            raise InvalidArgument(f"volume {rec.id} holds {rec.fs_type}, not {cap.fs_type}")

    def grow_backing(self, rec: VolumeRecord, required: int, limit: int) -> int:
        wanted = self._expansion_target(required, limit)
        if limit and rec.capacity_bytes > limit:
            raise OutOfRange(
                f"volume {rec.id} is already {rec.capacity_bytes} bytes, above limit_bytes {limit}"
            )
        pool = self.volumes.pool_of(rec)
        if wanted <= rec.capacity_bytes:
            # Already large enough: OK.  The backing is grown to the recorded size in
            # case a crash came between recording the new size and growing the image.
            pool.grow(rec, rec.capacity_bytes)
            return rec.capacity_bytes
        extra = wanted - rec.capacity_bytes
        with pool.alloc_lock:
            cap = self.volumes.capacity(pool, rec.thin)
            if pool.shares_space and extra > cap.available_bytes:
                raise ResourceExhausted(
                    f"pool {pool.name} cannot grow volume {rec.id} by {extra} bytes"
                )
            old = rec.capacity_bytes
            rec.capacity_bytes = wanted
            if rec.fs_type and pool.own_filesystem:
                rec.fs_grow_pending = True
            self.store.put_volume(rec)
            crash_point("expand.after_record")
            try:
                pool.grow(rec, wanted)
            except DomainError:
                rec.capacity_bytes = old
                self.store.put_volume(rec)
                raise
        crash_point("expand.after_grow_image")
        log.info("grew volume %s to %d bytes", rec.id, wanted, extra={"volume_id": rec.id})
        return wanted


def _grows_at_stage(rec: VolumeRecord, pool: Pool, source: str | None) -> bool:
    """A copy of a smaller filesystem into a larger image: its fs grows at NodeStage."""
    return rec.fs_grow_pending or (source is not None and bool(rec.fs_type)
                                   and pool.own_filesystem)


def _log_created(rec: VolumeRecord) -> None:
    log.info("created volume %s (%s) in pool %s: %d bytes, %s", rec.id, rec.name, rec.pool,
             rec.capacity_bytes, rec.fs_type or "block", extra={"volume_id": rec.id})
