"""Durable metadata: one JSON record per volume and per snapshot.

The host is the source of truth (image files, loop devices, mountinfo); the
store keeps only what cannot be rediscovered: the CreateVolume name (for
idempotency), requested size, pool, fs type, and the node-side state the
kubelet expects us to remember (staging path, publications).

Records live in ``<state-dir>/volumes/<id>.json`` and
``<state-dir>/snapshots/<id>.json``.  Every write goes to a temp file in the
same directory, is fsynced, renamed over the record and the directory is
fsynced, so a crash at any instant leaves either the old or the new record,
never a torn one.  Temp files (``.<id>.json.tmp-*``) left by a crash are ignored
and removed at load; an unreadable record is logged and skipped (never deleted).

IDs are validated before they touch a path (``validate_id``): no separators,
no dot-dot, bounded length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from plugin_runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^(vol|snap)-[0-9a-f]{32}$")
MAX_NAME_BYTES = 128

CREATING = "creating"
READY = "ready"
DELETING = "deleting"


def node_tag(node_id: str) -> str:
    """Eight hex digits naming a node inside the volume IDs it creates."""
    return hashlib.sha256(node_id.encode()).hexdigest()[:8]


def new_volume_id(node_id: str = "") -> str:
    """``vol-`` + the creating node's tag + 96 random bits (32 hex digits in all).

    The tag lets any node tell a volume that lives on another node from one that
    does not exist: the cluster-wide resizer sends ControllerExpandVolume to the
    driver next to its leader, which may not be the volume's node.
    """
    return f"vol-{node_tag(node_id)}{uuid.uuid4().hex[:24]}"


def home_tag(volume_id: str) -> str:
    """The node tag inside a volume ID (valid IDs only)."""
    return volume_id[4:12]


def new_snapshot_id() -> str:
    return f"snap-{uuid.uuid4().hex}"


def is_valid_id(value: str, kind: str) -> bool:
    match = ID_RE.match(value)
    return bool(match) and match.group(1) == kind  # type: ignore[union-attr]


def validate_name(name: str, what: str = "name") -> str:
    """A CO-chosen name: non-empty, at most 128 bytes, printable, no NUL."""
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    if not name.isprintable():
        raise InvalidArgument(f"{what} contains non-printable characters")
    return name


@dataclass
class Staging:
    """Where and how a volume is staged on this node."""

    path: str
    block: bool
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    mount_group: str = ""
    access_mode: str = ""
    device: str = ""

    @property
    def read_only(self) -> bool:
        """Staged for SINGLE_NODE_READER_ONLY: the stage is mounted read-only."""
        return self.access_mode == "SINGLE_NODE_READER_ONLY"


@dataclass
class Publication:
    target: str
    block: bool
    readonly: bool
    mount_flags: list[str] = field(default_factory=list)
    mount_group: str = ""
    access_mode: str = ""


@dataclass
class VolumeRecord:
    id: str
    name: str
    pool: str
    capacity_bytes: int
    block: bool
    fs_type: str
    thin: bool
    state: str = CREATING
    backing: str = ""  # image path, or the disk's stable id for disk-volume pools
    parameters: dict[str, str] = field(default_factory=dict)
    source_snapshot: str = ""
    source_volume: str = ""
    nouuid: bool = False  # an xfs copy of another filesystem: mount with nouuid
    fs_grow_pending: bool = False  # image grown while unstaged: grow the fs at next stage
    formatted: bool = False
    created_at: float = 0.0
    staging: Staging | None = None
    publications: dict[str, Publication] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        data = dict(data)
        staging = data.pop("staging", None)
        pubs = data.pop("publications", {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in known})
        rec.staging = Staging(**staging) if staging else None
        rec.publications = {k: Publication(**v) for k, v in pubs.items()}
        return rec


@dataclass
class SnapshotRecord:
    id: str
    name: str
    source_volume: str
    pool: str
    size_bytes: int
    fs_type: str
    block: bool
    state: str = CREATING
    backing: str = ""
    created_at: float = 0.0
    parameters: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_atomically(path: str, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` so that a crash leaves the old or the new file."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    from csi_driver.faults import crash_point

    crash_point("store.before_rename")
    os.replace(tmp, path)
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_durably(path: str) -> None:
    """Unlink ``path`` (absent is fine) and fsync its directory."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))


