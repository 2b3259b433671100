"""Mount table reading and mount(2)/umount2(2) for the CSI driver.

This module owns every mount the driver makes and every question it asks about
mounts.  It reads ``/proc/self/mountinfo`` (not ``/proc/mounts`` or psutil):
only mountinfo has the mount's root inside its filesystem and the device's
major:minor, without which a bind mount of a subdirectory cannot be told from a
mount of the whole filesystem.  Mounts are made through libc ``mount(2)`` via
ctypes rather than by spawning mount(8): staging and publishing are hot paths
and a process spawn costs more than the mount itself.  Unmounts are never lazy
(no ``MNT_DETACH``): a busy target is reported, not hidden.

Mount options from users go through ``validate_mount_options`` (an allow list);
``mount`` itself only refuses options that would change the meaning of the
comma-joined data string.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from plugin_runtime.errors import FailedPrecondition, Internal, InvalidArgument, NotFound

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2 flags
UMOUNT_NOFOLLOW = 8

# statvfs f_flag bits (<sys/statvfs.h>) and the MS_* flag each one stands for.
_ST_TO_MS = {
    1: MS_RDONLY,  # ST_RDONLY
    2: MS_NOSUID,  # ST_NOSUID
    4: MS_NODEV,  # ST_NODEV
    8: MS_NOEXEC,  # ST_NOEXEC
    16: MS_SYNCHRONOUS,  # ST_SYNCHRONOUS
    1024: MS_NOATIME,  # ST_NOATIME
    2048: MS_NODIRATIME,  # ST_NODIRATIME
    4096: MS_RELATIME,  # ST_RELATIME
    8192: MS_NOSYMFOLLOW,  # ST_NOSYMFOLLOW
}

# Flag options: name -> (flags to set, flags to clear).
_ATIME_MASK = MS_NOATIME | MS_RELATIME | MS_STRICTATIME
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "nodev": (MS_NODEV, 0),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, _ATIME_MASK & ~MS_NOATIME),
    "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0),
    "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, _ATIME_MASK & ~MS_RELATIME),
    "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, _ATIME_MASK & ~MS_STRICTATIME),
    "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "silent": (MS_SILENT, 0),
    "loud": (0, MS_SILENT),
}

# Filesystem data options that take no value and are safe for a volume's owner
# to choose (ext4, xfs, btrfs).  Not here on purpose: suid/dev (device nodes and
# setuid binaries on a user volume), loop/offset/sizelimit (mount(8) helpers that
# would attach arbitrary files), errors=panic (takes the node down), norecovery,
# subvol/subvolid (reach outside the volume), user/users/owner (mount(8) policy).
_BARE_DATA_OPTIONS = frozenset(
    {
        "discard",
        "nodiscard",
        "nouuid",
        "noquota",
        "quota",
        "usrquota",
        "grpquota",
        "prjquota",
        "uquota",
        "gquota",
        "pquota",
        "uqnoenforce",
        "gqnoenforce",
        "pqnoenforce",
        "barrier",
        "nobarrier",
        "inode64",
        "inode32",
        "largeio",
        "nolargeio",
        "swalloc",
        "wsync",
        "ssd",
        "nossd",
        "ssd_spread",
        "nossd_spread",
        "autodefrag",
        "noautodefrag",
        "compress",
        "compress-force",
        "space_cache",
        "nospace_cache",
        "datacow",
        "nodatacow",
        "datasum",
        "nodatasum",
        "flushoncommit",
        "noflushoncommit",
        "user_xattr",
        "nouser_xattr",
        "acl",
        "noacl",
        "delalloc",
        "nodelalloc",
        "dioread_nolock",
        "dioread_lock",
        "auto_da_alloc",
        "noauto_da_alloc",
        "journal_checksum",
        "nojournal_checksum",
        "journal_async_commit",
        "block_validity",
        "noblock_validity",
        "nogrpid",
        "grpid",
        "bsdgroups",
        "sysvgroups",
    }
)

_NUMBER = r"[0-9]{1,10}"
_SIZE = r"[0-9]{1,10}[kKmMgG]?"
_SELINUX_LABEL = r'(?:"[A-Za-z0-9_.:,\-]{1,240}"|[A-Za-z0-9_.:\-]{1,240})'
_COMPRESSION = r"(?:zlib|lzo|zstd|no)(?::[0-9]{1,2})?"

# Data options of the form key=value: key -> full-match pattern of the value.
_VALUE_DATA_OPTIONS: dict[str, re.Pattern[str]] = {
    key: re.compile(pattern)
    for key, pattern in {
        "data": r"ordered|writeback|journal",
        "commit": _NUMBER,
        "stripe": _NUMBER,
        "inode_readahead_blks": _NUMBER,
        "max_batch_time": _NUMBER,
        "min_batch_time": _NUMBER,
        "journal_ioprio": r"[0-7]",
        "errors": r"remount-ro|continue",
        "context": _SELINUX_LABEL,
        "fscontext": _SELINUX_LABEL,
        "defcontext": _SELINUX_LABEL,
        "rootcontext": _SELINUX_LABEL,
        "compress": _COMPRESSION,
        "compress-force": _COMPRESSION,
        "space_cache": r"v1|v2",
        "discard": r"sync|async",
        "logbsize": _SIZE,
        "logbufs": _NUMBER,
        "allocsize": _SIZE,
        "sunit": _NUMBER,
        "swidth": _NUMBER,
        "thread_pool": _NUMBER,
        "max_inline": _SIZE,
        "metadata_ratio": _NUMBER,
    }.items()
}

ALLOWED_MOUNT_OPTIONS: frozenset[str] = frozenset(
    set(FLAG_OPTIONS) - {"silent", "loud"}
    | _BARE_DATA_OPTIONS
    | {f"{key}=" for key in _VALUE_DATA_OPTIONS}
)
"""Option names users may pass: flag options, bare data options, and ``key=``
for data options that take a value (the value is checked per key)."""

MAX_OPTION_LENGTH = 256


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    optional_fields: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012``, ``\\134``)."""
    if "\\" not in field:
        return field
    # The kernel escapes only ASCII bytes (space, tab, newline, backslash, '#').
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse_line(line: str) -> MountEntry:
    fields = line.split(" ")
    try:
        separator = fields.index("-", 6)
    except ValueError:
        raise ValueError(f"mountinfo line without the '-' separator: {line!r}") from None
    if separator + 3 > len(fields):
        raise ValueError(f"mountinfo line too short after the separator: {line!r}")
    major_text, _, minor_text = fields[2].partition(":")
    super_options = fields[separator + 3] if separator + 3 < len(fields) else ""
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major_text),
        minor=int(minor_text),
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        optional_fields=tuple(fields[6:separator]),
        fs_type=_unescape(fields[separator + 1]),
        source=_unescape(fields[separator + 2]),
        super_options=tuple(super_options.split(",")) if super_options else (),
    )


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of /proc/<pid>/mountinfo; a malformed line raises ValueError."""
    # Only "\n" ends a line: the kernel escapes it in paths, but not "\r", "\x1e" and
    # the other characters str.splitlines() would also split on.
    return [_parse_line(line) for line in text.split("\n") if line]


def read_mounts(containing: str = "") -> list[MountEntry]:
    """The mount table of this process's mount namespace.

    With ``containing``, only the lines holding that text are parsed (a node
    with many pods has hundreds of mounts, and the node RPCs look for one): the
    caller still checks the fields, the text only skips lines that cannot match.
    """
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as handle:
        text = handle.read()
    if not containing:
        return parse_mountinfo(text)
    return [_parse_line(line) for line in text.split("\n") if containing in line]


def escape(path: str) -> str:
    """``path`` as mountinfo writes it (space, tab, newline and backslash in octal)."""
    if not any(c in path for c in " \t\n\\"):
        return path
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _canonical(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _topmost(entries: Iterable[MountEntry], mount_point: str) -> MountEntry | None:
    candidates = [e for e in entries if e.mount_point == mount_point]
    if not candidates:
        return None
    covered = {e.parent_id for e in candidates}
    # The top of a stack is the one no other mount at the same place sits on.
    on_top = [e for e in candidates if e.mount_id not in covered]
    return (on_top or candidates)[-1]


def find_mount(path: str, entries: Sequence[MountEntry] | None = None) -> MountEntry | None:
    """The top-most mount whose mount point is exactly ``path`` (after resolving it)."""
    point = _canonical(path)
    if entries is None:
        entries = read_mounts(f" {escape(point)} ")
    return _topmost(entries, point)


def is_mountpoint(path: str) -> bool:
    """True when something is mounted exactly at ``path``."""
    return find_mount(path) is not None


def mounts_of_device(
    major: int, minor: int, entries: Sequence[MountEntry] | None = None
) -> list[MountEntry]:
    """Every mount (including bind mounts) of the block device ``major:minor``."""
    table = read_mounts() if entries is None else entries
    return [e for e in table if e.major == major and e.minor == minor]


# --- mount(2) ----------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


class MountError(Internal):
    """mount(2) or umount2(2) failed; ``errno`` is the kernel's answer."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


