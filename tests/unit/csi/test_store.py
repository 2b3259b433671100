"""Record store: atomic writes, crash leftovers, unreadable records, node state, id validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from csi_driver import store as store_mod
from csi_driver.store import (
    Publication,
    SnapshotRecord,
    Staging,
    Store,
    VolumeRecord,
    is_valid_id,
    new_snapshot_id,
    new_volume_id,
    validate_name,
)
from plugin_runtime.errors import InvalidArgument


def record(name="pvc-1", **kw):
    args = {"id": new_volume_id(), "name": name, "pool": "default", "capacity_bytes": 1 << 20,
            "block": False, "fs_type": "ext4", "thin": True}
    args.update(kw)
    return VolumeRecord(**args)


def test_round_trip_with_staging_and_publications(tmp_path):
    s = Store(str(tmp_path))
    rec = record(state="ready")
    rec.staging = Staging(path="/k/s", block=False, fs_type="ext4", mount_flags=["noatime"])
    rec.publications["/k/t"] = Publication(target="/k/t", block=False, readonly=True)
    s.put_volume(rec)
    again = Store(str(tmp_path))
    loaded = again.volume(rec.id)
    assert loaded == rec
    assert again.volume_by_name("pvc-1") == rec
    snap = SnapshotRecord(id=new_snapshot_id(), name="s1", source_volume=rec.id,
                          pool="default", size_bytes=1, fs_type="ext4", block=False)
    again.put_snapshot(snap)
    assert Store(str(tmp_path)).snapshot_by_name("s1") == snap


def test_remove_updates_the_name_index(tmp_path):
    s = Store(str(tmp_path))
    rec = record()
    s.put_volume(rec)
    s.remove_volume(rec.id)
    assert s.volume_by_name(rec.name) is None
    assert os.listdir(s.volume_dir) == []
    s.remove_volume(rec.id)  # absent is fine


def test_crash_between_temp_write_and_rename_keeps_the_old_record(tmp_path):
    s = Store(str(tmp_path))
    rec = record(capacity_bytes=111)
    s.put_volume(rec)
    script = textwrap.dedent(f"""
        from csi_driver.store import Store
        s = Store({str(tmp_path)!r})
        rec = s.volume({rec.id!r})
        rec.capacity_bytes = 222
        s.put_volume(rec)
    """)
    env = dict(os.environ, HOSTKIT_CRASH_AT="store.before_rename")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60,
                          cwd=os.getcwd(), capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr
    leftovers = [e for e in os.listdir(s.volume_dir) if ".tmp-" in e]
    assert leftovers, "the crash should have left the fsynced temp file"
    reloaded = Store(str(tmp_path))
    again = reloaded.volume(rec.id)
    assert again is not None and again.capacity_bytes == 111
    assert not [e for e in os.listdir(s.volume_dir) if ".tmp-" in e]


def test_torn_temp_file_and_unreadable_record_are_ignored_not_deleted(tmp_path):
    s = Store(str(tmp_path))
    good = record(name="good")
    s.put_volume(good)
    torn = os.path.join(s.volume_dir, f".{good.id}.json.tmp-1-2")
    with open(torn, "w") as f:
        f.write('{"id": "vol-')
    broken_id = new_volume_id()
    broken = os.path.join(s.volume_dir, f"{broken_id}.json")
    with open(broken, "w") as f:
        f.write("{not json")
    mismatched_id = new_volume_id()
    with open(os.path.join(s.volume_dir, f"{mismatched_id}.json"), "w") as f:
        json.dump({"id": good.id}, f)
    again = Store(str(tmp_path))
    assert [v.id for v in again.volumes()] == [good.id]
    assert not os.path.exists(torn)
    assert os.path.exists(broken)  # never deleted: an operator looks at it
    assert broken in again.unreadable


@pytest.mark.parametrize("damage", [
    {"drop": "name"},  # valid JSON, the right id, a field missing
    {"set": ("staging", "not an object")},
    {"set": ("publications", ["not", "a", "map"])},
])
def test_record_that_is_json_but_not_a_record_is_unreadable_not_fatal(tmp_path, damage):
    s = Store(str(tmp_path))
    good, bad = record(name="good"), record(name="bad")
    s.put_volume(good)
    s.put_volume(bad)
    snap = SnapshotRecord(id=new_snapshot_id(), name="snap", source_volume=good.id,
                          pool="default", size_bytes=1 << 20, fs_type="ext4", block=False)
    s.put_snapshot(snap)
    path = os.path.join(s.volume_dir, f"{bad.id}.json")
    snap_path = os.path.join(s.snapshot_dir, f"{snap.id}.json")
    data = json.loads(Path(path).read_text())
    if "drop" in damage:
        del data[damage["drop"]]
    else:
        key, value = damage["set"]
        data[key] = value
    with open(path, "w") as f:
        json.dump(data, f)
    with open(snap_path, "w") as f:
        json.dump({"id": snap.id, "name": "snap"}, f)
    damaged = {path: Path(path).read_text(), snap_path: Path(snap_path).read_text()}
    again = Store(str(tmp_path))
    assert [v.id for v in again.volumes()] == [good.id]
    assert again.snapshots() == []
    assert sorted(again.unreadable) == sorted(damaged)
    for name, content in damaged.items():
        assert Path(name).read_text() == content, f"{name} was rewritten or removed"


def test_write_atomically_fsyncs_the_directory(tmp_path, monkeypatch):
    synced = []
    real = store_mod.fsync_dir

    def spy(directory):
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(store_mod, "fsync_dir", spy)
    store_mod.write_atomically(str(tmp_path / "x.json"), b"{}")
    assert synced == [str(tmp_path)]
    assert (tmp_path / "x.json").read_bytes() == b"{}"


def staged(name="pvc-n", **kw):
    rec = record(name=name, state="ready", **kw)
    rec.staging = Staging(path="/k/s", block=False, fs_type="ext4", device="/dev/loop7")
    rec.publications["/k/t"] = Publication(target="/k/t", block=False, readonly=False)
    return rec


def test_node_state_lives_apart_from_the_record_and_is_not_fsynced(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    rec = record(name="pvc-n", state="ready")
    s.put_volume(rec)
    synced: list[object] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(store_mod, "fsync_dir", lambda d: synced.append(d))
    rec.staging = Staging(path="/k/s", block=False, fs_type="ext4")
    s.put_node(rec)
    assert synced == [], "node state must not pay for fsyncs"
    record_file = json.loads(Path(s.volume_dir, f"{rec.id}.json").read_text())
    assert "staging" not in record_file and "publications" not in record_file
    node_file = json.loads(Path(s.node_dir, f"{rec.id}.json").read_text())
    assert node_file["staging"]["path"] == "/k/s"
    assert Store(str(tmp_path)).volume(rec.id) == rec
    rec.staging = None
    s.put_node(rec)
    assert os.listdir(s.node_dir) == [], "neither staged nor published: no node file"
    assert Store(str(tmp_path)).volume(rec.id) == rec


def test_put_volume_keeps_the_record_durable(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    synced: list[str] = []
    real = store_mod.fsync_dir

    def spy(directory: str) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(store_mod, "fsync_dir", spy)
    s.put_volume(staged())
    assert synced == [s.volume_dir]


def test_put_node_changes_only_the_node_state(tmp_path):
    s = Store(str(tmp_path))
    rec = staged()
    s.put_volume(rec)
    copy = s.volume(rec.id)
    assert copy is not None
    copy.publications.clear()
    copy.staging = None
    s.put_node(copy)
    again = s.volume(rec.id)
    assert again is not None and again.staging is None and again.publications == {}
    assert again.capacity_bytes == rec.capacity_bytes and again.name == rec.name


def test_record_with_inline_node_state_is_read_and_moved_out(tmp_path):
    """A state dir written before node state moved out keeps its volumes staged."""
    rec = staged()
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    legacy = {**rec.to_json(), **rec.node_json()}  # type: ignore[dict-item]
    (volumes / f"{rec.id}.json").write_text(json.dumps(legacy, indent=1))
    s = Store(str(tmp_path))
    assert s.volume(rec.id) == rec
    assert (tmp_path / "node" / f"{rec.id}.json").exists()
    loaded = s.volume(rec.id)
    assert loaded is not None
    s.put_volume(loaded)  # rewrites the record without the inline state
    assert "staging" not in json.loads((volumes / f"{rec.id}.json").read_text())
    assert Store(str(tmp_path)).volume(rec.id) == rec


@pytest.mark.parametrize("content", ["", '{"id": "vol-', '{"id": "%s", "staging": 3}'])
def test_damaged_node_state_reads_as_not_staged_and_keeps_the_volume(tmp_path, caplog, content):
    """What a power loss mid-write leaves: the volume stays, unstaged (nothing is mounted
    after a power loss either)."""
    s = Store(str(tmp_path))
    rec = staged()
    s.put_volume(rec)
    node_file = Path(s.node_dir, f"{rec.id}.json")
    node_file.write_text(content.replace("%s", rec.id))
    again = Store(str(tmp_path))
    loaded = again.volume(rec.id)
    assert loaded is not None and loaded.capacity_bytes == rec.capacity_bytes
    assert loaded.staging is None and loaded.publications == {}
    assert again.unreadable == []
    assert not node_file.exists()
    assert any(str(node_file) in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)


def test_node_state_without_a_record_is_removed_unless_the_record_is_unreadable(tmp_path):
    s = Store(str(tmp_path))
    rec, broken = staged(), staged(name="pvc-broken")
    s.put_volume(rec)
    s.put_volume(broken)
    Path(s.volume_dir, f"{rec.id}.json").unlink()  # e.g. removed by hand
    Path(s.volume_dir, f"{broken.id}.json").write_text("{not json")
    again = Store(str(tmp_path))
    assert again.volumes() == []
    assert sorted(os.listdir(s.node_dir)) == [f"{broken.id}.json"]


def test_remove_volume_removes_its_node_state(tmp_path):
    s = Store(str(tmp_path))
    rec = staged()
    s.put_volume(rec)
    assert os.listdir(s.node_dir) == [f"{rec.id}.json"]
    s.remove_volume(rec.id)
    assert os.listdir(s.node_dir) == [] and os.listdir(s.volume_dir) == []


def test_crash_before_the_node_state_rename_keeps_the_old_node_state(tmp_path):
    s = Store(str(tmp_path))
    rec = staged()
    s.put_volume(rec)
    script = textwrap.dedent(f"""
        from csi_driver.store import Store
        s = Store({str(tmp_path)!r})
        rec = s.volume({rec.id!r})
        rec.publications.clear()
        s.put_node(rec)
    """)
    env = dict(os.environ, HOSTKIT_CRASH_AT="store.before_rename")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60,
                          cwd=os.getcwd(), capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr
    again = Store(str(tmp_path)).volume(rec.id)
    assert again is not None and list(again.publications) == ["/k/t"]
    assert not [e for e in os.listdir(s.node_dir) if ".tmp-" in e]


def test_handed_out_records_are_copies(tmp_path):
    s = Store(str(tmp_path))
    rec = staged()
    s.put_volume(rec)
    expected = staged()
    expected.id = rec.id
    copy = s.volume(rec.id)
    assert copy is not None and copy == expected
    copy.parameters["x"] = "y"
    copy.staging.mount_flags.append("ro")  # type: ignore[union-attr]
    copy.publications["/k/t"].mount_flags.append("ro")
    rec.parameters["z"] = "w"
    rec.publications["/k/t"].mount_flags.append("ro")
    assert s.volume(rec.id) == expected


def test_a_read_only_store_reads_everything_and_changes_nothing(tmp_path):
    """``csi-driver pools`` looks at a running driver's state dir: it must not remove that
    driver's temp files or node state, nor move anything."""
    assert Store(str(tmp_path / "missing"), read_only=True).volumes() == []
    assert not (tmp_path / "missing").exists()
    s = Store(str(tmp_path))
    rec, gone = staged(), staged(name="pvc-gone")
    s.put_volume(rec)
    s.put_volume(gone)
    Path(s.volume_dir, f"{gone.id}.json").unlink()
    Path(s.volume_dir, f".{rec.id}.json.tmp-1-2").write_text("{")
    Path(s.node_dir, f"{rec.id}.json").write_text("{damaged")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    look = Store(str(tmp_path), read_only=True)
    loaded = look.volume(rec.id)
    assert loaded is not None and loaded.staging is None and [v.id for v in look.volumes()] \
        == [rec.id]
    with pytest.raises(RuntimeError, match="read-only"):
        look.put_volume(rec)
    with pytest.raises(RuntimeError, match="read-only"):
        look.put_node(rec)
    with pytest.raises(RuntimeError, match="read-only"):
        look.remove_volume(rec.id)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_volumes_in_gives_one_pools_records(tmp_path):
    s = Store(str(tmp_path))
    a, b, c = record(name="a"), record(name="b", pool="other"), record(name="c")
    for rec in (a, b, c):
        s.put_volume(rec)
    assert sorted(r.id for r in s.volumes_in("default")) == sorted([a.id, c.id])
    assert [r.id for r in s.volumes_in("other")] == [b.id]
    assert s.volumes_in("none") == []


