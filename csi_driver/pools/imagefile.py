"""Image-file pool: each volume is an image file in a directory, seen through a loop device.

Layout under the pool path::

    volumes/<volume-id>.img       one image per volume (mode 0600)
    snapshots/<snapshot-id>.img   one image per snapshot
    volumes/.<id>.img.partial     an image being built (removed or completed on retry)

Thin images are sparse (``ftruncate``); thick images are preallocated
(``posix_fallocate``), so a thick volume can never hit ENOSPC later.  A new image
is built under a ``.partial`` name and renamed into place, so an image with its
final name is always complete (a crash mid-copy or mid-fallocate leaves only a
partial file, which the retry replaces).  The image size is the volume's hard
size limit.  Loop devices are attached with direct I/O (no second copy in the
page cache) and found again by their backing file, so a retry never leaks one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager

from csi_driver import filesystems, loop
from csi_driver.config import PoolConfig
from csi_driver.pools.base import ALIGNMENT, Capacity, Orphan, pool_capacity
from csi_driver.pools.devices import BlockDevicePool
from csi_driver.store import READY, SnapshotRecord, VolumeRecord, fsync_dir, remove_durably
from plugin_runtime import commands
from plugin_runtime.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger(__name__)


def _hint(rec: VolumeRecord) -> str:
    return rec.staging.device if rec.staging is not None else ""


def detach_image(path: str) -> None:
    """Detach every loop device backed by ``path``."""
    for device in loop.devices_backed_by(path):
        loop.detach(device)


def _fill(fd: int, size: int, thin: bool, what: str) -> None:
    try:
        if thin:
            os.ftruncate(fd, size)
        else:
            current = os.fstat(fd).st_size
            if size > current:
                os.posix_fallocate(fd, current, size - current)
            os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ResourceExhausted(f"no space for {what} ({size} bytes): {exc.strerror}") from None
        raise Internal(f"cannot size {what} to {size} bytes: {exc.strerror}") from exc


class ImagePool(BlockDevicePool):
    kind = "image"
    supports_snapshots = True
    shares_space = True
    records_backing = False  # volumes/<id>.img: derivable from the id

    def __init__(self, config: PoolConfig, path: str | None = None) -> None:
        self.name = config.name
        self.config = config
        self.path = path or config.path
        self.volume_dir = os.path.join(self.path, "volumes")
        self.snapshot_dir = os.path.join(self.path, "snapshots")
        self._ready = False
        self.problem = ""
        # Serializes "check capacity, then allocate" so concurrent creates cannot
        # both take the last free bytes.
        self.alloc_lock = threading.Lock()

    def start(self) -> None:
        for d in (self.path, self.volume_dir, self.snapshot_dir):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as exc:
                self.problem = (f"cannot create the directory {d} of image pool {self.name}: "
                                f"{exc.strerror or exc}")
                raise FailedPrecondition(self.problem) from exc
        self.problem = ""
        self._ready = True

    def inspect(self) -> None:
        """For ``csi-driver pools``: ``start``, a failure shown as the pool's problem."""
        with contextlib.suppress(FailedPrecondition):
            self.start()

    def describe(self) -> dict[str, object]:
        return {"problem": self.problem} if self.problem else {}

    def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def image_path(self, volume_id: str) -> str:
        return os.path.join(self.volume_dir, f"{volume_id}.img")

    def snapshot_path(self, snapshot_id: str, source: VolumeRecord) -> str:
        return os.path.join(self.snapshot_dir, f"{snapshot_id}.img")

    def fs_stats(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def space(self, records: Sequence[VolumeRecord] = ()) -> tuple[int, int]:
        """(size, free bytes) for new volumes: thick images are preallocated, so the
        filesystem's free space already leaves out what they may still write."""
        return self.fs_stats()

    def capacity(
        self, thin: bool, provisioned: int, records: Sequence[VolumeRecord] = ()
    ) -> Capacity:
        return pool_capacity(self.config, self.space(records), thin=thin,
                             provisioned=provisioned)

    def allocate(self, rec: VolumeRecord, source: str | None = None) -> str:
        final = self.image_path(rec.id)
        if os.path.exists(final):
            size = os.stat(final).st_size
            if size < rec.capacity_bytes:
                self.grow(rec, rec.capacity_bytes)
            return final
        partial = os.path.join(self.volume_dir, f".{rec.id}.img.partial")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)  # left by a crash mid-build
        build_image(partial, rec.capacity_bytes, rec.thin, source, f"volume {rec.id}")
        os.rename(partial, final)
        fsync_dir(self.volume_dir)
        return final

    def release(self, rec: VolumeRecord) -> None:
        path = self.image_path(rec.id)
        detach_image(path)
        for name in (path, os.path.join(self.volume_dir, f".{rec.id}.img.partial")):
            try:
                os.unlink(name)
            except FileNotFoundError:
                continue
        fsync_dir(self.volume_dir)

    def backing_exists(self, rec: VolumeRecord) -> bool:
        return os.path.isfile(self.image_path(rec.id))

    def format_new(self, rec: VolumeRecord) -> None:
        # The image is ours and fresh (the record is still "creating", it was never
        # handed out), so mkfs runs on the file itself, without a loop device, and
        # may overwrite a half-made filesystem left by a crash.
        prezeroed = rec.fs_type == "ext4" and mke2fs_knows_prezeroed()
        commands.run(image_mkfs_argv(self.image_path(rec.id), rec.fs_type, prezeroed=prezeroed),
                     timeout=MKFS_TIMEOUT)

    def data_path(self, rec: VolumeRecord) -> str:
        return self.image_path(rec.id)

    def take_snapshot(
        self, source: VolumeRecord, snap: SnapshotRecord,
        quiesce: AbstractContextManager[None],
    ) -> None:
        copy_image_snapshot(self.data_path(source), snap, quiesce)

    def remove_snapshot(self, snap: SnapshotRecord) -> None:
        remove_image_snapshot(snap)

    def grow(self, rec: VolumeRecord, new_size: int) -> int:
        path = self.image_path(rec.id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"image of volume {rec.id} is missing ({path})") from None
        try:
            if os.fstat(fd).st_size < new_size:
                _fill(fd, new_size, rec.thin, f"volume {rec.id}")
                os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def attach(self, rec: VolumeRecord, *, checked: bool = False) -> str:
        path = self.image_path(rec.id)
        existing = [] if checked else loop.devices_backed_by(path, _hint(rec))
        if existing:
            return existing[0]
        if not os.path.isfile(path):
            raise NotFound(f"image of volume {rec.id} is missing ({path})")
        # 4 KiB logical blocks: every filesystem made here uses 4 KiB blocks/sectors, so
        # each block I/O is one aligned direct I/O on the image (measured: fewer
        # sub-page requests, better qd1 random reads than 512-byte sectors).  Always the
        # same size, so an image attaches the same way after a reboot.  A thick image
        # refuses discards: each would punch a hole in it (fstrim inside the volume, a
        # host's fstrim.timer), giving its preallocated space back to the pool.
        return loop.attach(path, direct_io=self.config.direct_io, block_size=ALIGNMENT,
                           discard=rec.thin)

    def recover(self, rec: VolumeRecord) -> str | None:
        device = super().recover(rec)
        if device and not rec.thin:
            loop.keep_allocation(device)  # attached by a driver that let discards through
        return device

    def attached_device(self, rec: VolumeRecord) -> str | None:
        found = loop.devices_backed_by(self.image_path(rec.id), _hint(rec))
        return found[0] if found else None

    def detach(self, rec: VolumeRecord) -> None:
        detach_image(self.image_path(rec.id))

    def refresh(self, rec: VolumeRecord) -> None:
        for device in loop.devices_backed_by(self.image_path(rec.id)):
            loop.refresh_capacity(device)

    def orphans(self, records: list[VolumeRecord], snapshot_paths: set[str]) -> list[Orphan]:
        found: list[Orphan] = []
        mine = {self.image_path(r.id): r for r in records if r.pool == self.name
                and (not r.backing or r.backing.startswith(self.path + "/"))}
        for directory, known in ((self.volume_dir, set(mine)), (self.snapshot_dir, snapshot_paths)):
            try:
                entries = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                path = os.path.join(directory, entry)
                if entry.endswith(".partial"):
                    found.append(Orphan("partial-image", self.name, path,
                                        "left by an interrupted create; a retry replaces it"))
                elif path not in known:
                    found.append(Orphan("image-without-record", self.name, path))
        for path, rec in mine.items():
            # A create or delete cut short is reported as such by reconcile; only a
            # ready volume without its image is drift.
            if rec.state == READY and not os.path.isfile(path):
                found.append(Orphan("record-without-image", self.name, path,
                                    f"volume {rec.id} ({rec.name})"))
        staged = {self.image_path(r.id) for r in records if r.staging is not None}
        for info in loop.list_attached():
            backing = info.backing_file or ""
            if backing.startswith(self.path + "/") and backing not in staged:
                found.append(Orphan("loop-not-staged", self.name, info.device,
                                    f"backed by {backing}"))
        return found


