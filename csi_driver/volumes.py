"""The volumes of this node: records, pools, locks, and the vocabulary of both services.

The CSI rules are split by side, and what differs between kinds of volume is
behind the pool interface (``pools.base.Pool``):

- ``provisioning.Provisioner``: CreateVolume, DeleteVolume, expansion,
  capacity, validation, listing (the controller side);
- ``node_volumes.NodeVolumes``: stage, publish, stats, node expansion;
- ``snapshots.SnapshotService``: the snapshot RPCs;
- ``pools``: how a volume of each kind is made, copied, grown, snapshotted,
  reached on the node, mounted and measured.

``VolumeService`` here is what all of them share: the store, the pools by
name, the per-volume locks, path checks, record lookup, health and the
reports ``csi-driver pools`` and the metrics show.  The plain request types
below are what the servicers build from protobuf messages.

A pool that is still starting answers UNAVAILABLE (retry soon).  A pool whose
start failed (``Pool.problem``: a path not on btrfs, quotas that cannot be
enabled, a directory that cannot be made) answers FAILED_PRECONDITION with
its problem, the text ``csi-driver pools`` shows: retrying cannot help until
the operator fixes it and restarts the driver.  The other pools keep serving;
``probe`` fails only when no pool can.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from csi_driver.config import DriverConfig
from csi_driver.locks import KeyedLocks
from csi_driver.pools.base import GIB, Capacity, Condition, Pool, VolumeUsage
from csi_driver.store import READY, Store, VolumeRecord, is_valid_id
from plugin_runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = ["Condition", "VolumeUsage"]

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
    """Records, pools and locks of this node's volumes, shared by every service."""

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
        # filesystem frozen while its data is copied (clones).
        self.copy_source: Callable[[VolumeRecord], AbstractContextManager[None]] | None = None

    def probe(self) -> bool:
        """Probe's answer: False while a pool is still starting, True once each pool
        serves or has failed and at least one serves; FailedPrecondition naming every
        pool's problem when none can serve."""
        pools = self.pools.values()
        if any(not p.ready and not p.problem for p in pools):
            return False
        if any(p.ready for p in pools):
            return True
        raise FailedPrecondition("no pool can serve volumes: " + "; ".join(
            f"pool {p.name} failed to start: {p.problem}" for p in pools))

    def topology(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.node_id}

    def save(self, rec: VolumeRecord) -> None:
        self.store.put_volume(rec)

    def pool_of(self, rec: VolumeRecord) -> Pool:
        pool = self.pools.get(rec.pool)
        if pool is None:
            raise FailedPrecondition(
                f"volume {rec.id} belongs to pool {rec.pool!r}, which is not configured"
            )
        check_ready(pool)
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

    def volume(self, volume_id: str) -> VolumeRecord:
        """The ready record of ``volume_id``; NotFound for anything else."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not is_valid_id(volume_id, "vol"):
            raise NotFound(f"volume {volume_id!r} does not exist (not an id of this driver)")
        rec = self.store.volume(volume_id)
        if rec is None or rec.state != READY:
            raise NotFound(f"volume {volume_id} does not exist")
        return rec

    def capacity(self, pool: Pool, thin: bool) -> Capacity:
        records = self.store.volumes_in(pool.name)  # read only
        return pool.capacity(thin, sum(r.capacity_bytes for r in records), records)

    def condition(self, rec: VolumeRecord) -> Condition:
        pool = self.pools.get(rec.pool)
        if pool is None:
            return Condition(True, f"pool {rec.pool} is not configured on this node")
        if not pool.ready and pool.problem:
            return Condition(True, failed_message(pool))
        return pool.condition(rec)

    def pool_reports(self) -> list[PoolReport]:
        reports = []
        for pool in self.pools.values():
            count = len(self.store.volumes_in(pool.name))
            thin = thick = None
            if pool.ready:
                thin = self.capacity(pool, True)
                thick = self.capacity(pool, False)
            detail: dict[str, object] = getattr(pool, "describe", dict)()
            reports.append(PoolReport(pool.name, pool.kind, pool.ready, thin, thick, count,
                                      detail))
        return reports


def failed_message(pool: Pool) -> str:
    return (f"pool {pool.name} failed to start and serves no volumes until the driver "
            f"restarts: {pool.problem}")


def check_ready(pool: Pool) -> None:
    """UNAVAILABLE while ``pool`` is starting; FAILED_PRECONDITION with its problem
    when its start failed."""
    if pool.ready:
        return
    if pool.problem:
        raise FailedPrecondition(failed_message(pool))
    raise Unavailable(f"pool {pool.name} is not ready yet (the driver is starting); retry")


def parse_token(token: str, length: int) -> int:
    """A list RPC's starting_token (an offset); ABORTED when it no longer fits."""
    if not token:
        return 0
    if not token.isdigit() or int(token) > length:
        raise Aborted(f"starting_token {token!r} is not valid (the list may have changed)")
    return int(token)
