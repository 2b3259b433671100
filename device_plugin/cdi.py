"""Container Device Interface spec files, one per resource.

With CDI on, every physical unit of a resource becomes a CDI device named by
its base ID, in ``<dir>/<vendor>-<class>.json`` with kind ``<vendor>/<class>``
(the class is the resource name's part after ``/``).  Each device's
``containerEdits`` carry its ``deviceNodes`` (path in the container, hostPath,
permissions), and the resource's mounts.  Request-dependent environment
variables (``{ids}``, ``{count}``...) cannot live in a static spec: they stay
in the Allocate answer.

Files are replaced atomically (temporary file in the same directory, fsync,
rename, fsync of the directory), rewritten only when their content changes, and
removed when the resource is removed or the plugin shuts down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from device_plugin.allocation import device_grants, mount_grants
from device_plugin.config import ResourceConfig
from device_plugin.units import Unit

log = logging.getLogger(__name__)

CDI_VERSION = "0.6.0"


def spec_path(directory: str, vendor: str, config: ResourceConfig) -> str:
    return os.path.join(directory, f"{vendor}-{config.short_name}.json")


def build_spec(vendor: str, config: ResourceConfig, units: Iterable[Unit]) -> dict[str, Any]:
    mounts = [
        {
            "hostPath": m.host_path,
            "containerPath": m.container_path,
            "options": ["rbind", "ro" if m.read_only else "rw"],
        }
        for m in mount_grants(config)
    ]
    devices = []
    for unit in units:
        edits: dict[str, Any] = {
            "deviceNodes": [
                {"path": g.container_path, "hostPath": g.host_path, "permissions": g.permissions}
                for g in device_grants(config, unit)
            ]
        }
        if mounts:
            edits["mounts"] = mounts
        devices.append({"name": unit.id, "containerEdits": edits})
    return {
        "cdiVersion": CDI_VERSION,
        "kind": f"{vendor}/{config.short_name}",
        "devices": devices,
    }


def write_atomically(path: str, data: bytes) -> bool:
    """Replace ``path`` with ``data`` unless it already holds exactly that; True if written."""
    try:
        with open(path, "rb") as current:
            if current.read() == data:
                return False
    except OSError:
        pass
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


class CdiWriter:
    """Writes and removes the spec files of one CDI directory."""

    def __init__(self, directory: str, vendor: str) -> None:
        self.directory = directory
        self.vendor = vendor

    def write(self, config: ResourceConfig, units: Iterable[Unit]) -> str:
        path = spec_path(self.directory, self.vendor, config)
        spec = build_spec(self.vendor, config, units)
        data = (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()
        if write_atomically(path, data):
            log.info("wrote CDI spec %s (%d devices)", path, len(spec["devices"]))
        return path

    def remove(self, config: ResourceConfig) -> None:
        path = spec_path(self.directory, self.vendor, config)
        try:
            os.unlink(path)
            log.info("removed CDI spec %s", path)
        except FileNotFoundError:
            pass