MKFS_TIMEOUT = 300.0
MKE2FS_VERSION_TIMEOUT = 15.0
PREZEROED_SINCE = (1, 47, 0)  # e2fsprogs release that added assume_storage_prezeroed


def mke2fs_version(text: str) -> tuple[int, ...] | None:
    """The version in ``mke2fs -V`` output ("mke2fs 1.47.0 (5-Feb-2023)"), None if absent."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "mke2fs":
            parts = words[1].split("-")[0].split(".")
            if all(part.isdigit() for part in parts):
                return tuple(int(part) for part in parts)
    return None


@functools.cache
def mke2fs_knows_prezeroed() -> bool:
    """Whether this host's mke2fs accepts ``-E assume_storage_prezeroed`` (asked once)."""
    result = commands.run(["mke2fs", "-V"], timeout=MKE2FS_VERSION_TIMEOUT, check=False)
    version = mke2fs_version(result.stderr + result.stdout)
    known = version is not None and version >= PREZEROED_SINCE
    if not known:
        log.warning(
            "mke2fs %s predates assume_storage_prezeroed (e2fsprogs %s): the kernel will zero "
            "the inode tables of new ext4 image volumes after their first mount, which punches "
            "that space out of thick images", ".".join(map(str, version or ())) or "(unknown)",
            ".".join(map(str, PREZEROED_SINCE)),
        )
    return known


