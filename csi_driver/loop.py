"""Loop devices through the kernel's ioctls, without losetup.

This module owns attaching image files to loop devices and detaching them.  It
talks to /dev/loop-control and /dev/loopN directly (``<linux/loop.h>``):
``LOOP_CTL_GET_FREE`` then one ``LOOP_CONFIGURE`` sets file, flags and direct
I/O atomically, which is both faster than spawning losetup on the staging hot
path and free of the window where a device is bound but not yet configured.

Rules it keeps:
- no autoclear: an attached device survives the driver's restart, and the
  image pool finds it again by its backing file's path from sysfs alone
  (``devices_backed_by``, which opens no device); ``find_by_backing_file``
  compares the backing file's device and inode instead, so a renamed file
  still matches;
- direct I/O is asked for and, when the backing filesystem refuses it, the
  device runs buffered and that is logged;
- a device attached for read-write use is writable: the kernel keeps a block
  device's read-only policy (BLKROSET, ``blockdev --setro``) across detach and
  LOOP_CONFIGURE does not reset it, so a device another program left read-only
  would make every later mount fail with EACCES.  ``attach`` clears the policy
  on the device it got, or unbinds it again and says which device is read-only;
- ``detach`` is never lazy: the kernel turns LOOP_CLR_FD on a device that is
  still open into "clear on last close", so a device that stays busy gets its
  autoclear flag taken back and the caller gets FailedPrecondition.  A device
  that another attach takes over right after our unbind counts as detached;
- ``attach(discard=False)`` turns discard off on the device (its queue's
  ``discard_max_bytes`` = 0): the loop driver turns every discard into a hole
  punched in the backing file, so a preallocated (thick) image would give its
  space back to whoever runs fstrim on the filesystem inside it, a host's weekly
  ``fstrim.timer`` included.  The kernel cannot turn discard on again on that
  device (it also zeroes the discard granularity, after which any non-zero
  ``discard_max_bytes`` is refused), and the setting outlives the unbind, so
  ``detach`` removes such a device (LOOP_CTL_REMOVE): the next LOOP_CTL_GET_FREE
  makes a fresh one.  Write-zeroes requests without "no unmap" still punch
  holes; no sysfs setting stops those.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from plugin_runtime.errors import (
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = Path("/sys/block")
LOOP_MAJOR = 7

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

# <linux/fs.h>
BLKGETSIZE64 = 0x80081272
BLKROSET = 0x125D
BLKROGET = 0x125E

LO_NAME_SIZE = 64
ATTACH_ATTEMPTS = 32
DETACH_WAIT_SECONDS = 2.0


class LoopInfo64(ctypes.Structure):
    """struct loop_info64."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    """struct loop_config."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


assert ctypes.sizeof(LoopInfo64) == 232
assert ctypes.sizeof(LoopConfig) == 304


@dataclass(frozen=True)
class LoopInfo:
    """An attached loop device as the kernel reports it."""

    device: str
    number: int
    backing_file: str | None
    """Path from sysfs; may end in " (deleted)" when the file was removed."""
    backing_dev: tuple[int, int]
    """(major, minor) of the filesystem holding the backing file."""
    backing_inode: int
    offset: int
    size_limit: int
    flags: int

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)


_DEVICE_RE = re.compile(r"/dev/loop([0-9]+)")


def _number(device: str) -> int:
    match = _DEVICE_RE.fullmatch(device)
    if match is None:
        raise InvalidArgument(f"{device!r} is not a loop device path (/dev/loopN)")
    return int(match.group(1))


def _decode_dev(encoded: int) -> tuple[int, int]:
    """Split a kernel ``huge_encode_dev`` value into (major, minor)."""
    major = (encoded & 0xFFF00) >> 8
    minor = (encoded & 0xFF) | ((encoded >> 12) & 0xFFF00)
    return major, minor


