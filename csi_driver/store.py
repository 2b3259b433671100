"""Durable metadata: one JSON record per volume and per snapshot, plus node state.

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
One exception to the fsyncs: a new volume whose backing carries its record,
committed with the backing (``Pool.carries_record``: subvolumes), is held in
memory while "creating" (``hold_volume``) and written "ready" without fsync;
start-up reconcile writes it again from the backing if a power loss took it
(or left it empty, the only unreadable record it may replace).

Node state (a volume's staging and publications) lives apart, in
``<state-dir>/node/<id>.json``, written by rename but not fsynced: it describes
mounts, and mounts do not outlive the kernel.  A killed driver finds the old or
the new file (a rename is atomic for every process); only a power loss or a
kernel crash can lose the last change or leave the file empty, and then every
mount it described is gone too, which is what an absent file says.  A damaged
node file is therefore read as "not staged, not published" with a warning, never
as a lost volume.  This halves what NodeStage and NodePublish cost (two fsyncs
and a directory fsync each were most of their time) without weakening anything
that must survive a power loss: the controller fields (name, size, pool, state,
backing) stay in the fsynced record.  Records written before this split carry
their node state inline; it is read from there until the next write moves it.

IDs are validated before they touch a path (``validate_id``): no separators,
no dot-dot, bounded length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

from csi_driver.faults import crash_point
from plugin_runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

T = TypeVar("T")

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
        """The durable part: every field but the node state."""
        return _flat_json(self, skip=_NODE_FIELDS)

    def node_json(self) -> dict[str, Any] | None:
        """The node state, or None when the volume is neither staged nor published."""
        if self.staging is None and not self.publications:
            return None
        return {
            "id": self.id,
            "staging": _flat_json(self.staging) if self.staging is not None else None,
            "publications": {t: _flat_json(p) for t, p in self.publications.items()},
        }

    def set_node_state(self, data: dict[str, Any]) -> None:
        """Take staging and publications from ``node_json``'s shape (TypeError if wrong)."""
        staging = data.get("staging")
        pubs = data.get("publications") or {}
        if staging is not None and not isinstance(staging, dict):
            raise TypeError("staging is not an object")
        if not isinstance(pubs, dict):
            raise TypeError("publications is not a map")
        self.staging = Staging(**staging) if staging else None
        self.publications = {k: Publication(**v) for k, v in pubs.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        rec = cls(**{k: v for k, v in data.items() if k in _CONTROLLER_FIELDS})
        rec.set_node_state(data)  # records written before the split hold it inline
        return rec

    def copy(self) -> VolumeRecord:
        """A deep copy (the store hands out copies; ``dataclasses.replace`` per level
        is a tenth of ``asdict`` + rebuild, and this runs on every RPC)."""
        return dataclasses.replace(
            self,
            parameters=dict(self.parameters),
            staging=_copy_staging(self.staging),
            publications=_copy_publications(self.publications),
        )

    def copy_node_state(self, other: VolumeRecord) -> None:
        """Take ``other``'s staging and publications (copies)."""
        self.staging = _copy_staging(other.staging)
        self.publications = _copy_publications(other.publications)


_NODE_FIELDS = frozenset({"staging", "publications"})
_CONTROLLER_FIELDS = frozenset(f.name for f in dataclasses.fields(VolumeRecord)) - _NODE_FIELDS


def _flat_json(record: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The fields of a record dataclass with plain values, lists and maps copied (not
    ``asdict``, which deep-copies through ``copy.deepcopy``: ten times slower)."""
    data = {}
    for f in dataclasses.fields(record):
        if f.name not in skip:
            value = getattr(record, f.name)
            data[f.name] = value.copy() if isinstance(value, (list, dict)) else value
    return data


def _copy_staging(staging: Staging | None) -> Staging | None:
    if staging is None:
        return None
    return dataclasses.replace(staging, mount_flags=list(staging.mount_flags))


def _copy_publications(publications: dict[str, Publication]) -> dict[str, Publication]:
    return {t: dataclasses.replace(p, mount_flags=list(p.mount_flags))
            for t, p in publications.items()}


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
        return _flat_json(self)

    def copy(self) -> SnapshotRecord:
        return dataclasses.replace(self, parameters=dict(self.parameters))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_atomically(path: str, payload: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``payload`` so that a crash leaves the old or the new file.

    ``durable=False`` skips the fsyncs: a killed process still finds the old or the
    new file, but a power loss may lose the change or leave the file empty.
    """
    _rename_into_place(_write_temp(path, payload, durable), path, durable)


def _write_temp(path: str, payload: bytes, durable: bool) -> str:
    """A temp file beside ``path`` holding ``payload`` (fsynced when ``durable``)."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _rename_into_place(tmp: str, path: str, durable: bool) -> None:
    crash_point("store.before_rename")
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path))


_writer: futures.ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()


def _background_writer() -> futures.ThreadPoolExecutor:
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = futures.ThreadPoolExecutor(max_workers=4,
                                                 thread_name_prefix="store-write")
        return _writer


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


def _encode(data: dict[str, Any]) -> bytes:
    # One line: with ``indent`` the json module falls back to its pure-Python encoder,
    # five times slower, on every NodeStage/NodePublish.  ``jq`` formats it for a reader.
    return json.dumps(data, sort_keys=True, separators=(", ", ": ")).encode()


def encode_volume(rec: VolumeRecord) -> bytes:
    """The durable part of ``rec`` as the record file holds it (for a pool that keeps a
    copy in the backing it makes: ``Pool.carries_record``)."""
    return _encode(rec.to_json())


def decode_volume(payload: bytes) -> VolumeRecord:
    """``encode_volume``'s inverse; ValueError for anything that is not such a record."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or not is_valid_id(str(data.get("id", "")), "vol"):
            raise ValueError("not a volume record")
        return VolumeRecord.from_json(data)
    except (TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a volume record: {exc}") from exc


class Store:
    """In-memory view of the records, written through to disk.

    Methods are thread-safe; callers serialize per volume with ``locks``.
    Records handed out are copies: mutate, then ``put_*`` to persist.
    ``put_volume`` persists everything (the record durably, the node state as
    node state is); ``put_node`` only the staging and publications.

    ``read_only``: for a look at a running driver's state (``csi-driver pools``):
    nothing is created, tidied or moved, and every ``put_*``/``remove_*`` raises.
    """

    def __init__(self, state_dir: str, *, read_only: bool = False) -> None:
        self.state_dir = state_dir
        self.read_only = read_only
        self.volume_dir = os.path.join(state_dir, "volumes")
        self.snapshot_dir = os.path.join(state_dir, "snapshots")
        self.node_dir = os.path.join(state_dir, "node")
        if not read_only:
            for d in (self.volume_dir, self.snapshot_dir, self.node_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._volumes: dict[str, VolumeRecord] = {}
        self._snapshots: dict[str, SnapshotRecord] = {}
        self._volume_names: dict[str, str] = {}
        self._snapshot_names: dict[str, str] = {}
        self.unreadable: list[str] = []
        self.load()

    def _entries(self, directory: str, kind: str) -> Iterator[tuple[str, str]]:
        """(path, id) of the record files of ``directory``; crash leftovers removed."""
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            if not self.read_only:
                raise
            return
        for entry in entries:
            path = os.path.join(directory, entry)
            if entry.startswith(".") and ".tmp-" in entry:
                self._tidy(path, "a temp file left by an interrupted write")
                continue
            if not entry.endswith(".json") or not is_valid_id(entry[:-5], kind):
                log.warning("ignoring unexpected file %s in the state dir", path)
                continue
            yield path, entry[:-5]

    @staticmethod
    def _read(path: str, record_id: str) -> dict[str, Any]:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("id") != record_id:
            raise ValueError("id does not match the file name")
        return data

    def _load_dir(self, directory: str, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for path, record_id in self._entries(directory, kind):
            try:
                data = self._read(path, record_id)
            except (OSError, ValueError) as exc:
                self._unreadable(path, exc)
                continue
            yield path, data

    def _unreadable(self, path: str, exc: Exception) -> None:
        log.error("cannot read record %s (left in place): %s", path, exc)
        self.unreadable.append(path)

    def _load_node_state(self) -> None:
        """Lay the node files over the records (caller holds the lock)."""
        found: set[str] = set()
        for path, volume_id in self._entries(self.node_dir, "vol"):
            rec = self._volumes.get(volume_id)
            if rec is None:
                if not os.path.exists(os.path.join(self.volume_dir, f"{volume_id}.json")):
                    self._tidy(path, f"node state of volume {volume_id}, which is not recorded")
                continue  # an unreadable record's: left for the operator with the record
            found.add(volume_id)
            try:
                rec.set_node_state(self._read(path, volume_id))
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                # Only a power loss mid-write leaves this (see the module docstring), and
                # then nothing it described is mounted any more.
                log.warning("node state %s is damaged (%s); volume %s counts as neither "
                            "staged nor published", path, exc, volume_id,
                            extra={"volume_id": volume_id})
                rec.staging, rec.publications = None, {}
                self._tidy(path, "damaged node state")
        if self.read_only:
            return
        for rec in self._volumes.values():
            if rec.id not in found and rec.node_json() is not None:
                self._write_node_state(rec)  # a record from before the split: move it out

    def _tidy(self, path: str, what: str) -> None:
        """Remove ``path`` (``what`` it is), unless this store only looks."""
        if self.read_only:
            log.info("leaving %s in place: %s (a read-only look)", path, what)
            return
        log.warning("removing %s: %s", path, what)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"the store of {self.state_dir} was opened read-only")

    def _write(self, directory: str, record_id: str, payload: bytes, durable: bool) -> None:
        self._writable()
        write_atomically(os.path.join(directory, f"{record_id}.json"), payload,
                         durable=durable)

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
            self._load_node_state()
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
            return rec.copy() if rec else None

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        with self._lock:
            vid = self._volume_names.get(name)
        return self.volume(vid) if vid else None

    def volumes(self) -> list[VolumeRecord]:
        with self._lock:
            recs = sorted(self._volumes.values(), key=lambda r: (r.created_at, r.id))
            return [r.copy() for r in recs]

    def volumes_in(self, pool: str) -> list[VolumeRecord]:
        """The records of ``pool`` as stored, not copied: READ ONLY (capacity sums them on
        every CreateVolume and GetCapacity; copying every record there grew with the
        number of volumes)."""
        with self._lock:
            return [r for r in self._volumes.values() if r.pool == pool]

    def put_volume(self, rec: VolumeRecord) -> None:
        """Persist all of ``rec``: the record durably, then its node state if it changed."""
        path = os.path.join(self.volume_dir, f"{rec.id}.json")
        self._writable()
        write_atomically(path, encode_volume(rec), durable=True)
        with self._lock:
            if path in self.unreadable:  # replaced by a good record
                self.unreadable.remove(path)
        self._remember(rec)

    def hold_volume(self, rec: VolumeRecord) -> None:
        """Keep ``rec`` in memory only, with no file: for the "creating" record of a volume
        whose pool writes the record into the backing it makes, committed with it
        (``Pool.carries_record``).  A crash then leaves either nothing or a backing that
        says what it is, which the driver records again at start; ``put_volume`` or
        ``remove_volume`` ends the hold."""
        self._writable()
        self._remember(rec)

    def put_volume_after(self, rec: VolumeRecord, step: Callable[[], T], *,
                         durable: bool = True) -> T:
        """``step()``, then ``put_volume(rec)``, but with the record's new file written and
        fsynced while ``step`` runs; it replaces the record only once ``step`` returned.

        For a CreateVolume whose record content is known before its backing is made:
        the durable write (a file, data and an fsync: ~0.5 ms) overlaps the backing's
        own durability wait (a btrfs commit: ~1 ms) instead of following it.  When
        ``step`` raises, the record stays as it was and the new file is removed.
        A crash at any point leaves the old record or the new one, as ``put_volume``.

        ``durable=False`` (a volume whose backing carries its record, committed by
        ``step``): no fsync at all; a power loss may then lose the file or leave it
        empty, and the driver writes it again from the backing at start.
        """
        self._writable()
        path = os.path.join(self.volume_dir, f"{rec.id}.json")
        written = _background_writer().submit(_write_temp, path, encode_volume(rec), durable)
        try:
            result = step()
        except BaseException:
            with contextlib.suppress(Exception):
                os.unlink(written.result())
            raise
        _rename_into_place(written.result(), path, durable)
        self._remember(rec)
        return result

    def _remember(self, rec: VolumeRecord) -> None:
        """After the record of ``rec`` was written: its node state, and the memory."""
        with self._lock:
            old = self._volumes.get(rec.id)
        if old is None or (old.staging, old.publications) != (rec.staging, rec.publications):
            self._write_node_state(rec)
        with self._lock:
            self._volumes[rec.id] = rec.copy()
            self._volume_names[rec.name] = rec.id

    def put_node(self, rec: VolumeRecord) -> None:
        """Persist ``rec``'s staging and publications only (not fsynced: see the module
        docstring); its other fields must be as stored."""
        self._write_node_state(rec)
        with self._lock:
            stored = self._volumes.get(rec.id)
            if stored is None:
                raise KeyError(f"volume {rec.id} is not recorded")
            stored.copy_node_state(rec)

    def _write_node_state(self, rec: VolumeRecord) -> None:
        self._writable()
        data = rec.node_json()
        if data is not None:
            self._write(self.node_dir, rec.id, _encode(data), durable=False)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.node_dir, f"{rec.id}.json"))

    def remove_volume(self, volume_id: str) -> None:
        self._writable()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.node_dir, f"{volume_id}.json"))
        remove_durably(os.path.join(self.volume_dir, f"{volume_id}.json"))
        with self._lock:
            rec = self._volumes.pop(volume_id, None)
            if rec and self._volume_names.get(rec.name) == volume_id:
                del self._volume_names[rec.name]

    # snapshots
    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        with self._lock:
            rec = self._snapshots.get(snapshot_id)
            return rec.copy() if rec else None

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        with self._lock:
            sid = self._snapshot_names.get(name)
        return self.snapshot(sid) if sid else None

    def snapshots(self) -> list[SnapshotRecord]:
        with self._lock:
            recs = sorted(self._snapshots.values(), key=lambda r: (r.created_at, r.id))
            return [r.copy() for r in recs]

    def put_snapshot(self, rec: SnapshotRecord) -> None:
        self._write(self.snapshot_dir, rec.id, _encode(rec.to_json()), durable=True)
        with self._lock:
            self._snapshots[rec.id] = rec.copy()
            self._snapshot_names[rec.name] = rec.id

    def remove_snapshot(self, snapshot_id: str) -> None:
        self._writable()
        remove_durably(os.path.join(self.snapshot_dir, f"{snapshot_id}.json"))
        with self._lock:
            rec = self._snapshots.pop(snapshot_id, None)
            if rec and self._snapshot_names.get(rec.name) == snapshot_id:
                del self._snapshot_names[rec.name]
