"""csi_driver.btrfs against a real btrfs on a loop device (root).

Every test makes its own btrfs image in a scratch directory; the scratch
fixture unmounts and detaches it even when the test fails.  Where the two quota
modes behave differently (limits copied onto snapshots, what a clone is charged
for, when a deleted volume's qgroup goes), the tests run in both.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from dataclasses import dataclass

import pytest

from csi_driver import btrfs, filesystems, mounts
from csi_driver.btrfs import QuotaMode
from plugin_runtime.errors import FailedPrecondition, InvalidArgument, NotFound

from .conftest import Scratch

MiB = 1 << 20
FS_SIZE = 768 * MiB
CHUNK = 1 * MiB


@dataclass
class Fs:
    root: str
    scratch: Scratch

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


def _make_fs(scratch: Scratch, name: str = "pool") -> Fs:
    device = scratch.attach(scratch.image(f"{name}.img", FS_SIZE))
    filesystems.make_filesystem(device, "btrfs")
    return Fs(root=scratch.mount(device, name, "btrfs"), scratch=scratch)


@pytest.fixture
def fs(scratch: Scratch) -> Fs:
    """A fresh btrfs with quotas off."""
    return _make_fs(scratch)


@pytest.fixture(params=[QuotaMode.FULL, QuotaMode.SIMPLE], ids=["qgroup", "squota"])
def qfs(request: pytest.FixtureRequest, scratch: Scratch) -> tuple[Fs, QuotaMode]:
    """A fresh btrfs with quotas on, in each mode."""
    made = _make_fs(scratch)
    setup = btrfs.enable_quotas(made.root, request.param)
    assert setup.changed and setup.status.mode is request.param, setup
    return made, request.param


def _write_until_error(fd: int, limit_bytes: int) -> tuple[int, OSError | None]:
    written = 0
    block = b"q" * CHUNK
    while written < limit_bytes:
        try:
            written += os.write(fd, block)
        except OSError as exc:
            return written, exc
    return written, None


def _digest_tree(root: str) -> dict[str, str]:
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def _fill(path: str, size: int, seed: bytes = b"d") -> None:
    with open(path, "wb") as handle:
        handle.write(seed * size)
        handle.flush()
        os.fsync(handle.fileno())


class Neighbour:
    """Keeps writing 1 MiB chunks with fsync into another volume until stopped."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "stream")
        self.written = 0
        self.total = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while not self._stop.is_set():
                    if self.written >= 96 * MiB:  # stay well inside its limit: start over
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        self.written = 0
                        # Freed extents leave the qgroup only at a commit.
                        btrfs.commit(os.path.dirname(self.path))
                    done = os.write(fd, b"n" * CHUNK)
                    os.fsync(fd)
                    self.written += done
                    self.total += done
            finally:
                os.close(fd)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Neighbour:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "neighbour writer did not stop"

    def progress(self, need: int, timeout: float) -> int:
        """Bytes written from now on, once ``need`` are or ``timeout`` seconds pass."""
        start = self.total
        deadline = time.monotonic() + timeout
        while self.total - start < need and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.total - start


def test_non_btrfs_path_is_refused_with_what_to_do(scratch: Scratch):
    plain = scratch.directory("plain")
    assert btrfs.filesystem_name(plain)[1] != "btrfs"
    with pytest.raises(btrfs.NotBtrfs, match=r"not btrfs: .*mkfs\.btrfs.*image-file pool") as info:
        btrfs.require_btrfs(plain)
    assert plain in str(info.value) and info.value.code == "FAILED_PRECONDITION"
    ext4 = scratch.attach(scratch.image("e.img", 64 * MiB))
    filesystems.make_filesystem(ext4, "ext4")
    ext4_root = scratch.mount(ext4, "e", "ext4")
    with pytest.raises(btrfs.NotBtrfs, match="ext2/ext3/ext4"):
        btrfs.require_btrfs(ext4_root)
    # The primitives themselves say the same instead of a bare ENOTTY.
    with pytest.raises(btrfs.NotBtrfs, match="not btrfs"):
        btrfs.create_subvolume(ext4_root, "v")
    with pytest.raises(btrfs.NotBtrfs, match="not btrfs"):
        btrfs.enable_quotas(ext4_root)
    with pytest.raises(btrfs.NotBtrfs, match="not btrfs"):
        btrfs.quota_status(ext4_root)
    assert not os.path.exists(os.path.join(ext4_root, "v"))
    assert not btrfs.is_subvolume(ext4_root)
    with pytest.raises(NotFound, match="does not exist"):
        btrfs.require_btrfs(scratch.path("missing"))