def _ensure_node(number: int, dev_dir: str = "/dev") -> str:
    """Return /dev/loopN, creating the node when devtmpfs has not (containers)."""
    device = f"{dev_dir}/loop{number}"
    try:
        st = os.stat(device)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISBLK(st.st_mode):
            raise Internal(f"{device} exists but is not a block device")
        return device
    try:
        dev_text = (SYS_BLOCK / f"loop{number}" / "dev").read_text().strip()
        major_text, _, minor_text = dev_text.partition(":")
        rdev = os.makedev(int(major_text), int(minor_text))
    except (OSError, ValueError):
        rdev = os.makedev(LOOP_MAJOR, number)
    try:
        os.mknod(device, 0o660 | stat.S_IFBLK, rdev)
        log.info("created missing device node %s", device)
    except FileExistsError:
        pass
    return device


def _open_control() -> int:
    try:
        return os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            os.mknod(LOOP_CONTROL, 0o660 | stat.S_IFCHR, os.makedev(10, 237))
        except FileExistsError:
            pass
        except OSError as exc:
            raise Internal(f"{LOOP_CONTROL} is missing and cannot be created: {exc}") from exc
        return os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)


def _get_status(fd: int) -> LoopInfo64 | None:
    """LOOP_GET_STATUS64 on an open device; None when nothing is bound."""
    info = LoopInfo64()
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    return info


LOOP_SET_BLOCK_SIZE = 0x4C09


def _kernel_has_loop_configure() -> bool:
    """LOOP_CONFIGURE exists since Linux 5.8; older kernels answer it with EINVAL."""
    try:
        major, minor = (int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    except ValueError:
        return True
    return (major, minor) >= (5, 8)


USE_LOOP_CONFIGURE = _kernel_has_loop_configure()


def _configure(loop_fd: int, file_fd: int, *, flags: int, block_size: int, name: bytes) -> None:
    if USE_LOOP_CONFIGURE:
        config = LoopConfig()
        config.fd = file_fd
        config.block_size = block_size
        config.info.lo_flags = flags
        ctypes.memmove(config.info.lo_file_name, name, min(len(name), LO_NAME_SIZE - 1))
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
        return
    # Pre-5.8 kernels: bind, then set status, block size and direct I/O one by one,
    # unbinding again if any step fails so that no half-configured device is left.
    fcntl.ioctl(loop_fd, LOOP_SET_FD, file_fd)
    try:
        info = LoopInfo64()
        info.lo_flags = flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)
        ctypes.memmove(info.lo_file_name, name, min(len(name), LO_NAME_SIZE - 1))
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
        if block_size:
            fcntl.ioctl(loop_fd, LOOP_SET_BLOCK_SIZE, block_size)
        if flags & LO_FLAGS_DIRECT_IO:
            try:
                fcntl.ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Left buffered; attach() notices the missing flag and logs it.
    except BaseException:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop_fd, LOOP_CLR_FD)
        raise


def attach(
    backing_file: str,
    *,
    direct_io: bool = True,
    read_only: bool = False,
    block_size: int = 0,
    partscan: bool = False,
    discard: bool = True,
) -> str:
    """Attach ``backing_file`` to a free loop device and return "/dev/loopN".

    ``block_size`` 0 lets the kernel choose the logical block size (keep it the
    same across attaches of one image: a filesystem made on 512-byte sectors
    must be re-attached the same way).  ``partscan`` makes the kernel read a
    partition table (tests use it).  ``discard=False``: the device refuses
    discards, so nothing run on it punches holes in the file (``keep_allocation``).
    Raises NotFound when the file is missing.
    """
    if block_size and (block_size & (block_size - 1) or not 512 <= block_size <= 4096):
        raise InvalidArgument(f"loop block size {block_size} is not 0 or a power of 2 in 512..4096")
    path = os.path.abspath(backing_file)
    try:
        file_fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"backing file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"backing file {path} is not a regular file") from None
    except OSError as exc:
        raise Internal(f"cannot open backing file {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            raise InvalidArgument(f"backing file {path} is not a regular file")
        flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_PARTSCAN if partscan else 0)
        if direct_io:
            flags |= LO_FLAGS_DIRECT_IO
        control_fd = _open_control()
        try:
            device = _attach_free(
                control_fd, file_fd, path, flags=flags, block_size=block_size, read_only=read_only
            )
        finally:
            os.close(control_fd)
    finally:
        os.close(file_fd)
    if not discard:
        keep_allocation(device)
    elif _discard_turned_off(device):
        log.warning("loop: %s came with discard turned off by an earlier user (the kernel "
                    "cannot turn it on again); %s will not give space back on fstrim",
                    device, path)
    return device