@pytest.mark.parametrize("value", [
    "", "vol-", "vol-../../etc", "vol-" + "0" * 31, "vol-" + "g" * 32, "../vol-" + "0" * 32,
    "snap-" + "0" * 32, "vol-" + "0" * 32 + "/x", "vol-" + "A" * 32,
])
def test_invalid_volume_ids(value):
    assert not is_valid_id(value, "vol")


def test_generated_ids_are_valid():
    assert is_valid_id(new_volume_id(), "vol")
    assert is_valid_id(new_snapshot_id(), "snap")
    assert not is_valid_id(new_snapshot_id(), "vol")


def test_names_are_bounded_and_printable():
    assert validate_name("pvc-1") == "pvc-1"
    for bad in ("", "x" * 129, "a\nb", "a\0b"):
        with pytest.raises(InvalidArgument):
            validate_name(bad)
    validate_name("é" * 64)  # 128 bytes
    with pytest.raises(InvalidArgument):
        validate_name("é" * 65)


def test_put_volume_after_replaces_the_record_only_once_the_step_returned(tmp_path):
    s = Store(str(tmp_path))
    rec = record(state="creating")
    s.put_volume(rec)
    path = Path(s.volume_dir, f"{rec.id}.json")
    ready = s.volume(rec.id)
    assert ready is not None
    ready.state = "ready"
    seen = []

    def step() -> str:
        seen.append(json.loads(path.read_text())["state"])
        return "made"

    assert s.put_volume_after(ready, step) == "made"
    assert seen == ["creating"], "the record must not change before the step is done"
    assert json.loads(path.read_text())["state"] == "ready"
    assert Store(str(tmp_path)).volume(rec.id) == ready
    assert os.listdir(s.volume_dir) == [f"{rec.id}.json"]


