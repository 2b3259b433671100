"""The node side of volumes: stage, publish, stats and node expansion, free of gRPC.

The CSI rules of the node RPCs, the same for every kind of volume:

- NodeStage/NodePublish repeat with the same arguments = OK, with other
  arguments = ALREADY_EXISTS; publish before stage = FAILED_PRECONDITION; one
  target only unless the access mode shares the volume.
- NodeUnstage/NodeUnpublish of something not staged/published = OK, and they
  also clean up what a crash left half-done (a mount, a loop device, a target).
- NodeGetVolumeStats/NodeExpandVolume answer NOT_FOUND for a volume that is not
  staged or published at the given path.

What the kind decides (how the volume is reached and mounted at the staging
path, how its mounts are recognised, how it is measured and grown on the
node) is asked of its pool (``pools.base.Pool``).  Publishing is the same for
every kind: a bind mount of the staging mount (or, for raw block, of the
device node) on the target, read-only and with nosuid/nodev/noexec as asked.

A NodePublishVolume travels: path checks -> the volume's lock -> the record
(``VolumeService.volume``) -> capability and staging checks -> stale
publications dropped -> ``pool.owner`` says whether the staging mount is the
volume's -> bind mount on the target -> fsGroup -> the publication recorded.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable

from csi_driver import mounts
from csi_driver.config import FS_TYPES
from csi_driver.faults import crash_point
from csi_driver.pools.base import Condition, MountOwner, VolumeUsage
from csi_driver.provisioning import Provisioner
from csi_driver.store import Publication, Staging, VolumeRecord
from csi_driver.volumes import (
    READ_ONLY_MODES,
    SHARED_MODES,
    SINGLE_NODE_MODES,
    Capability,
    VolumeService,
)
from plugin_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger(__name__)


class NodeVolumes:
    """The node side of the volumes of ``volumes``."""

    def __init__(self, volumes: VolumeService, provisioner: Provisioner) -> None:
        self.volumes = volumes
        self.provisioner = provisioner  # grows the backing when NodeExpand must do it
        self.store = volumes.store
        self.locks = volumes.locks
        self.node_id = volumes.node_id

    def node_stage(
        self, volume_id: str, staging_path: str, cap: Capability
    ) -> None:
        path = self.volumes.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
            self._check_node_cap(rec, cap)
            fs_type = "" if cap.block else (cap.fs_type or rec.fs_type
                                            or self.volumes.pool_of(rec).config.default_fs_type)
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
            pool = self.volumes.pool_of(rec)
            already = rec.staging is not None and _same_staging(rec.staging, wanted) \
                and _in_place(pool.owner(rec), path, cap.block)
            wanted.device = pool.stage(rec, wanted, self.volumes.save)
            if not cap.block and cap.mount_group and not wanted.read_only:
                _apply_group(path, cap.mount_group)
            if rec.staging != wanted:
                rec.staging = wanted
                self.store.put_node(rec)
            crash_point("stage.after_record")
        _log_node_op(not already, started, "NodeStageVolume", volume_id, "staged at", path,
                     f"device {wanted.device}, {fs_type or 'raw block'}")

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

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        path = self.volumes.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
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
            pool = self.volumes.pool_of(rec)
            owner = pool.owner(rec)
            changed = owner is not None or rec.staging is not None
            pool.unstage(rec, path)
            if rec.staging is not None:
                rec.staging = None
                self.store.put_node(rec)
        _log_node_op(changed, started, "NodeUnstageVolume", volume_id, "unstaged from", path,
                     f"detached {owner.device}" if owner is not None and owner.device
                     else "no device attached")

    def _forget_stale_publications(self, rec: VolumeRecord) -> None:
        """Drop publications whose target is gone (e.g. after a reboot)."""
        if not rec.publications:
            return
        table = mounts.read_mounts()  # once, not once per target (publish is a hot path)
        stale = [t for t in rec.publications if mounts.find_mount(t, table) is None]
        if stale:
            for target in stale:
                del rec.publications[target]
            self.store.put_node(rec)

    def node_publish(
        self,
        volume_id: str,
        *,
        staging_path: str,
        target_path: str,
        cap: Capability,
        readonly: bool,
    ) -> None:
        target = self.volumes.check_path(target_path, "target_path")
        if not staging_path:
            raise FailedPrecondition(
                "staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE)"
            )
        staging = self.volumes.check_path(staging_path, "staging_target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
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
            ours = self.volumes.pool_of(rec).owner(rec)
            if ours is None:
                raise FailedPrecondition(
                    f"volume {volume_id} is recorded as staged but cannot be reached now (its "
                    "loop device is detached or its subvolume is gone); stage it again"
                )
            if not cap.block:
                current = mounts.find_mount(staging)
                if current is None or not ours.matches(current):
                    raise FailedPrecondition(
                        f"volume {volume_id} is not mounted at {staging}; stage it again"
                    )
            source = staging if not cap.block else ours.device
            bound = self._bind(target, source=source, block=cap.block, readonly=readonly,
                               flags=flags, ours=ours)
            if cap.mount_group and not cap.block and not readonly and \
                    cap.access_mode not in READ_ONLY_MODES:
                _apply_group(target, cap.mount_group)  # read-only: nothing to make writable
            changed = bound or existing != wanted
            if existing != wanted:
                rec.publications[target] = wanted
                self.store.put_node(rec)
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
        ours: MountOwner,
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
        target = self.volumes.check_path(target_path, "target_path")
        started = time.monotonic()
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
            ours = self.volumes.pool_of(rec).owner(rec)
            changed = target in rec.publications or mounts.present(target)
            if mounts.present(target):
                current = mounts.find_mount(target)
                if current is not None:
                    if not ((ours is not None and ours.matches(current))
                            or target in rec.publications):
                        raise FailedPrecondition(
                            f"{target} holds a mount that is not volume {volume_id}'s"
                        )
                    mounts.unmount_matching(target, _same_mount_as(current, ours))
                crash_point("unpublish.after_unmount")
                _remove_target(target)
                crash_point("unpublish.after_remove")
            if target in rec.publications:
                del rec.publications[target]
                self.store.put_node(rec)
        _log_node_op(changed, started, "NodeUnpublishVolume", volume_id, "unpublished from",
                     target)

    def node_stats(
        self, volume_id: str, volume_path: str, staging_path: str = ""
    ) -> tuple[VolumeUsage, Condition]:
        rec = self.volumes.volume(volume_id)
        path = _volume_path(rec, volume_path)
        if not mounts.present(path):
            raise NotFound(f"{path} does not exist")
        condition = self.volumes.condition(rec)
        block = rec.publications[path].block if path in rec.publications else bool(
            rec.staging and rec.staging.block)
        return self.volumes.pool_of(rec).usage(rec, path, block), condition

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
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        with self.locks.hold(f"vol:{volume_id}"):
            rec = self.volumes.volume(volume_id)
            if cap is not None:
                self.provisioner.check_cap_fits(rec, cap)
            _volume_path(rec, volume_path)
            if required or limit:
                # The resizer answered for a volume of another node without growing it
                # (Provisioner._expand_elsewhere): its backing grows here.
                self.provisioner.grow_backing(rec, required, limit)
            pool = self.volumes.pool_of(rec)
            pool.refresh(rec)
            crash_point("expand.after_refresh")
            pool.expand_on_node(rec, self.volumes.save)
            return rec.capacity_bytes


def _in_place(owner: MountOwner | None, path: str, block: bool) -> bool:
    """True when the volume is already reachable at its staging path: its backing is
    attached and, for a filesystem, its staging mount is there."""
    if owner is None:
        return False
    if block:
        return os.path.isdir(path)
    current = mounts.find_mount(path) if os.path.exists(path) else None
    return current is not None and owner.matches(current)


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


def _same_mount_as(
    entry: mounts.MountEntry, ours: MountOwner | None
) -> Callable[[mounts.MountEntry], bool]:
    """Matches mounts of the volume, and more mounts like ``entry`` (a recorded target whose
    mount the owner does not recognise, e.g. after its device was renumbered)."""
    def matches(other: mounts.MountEntry) -> bool:
        if ours is not None and ours.matches(other):
            return True
        return (other.major, other.minor) == (entry.major, entry.minor)
    return matches


def _volume_path(rec: VolumeRecord, volume_path: str) -> str:
    """NodeGetVolumeStats/NodeExpandVolume: ``volume_path`` must be the volume's stage or
    one of its targets, else NOT_FOUND (the spec's code for a volume that does not
    exist at the given path).  A relative or malformed path cannot be where a volume
    is staged or published (those were checked absolute when recorded), so it is
    NOT_FOUND too, not INVALID_ARGUMENT; the volume is looked up first, so an
    unknown volume is NOT_FOUND whatever the path looks like."""
    path = os.path.normpath(volume_path) if os.path.isabs(volume_path) and \
        "\0" not in volume_path else ""
    if not path or (path not in rec.publications
                    and (rec.staging is None or rec.staging.path != path)):
        raise NotFound(f"volume {rec.id} is not staged or published at {volume_path!r}")
    return path


def _same_staging(a: Staging, b: Staging) -> bool:
    return (a.path, a.block, a.fs_type, sorted(a.mount_flags), a.mount_group, a.access_mode) == (
        b.path, b.block, b.fs_type, sorted(b.mount_flags), b.mount_group, b.access_mode)


def _apply_group(path: str, group: str) -> None:
    """fsGroup delegated by the kubelet: the volume root belongs to the group, setgid."""
    gid = int(group)
    st = os.stat(path)
    if st.st_gid != gid:
        os.chown(path, -1, gid)
    mode = stat.S_IMODE(st.st_mode) | stat.S_ISGID | stat.S_IRWXG
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


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