def _queue(device: str, name: str) -> Path:
    return SYS_BLOCK / os.path.basename(device) / "queue" / name


def _queue_value(device: str, name: str) -> int | None:
    try:
        return int(_queue(device, name).read_text())
    except (OSError, ValueError):
        return None


def discards(device: str) -> bool:
    """True when ``device`` accepts discards (which punch holes in its backing file)."""
    return bool(_queue_value(device, "discard_max_bytes"))


def _discard_turned_off(device: str) -> bool:
    """Discard turned off by a user on a device that could discard (``keep_allocation``)."""
    return _queue_value(device, "discard_max_bytes") == 0 \
        and bool(_queue_value(device, "discard_max_hw_bytes"))


def keep_allocation(device: str) -> None:
    """Turn discard off on ``device`` so that nothing punches holes in its backing file
    (idempotent; ``detach`` then removes the device, see the module docstring).  A
    kernel that refuses is logged: the device works, but fstrim inside it frees space."""
    if not discards(device):
        return
    try:
        _queue(device, "discard_max_bytes").write_text("0")
    except OSError as exc:
        log.warning("loop: cannot turn discard off on %s (%s): fstrim inside it will punch "
                    "holes in its backing file", device, exc)


def _remove(number: int) -> None:
    """LOOP_CTL_REMOVE of an unbound device; one another attach took meanwhile is left."""
    try:
        control_fd = _open_control()
    except (OSError, DomainError) as exc:
        log.warning("loop: cannot remove loop%d: %s", number, exc)
        return
    try:
        fcntl.ioctl(control_fd, LOOP_CTL_REMOVE, number)
        log.debug("removed loop%d (discard was off)", number)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENODEV, errno.ENXIO):
            log.warning("loop: cannot remove loop%d: %s", number, exc)
    finally:
        os.close(control_fd)


def _free_number(control_fd: int) -> int:
    """The number of a free loop device (LOOP_CTL_GET_FREE: the lowest unbound one)."""
    try:
        return int(fcntl.ioctl(control_fd, LOOP_CTL_GET_FREE))
    except OSError as exc:
        raise ResourceExhausted(f"no free loop device (LOOP_CTL_GET_FREE): {exc}") from exc


def read_only_policy(fd: int) -> bool:
    """BLKROGET on an open block device: True when the kernel refuses writes to it."""
    value = ctypes.c_int(0)
    fcntl.ioctl(fd, BLKROGET, value)
    return bool(value.value)


def set_read_only_policy(fd: int, read_only: bool) -> None:
    """BLKROSET on an open block device (needs CAP_SYS_ADMIN)."""
    fcntl.ioctl(fd, BLKROSET, ctypes.c_int(1 if read_only else 0))


def _make_writable(loop_fd: int, device: str, path: str) -> None:
    """Clear a read-only policy left on a just-attached device, or unbind it and refuse.

    Attached without LO_FLAGS_READ_ONLY, the disk itself is writable, so a device
    that still reports read-only carries a BLKROSET policy someone set before.
    """
    try:
        if not read_only_policy(loop_fd):
            return
        set_read_only_policy(loop_fd, False)
        if not read_only_policy(loop_fd):
            log.warning(
                "loop: %s was left read-only (BLKROSET) by an earlier user; cleared it to "
                "attach %s read-write", device, path,
            )
            return
        problem = "the policy stays set after BLKROSET 0"
    except OSError as exc:
        problem = f"clearing it failed: {exc}"
    with contextlib.suppress(OSError):
        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
    raise FailedPrecondition(
        f"loop device {device} is read-only (a BLKROSET policy left by an earlier user, as "
        f"'blockdev --setro' sets) and {problem}; not attaching {path} to it "
        f"(clear it with 'blockdev --setrw {device}')"
    )


