"""VolumeService: every CSI rule about volumes, free of gRPC.

The servicers translate messages into the plain requests below and call one
method each; everything the spec says about idempotency, compatibility,
ordering and error codes is decided here:

- CreateVolume is idempotent on the name (same name + compatible request =
  the existing volume; incompatible = ALREADY_EXISTS), resumes a create that
  a crash interrupted, and returns exactly the capacity asked for (rounded up
  only to the 4 KiB the loop device needs).
- DeleteVolume of an unknown volume is OK; of a staged/published one is
  FAILED_PRECONDITION; snapshots survive it.
- NodeStage/NodePublish repeat with the same arguments = OK, with other
  arguments = ALREADY_EXISTS; publish before stage = FAILED_PRECONDITION.
- NodeUnstage/NodeUnpublish of something not staged/published = OK, and they
  also clean up what a crash left half-done (a mount, a loop device, a target).

Filesystems are made at CreateVolume, directly on the image file (no loop
device needed): NodeStage then only attaches and mounts, which keeps staging
fast; a volume found without a signature at stage (e.g. created for block and
later mounted) is formatted then.  Per-volume and per-name locks
(``locks.KeyedLocks``) serialize operations; a caller that waits too long gets
ABORTED.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from csi_driver import filesystems, loop, mounts
from csi_driver.config import FS_TYPES, DriverConfig
from csi_driver.faults import crash_point
from csi_driver.locks import KeyedLocks
from csi_driver.pools.base import GIB, MIN_FS_BYTES, Capacity, Pool, align_up
from csi_driver.store import (
    CREATING,
    DELETING,
    READY,
    Publication,
    Staging,
    Store,
    VolumeRecord,
    home_tag,
    is_valid_id,
    new_volume_id,
    node_tag,
    validate_name,
)
from plugin_runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

TOPOLOGY_KEY = "topology.local.csi.hostkit.io/node"
DEFAULT_SIZE = 1 * GIB
MAX_PATH_BYTES = 4096

SINGLE_NODE_MODES = frozenset({
    "SINGLE_NODE_WRITER",
    "SINGLE_NODE_READER_ONLY",
    "SINGLE_NODE_SINGLE_WRITER",
    "SINGLE_NODE_MULTI_WRITER",
})
# Modes under which one volume may be published at several targets on this node.
SHARED_MODES = frozenset({"SINGLE_NODE_MULTI_WRITER"})
READ_ONLY_MODES = frozenset({"SINGLE_NODE_READER_ONLY"})

PARAM_POOL = "pool"
PARAM_FS = "fsType"
PARAM_K8S_FS = "csi.storage.k8s.io/fstype"
PARAM_THIN = "thin"
K8S_PREFIX = "csi.storage.k8s.io/"


@dataclass(frozen=True)
class Capability:
    """A CSI VolumeCapability in domain terms."""

    block: bool
    access_mode: str
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""


@dataclass(frozen=True)
class CreateRequest:
    name: str
    capabilities: tuple[Capability, ...]
    required_bytes: int = 0
    limit_bytes: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    source_snapshot: str = ""
    source_volume: str = ""
    requisite: tuple[Mapping[str, str], ...] = ()
    preferred: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True)
class VolumeUsage:
    block: bool
    bytes_total: int
    bytes_used: int = 0
    bytes_available: int = 0
    inodes_total: int = 0
    inodes_used: int = 0
    inodes_free: int = 0


@dataclass(frozen=True)
class PoolReport:
    name: str
    kind: str
    ready: bool
    capacity_thin: Capacity | None
    capacity_thick: Capacity | None
    volumes: int
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    pool: Pool
    fs_type: str  # "" for block
    thin: bool


def _norm(path: str) -> str:
    return os.path.normpath(path)


class VolumeService:
    def __init__(
        self,
        config: DriverConfig,
        node_id: str,
        store: Store,
        pools: Sequence[Pool],
        locks: KeyedLocks | None = None,
    ) -> None:
        if not pools:
            raise InvalidArgument("at least one pool is needed")
        self.config = config
        self.node_id = node_id
        self.store = store
        self.pools: dict[str, Pool] = {p.name: p for p in pools}
        self.default_pool = pools[0].name
        self.locks = locks or KeyedLocks(config.lock_wait_seconds)
        self.kubelet_root = _norm(config.kubelet_root)
        for pool in pools:
            adopt = getattr(pool, "adopt", None)
            if adopt is not None:
                adopt(store.volumes())
        # Set by snapshots.SnapshotService: a context that keeps a staged source volume's
        # filesystem frozen while its image is copied (clones).
        self.copy_source: Callable[[VolumeRecord], AbstractContextManager[None]] | None = None

    # ---------------------------------------------------------------- helpers
    @property
    def ready(self) -> bool:
        return all(p.ready for p in self.pools.values())

    def topology(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.node_id}

    def pool_of(self, rec: VolumeRecord) -> Pool:
        pool = self.pools.get(rec.pool)
        if pool is None:
            raise FailedPrecondition(
                f"volume {rec.id} belongs to pool {rec.pool!r}, which is not configured"
            )
        _check_ready(pool)
        return pool

    def check_path(self, path: str, what: str) -> str:
        if not path:
            raise InvalidArgument(f"{what} is required")
        if "\0" in path or len(path.encode()) > MAX_PATH_BYTES:
            raise InvalidArgument(f"{what} is not a valid path")
        if not os.path.isabs(path):
            raise InvalidArgument(f"{what} {path!r} must be an absolute path")
        norm = _norm(path)
        if ".." in path.split("/"):
            raise InvalidArgument(f"{what} {path!r} must not contain '..'")
        if self.config.restrict_paths:
            if not norm.startswith(self.kubelet_root + "/"):
                raise InvalidArgument(
                    f"{what} {path!r} is outside the kubelet root {self.kubelet_root}"
                )
            # A symlink on the way must not lead a mount or a removal out of the root.
            real_root = os.path.realpath(self.kubelet_root)
            if not os.path.realpath(norm).startswith(real_root + "/"):
                raise InvalidArgument(
                    f"{what} {path!r} resolves (through a symlink) outside the kubelet root"
                )
        return norm

    def _volume(self, volume_id: str) -> VolumeRecord:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not is_valid_id(volume_id, "vol"):
            raise NotFound(f"volume {volume_id!r} does not exist (not an id of this driver)")
        rec = self.store.volume(volume_id)
        if rec is None or rec.state != READY:
            raise NotFound(f"volume {volume_id} does not exist")
        return rec

    def provisioned(self, pool: str) -> int:
        return sum(r.capacity_bytes for r in self.store.volumes() if r.pool == pool)

    def capacity(self, pool: Pool, thin: bool) -> Capacity:
        return pool.capacity(thin, self.provisioned(pool.name))

    # ------------------------------------------------------------ parameters
    def placement(
        self, parameters: Mapping[str, str], capabilities: Sequence[Capability]
    ) -> Placement:
        """Pool, filesystem and provisioning mode from StorageClass parameters + capabilities."""
        for key in parameters:
            if key in (PARAM_POOL, PARAM_FS, PARAM_K8S_FS, PARAM_THIN):
                continue
            if key.startswith(K8S_PREFIX):
                continue  # pvc/name, pvc/namespace, pv/name from --extra-create-metadata
            raise InvalidArgument(
                f"unknown parameter {key!r} (known: {PARAM_POOL}, {PARAM_FS}, {PARAM_THIN})"
            )
        pool_name = parameters.get(PARAM_POOL) or self.default_pool
        pool = self.pools.get(pool_name)
        if pool is None:
            raise InvalidArgument(
                f"parameter pool: no pool named {pool_name!r} (known: {', '.join(self.pools)})"
            )
        thin_text = parameters.get(PARAM_THIN)
        if thin_text is None or thin_text == "":
            thin = pool.config.thin
        elif thin_text.lower() in ("true", "false"):
            thin = thin_text.lower() == "true"
        else:
            raise InvalidArgument(f"parameter thin: expected 'true' or 'false', got {thin_text!r}")
        block = all(c.block for c in capabilities) if capabilities else False
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
            if fs_type not in FS_TYPES:
                raise InvalidArgument(
                    f"fs type {fs_type!r} is not supported (supported: {', '.join(FS_TYPES)})"
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

    def _size(self, required: int, limit: int, fs_type: str) -> int:
        if required < 0 or limit < 0:
            raise OutOfRange("capacity_range bytes must not be negative")
        if limit and required > limit:
            raise OutOfRange(f"required_bytes {required} is larger than limit_bytes {limit}")
        size = required or limit or DEFAULT_SIZE
        if not required and not limit:
            size = max(size, MIN_FS_BYTES.get(fs_type, 0))
        size = align_up(size)
        if limit and size > limit:
            raise OutOfRange(
                f"limit_bytes {limit} is below the 4 KiB granularity of the volume "
                f"(smallest possible: {size})"
            )
        minimum = MIN_FS_BYTES.get(fs_type, 4096)
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
        _check_ready(place.pool)
        size = self._size(req.required_bytes, req.limit_bytes, place.fs_type)
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
            cap = self.capacity(pool, place.thin)
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
            source = self.pool_of(src).format_target(src)
            if self.copy_source is not None:
                copying = self.copy_source(src)
        try:
            if copying is not None:
                with copying:
                    rec.backing = pool.allocate(rec, source)
            else:
                rec.backing = pool.allocate(rec, source)
        except DomainError:
            self._abandon(rec)
            raise
        if pool.kind != "image":
            # Which disk holds the volume is not derivable from the id: make it durable
            # before the disk is written, so a crash cannot leave an unclaimed formatted disk.
            self.store.put_volume(rec)
        crash_point("create.after_copy" if source else "create.after_image")
        if source is not None and rec.fs_type:
            # A copy of a smaller filesystem: the image is larger, the fs grows at stage.
            rec.fs_grow_pending = True
        if rec.fs_type and not rec.formatted and source is None:
            pool.format_new(rec)
            rec.formatted = True
            crash_point("create.after_mkfs")
        rec.state = READY
        self.store.put_volume(rec)
        crash_point("create.after_ready")
        log.info("created volume %s (%s) in pool %s: %d bytes, %s", rec.id, rec.name, rec.pool,
                 rec.capacity_bytes, rec.fs_type or "block",
                 extra={"volume_id": rec.id})
        return rec

    def _abandon(self, rec: VolumeRecord) -> None:
        """Undo a create that cannot finish (no space, source gone): nothing is left behind."""
        try:
            self.pool_of(rec).release(rec)
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
            pool = self.pool_of(rec)
            device = pool.attached_device(rec)
            if device:
                users = _Owned.of(device).mounts()
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
        rec = self._volume(volume_id)
        return rec, self.condition(rec)

    def validate_capabilities(
        self,
        volume_id: str,
        capabilities: Sequence[Capability],
        parameters: Mapping[str, str],
    ) -> str:
        """'' when the volume supports all ``capabilities`` (and ``parameters``), else why not."""
        rec = self._volume(volume_id)
        if not capabilities:
            raise InvalidArgument("volume_capabilities are required")
        for cap in capabilities:
            if cap.access_mode not in SINGLE_NODE_MODES:
                return f"access mode {cap.access_mode} is not supported"
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
        start = _parse_token(starting_token, len(recs))
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        end = len(recs) if max_entries == 0 else min(len(recs), start + max_entries)
        page = [(r, self.condition(r)) for r in recs[start:end]]
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
        return self.capacity(place.pool, place.thin), MIN_FS_BYTES.get(place.fs_type, 4096)

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
            rec = self._volume(volume_id)
            if capability is not None:
                self._check_cap_fits(rec, capability)
            size = self._grow_backing(rec, required, limit)
            # A mounted filesystem is grown by NodeExpandVolume; an unstaged one grows at
            # its next NodeStage (fs_grow_pending), so the node has nothing to do now.
            node_needed = bool(rec.fs_type) and rec.staging is not None and not rec.staging.block
            if rec.staging is not None:
                self.pool_of(rec).refresh(rec)
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

    def _check_cap_fits(self, rec: VolumeRecord, cap: Capability) -> None:
        if cap.access_mode and cap.access_mode not in SINGLE_NODE_MODES:
            raise InvalidArgument(f"access mode {cap.access_mode} is not supported")
        if not cap.block and cap.fs_type and rec.fs_type and cap.fs_type != rec.fs_type:
            raise InvalidArgument(f"volume {rec.id} holds {rec.fs_type}, not {cap.fs_type}")

    def _grow_backing(self, rec: VolumeRecord, required: int, limit: int) -> int:
        wanted = self._expansion_target(required, limit)
        if limit and rec.capacity_bytes > limit:
            raise OutOfRange(
                f"volume {rec.id} is already {rec.capacity_bytes} bytes, above limit_bytes {limit}"
            )
        pool = self.pool_of(rec)
        if wanted <= rec.capacity_bytes:
            # Already large enough: OK.  The backing is grown to the recorded size in
            # case a crash came between recording the new size and growing the image.
            pool.grow(rec, rec.capacity_bytes)
            return rec.capacity_bytes
        extra = wanted - rec.capacity_bytes
        with pool.alloc_lock:
            cap = self.capacity(pool, rec.thin)
            if pool.shares_space and extra > cap.available_bytes:
                raise ResourceExhausted(
                    f"pool {pool.name} cannot grow volume {rec.id} by {extra} bytes"
                )
            old = rec.capacity_bytes
            rec.capacity_bytes = wanted
            if rec.fs_type:
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

    # ------------------------------------------------------------------ node
    def node_stage(
        self, volume_id: str, staging_path: str, cap: Capability
    ) -> None:
        path = self.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self._volume(volume_id)
            self._check_node_cap(rec, cap)
            fs_type = "" if cap.block else (cap.fs_type or rec.fs_type
                                            or self.pool_of(rec).config.default_fs_type)
            flags = list(mounts.validate_mount_options(cap.mount_flags)) if cap.mount_flags else []
            wanted = Staging(path=path, block=cap.block, fs_type=fs_type, mount_flags=flags,
                             mount_group=cap.mount_group, access_mode=cap.access_mode)
            if rec.staging is not None:
                if rec.staging.path != path:
                    raise FailedPrecondition(
                        f"volume {volume_id} is already staged at {rec.staging.path}"
                    )
                if not _same_staging(rec.staging, wanted):
                    raise AlreadyExists(
                        f"volume {volume_id} is already staged at {path} with another capability"
                    )
            pool = self.pool_of(rec)
            existing = pool.attached_device(rec)
            fresh = rec.staging is None and existing is None
            device = existing or pool.attach(rec, checked=True)
            crash_point("stage.after_attach")
            wanted.device = device
            mounted = False
            try:
                if not cap.block:
                    mounted = self._mount_staging(rec, device=device, path=path,
                                                  fs_type=fs_type, flags=flags, cap=cap)
                    if cap.mount_group and cap.access_mode not in READ_ONLY_MODES:
                        _apply_group(path, cap.mount_group)
                elif not os.path.exists(path):
                    os.makedirs(path, mode=0o750, exist_ok=True)
            except BaseException:
                if fresh:
                    self._undo_attach(rec, path)
                raise
            changed = existing is None or mounted or rec.staging != wanted
            if rec.staging != wanted:
                rec.staging = wanted
                self.store.put_volume(rec)
            crash_point("stage.after_record")
        _log_node_op(changed, started, "NodeStageVolume", volume_id, "staged at", path,
                     f"device {device}, {fs_type or 'raw block'}")

    def _undo_attach(self, rec: VolumeRecord, path: str) -> None:
        """A failed first stage leaves no mount and no loop device behind."""
        try:
            device = self.pool_of(rec).attached_device(rec)
            if device is not None:
                self._unmount_ours(path, _Owned.of(device))
            self.pool_of(rec).detach(rec)
        except (DomainError, OSError) as exc:
            log.error("could not undo the failed stage of %s: %s", rec.id, exc,
                      extra={"volume_id": rec.id})

    def _check_node_cap(self, rec: VolumeRecord, cap: Capability) -> None:
        if cap.access_mode not in SINGLE_NODE_MODES:
            raise FailedPrecondition(
                f"access mode {cap.access_mode} is not supported by node-local volumes"
            )
        if not cap.block:
            if cap.fs_type and cap.fs_type not in FS_TYPES:
                raise FailedPrecondition(f"fs type {cap.fs_type!r} is not supported")
            if cap.fs_type and rec.fs_type and cap.fs_type != rec.fs_type:
                raise FailedPrecondition(
                    f"volume {rec.id} holds {rec.fs_type}; it cannot be mounted as {cap.fs_type}"
                )
        if cap.mount_group and not cap.mount_group.isdigit():
            raise InvalidArgument(
                f"volume_mount_group {cap.mount_group!r} must be a numeric group id"
            )

    def _mount_staging(
        self,
        rec: VolumeRecord,
        *,
        device: str,
        path: str,
        fs_type: str,
        flags: list[str],
        cap: Capability,
    ) -> bool:
        """Mount the volume at its staging path; False when it already was."""
        current = mounts.find_mount(path) if os.path.exists(path) else None
        if current is not None:
            if _Owned.of(device).matches(current):
                if not current.read_only:
                    self._grow_if_pending(rec, device, path, fs_type)
                return False
            raise AlreadyExists(f"something else ({current.source}) is mounted at {path}")
        os.makedirs(path, mode=0o750, exist_ok=True)
        # A volume this driver formatted at CreateVolume with this fs type needs no
        # probe (blkid is a process spawn on the hot path); anything else is probed
        # and formatted only when it carries no signature at all.
        known = rec.formatted and rec.fs_type == fs_type
        if not known:
            found = filesystems.probe_filesystem(device)
            if found is None:
                if filesystems.has_signature(device):
                    raise FailedPrecondition(
                        f"volume {rec.id} carries a signature that is not a filesystem; "
                        "not formatting it"
                    )
                filesystems.make_filesystem(device, fs_type, check_empty=False)
                crash_point("stage.after_mkfs")
            elif found != fs_type:
                raise FailedPrecondition(
                    f"volume {rec.id} holds {found}; it cannot be mounted as {fs_type}"
                )
        if rec.fs_grow_pending and fs_type == "ext4":
            # ext4 grows offline before the mount: no CAP_SYS_RESOURCE needed (the online
            # resize ioctl needs it, and some runtimes drop it even for privileged pods).
            self.pool_of(rec).refresh(rec)
            filesystems.grow_filesystem(fs_type, device, None)
            rec.fs_grow_pending = False
            self.store.put_volume(rec)
        options = list(flags)
        if fs_type == "xfs" and rec.nouuid and "nouuid" not in options:
            options.append("nouuid")
        try:
            mounts.mount(device, path, fs_type, options,
                         read_only=cap.access_mode in READ_ONLY_MODES)
        except mounts.MountError as exc:
            if exc.errno == errno.EINVAL and flags:
                raise InvalidArgument(
                    f"{fs_type} refused the mount options {', '.join(flags)}: {exc}"
                ) from exc
            raise
        crash_point("stage.after_mount")
        if cap.access_mode not in READ_ONLY_MODES:  # a read-only mount cannot grow
            self._grow_if_pending(rec, device, path, fs_type)
        return True

    def _grow_if_pending(self, rec: VolumeRecord, device: str, path: str, fs_type: str) -> None:
        if not rec.fs_grow_pending:
            return
        self.pool_of(rec).refresh(rec)
        try:
            filesystems.grow_filesystem(fs_type, device, path)
        except FailedPrecondition as exc:
            # ext4 already mounted and no CAP_SYS_RESOURCE: the volume works at its old
            # size and grows offline at the next stage.
            log.warning("volume %s: filesystem not grown yet: %s", rec.id, exc,
                        extra={"volume_id": rec.id})
            return
        rec.fs_grow_pending = False
        self.store.put_volume(rec)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        path = self.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self._volume(volume_id)
            self._forget_stale_publications(rec)
            if rec.publications:
                raise FailedPrecondition(
                    f"volume {volume_id} is still published at "
                    f"{', '.join(sorted(rec.publications))}; unpublish it first"
                )
            if rec.staging is not None and rec.staging.path != path:
                log.debug("NodeUnstageVolume: volume %s is staged at %s, not at %s: nothing to do",
                          volume_id, rec.staging.path, path, extra={"volume_id": volume_id})
                return  # not staged at this path: nothing to do
            pool = self.pool_of(rec)
            device = pool.attached_device(rec)
            changed = device is not None or rec.staging is not None
            if device is not None:
                ours = _Owned.of(device)
                self._unmount_ours(path, ours)
                crash_point("unstage.after_unmount")
                others = ours.mounts()
                if others:
                    raise FailedPrecondition(
                        f"volume {volume_id} is still mounted at {others[0].mount_point}"
                    )
                pool.detach(rec)
                crash_point("unstage.after_detach")
            if rec.staging is not None:
                rec.staging = None
                self.store.put_volume(rec)
        _log_node_op(changed, started, "NodeUnstageVolume", volume_id, "unstaged from", path,
                     f"detached {device}" if device else "no device attached")

    def _unmount_ours(self, path: str, ours: _Owned) -> None:
        for _ in range(16):  # a crashed retry may have stacked the same mount twice
            current = mounts.find_mount(path) if _present(path) else None
            if current is None or not ours.matches(current):
                return
            mounts.unmount(path)
        raise FailedPrecondition(f"{path} stays mounted after repeated unmounts")

    def _forget_stale_publications(self, rec: VolumeRecord) -> None:
        """Drop publications whose target is gone (e.g. after a reboot)."""
        if not rec.publications:
            return
        table = mounts.read_mounts()  # once, not once per target (publish is a hot path)
        stale = [t for t in rec.publications if mounts.find_mount(t, table) is None]
        if stale:
            for target in stale:
                del rec.publications[target]
            self.store.put_volume(rec)

    def node_publish(
        self,
        volume_id: str,
        *,
        staging_path: str,
        target_path: str,
        cap: Capability,
        readonly: bool,
    ) -> None:
        target = self.check_path(target_path, "target_path")
        if not staging_path:
            raise FailedPrecondition(
                "staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE)"
            )
        staging = self.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self._volume(volume_id)
            self._check_node_cap(rec, cap)
            flags = list(mounts.validate_mount_options(cap.mount_flags)) if cap.mount_flags else []
            if rec.staging is None or rec.staging.path != staging:
                raise FailedPrecondition(
                    f"volume {volume_id} is not staged at {staging}; call NodeStageVolume first"
                )
            if rec.staging.block != cap.block:
                raise FailedPrecondition(
                    f"volume {volume_id} is staged for {'block' if rec.staging.block else 'mount'}"
                    f" access, the publish asks for {'block' if cap.block else 'mount'}"
                )
            wanted = Publication(target=target, block=cap.block, readonly=readonly,
                                 mount_flags=flags, mount_group=cap.mount_group,
                                 access_mode=cap.access_mode)
            # Targets that vanished (a reboot, a pod cleaned up by hand) do not count.
            self._forget_stale_publications(rec)
            existing = rec.publications.get(target)
            if existing is not None and existing != wanted:
                raise AlreadyExists(
                    f"volume {volume_id} is already published at {target} with other arguments"
                )
            others = [p for t, p in rec.publications.items() if t != target]
            if others and not (cap.access_mode in SHARED_MODES
                               and all(p.access_mode in SHARED_MODES for p in others)):
                raise FailedPrecondition(
                    f"volume {volume_id} is already published at {others[0].target} and its "
                    f"access mode ({cap.access_mode}) allows one target only"
                )
            pool = self.pool_of(rec)
            device = pool.attached_device(rec)
            if device is None:
                raise FailedPrecondition(
                    f"volume {volume_id} is recorded as staged but its device is not attached; "
                    "stage it again"
                )
            ours = _Owned.of(device)
            if not cap.block:
                current = mounts.find_mount(staging)
                if current is None or not ours.matches(current):
                    raise FailedPrecondition(
                        f"volume {volume_id} is not mounted at {staging}; stage it again"
                    )
            source = staging if not cap.block else device
            bound = self._bind(target, source=source, block=cap.block, readonly=readonly,
                               flags=flags, ours=ours)
            if cap.mount_group and not cap.block and not readonly and \
                    cap.access_mode not in READ_ONLY_MODES:
                _apply_group(target, cap.mount_group)  # read-only: nothing to make writable
            changed = bound or existing != wanted
            if existing != wanted:
                rec.publications[target] = wanted
                self.store.put_volume(rec)
            crash_point("publish.after_record")
        _log_node_op(changed, started, "NodePublishVolume", volume_id, "published at", target,
                     f"bind of {source}, {rec.staging.fs_type or 'raw block'}, "
                     f"{'read-only' if readonly else 'read-write'}")

    def _bind(
        self,
        target: str,
        *,
        source: str,
        block: bool,
        readonly: bool,
        flags: list[str],
        ours: _Owned,
    ) -> bool:
        """Bind-mount ``source`` at ``target``; False when it already was."""
        if os.path.islink(target):
            raise InvalidArgument(f"target_path {target} is a symlink; refusing to mount on it")
        current = mounts.find_mount(target) if os.path.lexists(target) else None
        if current is not None:
            if ours.matches(current) and current.read_only == readonly:
                return False
            raise AlreadyExists(f"something else is mounted at {target}")
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise NotFound(f"the parent directory of target_path {target} does not exist")
        created = False
        if block:
            if os.path.isdir(target):
                raise InvalidArgument(f"target_path {target} is a directory; block volumes "
                                      "are published on a file")
            if not os.path.lexists(target):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                created = True
        else:
            if os.path.lexists(target) and not os.path.isdir(target):
                raise InvalidArgument(f"target_path {target} exists and is not a directory")
            if not os.path.lexists(target):
                os.mkdir(target, 0o750)
                created = True
        crash_point("publish.after_mkdir")
        bind_flags = [f for f in flags if f in ("nosuid", "nodev", "noexec")]
        try:
            mounts.bind_mount(source, target, read_only=readonly, options=bind_flags)
        except BaseException:
            if created:
                _remove_target(target)  # leave nothing half-made behind
            raise
        crash_point("publish.after_mount")
        return True

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        target = self.check_path(target_path, "target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self._volume(volume_id)
            ours = self._owned(rec)
            changed = target in rec.publications or _present(target)
            if _present(target):
                current = mounts.find_mount(target)
                if current is not None:
                    if not (ours.matches(current) or target in rec.publications):
                        raise FailedPrecondition(
                            f"{target} holds a mount that is not volume {volume_id}'s"
                        )
                    ours.devices.add((current.major, current.minor))
                    self._unmount_ours(target, ours)
                crash_point("unpublish.after_unmount")
                _remove_target(target)
                crash_point("unpublish.after_remove")
            if target in rec.publications:
                del rec.publications[target]
                self.store.put_volume(rec)
        _log_node_op(changed, started, "NodeUnpublishVolume", volume_id, "unpublished from",
                     target)

    def _owned(self, rec: VolumeRecord) -> _Owned:
        device = self.pool_of(rec).attached_device(rec)
        if device is None:
            return _Owned(set(), set(), set())
        return _Owned.of(device)

    def node_stats(
        self, volume_id: str, volume_path: str, staging_path: str = ""
    ) -> tuple[VolumeUsage, Condition]:
        path = self.check_path(volume_path, "volume_path")
        rec = self._volume(volume_id)
        _check_volume_path(rec, path)
        if not _present(path):
            raise NotFound(f"{path} does not exist")
        condition = self.condition(rec)
        block = rec.publications[path].block if path in rec.publications else bool(
            rec.staging and rec.staging.block)
        if block:
            device = self.pool_of(rec).attached_device(rec)
            size = loop.device_size(device) if device else rec.capacity_bytes
            return VolumeUsage(block=True, bytes_total=size), condition
        total, used, avail, itotal, iused, ifree = filesystems.fs_usage(path)
        return VolumeUsage(False, total, used, avail, itotal, iused, ifree), condition

    def node_expand(
        self,
        volume_id: str,
        volume_path: str,
        *,
        required: int,
        limit: int,
        cap: Capability | None,
        staging_path: str = "",
    ) -> int:
        path = self.check_path(volume_path, "volume_path")
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self._volume(volume_id)
            if cap is not None:
                self._check_cap_fits(rec, cap)
            _check_volume_path(rec, path)
            if required or limit:
                self._grow_backing(rec, required, limit)
            pool = self.pool_of(rec)
            pool.refresh(rec)
            crash_point("expand.after_refresh")
            if rec.staging is not None and not rec.staging.block and rec.fs_type:
                if rec.staging.access_mode in READ_ONLY_MODES:
                    raise FailedPrecondition(
                        f"volume {volume_id} is mounted read-only; its filesystem grows at "
                        "the next writable stage"
                    )
                device = pool.attached_device(rec)
                if device is None:
                    raise FailedPrecondition(f"volume {volume_id} is not attached")
                filesystems.grow_filesystem(rec.fs_type, device, rec.staging.path)
                crash_point("expand.after_grow_fs")
                if rec.fs_grow_pending:
                    rec.fs_grow_pending = False
                    self.store.put_volume(rec)
            return rec.capacity_bytes

    # ------------------------------------------------------------- health
    def condition(self, rec: VolumeRecord) -> Condition:
        pool = self.pools.get(rec.pool)
        if pool is None:
            return Condition(True, f"pool {rec.pool} is not configured on this node")
        if not pool.backing_exists(rec):
            return Condition(True, f"the backing of volume {rec.id} ({rec.backing}) is gone")
        if rec.staging is not None:
            device = pool.attached_device(rec)
            if device is None:
                return Condition(True, "the volume is staged but its loop device is detached")
            if not rec.staging.block and rec.fs_type:
                problem = filesystems.filesystem_error(device, rec.fs_type, rec.staging.path)
                if problem:
                    return Condition(True, problem)
        return Condition(False, "healthy")

    # ------------------------------------------------------------ reports
    def pool_reports(self) -> list[PoolReport]:
        reports = []
        for pool in self.pools.values():
            count = sum(1 for r in self.store.volumes() if r.pool == pool.name)
            thin = thick = None
            if pool.ready:
                thin = self.capacity(pool, True)
                thick = self.capacity(pool, False)
            detail: dict[str, object] = getattr(pool, "describe", dict)()
            reports.append(PoolReport(pool.name, pool.kind, pool.ready, thin, thick, count,
                                      detail))
        return reports


@dataclass
class _Owned:
    """Identifies mounts of one volume: its device numbers, its device path as the
    mount source (btrfs), or (for a bind of the device node itself, which
    mountinfo shows as devtmpfs) the node's name."""

    devices: set[tuple[int, int]]
    names: set[str]
    sources: set[str]

    @classmethod
    def of(cls, device: str) -> _Owned:
        return cls({_major_minor(device)}, {os.path.basename(device)}, {device})

    def matches(self, entry: mounts.MountEntry) -> bool:
        if (entry.major, entry.minor) in self.devices:
            return True
        if entry.source in self.sources:  # btrfs shows an anonymous st_dev, not the loop's
            return True
        return entry.fs_type in ("devtmpfs", "tmpfs") and \
            entry.root.rsplit("/", 1)[-1] in self.names

    def mounts(self) -> list[mounts.MountEntry]:
        return [e for e in mounts.read_mounts() if self.matches(e)]