def _check_option_syntax(option: str) -> None:
    if not option:
        raise InvalidArgument("empty mount option")
    if len(option) > MAX_OPTION_LENGTH:
        raise InvalidArgument(f"mount option {option[:40]!r}... is longer than {MAX_OPTION_LENGTH}")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in option):
        raise InvalidArgument(f"mount option {option!r} contains whitespace or control characters")
    # A comma outside double quotes would smuggle a second option into the data string.
    if "," in re.sub(r'"[^"]*"', "", option) or option.count('"') % 2:
        raise InvalidArgument(f"mount option {option!r} contains a comma or unbalanced quotes")


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """Translate flag options to MS_* flags; return (flags, comma-joined data string)."""
    flags = 0
    data: list[str] = []
    for option in options:
        _check_option_syntax(option)
        if option in FLAG_OPTIONS:
            set_bits, clear_bits = FLAG_OPTIONS[option]
            flags = (flags & ~clear_bits) | set_bits
        else:
            data.append(option)
    return flags, ",".join(data)


def _encode(text: str) -> bytes:
    return os.fsencode(text)


def _mount_syscall(
    source: str, target: str, fs_type: str | None, flags: int, data: str | None
) -> int:
    result = _libc.mount(
        _encode(source),
        _encode(target),
        _encode(fs_type) if fs_type else None,
        flags,
        _encode(data) if data else None,
    )
    return 0 if result == 0 else ctypes.get_errno()


