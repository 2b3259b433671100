"""The node side of volumes that are block devices with a filesystem of their own.

Image-file pools (a loop device per volume) and disk pools (the disk itself)
differ in where the device comes from (``attach``/``detach``), not in what the
node does with it: stage = attach, then mount the volume's own filesystem
(formatting a volume that has none, growing one whose backing grew while it
was not mounted); publish = a bind of the staging mount (or of the device node
for raw block); stats = statvfs of the mount (or the device size); node
expansion = grow the mounted filesystem; condition = backing present, device
attached, no filesystem errors.  ``BlockDevicePool`` holds that once, and a
kind only supplies the five backing operations it declares abstract.

The mounts of such a volume are recognised by ``DeviceMounts``: its device
numbers, its device path as the mount source (btrfs shows an anonymous st_dev),
or, for a bind of the device node itself, the node's name under devtmpfs.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import stat
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from csi_driver import filesystems, loop, mounts
from csi_driver.config import FS_TYPES, PoolConfig
from csi_driver.faults import crash_point
from csi_driver.pools.base import (
    HEALTHY,
    MIN_FS_BYTES,
    Condition,
    MountOwner,
    SaveRecord,
    VolumeUsage,
)
from csi_driver.store import Staging, VolumeRecord
from plugin_runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
)

log = logging.getLogger(__name__)


@dataclass
class DeviceMounts:
    """Identifies mounts of one block-device volume (a ``MountOwner``)."""

    device: str
    devices: set[tuple[int, int]]
    names: set[str]
    sources: set[str]

    @classmethod
    def of(cls, device: str) -> DeviceMounts:
        return cls(device, {major_minor(device)}, {os.path.basename(device)}, {device})

    def matches(self, entry: mounts.MountEntry) -> bool:
        if (entry.major, entry.minor) in self.devices:
            return True
        if entry.source in self.sources:  # btrfs shows an anonymous st_dev, not the loop's
            return True
        return entry.fs_type in ("devtmpfs", "tmpfs") and \
            entry.root.rsplit("/", 1)[-1] in self.names

    def mounts(self) -> list[mounts.MountEntry]:
        return [e for e in mounts.read_mounts() if self.matches(e)]


def major_minor(device: str) -> tuple[int, int]:
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        raise FailedPrecondition(f"{device} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


class BlockDevicePool(abc.ABC):
    """Node-side behaviour shared by the kinds whose volumes are block devices."""

    name: str
    config: PoolConfig
    own_filesystem = True
    atomic_snapshots = False
    fs_types: tuple[str, ...] = FS_TYPES
    parameters: tuple[str, ...] = ()

    # ------------------------------------------------ what each kind supplies
    @abc.abstractmethod
    def attach(self, rec: VolumeRecord, *, checked: bool = False) -> str:
        """The block device of ``rec``, attaching it if needed."""

    @abc.abstractmethod
    def attached_device(self, rec: VolumeRecord) -> str | None:
        """The block device of ``rec`` if it is attached now."""

    @abc.abstractmethod
    def detach(self, rec: VolumeRecord) -> None:
        """Detach whatever makes ``rec`` a block device; none is fine."""

    @abc.abstractmethod
    def refresh(self, rec: VolumeRecord) -> None:
        """Make the attached device see the backing's current size."""

    @abc.abstractmethod
    def backing_exists(self, rec: VolumeRecord) -> bool:
        """True when the backing of ``rec`` is present."""

    # --------------------------------------------------------- provisioning
    def minimum_size(self, fs_type: str) -> int:
        return MIN_FS_BYTES.get(fs_type, 4096)

    def check_access(self, block: bool) -> None:
        return  # block devices serve both raw block and filesystem access

    def check_parameters(self, parameters: dict[str, str]) -> None:
        return  # no parameters of their own

    def carries_record(self, rec: VolumeRecord) -> bool:
        return False  # an image or disk holds only the volume's data

    def carried_records(self, known: AbstractSet[str]) -> list[VolumeRecord]:
        return []

    def needs_node_expansion(self, rec: VolumeRecord) -> bool:
        # A mounted filesystem is grown by NodeExpandVolume; an unstaged one grows at
        # its next NodeStage (fs_grow_pending), so the node has nothing to do now.
        return bool(rec.fs_type) and rec.staging is not None and not rec.staging.block

    # ------------------------------------------------------------ node side
    def owner(self, rec: VolumeRecord) -> MountOwner | None:
        device = self.attached_device(rec)
        return DeviceMounts.of(device) if device is not None else None

    def stage(self, rec: VolumeRecord, staging: Staging, save: SaveRecord) -> str:
        existing = self.attached_device(rec)
        fresh = rec.staging is None and existing is None
        device = existing or self.attach(rec, checked=True)
        crash_point("stage.after_attach")
        try:
            if not staging.block:
                self._mount_staging(rec, device, staging, save)
            elif not os.path.exists(staging.path):
                os.makedirs(staging.path, mode=0o750, exist_ok=True)
        except BaseException:
            if fresh:
                self._undo_attach(rec, staging.path)
            raise
        return device

    def _undo_attach(self, rec: VolumeRecord, path: str) -> None:
        """A failed first stage leaves no mount and no loop device behind."""
        try:
            device = self.attached_device(rec)
            if device is not None:
                mounts.unmount_matching(path, DeviceMounts.of(device).matches)
            self.detach(rec)
        except (DomainError, OSError) as exc:
            log.error("could not undo the failed stage of %s: %s", rec.id, exc,
                      extra={"volume_id": rec.id})

    def _mount_staging(
        self, rec: VolumeRecord, device: str, staging: Staging, save: SaveRecord
    ) -> None:
        path, fs_type, flags = staging.path, staging.fs_type, staging.mount_flags
        current = mounts.find_mount(path) if os.path.exists(path) else None
        if current is not None:
            if DeviceMounts.of(device).matches(current):
                if not current.read_only:
                    self._grow_if_pending(rec, device, path, fs_type, save)
                return
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
            self.refresh(rec)
            filesystems.grow_filesystem(fs_type, device, None)
            rec.fs_grow_pending = False
            save(rec)
        options = list(flags)
        if fs_type == "xfs" and rec.nouuid and "nouuid" not in options:
            options.append("nouuid")
        try:
            mounts.mount(device, path, fs_type, options, read_only=staging.read_only)
        except mounts.MountError as exc:
            if exc.errno == errno.EINVAL and flags:
                raise InvalidArgument(
                    f"{fs_type} refused the mount options {', '.join(flags)}: {exc}"
                ) from exc
            raise
        crash_point("stage.after_mount")
        if not staging.read_only:  # a read-only mount cannot grow
            self._grow_if_pending(rec, device, path, fs_type, save)

    def _grow_if_pending(
        self, rec: VolumeRecord, device: str, path: str, fs_type: str, save: SaveRecord
    ) -> None:
        if not rec.fs_grow_pending:
            return
        self.refresh(rec)
        try:
            filesystems.grow_filesystem(fs_type, device, path)
        except FailedPrecondition as exc:
            # ext4 already mounted and no CAP_SYS_RESOURCE: the volume works at its old
            # size and grows offline at the next stage.
            log.warning("volume %s: filesystem not grown yet: %s", rec.id, exc,
                        extra={"volume_id": rec.id})
            return
        rec.fs_grow_pending = False
        save(rec)

    def unstage(self, rec: VolumeRecord, path: str) -> None:
        device = self.attached_device(rec)
        if device is None:
            return
        ours = DeviceMounts.of(device)
        mounts.unmount_matching(path, ours.matches)
        crash_point("unstage.after_unmount")
        others = ours.mounts()
        if others:
            raise FailedPrecondition(
                f"volume {rec.id} is still mounted at {others[0].mount_point}"
            )
        self.detach(rec)
        crash_point("unstage.after_detach")

    def usage(self, rec: VolumeRecord, path: str, block: bool) -> VolumeUsage:
        if block:
            device = self.attached_device(rec)
            size = loop.device_size(device) if device else rec.capacity_bytes
            return VolumeUsage(block=True, bytes_total=size)
        total, used, avail, itotal, iused, ifree = filesystems.fs_usage(path)
        return VolumeUsage(False, total, used, avail, itotal, iused, ifree)

    def expand_on_node(self, rec: VolumeRecord, save: SaveRecord) -> None:
        staging = rec.staging
        if staging is None or staging.block or not rec.fs_type:
            return  # not mounted: the filesystem grows at the next stage
        if staging.read_only:
            raise FailedPrecondition(
                f"volume {rec.id} is mounted read-only; its filesystem grows at "
                "the next writable stage"
            )
        device = self.attached_device(rec)
        if device is None:
            raise FailedPrecondition(f"volume {rec.id} is not attached")
        filesystems.grow_filesystem(rec.fs_type, device, staging.path)
        crash_point("expand.after_grow_fs")
        if rec.fs_grow_pending:
            rec.fs_grow_pending = False
            save(rec)

    def condition(self, rec: VolumeRecord) -> Condition:
        if not self.backing_exists(rec):
            return Condition(True, f"the backing of volume {rec.id} ({rec.backing}) is gone")
        if rec.staging is not None:
            device = self.attached_device(rec)
            if device is None:
                return Condition(True, "the volume is staged but its loop device is detached")
            if not rec.staging.block and rec.fs_type:
                problem = filesystems.filesystem_error(device, rec.fs_type, rec.staging.path)
                if problem:
                    return Condition(True, problem)
        return HEALTHY

    def recover(self, rec: VolumeRecord) -> str | None:
        staging = rec.staging
        if staging is not None and not staging.block and mounts.is_mountpoint(staging.path):
            # A crash during a snapshot can leave the stage frozen: every writer would hang.
            filesystems.thaw(staging.path)
        device = self.attached_device(rec)
        if device is None:
            if not self.backing_exists(rec):
                return None
            device = self.attach(rec)
            log.info("re-attached staged volume %s as %s", rec.id, device,
                     extra={"volume_id": rec.id})
        return device