def _log_node_op(changed: bool, started: float, rpc: str, volume_id: str, state: str,
                 path: str, details: str = "") -> None:
    """One line per node operation: INFO when it changed something, DEBUG for a repeat."""
    level = logging.INFO if changed else logging.DEBUG
    if log.isEnabledFor(level):
        took = (time.monotonic() - started) * 1000
        log.log(level, "%s: volume %s %s%s %s%s %s %.1f ms", rpc, volume_id,
                "" if changed else "already ", state, path,
                f" ({details})" if details else "", "in" if changed else "- nothing to do,",
                took, extra={"volume_id": volume_id})


def _check_ready(pool: Pool) -> None:
    if not pool.ready:
        raise Unavailable(f"pool {pool.name} is not ready yet (the driver is starting); retry")


def _check_volume_path(rec: VolumeRecord, path: str) -> None:
    """NodeGetVolumeStats/NodeExpandVolume: ``path`` must be the volume's stage or a target."""
    if path not in rec.publications and (rec.staging is None or rec.staging.path != path):
        raise NotFound(f"volume {rec.id} is not staged or published at {path}")


def _same_staging(a: Staging, b: Staging) -> bool:
    return (a.path, a.block, a.fs_type, sorted(a.mount_flags), a.mount_group, a.access_mode) == (
        b.path, b.block, b.fs_type, sorted(b.mount_flags), b.mount_group, b.access_mode)