def _raise_mount_error(what: str, err: int) -> NoReturn:
    message = f"{what} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
    if err == errno.ENOENT:
        raise NotFound(message)
    if err == errno.EBUSY:
        raise FailedPrecondition(message)
    raise MountError(message, err)


def mount(
    source: str,
    target: str,
    fs_type: str,
    options: Sequence[str] = (),
    *,
    read_only: bool = False,
) -> None:
    """Mount ``source`` (a block device) on ``target`` with mount(2).

    Flag options (ro, nosuid, noatime, ...) become MS_* flags; the rest are
    passed to the filesystem as its data string.  ENOENT raises NotFound, EBUSY
    FailedPrecondition, anything else ``MountError`` (Internal) with the errno.
    """
    flags, data = split_options(options)
    if read_only:
        flags |= MS_RDONLY
    if not fs_type:
        raise InvalidArgument(f"mount of {source} on {target}: no filesystem type given")
    err = _mount_syscall(source, target, fs_type, flags, data)
    if err:
        shown = ",".join(options) or "defaults"
        _raise_mount_error(
            f"mount -t {fs_type} -o {shown}{',ro' if read_only else ''} {source} {target}", err
        )
    log.debug("mounted %s on %s (%s, flags=%#x, data=%r)", source, target, fs_type, flags, data)