def image_mkfs_argv(path: str, fs_type: str, *, prezeroed: bool = True) -> list[str]:
    """mkfs for a fresh image file.

    A new image reads as zeros (sparse, or fallocated extents that are unwritten),
    so ext4 may skip zeroing its journal and inode tables; discard is pointless on
    a file.  ``prezeroed`` also tells mke2fs to mark every inode table as zeroed
    (``assume_storage_prezeroed``, e2fsprogs 1.47): otherwise the kernel's
    ext4lazyinit thread zeroes them after the first mount with write-zeroes
    requests, which the loop device turns into hole punches in the image file.
    Measured on a 2 GiB thick image: 32 MiB of its preallocation gone within a
    second of the first mount (so the "never ENOSPC" promise no longer held for
    the inode tables), plus background I/O competing with the volume's first
    user.  4 KiB blocks/sectors keep the filesystem mountable whatever logical
    block size the loop device inherits from the pool's disk (512 B or 4 KiB).
    """
    if fs_type == "ext4":
        extended = "nodiscard,lazy_itable_init=1,lazy_journal_init=1"
        if prezeroed:
            extended += ",assume_storage_prezeroed=1"
        return ["mkfs.ext4", "-F", "-q", "-b", "4096", "-E", extended, path]
    if fs_type == "xfs":
        return ["mkfs.xfs", "-f", "-q", "-K", "-s", "size=4096", path]
    if fs_type == "btrfs":
        return ["mkfs.btrfs", "-f", "-q", "-K", path]
    raise InvalidArgument(f"fs type {fs_type!r} is not supported")


def build_image(path: str, size: int, thin: bool, source: str | None, what: str) -> None:
    """Create ``path`` of ``size`` bytes, empty or with the data of ``source``."""
    try:
        if source is not None:
            if not filesystems.reflink_copy(source, path):
                filesystems.sparse_copy(source, path)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if os.fstat(fd).st_size < size:
                _fill(fd, size, thin, what)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def _partial_snapshot(snap: SnapshotRecord) -> str:
    """Where a snapshot image is built before it is renamed to ``snap.backing``."""
    return os.path.join(os.path.dirname(snap.backing), f".{snap.id}.img.partial")


def copy_image_snapshot(
    source: str, snap: SnapshotRecord, quiesce: AbstractContextManager[None]
) -> None:
    """Copy ``source`` (an image or a disk) to ``snap.backing`` through a partial file:
    a reflink where the pool filesystem shares extents, a sparse copy otherwise."""
    partial = _partial_snapshot(snap)
    for leftover in (snap.backing, partial):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    with quiesce:
        build_image(partial, 0, True, source, f"snapshot {snap.id}")
    os.rename(partial, snap.backing)
    fsync_dir(os.path.dirname(snap.backing))


def remove_image_snapshot(snap: SnapshotRecord) -> None:
    """Remove a snapshot image and any partial copy; absent is fine."""
    if snap.backing:
        for path in (snap.backing, _partial_snapshot(snap)):
            remove_durably(path)
