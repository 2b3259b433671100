"""Filesystems on volume devices: probe, make, grow, freeze, copy, health, usage.

This module owns what the driver does to a filesystem as opposed to a mount or
a loop device.  Tools (blkid, mkfs.*, resize2fs, xfs_growfs, btrfs) run through
``plugin_runtime.commands.run``; everything the kernel offers directly is done
by ioctl or syscall: FIFREEZE/FITHAW for consistent snapshots, FICLONE for
reflink copies, SEEK_DATA/SEEK_HOLE plus copy_file_range for sparse copies,
statvfs for usage.

mkfs options were chosen by measurement on a 1 GiB sparse image on a loop
device with direct I/O (benchmarks/csi_primitives.py prints the figures):
discard is always off (on a loop device it punches holes in the image, which
would undo a thick pool's preallocation and gains nothing on a fresh sparse
file), the ext4 journal is kept, and ext4's inode tables are initialised lazily
by the kernel.  The ext4 journal is zeroed at mkfs time except on loop devices:
their images are always fresh sparse files that read as zeros, whereas a
reused disk could hold a stale journal that a crash would replay.

Measured here (p50 of 10, 1 GiB sparse image, mkfs alone; the machine is
shared, so only differences of several ms mean anything):
- ext4 defaults 5.9 ms, 32.6 MiB of the image allocated (zeroed journal);
  ours (nodiscard, lazy itable, lazy journal on loop) 4.5 ms, 0.6 MiB;
  lazy_journal_init=0 3.9 ms, 32.6 MiB; -T largefile no faster.
- xfs defaults 23 ms, with -K (no discard) 8.7 ms; 64 MiB allocated either
  way (the log, zeroed by write-zeroes; xfsprogs 6.1 has a 64 MiB minimum log).
- btrfs 14-22 ms with or without -K (noise dominates), 4.6 MiB allocated;
  -m single gains nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from csi_driver import loop
from csi_driver.config import FS_TYPES
from plugin_runtime import commands
from plugin_runtime.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
)

log = logging.getLogger(__name__)

SUPPORTED_FILESYSTEMS = FS_TYPES  # the configuration's vocabulary, declared once

# Smallest device each mkfs accepts (measured: xfsprogs 6.1 refuses < 300 MiB,
# btrfs-progs 6.2 < 114294784 bytes; ext4 works far below what a volume needs).
MIN_FILESYSTEM_SIZE = {"ext4": 1 << 20, "xfs": 300 << 20, "btrfs": 114294784}
LABEL_LIMITS = {"ext4": 16, "xfs": 12, "btrfs": 255}

MKFS_TIMEOUT = 120.0
PROBE_TIMEOUT = 15.0
GROW_TIMEOUT = 300.0

# <linux/fs.h>
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FICLONE = 0x40049409

SEEK_DATA = 3
SEEK_HOLE = 4
COPY_CHUNK = 1 << 30


class FsUsage(NamedTuple):
    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_free: int


def _check_fs_type(fs_type: str) -> None:
    if fs_type not in SUPPORTED_FILESYSTEMS:
        raise InvalidArgument(
            f"filesystem type {fs_type!r} is not supported "
            f"(one of {', '.join(SUPPORTED_FILESYSTEMS)})"
        )


def _check_block_device(device: str) -> None:
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError:
        raise NotFound(f"device {device} does not exist") from None
    if not stat.S_ISBLK(mode):
        raise InvalidArgument(f"{device} is not a block device")


# --- probing -----------------------------------------------------------------


class AmbivalentSignatures(FailedPrecondition):
    """blkid found several conflicting signatures (exit status 8)."""


def _blkid(device: str, *extra: str) -> commands.CommandResult | None:
    """Run ``blkid -p`` (low-level probe, no cache); None when nothing was found."""
    _check_block_device(device)
    result = commands.run(["blkid", "-p", *extra, device], timeout=PROBE_TIMEOUT, check=False)
    if result.returncode == 2:
        return None  # no signature of any kind
    if result.returncode == 8:
        raise AmbivalentSignatures(
            f"{device} carries more than one filesystem signature (blkid: ambivalent result); "
            "refusing to guess which one is real"
        )
    if result.returncode != 0:
        raise commands.CommandError(result)
    return result


def probe_filesystem(device: str) -> str | None:
    """The filesystem type on ``device`` (e.g. "ext4"), or None when there is none.

    A partition table or another non-filesystem signature also gives None; use
    ``has_signature`` before writing to a device.  Several conflicting
    filesystem signatures raise ``AmbivalentSignatures`` (FailedPrecondition).
    """
    result = _blkid(device, "-o", "value", "-s", "TYPE")
    if result is None:
        return None
    return result.stdout.strip() or None


def has_signature(device: str) -> bool:
    """True when ``device`` carries any signature blkid knows (filesystem, RAID,
    LVM, swap, crypto, partition table)."""
    try:
        result = _blkid(device, "-o", "export")
    except AmbivalentSignatures:
        return True
    if result is None:
        return False
    keys = {line.partition("=")[0] for line in result.stdout.splitlines()}
    return bool(keys & {"TYPE", "PTTYPE", "PTUUID", "USAGE"})


_EXT_MAGIC = b"\x53\xef"
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_EXTENTS = 0x40
_BTRFS_MAGIC = b"_BHRfS_M"
_XFS_MAGIC = b"XFSB"


def identify_filesystem(device: str) -> str | None:
    """Recognise ext4, xfs or btrfs by their superblock magic, without a tool.

    Positive identification only, without spawning blkid (the driver itself does
    not call it: NodeStage of a volume it formatted skips probing altogether;
    benchmarks/csi_primitives.py compares it with blkid).  None means "not
    recognised here", never "empty"; decide whether a device may be formatted
    with ``has_signature``/``probe_filesystem``.
    Ambiguous devices (more than one magic) give None as well.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"device {device} does not exist") from None
    except OSError as exc:
        raise Internal(f"cannot open {device}: {exc}") from exc
    try:
        head = os.pread(fd, 2048, 0)
        btrfs = os.pread(fd, 8, 65536 + 64)
    finally:
        os.close(fd)
    found = []
    if head[:4] == _XFS_MAGIC:
        found.append("xfs")
    if len(head) >= 1024 + 100 and head[1024 + 56 : 1024 + 58] == _EXT_MAGIC:
        compat = int.from_bytes(head[1024 + 92 : 1024 + 96], "little")
        incompat = int.from_bytes(head[1024 + 96 : 1024 + 100], "little")
        if compat & _EXT_COMPAT_HAS_JOURNAL and incompat & _EXT_INCOMPAT_EXTENTS:
            found.append("ext4")
        else:
            return None  # ext2/ext3 or unusual: let blkid name it
    if btrfs == _BTRFS_MAGIC:
        found.append("btrfs")
    return found[0] if len(found) == 1 else None


