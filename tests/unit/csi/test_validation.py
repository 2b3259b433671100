"""VolumeService input rules that need no kernel: paths, parameters, sizes, topology."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from csi_driver.config import parse_config
from csi_driver.pools.imagefile import ImagePool
from csi_driver.provisioning import Provisioner
from csi_driver.store import Store
from csi_driver.volumes import (
    TOPOLOGY_KEY,
    Capability,
    CreateRequest,
    VolumeService,
)
from plugin_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[3]
MOUNT = Capability(block=False, access_mode="SINGLE_NODE_WRITER")
BLOCK = Capability(block=True, access_mode="SINGLE_NODE_WRITER")


@pytest.fixture
def service(tmp_path):
    config = parse_config({"kubelet_root": "/var/lib/kubelet", "pools": [
        {"name": "a", "type": "image", "path": str(tmp_path / "a")},
        {"name": "b", "type": "image", "path": str(tmp_path / "b"), "thin": False,
         "default_fs_type": "xfs"},
    ]}, str(tmp_path))
    pools = [ImagePool(p) for p in config.pools]
    for p in pools:
        p.start()
    return Provisioner(VolumeService(config, "node-1", Store(str(tmp_path / "state")), pools))


@pytest.mark.parametrize("path", [
    "relative/path", "/etc/passwd", "/var/lib/kubelet", "/var/lib/kubelet/../x",
    "/var/lib/kubeletx/pods", "/var/lib/kubelet/pods/\0x", "",
])
def test_paths_outside_the_kubelet_root_are_refused(service, path):
    with pytest.raises(InvalidArgument):
        service.volumes.check_path(path, "target_path")


def test_symlinks_out_of_the_kubelet_root_are_refused(tmp_path):
    root = tmp_path / "kubelet"
    (root / "pods").mkdir(parents=True)
    (root / "pods" / "escape").symlink_to("/etc")
    config = parse_config({"kubelet_root": str(root), "pools": [
        {"name": "a", "type": "image", "path": str(tmp_path / "a")}]}, str(tmp_path))
    svc = VolumeService(config, "n", Store(str(tmp_path / "s")), [ImagePool(config.pools[0])])
    with pytest.raises(InvalidArgument, match="symlink"):
        svc.check_path(str(root / "pods/escape/mount"), "target_path")
    assert svc.check_path(str(root / "pods/u/mount"), "t") == str(root / "pods/u/mount")


def test_paths_under_the_kubelet_root_are_normalised(service):
    assert service.volumes.check_path("/var/lib/kubelet/pods//u/mount/", "t") == \
        "/var/lib/kubelet/pods/u/mount"


def test_parameters(service):
    place = service.placement({}, [MOUNT])
    assert (place.pool.name, place.fs_type, place.thin) == ("a", "ext4", True)
    place = service.placement({"pool": "b"}, [MOUNT])
    assert (place.fs_type, place.thin) == ("xfs", False)
    place = service.placement({"pool": "b", "thin": "true", "fsType": "btrfs"}, [MOUNT])
    assert (place.fs_type, place.thin) == ("btrfs", True)
    assert service.placement({"csi.storage.k8s.io/fstype": "xfs"}, [MOUNT]).fs_type == "xfs"
    assert service.placement({}, [BLOCK]).fs_type == ""
    service.placement({"csi.storage.k8s.io/pvc/name": "x",
                       "csi.storage.k8s.io/pvc/namespace": "y",
                       "csi.storage.k8s.io/pv/name": "z"}, [MOUNT])
    for params, word in (({"color": "red"}, "color"), ({"pool": "zz"}, "zz"),
                         ({"thin": "maybe"}, "thin"), ({"fsType": "ntfs"}, "ntfs")):
        with pytest.raises(InvalidArgument, match=word):
            service.placement(params, [MOUNT])
    with pytest.raises(InvalidArgument):
        service.placement({"fsType": "xfs"}, [Capability(False, "SINGLE_NODE_WRITER", "ext4")])


def test_sizes(service):
    assert service._size(0, 0, "ext4") == 1 << 30
    assert service._size(0, 5 * MiB, "ext4") == 5 * MiB
    assert service._size(MiB + 1, 0, "ext4") == MiB + 4096
    assert service._size(0, 0, "xfs") == 1 << 30
    with pytest.raises(OutOfRange):
        service._size(100 * MiB, 0, "xfs")
    with pytest.raises(OutOfRange):
        service._size(MiB + 1, MiB + 2, "ext4")
    with pytest.raises(OutOfRange):
        service._size(2 * MiB, MiB, "ext4")
    with pytest.raises(OutOfRange):
        service._size(100, 0, "ext4")
    assert service._size(1, 0, "") == 4096


def test_create_checks_before_touching_anything(service):
    with pytest.raises(InvalidArgument):
        service.create_volume(CreateRequest(name="", capabilities=(MOUNT,)))
    with pytest.raises(InvalidArgument, match="access mode"):
        service.create_volume(CreateRequest(
            name="v", capabilities=(Capability(False, "MULTI_NODE_MULTI_WRITER"),)))
    with pytest.raises(ResourceExhausted, match="topology"):
        service.create_volume(CreateRequest(
            name="v", capabilities=(MOUNT,), required_bytes=MiB,
            requisite=({TOPOLOGY_KEY: "node-2"},)))
    with pytest.raises(NotFound):
        service.create_volume(CreateRequest(
            name="v", capabilities=(MOUNT,), required_bytes=MiB,
            source_snapshot="snap-" + "0" * 32))
    with pytest.raises(ResourceExhausted, match="cannot hold"):
        service.create_volume(CreateRequest(
            name="v", capabilities=(BLOCK,), required_bytes=1 << 60,
            parameters={"pool": "b"}))
    assert service.store.volumes() == []


def test_unknown_ids_are_not_found_and_delete_is_ok(service):
    for bad in ("x", "vol-../../etc", "../" * 10):
        with pytest.raises(NotFound):
            service.get_volume(bad)
        service.delete_volume(bad)


GRPC_FREE = ["config", "store", "locks", "volumes", "snapshots", "reconcile", "faults",
             "metrics", "loop", "mounts", "filesystems", "disks", "pools/base",
             "pools/imagefile", "pools/disk", "pools/__init__"]


@pytest.mark.parametrize("module", GRPC_FREE)
def test_domain_modules_do_not_import_grpc_or_stubs(module):
    tree = ast.parse((ROOT / "csi_driver" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            assert not name.startswith("grpc") and "_proto" not in name and \
                not name.startswith("csi_driver.api"), f"{module} imports {name}"


def test_copies_stay_in_their_source_pool_and_default_to_its_size(service):
    from csi_driver.snapshots import SnapshotService

    snaps = SnapshotService(service.volumes)
    src = service.create_volume(CreateRequest(
        name="src", capabilities=(BLOCK,), required_bytes=3 * MiB, parameters={"pool": "b"}))
    snap = snaps.create_snapshot("s1", src.id, {})
    assert snap.pool == "b" and snap.size_bytes == 3 * MiB
    assert snaps.create_snapshot("s1", src.id, {}).id == snap.id
    restored = service.create_volume(CreateRequest(
        name="r", capabilities=(BLOCK,), source_snapshot=snap.id))
    assert (restored.pool, restored.capacity_bytes, restored.thin) == ("b", 3 * MiB, False)
    clone = service.create_volume(CreateRequest(
        name="c", capabilities=(BLOCK,), source_volume=src.id, required_bytes=5 * MiB))
    assert (clone.pool, clone.capacity_bytes) == ("b", 5 * MiB)
    with pytest.raises(OutOfRange):
        service.create_volume(CreateRequest(
            name="small", capabilities=(BLOCK,), source_snapshot=snap.id, required_bytes=MiB))
    with pytest.raises(InvalidArgument, match="same pool"):
        service.create_volume(CreateRequest(
            name="elsewhere", capabilities=(BLOCK,), source_snapshot=snap.id,
            parameters={"pool": "a"}))
    service.delete_volume(src.id)
    assert snaps.get_snapshot(snap.id).source_volume == src.id  # survives its source
    for vid in (restored.id, clone.id):
        service.delete_volume(vid)
    snaps.delete_snapshot(snap.id)
    snaps.delete_snapshot(snap.id)
    assert service.store.volumes() == [] and service.store.snapshots() == []


def test_requests_before_the_pools_are_ready_are_unavailable(tmp_path):
    from plugin_runtime.errors import Unavailable

    config = parse_config({"pools": [{"name": "a", "type": "image",
                                      "path": str(tmp_path / "a")}]}, str(tmp_path))
    pool = ImagePool(config.pools[0])  # not started
    svc = Provisioner(VolumeService(config, "n", Store(str(tmp_path / "s")), [pool]))
    assert not svc.volumes.probe()
    with pytest.raises(Unavailable, match="pool a is not ready yet"):
        svc.create_volume(CreateRequest(name="v", capabilities=(BLOCK,), required_bytes=MiB))
    cap, _ = svc.get_capacity({}, [], None)
    assert cap is None
    pool.start()
    assert svc.volumes.probe()
    assert svc.create_volume(CreateRequest(name="v", capabilities=(BLOCK,),
                                           required_bytes=MiB)).capacity_bytes == MiB


def test_a_pool_that_failed_to_start_says_why_and_the_others_serve(tmp_path):
    """A failed start is no "starting" state: FAILED_PRECONDITION with the pool's
    problem, while the healthy pool serves and Probe says ready."""
    (tmp_path / "file").write_text("")
    config = parse_config({"pools": [
        {"name": "good", "type": "image", "path": str(tmp_path / "good")},
        {"name": "bad", "type": "image", "path": str(tmp_path / "file" / "bad")},
    ]}, str(tmp_path))
    good, bad = ImagePool(config.pools[0]), ImagePool(config.pools[1])
    volumes = VolumeService(config, "n", Store(str(tmp_path / "s")), [good, bad])
    svc = Provisioner(volumes)
    good.start()
    assert not volumes.probe()  # "bad" has not started yet
    with pytest.raises(FailedPrecondition) as failed:
        bad.start()
    assert not bad.ready and bad.describe() == {"problem": bad.problem}
    assert f"{tmp_path / 'file' / 'bad'} of image pool bad: Not a directory" in bad.problem
    with pytest.raises(FailedPrecondition) as refused:
        svc.create_volume(CreateRequest(name="v", capabilities=(BLOCK,), required_bytes=MiB,
                                        parameters={"pool": "bad"}))
    assert str(refused.value).startswith("pool bad failed to start")
    assert str(refused.value).endswith(str(failed.value))
    assert volumes.probe()
    vol = svc.create_volume(CreateRequest(name="w", capabilities=(BLOCK,),
                                          required_bytes=MiB, parameters={"pool": "good"}))
    assert vol.pool == "good"
    good.stop()
    good.problem = "gone"  # what a failed start of the last serving pool leaves
    condition = volumes.condition(vol)  # ControllerGetVolume, ListVolumes
    assert condition.abnormal and condition.message == (
        "pool good failed to start and serves no volumes until the driver restarts: gone")
    with pytest.raises(FailedPrecondition, match="no pool can serve volumes: pool good "
                       "failed to start: gone; pool bad failed to start: cannot create"):
        volumes.probe()