def _current_flags(target: str) -> int:
    st_flags = os.statvfs(target).f_flag
    flags = 0
    for st_bit, ms_bit in _ST_TO_MS.items():
        if st_flags & st_bit:
            flags |= ms_bit
    return flags


def bind_mount(
    source: str, target: str, *, read_only: bool = False, options: Sequence[str] = ()
) -> None:
    """Bind ``source`` (a directory, or a device node/file onto a file) on ``target``.

    Read-only and flag ``options`` (nosuid, nodev, noexec, ...) need a second
    remount of the bind; the per-mount flags the kernel already set (and may
    have locked) are kept.  If the remount fails the bind is undone, so no
    half-made mount is left behind.
    """
    extra_flags, data = split_options(options)
    if data:
        raise InvalidArgument(
            f"bind mount of {source} on {target}: only flag options apply to a bind mount, "
            f"not {data!r}"
        )
    err = _mount_syscall(source, target, None, MS_BIND, None)
    if err:
        _raise_mount_error(f"bind mount of {source} on {target}", err)
    if not read_only and not extra_flags:
        return
    try:
        flags = _current_flags(target) | extra_flags | MS_REMOUNT | MS_BIND
        if read_only:
            flags |= MS_RDONLY
        err = _mount_syscall("none", target, None, flags, None)
        if err:
            _raise_mount_error(f"read-only/flags remount of the bind mount at {target}", err)
    except BaseException:
        undo = _libc.umount2(_encode(target), UMOUNT_NOFOLLOW)
        if undo != 0:
            log.error(
                "could not undo bind mount at %s: %s", target, os.strerror(ctypes.get_errno())
            )
        raise


def unmount(target: str) -> None:
    """Unmount the top-most mount at ``target`` (never lazily).

    Not mounted (EINVAL) or missing (ENOENT) is a no-op; a busy mount raises
    FailedPrecondition naming the target.  A symlink as the last component is
    not followed.
    """
    if _libc.umount2(_encode(target), UMOUNT_NOFOLLOW) == 0:
        log.debug("unmounted %s", target)
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err == errno.EBUSY:
        raise FailedPrecondition(
            f"{target} is busy (open files or a mount below it); not unmounting lazily"
        )
    raise MountError(f"umount of {target} failed: {os.strerror(err)}", err)


def validate_mount_options(options: Iterable[str]) -> list[str]:
    """Check user mount options against the allow list; return them without duplicates.

    Raises InvalidArgument naming the first refused option.
    """
    accepted: list[str] = []
    for option in options:
        if not isinstance(option, str):
            raise InvalidArgument(f"mount option {option!r} is not a string")
        _check_option_syntax(option)
        if ".." in option or "/" in option:
            raise InvalidArgument(f"mount option {option!r} refers to a path; not allowed")
        key, has_value, value = option.partition("=")
        if not has_value:
            if key not in ALLOWED_MOUNT_OPTIONS:
                raise InvalidArgument(f"mount option {option!r} is not allowed")
        else:
            pattern = _VALUE_DATA_OPTIONS.get(key)
            if pattern is None:
                raise InvalidArgument(f"mount option {key!r} is not allowed")
            if not pattern.fullmatch(value):
                raise InvalidArgument(f"mount option {option!r} has a value that is not allowed")
        if option not in accepted:
            accepted.append(option)
    return accepted


def present(path: str) -> bool:
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


def unmount_matching(path: str, matches: Callable[[MountEntry], bool]) -> None:
    """Unmount ``path`` while the top-most mount there satisfies ``matches``.

    A crashed retry may have stacked the same mount twice, so this repeats
    (bounded); a mount that is not ``matches``'s is left alone.
    """
    for _ in range(16):
        current = find_mount(path) if present(path) else None
        if current is None or not matches(current):
            return
        unmount(path)
    raise FailedPrecondition(f"{path} stays mounted after repeated unmounts")