def test_put_volume_after_a_failed_step_keeps_the_record_and_leaves_no_file(tmp_path):
    s = Store(str(tmp_path))
    rec = record(state="creating")
    s.put_volume(rec)
    ready = s.volume(rec.id)
    assert ready is not None
    ready.state = "ready"

    def step() -> None:
        raise InvalidArgument("no room")

    with pytest.raises(InvalidArgument, match="no room"):
        s.put_volume_after(ready, step)
    assert os.listdir(s.volume_dir) == [f"{rec.id}.json"], "the new file is removed"
    again = s.volume(rec.id)
    assert again is not None and again.state == "creating"
    assert Store(str(tmp_path)).volume(rec.id) == again


def test_crash_in_put_volume_after_before_the_rename_keeps_the_old_record(tmp_path):
    s = Store(str(tmp_path))
    rec = record(state="creating")
    s.put_volume(rec)
    script = textwrap.dedent(f"""
        from csi_driver.store import Store
        s = Store({str(tmp_path)!r})
        rec = s.volume({rec.id!r})
        rec.state = "ready"
        s.put_volume_after(rec, lambda: None)
    """)
    env = dict(os.environ, HOSTKIT_CRASH_AT="store.before_rename")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60,
                          cwd=os.getcwd(), capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr
    again = Store(str(tmp_path)).volume(rec.id)
    assert again is not None and again.state == "creating"


