"""Subvolume volumes through the real driver over gRPC, on a btrfs on a loop device (root).

Issue 9, section 4: a write past a volume's limit fails with EDQUOT while other
volumes of the pool keep writing, and ControllerExpandVolume lets the same
write through with no node step; NodeGetVolumeStats matches the qgroup
accounting; snapshots, restores and clones taken while the source is being
written hold a point-in-time state (checked with checksums), never a torn one;
a pool on a path that is not btrfs is refused with a message naming what to
do.  The driver runs once per quota mode (full qgroups, simple quotas), each
on its own btrfs, and everything is unmounted and detached after, even on
failure.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import btrfs
from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    Csi,
    DriverProcess,
    KubeletLayout,
    MiB,
    btrfs_mount,
    mount_cap,
    mounts_under,
    wait_until,
)

POOL = "subvol"
PARAMS = {"pool": POOL}
Code = grpc.StatusCode


@dataclass
class SubvolDriver:
    driver: DriverProcess
    fs: Path
    mode: str

    @property
    def pool_path(self) -> str:
        return str(self.fs / "pool")

    def csi(self) -> Csi:
        if not self.driver.alive():
            self.driver.start()
        return self.driver.csi()

    def volume_path(self, volume_id: str) -> str:
        return os.path.join(self.pool_path, "volumes", volume_id)

    def snapshot_path(self, snapshot_id: str) -> str:
        return os.path.join(self.pool_path, "snapshots", snapshot_id)

    def usage(self, volume_id: str) -> btrfs.QgroupUsage:
        subvol = btrfs.subvolume_id(self.volume_path(volume_id))
        return btrfs.qgroup_usage(self.pool_path, subvol)


@contextlib.contextmanager
def subvolume_driver(mode: str) -> Iterator[SubvolDriver]:
    base = Path(tempfile.mkdtemp(prefix="csisv", dir="/tmp"))
    try:
        with btrfs_mount(base, size=2 << 30) as fs:
            driver = DriverProcess(base=base, node_id="node-a", config={"pools": [
                {"name": POOL, "type": "subvolume", "path": str(fs / "pool"),
                 "quota_mode": mode},
            ]})
            try:
                driver.start()
                yield SubvolDriver(driver, fs, mode)
            finally:
                leftovers = driver.cleanup()
                if leftovers:
                    print(f"cleaned after the driver in {base}: {leftovers}")
    finally:
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["full", "simple"])
def sv(request: pytest.FixtureRequest) -> Iterator[SubvolDriver]:
    with subvolume_driver(request.param) as made:
        yield made


@dataclass
class Volume:
    sv: SubvolDriver
    id: str
    capacity: int
    staging: str = ""
    target: str = ""
    snapshots: list[str] = field(default_factory=list)

    def file(self, name: str) -> str:
        return os.path.join(self.target, name)


class Volumes:
    """Volumes made by one test; all unpublished, unstaged and deleted after it."""

    def __init__(self, sv: SubvolDriver) -> None:
        self.sv = sv
        self.csi = sv.csi()
        self.kubelet = KubeletLayout(sv.driver.kubelet_root)
        self.made: list[Volume] = []
        self.snapshots: list[str] = []

    def create(self, size: int, source: Any = None) -> Volume:
        made = self.csi.create(f"pvc-{uuid.uuid4()}", size=size, params=PARAMS, source=source)
        vol = Volume(self.sv, made.volume_id, made.capacity_bytes)
        self.made.append(vol)
        return vol

    def up(self, vol: Volume) -> Volume:
        cap = mount_cap()
        vol.staging = self.kubelet.staging_dir(vol.id)
        vol.target = self.kubelet.target_dir(str(uuid.uuid4()), f"pv-{vol.id[:20]}")
        self.csi.stage(vol.id, vol.staging, cap)
        self.csi.publish(vol.id, vol.staging, vol.target, cap)
        return vol

    def snapshot(self, vol: Volume) -> str:
        resp = self.csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=vol.id, name=f"snap-{uuid.uuid4()}"),
            timeout=120,
        )
        assert resp.snapshot.ready_to_use
        self.snapshots.append(resp.snapshot.snapshot_id)
        return str(resp.snapshot.snapshot_id)

    def close(self) -> None:
        problems = []
        for vol in reversed(self.made):
            try:
                if vol.target:
                    self.csi.unpublish(vol.id, vol.target)
                if vol.staging:
                    self.csi.unstage(vol.id, vol.staging)
                self.csi.delete(vol.id)
            except grpc.RpcError as err:
                problems.append(f"{vol.id}: {err.code().name} {err.details()}")
        for snapshot_id in self.snapshots:
            try:
                self.csi.controller.DeleteSnapshot(
                    csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=60)
            except grpc.RpcError as err:
                problems.append(f"{snapshot_id}: {err.code().name} {err.details()}")
        assert not problems, problems


@pytest.fixture
def vols(sv: SubvolDriver) -> Iterator[Volumes]:
    made = Volumes(sv)
    try:
        yield made
    finally:
        made.close()


def _stats(csi: Csi, vol: Volume) -> dict[int, Any]:
    resp = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=vol.target), timeout=30)
    assert not resp.volume_condition.abnormal, resp.volume_condition.message
    return {u.unit: u for u in resp.usage}


def _write_until_error(fd: int, limit: int) -> tuple[int, OSError | None]:
    written = 0
    while written < limit:
        try:
            written += os.write(fd, b"w" * MiB)
        except OSError as exc:
            return written, exc
    return written, None


class Writer(threading.Thread):
    """Keeps writing 1 MiB chunks with fsync into ``directory`` until stopped."""

    def __init__(self, directory: str, wrap: int) -> None:
        super().__init__(daemon=True)
        self.path = os.path.join(directory, "stream")
        self.wrap = wrap
        self.written = 0
        self.total = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while not self.stop_event.is_set():
                    if self.written >= self.wrap:  # stay inside its limit: start over
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        self.written = 0
                        # Freed extents leave the qgroup only at a commit.
                        btrfs.commit(os.path.dirname(self.path))
                    done = os.write(fd, b"n" * MiB)
                    os.fsync(fd)
                    self.written += done
                    self.total += done
            finally:
                os.close(fd)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "writer did not stop"

    def progress(self, need: int, timeout: float) -> int:
        """Bytes written from now on, once ``need`` are or ``timeout`` seconds pass."""
        start = self.total
        deadline = time.monotonic() + timeout
        while self.total - start < need and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.total - start


def test_limit_stops_one_volume_others_keep_writing_and_expand_lets_it_through(
    sv: SubvolDriver, vols: Volumes
):
    small = vols.up(vols.create(16 * MiB))
    assert small.capacity == 16 * MiB
    neighbours = [vols.up(vols.create(128 * MiB)) for _ in range(2)]
    writers = [Writer(v.target, 48 * MiB) for v in neighbours]
    for writer in writers:
        writer.start()
    try:
        fd = os.open(small.file("data"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            written, error = _write_until_error(fd, 64 * MiB)
            assert isinstance(error, OSError) and error.errno == errno.EDQUOT, (written, error)
            assert 12 * MiB <= written <= 16 * MiB, written
            for writer in writers:  # the full volume holds no one else back
                assert writer.progress(2 * MiB, timeout=20) >= 2 * MiB
                assert writer.error is None, writer.error

            resp = vols.csi.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=small.id, capacity_range=csi_pb2.CapacityRange(
                        required_bytes=48 * MiB),
                    volume_capability=mount_cap()),
                timeout=60)
            assert resp.capacity_bytes == 48 * MiB
            assert not resp.node_expansion_required
            # The very write that failed goes through at once: no node step.
            assert os.write(fd, b"w" * MiB) == MiB
            more, error = _write_until_error(fd, 16 * MiB)
            assert error is None and more == 16 * MiB
            os.fsync(fd)
        finally:
            os.close(fd)
        for writer in writers:
            assert writer.error is None, writer.error
    finally:
        for writer in writers:
            writer.stop()
    assert sv.usage(small.id).max_referenced == 48 * MiB


def test_a_volume_whose_record_was_lost_is_recorded_again_from_its_subvolume(
        sv: SubvolDriver, vols: Volumes):
    """A new volume's subvolume carries its record, committed with it, so its record file
    is written without fsync.  What a power loss can do to that file (take it, or leave
    it empty) the driver undoes at start: the record is written again from the
    subvolume, ready, with the limit in force if the volume was expanded since, and the
    CO's retry gets the same volume.  A record damaged any other way is left alone."""
    lost, emptied, grown, torn = (vols.create(32 * MiB) for _ in range(4))
    vols.csi.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=grown.id, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB),
        volume_capability=mount_cap()), timeout=60)
    carried = json.loads(os.getxattr(sv.volume_path(lost.id), "trusted.hostkit.record"))
    assert (carried["id"], carried["capacity_bytes"], carried["pool"]) == \
        (lost.id, 32 * MiB, POOL)

    def record(vol: Volume) -> Path:
        return sv.driver.state_dir / "volumes" / f"{vol.id}.json"

    names = {v.id: json.loads(record(v).read_text())["name"] for v in (lost, emptied, grown)}
    full_torn = record(torn).read_bytes()
    sv.driver.stop()
    record(lost).unlink()
    record(emptied).write_bytes(b"")
    record(grown).unlink()
    record(torn).write_bytes(full_torn[:40])
    try:
        csi = vols.csi = sv.csi()  # starts the driver; start-up reconcile writes the records
        log = sv.driver.log_path.read_text(errors="replace")
        log = log[log.rindex("--- start "):]
        for vol in (lost, emptied, grown):
            assert f"reconcile: record-restored in pool {POOL}: {vol.id}" in log, log[-3000:]
            assert json.loads(record(vol).read_text())["state"] == "ready"
        for vol, size in ((lost, 32 * MiB), (emptied, 32 * MiB), (grown, 48 * MiB)):
            again = csi.create(names[vol.id], size=32 * MiB, limit=0, params=PARAMS)
            assert (again.volume_id, again.capacity_bytes) == (vol.id, size)
        vols.up(lost)
        with open(lost.file("after"), "wb") as handle:
            handle.write(b"x" * MiB)
        assert record(torn).read_bytes() == full_torn[:40], "a damaged record was rewritten"
        findings = sv.driver.pools_json()["findings"]
        assert [f for f in findings if f["kind"] == "unreadable-record"
                and f["path"] == str(record(torn))], findings
        assert [f for f in findings if f["kind"] == "subvolume-without-record"
                and f["path"] == sv.volume_path(torn.id)
                and f"carries the record of volume {torn.id}" in f["detail"]], findings
    finally:
        sv.driver.stop()
        record(torn).write_bytes(full_torn)  # so that the teardown can delete it
        vols.csi = sv.csi()