def test_limit_stops_one_volume_while_another_keeps_writing(qfs: tuple[Fs, QuotaMode]):
    fs, _mode = qfs
    small = btrfs.create_subvolume(fs.root, "small", limit=16 * MiB)
    big = btrfs.create_subvolume(fs.root, "big", limit=256 * MiB)
    assert btrfs.qgroup_usage(fs.root, small.id).max_referenced == 16 * MiB
    fd = os.open(os.path.join(small.path, "data"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with Neighbour(big.path) as neighbour:
            written, error = _write_until_error(fd, 64 * MiB)
            assert isinstance(error, OSError) and error.errno == errno.EDQUOT, (written, error)
            assert 12 * MiB <= written <= 16 * MiB, written  # metadata counts too
            # The neighbour is not held back by the full volume.
            assert neighbour.progress(2 * CHUNK, timeout=20) >= 2 * CHUNK
            assert neighbour.error is None, neighbour.error
            # Still full: the same write fails again...
            with pytest.raises(OSError) as again:
                os.write(fd, b"q" * CHUNK)
            assert again.value.errno == errno.EDQUOT
            # ...and goes through at once after the limit is raised.
            btrfs.set_limit(fs.root, small.id, 48 * MiB)
            btrfs.set_limit(fs.root, small.id, 48 * MiB)  # idempotent
            assert os.write(fd, b"q" * CHUNK) == CHUNK
            more, error = _write_until_error(fd, 16 * MiB)
            assert error is None and more == 16 * MiB
            assert neighbour.error is None, neighbour.error
        os.fsync(fd)
    finally:
        os.close(fd)
    usage = btrfs.qgroup_usage(fs.root, small.id)
    assert usage.max_referenced == 48 * MiB and usage.max_exclusive is None


def test_usage_query_matches_written_bytes_and_sysfs(qfs: tuple[Fs, QuotaMode]):
    fs, _mode = qfs
    vol = btrfs.create_subvolume(fs.root, "vol", limit=64 * MiB)
    _fill(os.path.join(vol.path, "a"), 8 * MiB)
    _fill(os.path.join(vol.path, "b"), 3 * MiB)
    btrfs.commit(fs.root)
    usage = btrfs.qgroup_usage(fs.root, vol.id)
    assert 11 * MiB <= usage.referenced <= 11 * MiB + 256 * 1024, usage
    assert usage.exclusive == usage.referenced  # nothing shared yet
    assert usage.max_referenced == 64 * MiB
    sysfs = btrfs.SYS_FS_BTRFS / btrfs.fsid(fs.root) / "qgroups" / f"0_{vol.id}"
    assert int((sysfs / "referenced").read_text()) == usage.referenced
    assert int((sysfs / "exclusive").read_text()) == usage.exclusive
    assert int((sysfs / "max_referenced").read_text()) == 64 * MiB
    assert btrfs.list_qgroups(fs.root)[vol.id] == usage
    committed = btrfs.list_qgroups(fs.root, live=False)[vol.id]
    assert (committed.referenced, committed.max_referenced) == (usage.referenced, 64 * MiB)
    with pytest.raises(btrfs.SubvolumeNotFound, match="no qgroup"):
        btrfs.qgroup_usage(fs.root, 99999)


def test_listings_span_many_tree_search_batches(fs: Fs):
    btrfs.enable_quotas(fs.root, QuotaMode.FULL)
    # A 4 KiB search buffer holds about 55 qgroup items: 150 volumes need several rounds.
    made = {btrfs.create_subvolume(fs.root, f"v{i}", limit=(i + 1) * MiB).id for i in range(150)}
    qgroups = btrfs.list_qgroups(fs.root)
    assert made <= set(qgroups)
    assert {qgroups[i].max_referenced for i in made} == {(i + 1) * MiB for i in range(150)}
    btrfs.commit(fs.root)
    committed = btrfs.list_qgroups(fs.root, live=False)
    assert {committed[i].max_referenced for i in made} == {(i + 1) * MiB for i in range(150)}
    roots = btrfs.root_item_ids(fs.root)
    assert made <= set(roots) and all(roots[i] for i in made)


def test_snapshots_read_only_and_writable_with_own_limits(qfs: tuple[Fs, QuotaMode]):
    fs, mode = qfs
    src = btrfs.create_subvolume(fs.root, "src", limit=10 * MiB)
    os.mkdir(os.path.join(src.path, "dir"))
    _fill(os.path.join(src.path, "dir", "data"), 8 * MiB)
    before = _digest_tree(src.path)

    snap = btrfs.snapshot(src.path, fs.root, "snap", read_only=True)
    assert btrfs.is_read_only(snap.path) and not btrfs.is_read_only(src.path)
    info = btrfs.subvolume_info(snap.path)
    assert info.id == snap.id == btrfs.subvolume_id(snap.path)
    assert info.read_only and info.name == "snap"
    assert info.parent_uuid == btrfs.subvolume_info(src.path).uuid
    assert _digest_tree(snap.path) == before
    with pytest.raises(OSError) as refused:
        _fill(os.path.join(snap.path, "new"), 1)
    assert refused.value.errno == errno.EROFS
    # The source moves on; the snapshot does not.
    _fill(os.path.join(src.path, "dir", "data"), 1 * MiB, b"z")
    assert _digest_tree(snap.path) == before

    clone = btrfs.snapshot(snap.path, fs.root, "clone", read_only=False, limit=10 * MiB)
    assert not btrfs.is_read_only(clone.path)
    assert btrfs.subvolume_info(clone.path).parent_uuid == info.uuid
    assert _digest_tree(clone.path) == before
    assert btrfs.qgroup_usage(fs.root, clone.id).max_referenced == 10 * MiB
    fd = os.open(os.path.join(clone.path, "more"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written, error = _write_until_error(fd, 32 * MiB)
    finally:
        os.close(fd)
    assert isinstance(error, OSError) and error.errno == errno.EDQUOT
    if mode is QuotaMode.FULL:
        # max_rfer counts the shared 8 MiB: the clone is bounded at its capacity.
        assert written <= 2 * MiB, written
    else:
        # Simple quotas charge a clone only for what it writes (the reason the
        # driver prefers full qgroups): the full limit again on top of the shared data.
        assert written >= 8 * MiB, written
    assert _digest_tree(snap.path) == before

    # A snapshot survives its source; the flag can be cleared and set again.
    btrfs.delete_subvolume(src.path)
    assert _digest_tree(snap.path) == before
    btrfs.set_read_only(snap.path, False)
    btrfs.set_read_only(snap.path, False)
    _fill(os.path.join(snap.path, "now-writable"), 1)
    btrfs.set_read_only(snap.path, True)
    assert btrfs.is_read_only(snap.path)


def test_full_qgroups_copy_the_source_limit_unless_one_is_given(fs: Fs):
    btrfs.enable_quotas(fs.root, QuotaMode.FULL)
    src = btrfs.create_subvolume(fs.root, "src", limit=10 * MiB)
    plain = btrfs.snapshot(src.path, fs.root, "plain", read_only=False)
    assert btrfs.qgroup_usage(fs.root, plain.id).max_referenced == 10 * MiB
    own = btrfs.snapshot(src.path, fs.root, "own", read_only=False, limit=30 * MiB)
    assert btrfs.qgroup_usage(fs.root, own.id).max_referenced == 30 * MiB


def test_delete_removes_the_qgroup(qfs: tuple[Fs, QuotaMode]):
    fs, mode = qfs
    vol = btrfs.create_subvolume(fs.root, "vol", limit=64 * MiB)
    _fill(os.path.join(vol.path, "data"), 4 * MiB)
    snap = btrfs.snapshot(vol.path, fs.root, "snap", read_only=True)
    btrfs.commit(fs.root)

    assert btrfs.delete_subvolume(vol.path) == vol.id
    assert not os.path.exists(vol.path)
    assert btrfs.root_item_ids(fs.root).get(vol.id) in (False, None)  # deleted, maybe dropped
    assert btrfs.wait_dropped(fs.root, vol.id, timeout=30)
    btrfs.remove_stale_qgroups(fs.root)
    btrfs.commit(fs.root)
    if mode is QuotaMode.FULL:
        assert vol.id not in btrfs.list_qgroups(fs.root)
    else:
        # Simple quotas keep charging the deleted volume for extents the snapshot
        # still holds; its qgroup can only go with them.
        assert vol.id in btrfs.list_qgroups(fs.root)
        with pytest.raises(btrfs.QgroupBusy):
            btrfs.remove_qgroup(fs.root, vol.id)

    btrfs.delete_subvolume(snap.path)
    assert btrfs.wait_dropped(fs.root, snap.id, timeout=30)
    btrfs.commit(fs.root)
    btrfs.remove_stale_qgroups(fs.root)
    btrfs.commit(fs.root)
    left = btrfs.list_qgroups(fs.root)
    assert vol.id not in left and snap.id not in left, left
    assert btrfs.remove_stale_qgroups(fs.root) == []
    assert btrfs.remove_qgroup(fs.root, vol.id) is False  # already gone


def test_errors_and_idempotent_answers(fs: Fs, scratch: Scratch):
    setup = btrfs.enable_quotas(fs.root, QuotaMode.FULL)
    assert setup.changed and "full qgroups" in setup.reason
    again = btrfs.enable_quotas(fs.root, QuotaMode.FULL)
    assert not again.changed and again.status.mode is QuotaMode.FULL
    kept = btrfs.enable_quotas(fs.root, QuotaMode.SIMPLE)
    assert not kept.changed and kept.status.mode is QuotaMode.FULL
    assert "would drop every existing limit" in kept.reason

    vol = btrfs.create_subvolume(fs.root, "vol", limit=8 * MiB)
    assert btrfs.is_subvolume(vol.path) and btrfs.subvolume_id(fs.root) == btrfs.FS_TREE
    os.mkdir(os.path.join(vol.path, "inner"))
    assert btrfs.subvolume_id(os.path.join(vol.path, "inner")) == vol.id
    with pytest.raises(btrfs.SubvolumeExists, match="already exists"):
        btrfs.create_subvolume(fs.root, "vol")
    os.mkdir(fs.path("plain"))
    with pytest.raises(btrfs.SubvolumeExists):
        btrfs.create_subvolume(fs.root, "plain")
    with pytest.raises(btrfs.SubvolumeExists):
        btrfs.snapshot(vol.path, fs.root, "plain", read_only=True)
    for bad in ("", ".", "..", "a/b", "x" * 256, "nul\0"):
        with pytest.raises(InvalidArgument):
            btrfs.create_subvolume(fs.root, bad)
    btrfs.create_subvolume(fs.root, "y" * 255)  # the longest name btrfs takes
    with pytest.raises(btrfs.NotASubvolume, match="plain directory"):
        btrfs.snapshot(fs.path("plain"), fs.root, "s", read_only=True)
    with pytest.raises(btrfs.NotASubvolume):
        btrfs.delete_subvolume(fs.path("plain"))
    with pytest.raises(btrfs.SubvolumeNotFound):
        btrfs.delete_subvolume(fs.path("missing"))
    with pytest.raises(NotFound):
        btrfs.create_subvolume(fs.path("missing"), "v")
    with pytest.raises(btrfs.SubvolumeNotFound, match="no qgroup"):
        btrfs.set_limit(fs.root, 99999, MiB)
    with pytest.raises(btrfs.QgroupBusy):
        btrfs.remove_qgroup(fs.root, vol.id)
    assert btrfs.remove_qgroup(fs.root, 99999) is False
    with pytest.raises(InvalidArgument, match="negative"):
        btrfs.set_limit(fs.root, vol.id, -1)

    # Mounted (the kernel would delete it and leave the mount empty): refused.
    target = scratch.bind(vol.path, "bound")
    with pytest.raises(btrfs.SubvolumeBusy, match=target):
        btrfs.delete_subvolume(vol.path)
    assert btrfs.mount_points_of(vol.path, vol.id) == [target]
    mounts.unmount(target)
    nested = btrfs.create_subvolume(vol.path, "nested")
    with pytest.raises(btrfs.SubvolumeBusy, match="nested"):
        btrfs.delete_subvolume(vol.path)
    btrfs.delete_subvolume(nested.path)
    assert btrfs.delete_subvolume(vol.path) == vol.id
    with pytest.raises(btrfs.SubvolumeNotFound):
        btrfs.delete_subvolume(vol.path)


def test_quotas_off_refuses_limits_instead_of_ignoring_them(fs: Fs):
    status = btrfs.quota_status(fs.root)
    assert status.mode is QuotaMode.OFF and not status.enabled
    with pytest.raises(btrfs.QuotasDisabled, match="quotas are off"):
        btrfs.create_subvolume(fs.root, "v", limit=8 * MiB)
    assert not os.path.exists(fs.path("v"))  # the kernel would have made it unlimited
    plain = btrfs.create_subvolume(fs.root, "plain")
    with pytest.raises(btrfs.QuotasDisabled):
        btrfs.set_limit(fs.root, plain.id, 8 * MiB)
    with pytest.raises(btrfs.QuotasDisabled):
        btrfs.qgroup_usage(fs.root, plain.id)
    with pytest.raises(btrfs.QuotasDisabled):
        btrfs.rescan_quotas(fs.root)
    assert btrfs.remove_stale_qgroups(fs.root) == []

    # Enabling full qgroups on data already there counts it (rescan waited for).
    _fill(os.path.join(plain.path, "old"), 4 * MiB)
    btrfs.enable_quotas(fs.root, QuotaMode.FULL)
    status = btrfs.quota_status(fs.root)
    assert status.mode is QuotaMode.FULL and not status.rescanning and not status.inconsistent
    btrfs.rescan_quotas(fs.root)
    assert btrfs.qgroup_usage(fs.root, plain.id).referenced >= 4 * MiB
    btrfs.disable_quotas(fs.root)
    btrfs.disable_quotas(fs.root)
    assert btrfs.quota_status(fs.root).mode is QuotaMode.OFF


def test_simple_quotas_have_no_rescan(fs: Fs):
    btrfs.enable_quotas(fs.root, QuotaMode.SIMPLE)
    assert btrfs.quota_status(fs.root).mode is QuotaMode.SIMPLE
    with pytest.raises(FailedPrecondition, match="simple quotas"):
        btrfs.rescan_quotas(fs.root)


def test_nocow_on_an_empty_subvolume_only(fs: Fs):
    vol = btrfs.create_subvolume(fs.root, "db")
    assert not btrfs.has_nocow(vol.path)
    btrfs.set_nocow(vol.path)
    btrfs.set_nocow(vol.path)  # idempotent while still empty
    assert btrfs.has_nocow(vol.path)
    os.mkdir(os.path.join(vol.path, "sub"))
    _fill(os.path.join(vol.path, "sub", "table"), 1 * MiB)
    assert btrfs.has_nocow(os.path.join(vol.path, "sub", "table"))
    other = btrfs.create_subvolume(fs.root, "full")
    _fill(os.path.join(other.path, "x"), 1)
    with pytest.raises(FailedPrecondition, match="not empty"):
        btrfs.set_nocow(other.path)
    assert not btrfs.has_nocow(other.path)
