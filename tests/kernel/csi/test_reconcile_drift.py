"""Start-up reconcile reports every kind of drift it knows, and deletes nothing.

For each kind ``csi_driver.reconcile`` (and the image pool's ``orphans``) can
report, the test makes the drift the way it arises on a real node:

- by killing the driver at the crash point that leaves it (a "creating" or
  "deleting" volume or snapshot record, a loop device attached by a stage that never recorded it,
  a publication whose bind mount is gone), or
- by hand where only something outside the driver can cause it (an image
  removed or a record lost by an operator, a record corrupted on disk, the
  ``.partial`` image a kill -9 in the middle of building an image leaves: no
  crash point sits inside that copy).

Then the driver starts again and its start-up reconcile must log the finding
(``reconcile: <kind> in pool <pool>: <object>``), ``csi-driver pools --json``
must list it with its object, and every file, record, loop device and
directory involved must still be there afterwards.

The parametrized test runs on the default image pool; the disk pool's
``record-without-disk`` has its own test (a loop device standing in for a disk
is detached while the driver is down).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import loop
from csi_driver._proto import csi_pb2
from tests.grpc.csi.driver_harness import (
    DriverProcess,
    KubeletLayout,
    MiB,
    block_cap,
    loops_backed_by,
    mount_cap,
    running_driver,
)

SIZE = 16 * MiB
CAP = mount_cap(fs_type="ext4")
EXT4_SIZE = 64 * MiB


@dataclass
class Drift:
    """What one scenario made: the finding expected and what must survive it."""

    driver: DriverProcess
    kind: str = ""
    path: str = ""  # the finding's object: a file, a device, a volume id or a target
    files: dict[str, bytes] = field(default_factory=dict)  # path -> exact content kept
    dirs: list[str] = field(default_factory=list)
    loops: dict[str, str] = field(default_factory=dict)  # device -> its backing file
    # Kinds that must NOT be reported for this object (a single cause, a single finding).
    not_kinds: list[str] = field(default_factory=list)

    @property
    def volume_dir(self) -> Path:
        return self.driver.state_dir / "pools/default/volumes"

    def image(self, volume_id: str) -> Path:
        return self.volume_dir / f"{volume_id}.img"

    def record(self, volume_id: str) -> Path:
        return self.driver.state_dir / "volumes" / f"{volume_id}.json"

    def keep(self, *paths: Path) -> None:
        for path in paths:
            self.files[str(path)] = path.read_bytes()


def _crash(driver: DriverProcess, point: str, action: Callable[[], object]) -> None:
    """Restart the driver armed at ``point``, send ``action``: it must die by SIGKILL."""
    driver.stop()
    driver.start(env={"HOSTKIT_CRASH_AT": point})
    with pytest.raises(grpc.RpcError) as info:
        action()
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (
        f"{info.value.code().name}: {info.value.details()}")
    assert driver.wait_exit(timeout=30) == -signal.SIGKILL, f"{point} was not reached"


def _ready_volume(d: Drift, kind: str = "block") -> str:
    size = EXT4_SIZE if kind == "mount" else SIZE
    vol = d.driver.csi().create(f"pv-{d.driver.base.name}-{kind}", size=size, kind=kind,
                                fs_type="ext4" if kind == "mount" else "")
    return str(vol.volume_id)


# --------------------------------------------------------------------------- scenarios


def _record_without_image(d: Drift) -> None:
    """An operator moved the image away: the record stays, its backing is gone."""
    vid = _ready_volume(d)
    d.driver.stop()
    d.image(vid).rename(d.driver.base / "moved-away.img")
    d.kind, d.path = "record-without-image", str(d.image(vid))
    d.keep(d.record(vid), d.driver.base / "moved-away.img")


def _image_without_record(d: Drift) -> None:
    """The state dir came back from a backup older than the volume: its record is lost."""
    vid = _ready_volume(d)
    d.driver.stop()
    d.record(vid).unlink()
    d.kind, d.path = "image-without-record", str(d.image(vid))
    d.keep(d.image(vid))


def _loop_not_staged(d: Drift) -> None:
    """kill -9 after NodeStage attached the loop device, before anything was recorded."""
    vid = _ready_volume(d)
    kubelet = KubeletLayout(d.driver.kubelet_root)
    before = set(loops_backed_by(d.driver.state_dir))
    _crash(d.driver, "stage.after_attach",
           lambda: d.driver.csi().stage(vid, kubelet.block_staging("pv-drift"), block_cap()))
    attached = sorted(set(loops_backed_by(d.driver.state_dir)) - before)
    assert len(attached) == 1, attached
    d.kind, d.path = "loop-not-staged", attached[0]
    d.loops[attached[0]] = str(d.image(vid))
    d.keep(d.record(vid), d.image(vid))


def _partial_image(d: Drift) -> None:
    """kill -9 in the middle of building an image: a "creating" record and the
    ``.partial`` file the build writes before renaming it into place."""
    _crash(d.driver, "create.after_record",
           lambda: d.driver.csi().create(f"pv-{d.driver.base.name}", size=SIZE, kind="block"))
    (record,) = (d.driver.state_dir / "volumes").glob("vol-*.json")
    vid = record.stem
    partial = d.volume_dir / f".{vid}.img.partial"
    with open(partial, "xb") as out:
        out.write(b"half a copy" * 1000)
    os.chmod(partial, 0o600)
    d.kind, d.path = "partial-image", str(partial)
    d.keep(partial, record)


def _incomplete_create(d: Drift) -> None:
    """kill -9 after CreateVolume made its "creating" record and the image."""
    _crash(d.driver, "create.after_image",
           lambda: d.driver.csi().create(f"pv-{d.driver.base.name}", size=SIZE, kind="block"))
    (record,) = (d.driver.state_dir / "volumes").glob("vol-*.json")
    d.kind, d.path = "incomplete-create", record.stem
    d.keep(record, d.image(record.stem))


def _incomplete_delete(d: Drift) -> None:
    """kill -9 after DeleteVolume marked the record "deleting", image still there."""
    vid = _ready_volume(d)
    _crash(d.driver, "delete.after_mark", lambda: d.driver.csi().delete(vid))
    d.kind, d.path = "incomplete-delete", vid
    d.keep(d.record(vid), d.image(vid))


def _stale_publication(d: Drift) -> None:
    """kill -9 after NodeUnpublish removed the bind mount, before the record forgot it."""
    vid = _ready_volume(d, "mount")
    kubelet = KubeletLayout(d.driver.kubelet_root)
    staging = kubelet.staging_dir(vid)
    target = kubelet.target_dir("pod-drift", "pv-drift")
    csi = d.driver.csi()
    csi.stage(vid, staging, CAP)
    csi.publish(vid, staging, target, CAP)
    Path(target, "kept.txt").write_text("data of the volume")
    _crash(d.driver, "unpublish.after_unmount", lambda: d.driver.csi().unpublish(vid, target))
    assert not os.path.ismount(target)
    d.kind, d.path = "stale-publication", target
    d.dirs += [target, staging]
    d.keep(d.record(vid), d.image(vid))


def _unreadable_record(d: Drift) -> None:
    """A record torn on disk (not by us: our writes are atomic), e.g. by a bad disk."""
    vid = _ready_volume(d)
    d.driver.stop()
    record = d.record(vid)
    record.write_bytes(record.read_bytes()[: 40])
    d.kind, d.path = "unreadable-record", str(record)
    d.keep(record, d.image(vid))


def _record_not_a_record(d: Drift) -> None:
    """A record that is JSON with the right id but lacks a field (a hand edit): the
    driver must still start, and report it like any unreadable record."""
    vid = _ready_volume(d)
    d.driver.stop()
    record = d.record(vid)
    data = json.loads(record.read_text())
    del data["capacity_bytes"]
    record.write_text(json.dumps(data))
    d.kind, d.path = "unreadable-record", str(record)
    d.keep(record, d.image(vid))


def _incomplete_delete_image_gone(d: Drift) -> None:
    """kill -9 after DeleteVolume removed the image, before it removed the record: an
    interrupted delete, not a volume that lost its data."""
    vid = _ready_volume(d)
    _crash(d.driver, "delete.after_remove_image", lambda: d.driver.csi().delete(vid))
    assert not d.image(vid).exists()
    d.kind, d.path = "incomplete-delete", vid
    d.not_kinds = ["record-without-image"]
    d.keep(d.record(vid))


def _snapshot(d: Drift, vid: str) -> Any:
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=vid, name=f"snap-{vid}")
    return d.driver.csi().controller.CreateSnapshot(request, timeout=60)


def _snapshot_record(d: Drift) -> Path:
    (record,) = (d.driver.state_dir / "snapshots").glob("snap-*.json")
    return record


def _incomplete_snapshot(d: Drift) -> None:
    """kill -9 after CreateSnapshot made its "creating" snapshot record."""
    vid = _ready_volume(d)
    _crash(d.driver, "snapshot.after_record", lambda: _snapshot(d, vid))
    record = _snapshot_record(d)
    d.kind, d.path = "incomplete-snapshot", record.stem
    d.keep(record, d.record(vid), d.image(vid))


def _incomplete_snapshot_delete(d: Drift) -> None:
    """kill -9 after DeleteSnapshot marked its record "deleting"."""
    vid = _ready_volume(d)
    snap_id = _snapshot(d, vid).snapshot.snapshot_id
    request = csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id)
    _crash(d.driver, "delete_snapshot.after_mark",
           lambda: d.driver.csi().controller.DeleteSnapshot(request, timeout=60))
    record = _snapshot_record(d)
    d.kind, d.path = "incomplete-snapshot-delete", snap_id
    d.keep(record, d.record(vid), d.image(vid))


# scenario -> the kind of finding it must produce
SCENARIOS: dict[str, tuple[str, Callable[[Drift], None]]] = {
    "record-without-image": ("record-without-image", _record_without_image),
    "image-without-record": ("image-without-record", _image_without_record),
    "loop-not-staged": ("loop-not-staged", _loop_not_staged),
    "partial-image": ("partial-image", _partial_image),
    "incomplete-create": ("incomplete-create", _incomplete_create),
    "incomplete-delete": ("incomplete-delete", _incomplete_delete),
    "incomplete-delete-image-gone": ("incomplete-delete", _incomplete_delete_image_gone),
    "incomplete-snapshot": ("incomplete-snapshot", _incomplete_snapshot),
    "incomplete-snapshot-delete": ("incomplete-snapshot-delete", _incomplete_snapshot_delete),
    "stale-publication": ("stale-publication", _stale_publication),
    "unreadable-record": ("unreadable-record", _unreadable_record),
    "record-not-a-record": ("unreadable-record", _record_not_a_record),
}


@pytest.fixture
def drift_driver() -> Iterator[DriverProcess]:
    with running_driver(node_id="node-drift") as driver:
        yield driver


def _log_of_last_start(driver: DriverProcess) -> str:
    text = driver.log_path.read_text(errors="replace")
    return text[text.rindex("--- start "):]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_reconcile_reports_drift_and_deletes_nothing(drift_driver: DriverProcess,
                                                     scenario: str):
    kind, make = SCENARIOS[scenario]
    d = Drift(drift_driver)
    make(d)
    assert d.kind == kind
    if d.driver.alive():
        d.driver.stop()
    d.driver.start()  # start-up reconcile runs before Probe says ready

    pool = "" if kind == "unreadable-record" else "default"
    logged = f"reconcile: {kind} in pool {pool or '-'}: {d.path}"
    assert logged in _log_of_last_start(d.driver), d.driver.log_tail()
    findings = d.driver.pools_json()["findings"]
    assert isinstance(findings, list)
    assert [f for f in findings if f["kind"] == kind and f["path"] == d.path
            and f["pool"] == pool], findings
    for other in d.not_kinds:
        assert not [f for f in findings if f["kind"] == other], findings

    # Nothing was deleted, detached or rewritten.
    for path, content in d.files.items():
        assert Path(path).read_bytes() == content, f"{path} was changed or removed"
    for directory in d.dirs:
        assert os.path.isdir(directory), f"{directory} was removed"
    attached = set(loops_backed_by(d.driver.state_dir))
    for device, backing in d.loops.items():
        assert device in attached, f"{device} (backed by {backing}) was detached"


@pytest.fixture
def vanishing_disk() -> Iterator[tuple[Path, str]]:
    """One loop device standing in for a disk (400 MiB), which the test may detach.

    Teardown detaches it only if it is still the same device on the same image:
    once the test detached it, the number may belong to someone else.
    """
    base = Path(os.path.realpath(tempfile.mkdtemp(prefix="csiv", dir="/tmp")))
    image = base / "disk0.img"
    with open(image, "wb") as f:
        f.truncate(400 * MiB)
    device = loop.attach(str(image), direct_io=False)
    try:
        yield base, device
    finally:
        if device in loop.devices_backed_by(str(image)):
            loop.detach(device)
        shutil.rmtree(base, ignore_errors=True)


def test_reconcile_reports_a_vanished_disk_and_keeps_its_record(
    vanishing_disk: tuple[Path, str],
):
    """record-without-disk: a disk-volume pool's disk is unplugged while the driver is
    down; at start the volume's record is reported, kept, and nothing is wiped."""
    base, device = vanishing_disk

    def config(driver_base: Path) -> dict[str, object]:
        return {"restrict_paths": True, "pools": [
            {"name": "disks", "type": "disk", "mode": "volume",
             "selector": {"kernel": "loop*",
                          "attributes": {"loop/backing_file": f"{base}/disk*.img"}}},
            {"name": "default", "type": "image", "path": str(driver_base / "state/pools/d")},
        ]}

    with running_driver(node_id="node-drift", config=config) as driver:
        vol = driver.csi().create(f"pv-{base.name}", size=400 * MiB, kind="block",
                                  params={"pool": "disks"})
        record = driver.state_dir / "volumes" / f"{vol.volume_id}.json"
        kept = record.read_bytes()
        backing = json.loads(kept)["backing"]
        assert backing
        driver.stop()
        loop.detach(device)  # the disk is unplugged
        driver.start()

        logged = f"reconcile: record-without-disk in pool disks: {backing}"
        assert logged in _log_of_last_start(driver), driver.log_tail()
        findings = driver.pools_json()["findings"]
        assert [f for f in findings if f["kind"] == "record-without-disk"
                and f["pool"] == "disks" and f["path"] == backing], findings
        assert record.read_bytes() == kept, "the record was changed or removed"
        assert (base / "disk0.img").stat().st_size == 400 * MiB