class Store:
    """In-memory view of the records, written through to disk.

    Methods are thread-safe; callers serialize per volume with ``locks``.
    Records handed out are copies' owners: mutate, then ``put_*`` to persist.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.volume_dir = os.path.join(state_dir, "volumes")
        self.snapshot_dir = os.path.join(state_dir, "snapshots")
        for d in (self.volume_dir, self.snapshot_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._volumes: dict[str, VolumeRecord] = {}
        self._snapshots: dict[str, SnapshotRecord] = {}
        self._volume_names: dict[str, str] = {}
        self._snapshot_names: dict[str, str] = {}
        self.unreadable: list[str] = []
        self.load()

    def _load_dir(self, directory: str, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if entry.startswith(".") and ".tmp-" in entry:
                log.warning("removing temp file %s left by an interrupted write", path)
                os.unlink(path)
                continue
            if not entry.endswith(".json") or not is_valid_id(entry[:-5], kind):
                log.warning("ignoring unexpected file %s in the state dir", path)
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if not isinstance(data, dict) or data.get("id") != entry[:-5]:
                    raise ValueError("id does not match the file name")
            except (OSError, ValueError) as exc:
                self._unreadable(path, exc)
                continue
            yield path, data

    def _unreadable(self, path: str, exc: Exception) -> None:
        log.error("cannot read record %s (left in place): %s", path, exc)
        self.unreadable.append(path)

    def load(self) -> None:
        with self._lock:
            self._volumes.clear()
            self._snapshots.clear()
            self.unreadable = []
            # JSON with the right id can still lack fields or hold wrong types (a
            # damaged disk, a hand edit): that record is unreadable too, not fatal.
            for path, data in self._load_dir(self.volume_dir, "vol"):
                try:
                    rec = VolumeRecord.from_json(data)
                except (TypeError, ValueError, AttributeError) as exc:
                    self._unreadable(path, exc)
                    continue
                self._volumes[rec.id] = rec
            for path, data in self._load_dir(self.snapshot_dir, "snap"):
                try:
                    snap = SnapshotRecord.from_json(data)
                except (TypeError, ValueError, AttributeError) as exc:
                    self._unreadable(path, exc)
                    continue
                self._snapshots[snap.id] = snap
            self._volume_names = {v.name: v.id for v in self._volumes.values()}
            self._snapshot_names = {s.name: s.id for s in self._snapshots.values()}

    # volumes
    def volume(self, volume_id: str) -> VolumeRecord | None:
        with self._lock:
            rec = self._volumes.get(volume_id)
            return VolumeRecord.from_json(rec.to_json()) if rec else None

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        with self._lock:
            vid = self._volume_names.get(name)
        return self.volume(vid) if vid else None

    def volumes(self) -> list[VolumeRecord]:
        with self._lock:
            recs = sorted(self._volumes.values(), key=lambda r: (r.created_at, r.id))
            return [VolumeRecord.from_json(r.to_json()) for r in recs]

    def put_volume(self, rec: VolumeRecord) -> None:
        payload = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode()
        write_atomically(os.path.join(self.volume_dir, f"{rec.id}.json"), payload)
        with self._lock:
            self._volumes[rec.id] = VolumeRecord.from_json(rec.to_json())
            self._volume_names[rec.name] = rec.id

    def remove_volume(self, volume_id: str) -> None:
        remove_durably(os.path.join(self.volume_dir, f"{volume_id}.json"))
        with self._lock:
            rec = self._volumes.pop(volume_id, None)
            if rec and self._volume_names.get(rec.name) == volume_id:
                del self._volume_names[rec.name]

    # snapshots
    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        with self._lock:
            rec = self._snapshots.get(snapshot_id)
            return SnapshotRecord.from_json(rec.to_json()) if rec else None

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        with self._lock:
            sid = self._snapshot_names.get(name)
        return self.snapshot(sid) if sid else None

    def snapshots(self) -> list[SnapshotRecord]:
        with self._lock:
            recs = sorted(self._snapshots.values(), key=lambda r: (r.created_at, r.id))
            return [SnapshotRecord.from_json(r.to_json()) for r in recs]

    def put_snapshot(self, rec: SnapshotRecord) -> None:
        payload = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode()
        write_atomically(os.path.join(self.snapshot_dir, f"{rec.id}.json"), payload)
        with self._lock:
            self._snapshots[rec.id] = SnapshotRecord.from_json(rec.to_json())
            self._snapshot_names[rec.name] = rec.id

    def remove_snapshot(self, snapshot_id: str) -> None:
        remove_durably(os.path.join(self.snapshot_dir, f"{snapshot_id}.json"))
        with self._lock:
            rec = self._snapshots.pop(snapshot_id, None)
            if rec and self._snapshot_names.get(rec.name) == snapshot_id:
                del self._snapshot_names[rec.name]
