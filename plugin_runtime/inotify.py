"""Directory watches through Linux inotify (ctypes, no extra dependency).

Used where the daemons must react to files appearing or disappearing without
polling: the kubelet re-creating ``kubelet.sock`` after a restart, a plugin's
own socket being deleted by the kubelet's directory wipe, and a ConfigMap update
swapping the ``..data`` symlink of a mounted config directory.

``DirectoryWatch`` is a file descriptor: wait on it with ``select``/``poll`` (its
``fileno()``) or call ``read(timeout)``, which returns the decoded events.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from dataclasses import dataclass

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_EVENT_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclass(frozen=True)
class Event:
    mask: int
    name: str

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


class DirectoryWatch:
    """An inotify instance watching one directory for ``mask`` events."""

    DEFAULT_MASK = (
        IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_CLOSE_WRITE | IN_ATTRIB
        | IN_DELETE_SELF | IN_MOVE_SELF
    )

    def __init__(self, directory: str, mask: int = DEFAULT_MASK) -> None:
        self.directory = directory
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int = int(fd)
        wd = _libc.inotify_add_watch(fd, os.fsencode(directory), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    def fileno(self) -> int:
        return self._fd

    def read(self, timeout: float | None) -> list[Event]:
        """Events that arrived, waiting up to ``timeout`` seconds (None: forever)."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return []
            raise
        events: list[Event] = []
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            raw = data[offset : offset + length].split(b"\0", 1)[0]
            offset += length
            events.append(Event(mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