def _attach_free(
    control_fd: int, file_fd: int, path: str, *, flags: int, block_size: int, read_only: bool
) -> str:
    last_error: OSError | None = None
    for _attempt in range(ATTACH_ATTEMPTS):
        number = _free_number(control_fd)
        try:
            device = _ensure_node(number)
            loop_fd = os.open(device, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENXIO):
                continue  # removed (LOOP_CTL_REMOVE) by someone between GET_FREE and open
            raise Internal(f"cannot open loop device {number} to attach {path}: {exc}") from exc
        try:
            try:
                _configure(
                    loop_fd, file_fd, flags=flags, block_size=block_size, name=os.fsencode(path)
                )
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    last_error = exc  # another attacher won the race for this device
                    continue
                if exc.errno == errno.EINVAL and flags & LO_FLAGS_DIRECT_IO:
                    log.warning(
                        "loop: direct I/O refused for %s (%s); attaching with buffered I/O",
                        path,
                        exc.strerror,
                    )
                    flags &= ~LO_FLAGS_DIRECT_IO
                    continue
                raise Internal(f"LOOP_CONFIGURE of {device} with {path} failed: {exc}") from exc
            if not read_only:
                _make_writable(loop_fd, device, path)
            try:
                info = _get_status(loop_fd)
            except OSError as exc:
                log.warning("attached %s to %s but cannot read its status: %s", path, device, exc)
                return device
            if info is None:
                continue  # detached by someone else already; try again
            if flags & LO_FLAGS_DIRECT_IO and not info.lo_flags & LO_FLAGS_DIRECT_IO:
                log.warning(
                    "loop: %s runs with buffered I/O, the kernel refused direct I/O for %s",
                    device,
                    path,
                )
            log.debug("attached %s to %s (flags=%#x)", path, device, info.lo_flags)
            return device
        finally:
            os.close(loop_fd)
    raise Internal(
        f"could not attach {path}: every free loop device was taken by another attacher "
        f"({ATTACH_ATTEMPTS} attempts; last error: {last_error})"
    )


def detach(device: str) -> None:
    """Detach ``device``; a device that is already free (or absent) is fine.

    Raises FailedPrecondition naming the device when it stays in use (mounted,
    held, or open by another process) for ``DETACH_WAIT_SECONDS``.
    """
    _number(device)
    deadline = time.monotonic() + DETACH_WAIT_SECONDS
    while True:
        try:
            # O_EXCL fails with EBUSY while a filesystem or a holder claims it.
            fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno != errno.EBUSY:
                raise Internal(f"cannot open {device} to detach it: {exc}") from exc
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    f"loop device {device} is in use (mounted or held); not detaching it"
                ) from None
            time.sleep(0.02)
            continue
        retire = _discard_turned_off(device)
        try:
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                if exc.errno != errno.EBUSY:
                    raise Internal(f"LOOP_CLR_FD on {device} failed: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise FailedPrecondition(
                        f"loop device {device} is busy; not detaching it"
                    ) from exc
                time.sleep(0.02)
                continue
        finally:
            os.close(fd)
        if _wait_cleared(device, deadline):
            log.debug("detached %s", device)
            if retire:
                _remove(_number(device))
            return
        raise FailedPrecondition(
            f"loop device {device} is held open by another process; not detaching it lazily"
        )


def _wait_cleared(device: str, deadline: float) -> bool:
    """After LOOP_CLR_FD: wait for the unbind; on timeout take autoclear back."""
    while True:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENXIO):
                return True
            raise Internal(f"cannot reopen {device} after detaching: {exc}") from exc
        try:
            info = _get_status(fd)
            if info is None:
                return True
            if not info.lo_flags & LO_FLAGS_AUTOCLEAR:
                # Our binding is gone and another attach already reused the free device
                # (concurrent volumes do): the detach succeeded; the new binding is not
                # ours to touch.
                log.debug("%s was detached and immediately reused", device)
                return True
            if time.monotonic() >= deadline:
                # Still open elsewhere: the kernel would clear it on last close, which is
                # a lazy detach.  Undo that and report the device busy.
                info.lo_flags &= ~LO_FLAGS_AUTOCLEAR
                try:
                    fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        return True
                    log.error("could not take back autoclear on %s: %s", device, exc)
                return False
        finally:
            os.close(fd)
        time.sleep(0.01)