def test_a_held_record_is_served_from_memory_and_written_by_nothing(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    rec = record(state="creating")
    s.hold_volume(rec)
    assert s.volume(rec.id) == rec and s.volume_by_name(rec.name) == rec
    assert os.listdir(s.volume_dir) == [] and os.listdir(s.node_dir) == []
    synced: list[object] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(store_mod, "fsync_dir", lambda d: synced.append(d))
    ready = s.volume(rec.id)
    assert ready is not None
    ready.state = "ready"
    s.put_volume_after(ready, lambda: None, durable=False)
    assert synced == [], "a record its backing carries must not pay for fsyncs"
    assert json.loads(Path(s.volume_dir, f"{rec.id}.json").read_text())["state"] == "ready"
    assert Store(str(tmp_path)).volume(rec.id) == ready


def test_a_held_record_that_is_dropped_leaves_nothing(tmp_path):
    s = Store(str(tmp_path))
    rec = record(state="creating")
    s.hold_volume(rec)
    s.remove_volume(rec.id)
    assert s.volume(rec.id) is None and s.volume_by_name(rec.name) is None
    assert os.listdir(s.volume_dir) == []


def test_encoded_records_decode_to_the_same_record_and_garbage_is_refused():
    rec = record(state="creating", parameters={"nocow": "true"})
    assert store_mod.decode_volume(store_mod.encode_volume(rec)) == rec
    for garbage in (b"", b"[]", b"{\"id\": \"../x\"}", b"\xff\xfe", b"{\"id\": \"vol-" +
                    b"0" * 32 + b"\"}"):
        with pytest.raises(ValueError):
            store_mod.decode_volume(garbage)


def test_a_good_record_replaces_an_unreadable_one_in_the_report(tmp_path):
    s = Store(str(tmp_path))
    rec = record()
    s.put_volume(rec)
    path = Path(s.volume_dir, f"{rec.id}.json")
    path.write_bytes(b"")
    s = Store(str(tmp_path))
    assert s.unreadable == [str(path)] and s.volume(rec.id) is None
    s.put_volume(rec)
    assert s.unreadable == [] and s.volume(rec.id) == rec