def _parse_token(token: str, length: int) -> int:
    if not token:
        return 0
    from plugin_runtime.errors import Aborted

    if not token.isdigit() or int(token) > length:
        raise Aborted(f"starting_token {token!r} is not valid (the list may have changed)")
    return int(token)


def _major_minor(device: str) -> tuple[int, int]:
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        raise FailedPrecondition(f"{device} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _apply_group(path: str, group: str) -> None:
    """fsGroup delegated by the kubelet: the volume root belongs to the group, setgid."""
    gid = int(group)
    st = os.stat(path)
    if st.st_gid != gid:
        os.chown(path, -1, gid)
    mode = stat.S_IMODE(st.st_mode) | stat.S_ISGID | stat.S_IRWXG
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _present(path: str) -> bool:
    """Something is at ``path``, even if it cannot be looked at.

    ``os.path.lexists`` says False on any error, and the mount point of a
    filesystem that shut itself down (xfs after a metadata error) answers lstat
    with EIO: treated as absent, the dead mount would never be unmounted.
    """
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _remove_target(target: str) -> None:
    """Remove the file or empty directory NodePublish created; never recursively."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(target)
        except OSError as exc:
            log.warning("leaving target %s in place: %s", target, exc.strerror)
    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(target)
    else:
        log.warning("leaving target %s in place: not what NodePublish creates", target)