def _sysfs_backing(name: str) -> str | None:
    """/sys/block/<name>/loop/backing_file, None when unbound (or being torn down)."""
    try:
        with open(f"{SYS_BLOCK}/{name}/loop/backing_file", encoding="utf-8",
                  errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None  # unbound (ENOENT), or being torn down right now (ENODEV)


def backing_file(device: str) -> str | None:
    """The backing file's path (sysfs; " (deleted)" suffix kept), None when free."""
    return _sysfs_backing(f"loop{_number(device)}")


def devices_backed_by(path: str, hint: str = "") -> list[str]:
    """Loop devices whose backing file is ``path``, read from sysfs alone.

    No device node is opened (unlike ``find_by_backing_file``, which opens every
    bound device for its status), so concurrent lookups never look like holders
    to a detach waiting for the last close.  The path string identifies the file:
    for callers that own their paths (the image pool).  A deleted backing file
    still matches.  ``hint`` (a device recorded earlier) is checked first, which
    spares a scan of every loop device on hot paths.
    """
    path = os.path.realpath(path)  # sysfs shows the resolved path

    def shows(name: str) -> bool:
        backing = _sysfs_backing(name)
        return backing is not None and backing.removesuffix(" (deleted)") == path

    if hint.startswith("/dev/loop") and shows(hint[5:]):
        return [hint]
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        return []
    found = [f"/dev/{n}" for n in names if n.startswith("loop") and n[4:].isdigit() and shows(n)]
    return sorted(found, key=lambda d: int(d[9:]))


def _status_of(device: str) -> LoopInfo64 | None:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return None
        raise Internal(f"cannot open {device}: {exc}") from exc
    try:
        return _get_status(fd)
    except OSError as exc:
        raise Internal(f"LOOP_GET_STATUS64 on {device} failed: {exc}") from exc
    finally:
        os.close(fd)


def _bound_numbers() -> list[int]:
    numbers = []
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        return []
    for name in names:
        # /sys/block/loopN/loop exists only while a file is bound.
        if name.startswith("loop") and name[4:].isdigit() and (SYS_BLOCK / name / "loop").is_dir():
            numbers.append(int(name[4:]))
    return sorted(numbers)


def list_attached() -> list[LoopInfo]:
    """Every loop device that has a backing file, in device-number order."""
    result = []
    for number in _bound_numbers():
        device = f"/dev/loop{number}"
        try:
            info = _status_of(_ensure_node(number))
        except (Internal, OSError):
            continue
        if info is None:
            continue
        result.append(
            LoopInfo(
                device=device,
                number=number,
                backing_file=backing_file(device),
                backing_dev=_decode_dev(info.lo_device),
                backing_inode=info.lo_inode,
                offset=info.lo_offset,
                size_limit=info.lo_sizelimit,
                flags=info.lo_flags,
            )
        )
    return result


def find_by_backing_file(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``, matched by device and inode.

    When ``path`` no longer exists, devices whose sysfs backing file reads
    "<path> (deleted)" are returned instead.
    """
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except FileNotFoundError:
        gone = f"{absolute} (deleted)"
        return [f"/dev/loop{n}" for n in _bound_numbers() if backing_file(f"/dev/loop{n}") == gone]
    wanted = (os.major(st.st_dev), os.minor(st.st_dev))
    return [
        info.device
        for info in list_attached()
        if info.backing_inode == st.st_ino and info.backing_dev == wanted
    ]


def refresh_capacity(device: str) -> None:
    """Make the kernel re-read the backing file's size (after growing it)."""
    _number(device)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"loop device {device} does not exist") from None
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise FailedPrecondition(f"loop device {device} has no backing file") from exc
        raise Internal(f"LOOP_SET_CAPACITY on {device} failed: {exc}") from exc
    finally:
        os.close(fd)


def device_size(device: str) -> int:
    """Size in bytes of a block device (BLKGETSIZE64)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"block device {device} does not exist") from None
    except OSError as exc:
        raise Internal(f"cannot open {device}: {exc}") from exc
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    except OSError as exc:
        raise Internal(f"BLKGETSIZE64 on {device} failed: {exc}") from exc
    finally:
        os.close(fd)
    return int(struct.unpack("=Q", buf)[0])