def test_stats_match_the_qgroup_accounting(sv: SubvolDriver, vols: Volumes):
    vol = vols.up(vols.create(64 * MiB))
    for name, size in (("a", 8 * MiB), ("b", 3 * MiB)):
        with open(vol.file(name), "wb") as handle:
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
    os.mkdir(vol.file("dir"))
    btrfs.commit(sv.pool_path)
    stats = _stats(vols.csi, vol)
    usage = sv.usage(vol.id)
    unit = csi_pb2.VolumeUsage.Unit
    size = stats[unit.BYTES]
    assert size.total == usage.max_referenced == 64 * MiB
    assert size.used == usage.referenced + usage.reserved
    assert 11 * MiB <= size.used <= 11 * MiB + 512 * 1024
    assert size.available == size.total - size.used
    inodes = stats[unit.INODES]
    statvfs = os.statvfs(vol.target)
    assert inodes.total == statvfs.f_files and inodes.available == statvfs.f_ffree


# --- snapshots of a volume that is being written -----------------------------

SLOTS = 6
VERSION_SIZE = 192 * 1024
RECORD = 4096


def _version(slot: int, number: int) -> bytes:
    seed = hashlib.sha256(f"{slot}:{number}".encode()).digest()
    body = (seed * (VERSION_SIZE // len(seed)))[: VERSION_SIZE - 16]
    return struct.pack("=QQ", slot, number) + body


def _record(number: int) -> bytes:
    body = struct.pack("=Q", number) + bytes([number % 251]) * (RECORD - 40)
    return body + hashlib.sha256(body).digest()


class LiveSource(threading.Thread):
    """An application writing its volume in the two ways applications make updates safe.

    - whole files replaced atomically (write a temp file, fsync, rename), in
      ``SLOTS`` slots, each version's number and checksum derivable from its header;
    - an append-only log of checksummed 4 KiB records, fsynced every 8 records.

    ``completed`` (rename done) and ``synced`` (records fsynced) are what any
    point-in-time image taken later must hold at least.
    """

    def __init__(self, root: str) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.completed = [-1] * SLOTS
        self.started = [-1] * SLOTS
        self.synced = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            log_fd = os.open(os.path.join(self.root, "log"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                number = 0
                appended = 0
                while not self.stop_event.is_set():
                    slot = number % SLOTS
                    self.started[slot] = number
                    temp = os.path.join(self.root, f".slot{slot}.tmp")
                    with open(temp, "wb") as handle:
                        handle.write(_version(slot, number))
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.rename(temp, os.path.join(self.root, f"slot{slot}"))
                    self.completed[slot] = number
                    for _ in range(8):
                        os.write(log_fd, _record(appended))
                        appended += 1
                    os.fsync(log_fd)
                    self.synced = appended
                    number += 1
            finally:
                os.close(log_fd)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "source writer did not stop"


def _check_point_in_time(root: str, completed: list[int],
                         started: list[int], synced: int) -> str:
    """Assert ``root`` holds one untorn point-in-time image within the marks; its digest.

    Within each file: whole versions and checksummed records only.  Across
    files: the writer finishes (fsync, rename) version v before it starts v+1
    and appends 8 fsynced log records after each rename, so an image taken at
    one instant that holds version N as its newest holds, in every other slot,
    the newest version below N of that slot, and 8*N to 8*(N+1) log records.
    A file-by-file copy of a volume being written would break that.
    """
    digest = hashlib.sha256()
    numbers: dict[int, int] = {}
    for slot in range(SLOTS):
        path = os.path.join(root, f"slot{slot}")
        if completed[slot] < 0 and not os.path.exists(path):
            continue
        with open(path, "rb") as handle:
            data = handle.read()
        got_slot, number = struct.unpack_from("=QQ", data)
        assert got_slot == slot and data == _version(slot, number), f"slot{slot} is torn"
        assert completed[slot] <= number, f"slot{slot}: version {number} older than " \
                                          f"{completed[slot]}, completed before the snapshot"
        if started:
            assert number <= started[slot], f"slot{slot}: version from after the snapshot"
        numbers[slot] = number
        digest.update(data)
    newest = max(numbers.values(), default=-1)
    for slot in range(SLOTS):
        expected = newest - (newest - slot) % SLOTS  # newest version <= newest in this slot
        assert numbers.get(slot, -1) == (expected if expected >= 0 else -1), \
            f"slots {numbers} are not one instant's state (newest version {newest})"
    with open(os.path.join(root, "log"), "rb") as handle:
        log = handle.read()
    valid = 0
    while (valid + 1) * RECORD <= len(log) and log[valid * RECORD:(valid + 1) * RECORD] == \
            _record(valid):
        valid += 1
    assert valid >= synced, f"log: {valid} valid records, {synced} were fsynced before"
    # Beyond the valid records only zeros may follow (btrfs sizes a file being
    # appended to during the snapshot before its data lands: a crash-like tail).
    assert log[valid * RECORD:].strip(b"\0") == b"", "log has a torn record"
    assert 8 * newest <= valid <= 8 * (newest + 1), \
        f"log holds {valid} records, version {newest} is the newest file"
    digest.update(log[: valid * RECORD])
    return digest.hexdigest()


def test_snapshot_restore_and_clone_of_a_volume_being_written(sv: SubvolDriver, vols: Volumes):
    source = vols.up(vols.create(256 * MiB))
    app = LiveSource(source.target)
    app.start()
    images: list[tuple[str, list[int], list[int], int]] = []
    try:
        time.sleep(0.3)
        for _ in range(3):
            completed, synced = list(app.completed), app.synced
            snapshot_id = vols.snapshot(source)
            images.append((snapshot_id, completed, list(app.started), synced))
            time.sleep(0.1)
        floor_completed, floor_synced = list(app.completed), app.synced
        clone = vols.create(256 * MiB, source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.id)))
        clone_started = list(app.started)
        assert app.error is None, app.error
    finally:
        app.stop()
    assert app.error is None, app.error

    # Each snapshot on disk is read-only and an untorn point-in-time image.
    digests = {}
    for snapshot_id, completed, started, synced in images:
        assert synced > 0 and min(completed) >= 0, "the source was not written before"
        path = sv.snapshot_path(snapshot_id)
        assert btrfs.is_read_only(path)
        digests[snapshot_id] = _check_point_in_time(path, completed, started, synced)

    # Restores hold exactly their snapshot, each with its own limit.
    for snapshot_id, completed, started, synced in images[:2]:
        restored = vols.up(vols.create(256 * MiB, source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))))
        assert restored.capacity == 256 * MiB
        assert sv.usage(restored.id).max_referenced == 256 * MiB
        assert _check_point_in_time(restored.target, completed, started, synced) == \
            digests[snapshot_id]
        with open(restored.file("written-after-restore"), "wb") as handle:
            handle.write(b"r" * MiB)  # writable, and the snapshot does not change
        assert _check_point_in_time(sv.snapshot_path(snapshot_id), completed, started,
                                    synced) == digests[snapshot_id]

    # The clone of the live source is an untorn image from between the two marks.
    vols.up(clone)
    assert sv.usage(clone.id).max_referenced == 256 * MiB
    _check_point_in_time(clone.target, floor_completed, clone_started, floor_synced)

    # A snapshot survives its source.
    vols.csi.unpublish(source.id, source.target)
    vols.csi.unstage(source.id, source.staging)
    vols.csi.delete(source.id)
    vols.made.remove(source)
    snapshot_id, completed, started, synced = images[-1]
    late = vols.up(vols.create(256 * MiB, source=csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))))
    assert _check_point_in_time(late.target, completed, started, synced) == \
        digests[snapshot_id]


