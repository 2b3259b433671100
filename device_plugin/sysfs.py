"""Reading sysfs attribute files without trusting their contents.

sysfs attributes are whatever a driver prints: possibly not UTF-8, possibly
huge (binary blobs such as ``descriptors``), possibly unreadable (EACCES, EIO,
or gone because the device vanished a moment ago).  Discovery and health
probes read them through ``read_attribute``, which never raises for those
cases: it returns None, or text capped at ``MAX_ATTRIBUTE_BYTES`` and decoded
with replacement characters, trailing whitespace stripped as udev does.
"""

from __future__ import annotations

import os
import stat

MAX_ATTRIBUTE_BYTES = 4096


def decode_capped(raw: bytes, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    return raw[:limit].decode("utf-8", "replace").rstrip()


def attribute_name_problem(name: str) -> str | None:
    """Why ``name`` is not a relative attribute path (``ro``, ``loop/backing_file``)."""
    if not name:
        return "must not be empty"
    if name.startswith("/"):
        return "must be relative to the device's sysfs directory"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "must not contain empty, '.' or '..' components"
    return None


def read_attribute(sys_path: str, name: str) -> str | None:
    """The value of attribute ``name`` of the device at ``sys_path``, or None."""
    if attribute_name_problem(name):
        return None
    try:
        fd = os.open(os.path.join(sys_path, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, MAX_ATTRIBUTE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return decode_capped(raw)


def numa_node(sys_paths: list[str]) -> int | None:
    """The first non-negative ``numa_node`` among ``sys_paths`` (device, then ancestors)."""
    for path in sys_paths:
        value = read_attribute(path, "numa_node")
        if value is None:
            continue
        try:
            node = int(value)
        except ValueError:
            continue
        if node >= 0:
            return node
    return None