# --- mkfs ----------------------------------------------------------------------


def mkfs_argv(device: str, fs_type: str, *, label: str | None = None) -> list[str]:
    """The mkfs command line used for ``fs_type`` (exported for the benchmark)."""
    if fs_type == "ext4":
        lazy_journal = "1" if os.path.basename(device).startswith("loop") else "0"
        argv = [
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            f"nodiscard,lazy_itable_init=1,lazy_journal_init={lazy_journal}",
        ]
    elif fs_type == "xfs":
        argv = ["mkfs.xfs", "-f", "-q", "-K"]
    else:
        argv = ["mkfs.btrfs", "-f", "-q", "-K"]
    if label:
        argv += ["-L", label]
    return [*argv, device]


def make_filesystem(
    device: str, fs_type: str, *, label: str | None = None, check_empty: bool = True
) -> None:
    """Make an ``fs_type`` filesystem on ``device``.

    With ``check_empty`` (the default) a device that carries any signature is
    refused with FailedPrecondition: mkfs never overwrites data.  Callers that
    probed the device themselves just before may pass False to save the blkid
    run.  Raises InvalidArgument for an unsupported type or label, OutOfRange
    when the device is below the filesystem's minimum size, Internal when mkfs
    fails.
    """
    _check_fs_type(fs_type)
    _check_block_device(device)
    if label is not None:
        limit = LABEL_LIMITS[fs_type]
        if not label or len(label.encode()) > limit or not label.isprintable() or label[0] == "-":
            raise InvalidArgument(
                f"filesystem label {label!r} is not valid for {fs_type} (1-{limit} printable bytes)"
            )
    size = loop.device_size(device)
    minimum = MIN_FILESYSTEM_SIZE[fs_type]
    if size < minimum:
        raise OutOfRange(f"{device} has {size} bytes; {fs_type} needs at least {minimum} bytes")
    if check_empty and has_signature(device):
        try:
            found = probe_filesystem(device) or "a partition table or other signature"
        except AmbivalentSignatures:
            found = "several conflicting signatures"
        raise FailedPrecondition(f"{device} is not empty (it has {found}); not formatting it")
    result = commands.run(mkfs_argv(device, fs_type, label=label), timeout=MKFS_TIMEOUT)
    log.debug("made %s on %s in %.3fs", fs_type, device, result.seconds)