def test_pool_on_a_path_that_is_not_btrfs_is_refused():
    base = Path(tempfile.mkdtemp(prefix="csinb", dir="/tmp"))
    plain = base / "plain"
    plain.mkdir()
    driver = DriverProcess(base=base, node_id="node-a", config={"pools": [
        {"name": POOL, "type": "subvolume", "path": str(plain / "pool")},
    ]})
    try:
        driver.start(wait=False)
        # `csi-driver pools` names the problem and what to do.
        (pool,) = driver.pools_json()["pools"]
        assert pool["type"] == "subvolume" and not pool["ready"], pool
        problem = str(pool["problem"])
        found = btrfs.filesystem_name(str(plain))[1]
        assert f"{plain} is on {found}" in problem and "not btrfs" in problem, problem
        assert "mkfs.btrfs" in problem and "image-file pool" in problem, problem
        # With no pool that can serve, Probe fails naming the pool and its problem (not
        # "still starting"), the log says why, and a create gets the problem too.
        assert wait_until(driver.socket.exists, 30)
        assert wait_until(lambda: "not btrfs" in driver.log_tail(), 30), driver.log_tail()

        def probe_failure() -> grpc.RpcError | None:
            try:
                driver.csi().identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
            except grpc.RpcError as err:
                return err
            return None

        assert wait_until(probe_failure, 30), driver.log_tail()
        failure = probe_failure()
        assert failure is not None and failure.code() == Code.FAILED_PRECONDITION
        assert failure.details() == (
            f"no pool can serve volumes: pool {POOL} failed to start: {problem}")
        with pytest.raises(grpc.RpcError) as refused:
            driver.csi().create(f"pvc-{uuid.uuid4()}", size=16 * MiB, params=PARAMS)
        assert refused.value.code() == Code.FAILED_PRECONDITION, refused.value.details()
        assert refused.value.details() == (f"pool {POOL} failed to start and serves no "
                                           f"volumes until the driver restarts: {problem}")
        assert not os.path.exists(plain / "pool" / "volumes")
    finally:
        driver.cleanup()
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def test_by_default_a_clone_holds_no_more_than_its_capacity():
    """The pool's default quota mode makes a clone's limit bound what it holds,
    shared data included: a 16 MiB clone of a volume holding 10 MiB takes at
    most 6 MiB more.  (Simple quotas would take 16 MiB more: why full qgroups are
    the default.)  NodeGetVolumeStats then counts the shared data too."""
    base = Path(tempfile.mkdtemp(prefix="csisv", dir="/tmp"))
    try:
        with btrfs_mount(base, size=1 << 30) as fs:
            driver = DriverProcess(base=base, node_id="node-a", config={"pools": [
                {"name": POOL, "type": "subvolume", "path": str(fs / "pool")}]})
            try:
                driver.start()
                sv = SubvolDriver(driver, fs, "default")
                vols = Volumes(sv)
                try:
                    source = vols.up(vols.create(16 * MiB))
                    with open(source.file("shared"), "wb") as handle:
                        handle.write(os.urandom(10 * MiB))
                        handle.flush()
                        os.fsync(handle.fileno())
                    btrfs.commit(sv.pool_path)
                    clone = vols.up(vols.create(16 * MiB, source=csi_pb2.VolumeContentSource(
                        volume=csi_pb2.VolumeContentSource.VolumeSource(
                            volume_id=source.id))))
                    assert os.path.getsize(clone.file("shared")) == 10 * MiB
                    fd = os.open(clone.file("more"), os.O_WRONLY | os.O_CREAT, 0o644)
                    try:
                        written, error = _write_until_error(fd, 16 * MiB)
                    finally:
                        os.close(fd)
                    assert isinstance(error, OSError) and error.errno == errno.EDQUOT, \
                        (written, error)
                    assert written <= 6 * MiB, written
                    btrfs.commit(sv.pool_path)
                    used = _stats(vols.csi, clone)[csi_pb2.VolumeUsage.Unit.BYTES].used
                    assert used >= 10 * MiB, used
                finally:
                    vols.close()
            finally:
                leftovers = driver.cleanup()
                if leftovers:
                    print(f"cleaned after the driver in {base}: {leftovers}")
    finally:
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def test_volumes_stage_and_publish_after_the_pool_filesystem_is_mounted_again():
    """The pool remembers the device numbers of its filesystem's mount (every node RPC
    needs them); a remount gives the filesystem new ones, and stage, publish and their
    undoing must follow, not keep matching the old numbers."""
    from csi_driver import mounts

    with subvolume_driver("full") as sv:
        vols = Volumes(sv)
        try:
            vol = vols.up(vols.create(16 * MiB))
            with open(vol.file("before"), "wb") as handle:
                handle.write(b"kept")
            vols.csi.unpublish(vol.id, vol.target)
            vols.csi.unstage(vol.id, vol.staging)
            pool_mount = mounts.find_mount(str(sv.fs))
            assert pool_mount is not None
            before = (pool_mount.major, pool_mount.minor)
            mounts.unmount(str(sv.fs))
            other_base = Path(tempfile.mkdtemp(prefix="csisv2", dir="/tmp"))
            try:
                # Another btrfs takes the numbers the pool filesystem just gave back.
                with btrfs_mount(other_base, size=256 * MiB):
                    mounts.mount(pool_mount.source, str(sv.fs), "btrfs", ())
                    again = mounts.find_mount(str(sv.fs))
                    assert again is not None and (again.major, again.minor) != before
                    vols.up(vol)
                    with open(vol.file("before"), "rb") as handle:
                        assert handle.read() == b"kept"
                    published = mounts.find_mount(vol.target)
                    assert published is not None
                    assert (published.major, published.minor) == (again.major, again.minor)
                    vols.csi.unpublish(vol.id, vol.target)
                    vols.csi.unstage(vol.id, vol.staging)
                    vol.target = vol.staging = ""
                    assert not mounts_under(sv.driver.kubelet_root)
            finally:
                if not mounts_under(other_base):
                    shutil.rmtree(other_base, ignore_errors=True)
        finally:
            vols.close()
