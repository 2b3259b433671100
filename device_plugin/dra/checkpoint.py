"""Prepared claims on disk, so that a restarted driver can still unprepare them.

One JSON file per claim, ``<dir>/<claim uid>.json``, written atomically (temp
file, fsync, rename, fsync of the directory: ``cdi.write_atomically``) after the
claim's CDI spec is in place and removed after the spec is gone.  The kubelet
may call NodeUnprepareResources after the claim was deleted from the API
server, and after a driver restart, so everything unprepare needs is here: the
devices handed out and the CDI spec that carries them.  The record also makes a
repeated NodePrepareResources answer exactly what the first one did (the
kubelet caches and appends what it gets; reference §2).

A record that does not parse is reported and skipped, never fatal: the claim is
then treated as not prepared (its spec file, named by UID, is still removed on
unprepare).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from device_plugin.cdi import write_atomically

log = logging.getLogger(__name__)

# Claim UIDs are UUIDs; anything else must not become a path.
_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")


def safe_uid(uid: str) -> bool:
    return _SAFE_UID.fullmatch(uid) is not None


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared claim, as NodePrepareResources returned it."""

    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]
    share_id: str | None = None
    admin_access: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "requestNames": list(self.request_names),
            "pool": self.pool,
            "device": self.device,
            "cdiDeviceIDs": list(self.cdi_device_ids),
            "shareID": self.share_id,
            "adminAccess": self.admin_access,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> PreparedDevice:
        def strings(key: str) -> tuple[str, ...]:
            value = raw.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key} must be a list of strings")
            return tuple(value)

        pool, device, share = raw.get("pool"), raw.get("device"), raw.get("shareID")
        if not isinstance(pool, str) or not isinstance(device, str):
            raise ValueError("pool and device must be strings")
        if share is not None and not isinstance(share, str):
            raise ValueError("shareID must be a string")
        return cls(strings("requestNames"), pool, device, strings("cdiDeviceIDs"), share,
                   bool(raw.get("adminAccess", False)))


@dataclass(frozen=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]
    cdi_spec: str

    def as_dict(self) -> dict[str, object]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "devices": [d.as_dict() for d in self.devices],
            "cdiSpec": self.cdi_spec,
        }

    @classmethod
    def from_dict(cls, raw: object) -> PreparedClaim:
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        fields = {k: raw.get(k) for k in ("uid", "namespace", "name", "cdiSpec")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be strings")
        devices = raw.get("devices")
        if not isinstance(devices, list):
            raise ValueError("devices must be a list")
        return cls(
            str(fields["uid"]), str(fields["namespace"]), str(fields["name"]),
            tuple(PreparedDevice.from_dict(d) for d in devices), str(fields["cdiSpec"]),
        )


class CheckpointStore:
    """The directory of prepared-claim records (created on first use)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, uid: str) -> str:
        if not safe_uid(uid):
            raise ValueError(f"claim UID {uid!r} is not a UID")
        return os.path.join(self.directory, f"{uid}.json")

    def get(self, uid: str) -> PreparedClaim | None:
        try:
            with open(self.path(uid), "rb") as handle:
                raw = json.loads(handle.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("checkpoint of claim %s is unreadable, treating it as not prepared: %s",
                      uid, exc)
            return None
        try:
            return PreparedClaim.from_dict(raw)
        except ValueError as exc:
            log.error("checkpoint of claim %s is malformed, treating it as not prepared: %s",
                      uid, exc)
            return None

    def put(self, claim: PreparedClaim) -> None:
        data = (json.dumps(claim.as_dict(), indent=2, sort_keys=True) + "\n").encode()
        write_atomically(self.path(claim.uid), data)

    def remove(self, uid: str) -> bool:
        """Remove the record; False when there was none."""
        try:
            os.unlink(self.path(uid))
        except FileNotFoundError:
            return False
        return True

    def all(self) -> Iterator[PreparedClaim]:
        """Every readable record (unreadable ones are logged and skipped)."""
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(self.directory)):
                if entry.endswith(".json") and not entry.startswith("."):
                    claim = self.get(entry[: -len(".json")]) if safe_uid(
                        entry[: -len(".json")]) else None
                    if claim is not None:
                        yield claim