# --- growing -----------------------------------------------------------------


CAP_SYS_RESOURCE = 24


def has_capability(bit: int) -> bool:
    """True when this process has capability ``bit`` in its effective set."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def can_grow_online(fs_type: str) -> bool:
    """Whether ``grow_filesystem`` can grow a mounted ``fs_type`` here.

    ext4's online resize ioctl needs CAP_SYS_RESOURCE, which some container
    runtimes drop even for privileged root (these development machines do);
    xfs and btrfs need only CAP_SYS_ADMIN.
    """
    _check_fs_type(fs_type)
    return fs_type != "ext4" or has_capability(CAP_SYS_RESOURCE)


def grow_filesystem(fs_type: str, device: str, mount_point: str | None) -> None:
    """Grow the filesystem on ``device`` to the size of the device.

    Online (``mount_point`` given) for every type.  With ``mount_point`` None,
    only ext4 can grow (offline: e2fsck -f -p, then resize2fs); xfs and btrfs
    grow only while mounted.  An ext4 that cannot grow online because the
    process lacks CAP_SYS_RESOURCE raises FailedPrecondition saying so.
    """
    _check_fs_type(fs_type)
    if mount_point is None:
        if fs_type != "ext4":
            raise InvalidArgument(f"{fs_type} grows only while mounted; no mount point given")
        _check_block_device(device)
        # resize2fs refuses an unmounted filesystem that was not checked since its
        # last mount; -p repairs only what is safe and exits 1 when it fixed something.
        check = commands.run(["e2fsck", "-f", "-p", device], timeout=GROW_TIMEOUT, check=False)
        if check.returncode not in (0, 1):
            raise FailedPrecondition(
                f"e2fsck of {device} before growing found problems it could not fix "
                f"(status {check.returncode}): {(check.stdout + check.stderr).strip()[-500:]}"
            )
        argv = ["resize2fs", device]
    elif fs_type == "ext4":
        argv = ["resize2fs", device]
    elif fs_type == "xfs":
        argv = ["xfs_growfs", mount_point]
    else:
        argv = ["btrfs", "filesystem", "resize", "max", mount_point]
    try:
        result = commands.run(argv, timeout=GROW_TIMEOUT)
    except commands.CommandError as exc:
        if fs_type == "ext4" and mount_point and "Permission denied" in exc.stderr:
            raise FailedPrecondition(
                f"cannot grow the mounted ext4 on {device}: online ext4 resize needs "
                "CAP_SYS_RESOURCE, which this process lacks"
                + ("" if has_capability(CAP_SYS_RESOURCE) else " (CapEff has no bit 24)")
            ) from exc
        raise
    log.info("grew %s on %s (%s) in %.3fs", fs_type, device, mount_point, result.seconds)


# --- freeze ------------------------------------------------------------------


def _ioctl_on_directory(mount_point: str, request: int) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze(mount_point: str) -> None:
    """Freeze the filesystem mounted at ``mount_point`` (FIFREEZE): writes block
    and the on-disk image is consistent until ``thaw``."""
    try:
        _ioctl_on_directory(mount_point, FIFREEZE)
    except FileNotFoundError:
        raise NotFound(f"mount point {mount_point} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"{mount_point} is already frozen") from exc
        if exc.errno == errno.EOPNOTSUPP:
            raise FailedPrecondition(f"the filesystem at {mount_point} cannot be frozen") from exc
        raise Internal(f"FIFREEZE on {mount_point} failed: {exc}") from exc


def thaw(mount_point: str) -> None:
    """Thaw a frozen filesystem; thawing one that is not frozen is a no-op."""
    try:
        _ioctl_on_directory(mount_point, FITHAW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return  # not frozen
        raise Internal(f"FITHAW on {mount_point} failed: {exc}") from exc


@contextlib.contextmanager
def frozen(mount_point: str) -> Iterator[None]:
    """Keep ``mount_point`` frozen for the body of the ``with``; always thaws."""
    freeze(mount_point)
    try:
        yield
    finally:
        thaw(mount_point)


# --- copies ------------------------------------------------------------------

_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS)


def _create_exclusive(dst: str, mode: int) -> int:
    try:
        return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o777)
    except FileExistsError:
        raise FailedPrecondition(f"copy destination {dst} already exists") from None
    except FileNotFoundError:
        raise NotFound(f"directory of copy destination {dst} does not exist") from None


def _open_source(src: str) -> int:
    try:
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"copy source {src} does not exist") from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def reflink_copy(src: str, dst: str) -> bool:
    """Clone ``src`` into a new file ``dst`` sharing its extents (FICLONE).

    Returns False, leaving no ``dst`` behind, when the filesystem cannot
    reflink (ext4) or the files are on different filesystems.
    """
    src_fd = _open_source(src)
    try:
        dst_fd = _create_exclusive(dst, os.fstat(src_fd).st_mode)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            os.fsync(dst_fd)
        except OSError as exc:
            os.close(dst_fd)
            _remove_quietly(dst)
            if exc.errno in _NO_REFLINK:
                return False
            raise Internal(f"reflink copy of {src} to {dst} failed: {exc}") from exc
        except BaseException:
            os.close(dst_fd)
            _remove_quietly(dst)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    return True


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    offset = start
    use_copy_file_range = True
    while offset < end:
        count = min(COPY_CHUNK, end - offset)
        if use_copy_file_range:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_copy_file_range = False
                continue
        else:
            os.lseek(dst_fd, offset, os.SEEK_SET)
            copied = os.sendfile(dst_fd, src_fd, offset, count)
        if copied == 0:
            break  # the source shrank under us; the final ftruncate keeps the size
        offset += copied


def sparse_copy(src: str, dst: str) -> None:
    """Copy ``src`` to a new file ``dst``, keeping holes as holes.

    Only the data extents (SEEK_DATA/SEEK_HOLE) are copied, with
    copy_file_range (in-kernel, and shared extents where the filesystem can);
    ``dst`` is fsynced, and removed again if anything fails.
    """
    src_fd = _open_source(src)
    try:
        st = os.fstat(src_fd)
        dst_fd = _create_exclusive(dst, st.st_mode)
        try:
            size = st.st_size
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(src_fd, offset, SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole remains
                    raise
                hole = os.lseek(src_fd, data, SEEK_HOLE)
                _copy_range(src_fd, dst_fd, data, min(hole, size))
                offset = hole
            os.ftruncate(dst_fd, size)
            os.fsync(dst_fd)
        except BaseException as exc:
            os.close(dst_fd)
            _remove_quietly(dst)
            if isinstance(exc, OSError):
                raise Internal(f"sparse copy of {src} to {dst} failed: {exc}") from exc
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)


# --- health and usage --------------------------------------------------------


def _device_name(device: str) -> str:
    return os.path.basename(os.path.realpath(device))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        return None


def _ext4_error(device: str) -> str | None:
    base = Path("/sys/fs/ext4") / _device_name(device)
    count = _read_int(base / "errors_count")
    if not count:
        return None
    where = ""
    with contextlib.suppress(OSError):
        func = (base / "first_error_func").read_text().strip()
        line = (base / "first_error_line").read_text().strip()
        where = f" (first in {func}:{line})" if func else ""
    return f"ext4 on {device} has recorded {count} error(s){where}"


def _btrfs_error(device: str) -> str | None:
    name = _device_name(device)
    root = Path("/sys/fs/btrfs")
    try:
        filesystems = list(root.iterdir())
    except OSError:
        return None
    for fs_dir in filesystems:
        if not (fs_dir / "devices" / name).exists():
            continue
        problems = []
        with contextlib.suppress(OSError):
            for devinfo in (fs_dir / "devinfo").iterdir():
                if _read_int(devinfo / "missing"):
                    problems.append(f"device {devinfo.name} missing")
                with contextlib.suppress(OSError):
                    for line in (devinfo / "error_stats").read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if value.strip().isdigit() and int(value) > 0:
                            problems.append(f"{key}={int(value)}")
        if problems:
            return f"btrfs on {device} reports device errors: {', '.join(problems)}"
    return None


def filesystem_error(device: str, fs_type: str, mount_point: str | None) -> str | None:
    """A message when the kernel reports the filesystem damaged, else None.

    Best effort, from what the kernel exposes without tools:
    - ext4: ``/sys/fs/ext4/<dev>/errors_count`` (errors recorded in the superblock;
      the kernel copies a new error there from a work item, so it shows within
      milliseconds, not at the instant of the error);
    - btrfs: ``/sys/fs/btrfs/<fsid>/devinfo/*/error_stats`` counters;
    - any type, when mounted: the mount point cannot be stat'ed or listed
      (EIO, as on an xfs that shut itself down after a metadata error).
    """
    if fs_type == "ext4":
        message = _ext4_error(device)
        if message:
            return message
    elif fs_type == "btrfs":
        message = _btrfs_error(device)
        if message:
            return message
    if mount_point is not None:
        try:
            os.statvfs(mount_point)
            with os.scandir(mount_point) as entries:
                next(entries, None)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EUCLEAN):
                return f"{fs_type} at {mount_point} fails with {os.strerror(exc.errno)}"
            if exc.errno in (errno.ENOENT, errno.ENOTCONN, errno.ESTALE):
                return f"mount point {mount_point} is gone ({os.strerror(exc.errno)})"
    return None


def fs_usage(mount_point: str) -> FsUsage:
    """Bytes and inodes of the filesystem mounted at ``mount_point`` (statvfs)."""
    try:
        st = os.statvfs(mount_point)
    except FileNotFoundError:
        raise NotFound(f"{mount_point} does not exist") from None
    except OSError as exc:
        raise Internal(f"statvfs of {mount_point} failed: {exc}") from exc
    total = st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return FsUsage(
        bytes_total=total,
        bytes_used=used,
        bytes_available=st.f_bavail * st.f_frsize,
        inodes_total=st.f_files,
        inodes_used=max(st.f_files - st.f_ffree, 0),
        inodes_free=st.f_ffree,
    )
