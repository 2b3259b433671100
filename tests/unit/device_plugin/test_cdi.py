"""CDI spec files: content, atomic replacement, rewrite on change, removal."""

from __future__ import annotations

import json
import os

from device_plugin.cdi import CdiWriter, write_atomically
from device_plugin.config import parse_yaml
from device_plugin.registry import Catalog
from tests.unit.device_plugin.records import drm_node

YAML = """
cdi: {{enabled: true, dir: {dir}, vendor: acme.io}}
resources:
  - name: gpu
    match:
      - {{subsystem: drm, kernel: "card*"}}
      - {{subsystem: drm, kernel: "renderD*"}}
    group_by: {{subsystem: pci}}
    permissions: rwm
    mounts: [{{host_path: /usr/lib/gpu, container_path: /opt/gpu, read_only: true}}]
    share: 2
  - name: plain
    match: [{{subsystem: misc}}]
    cdi: false
"""


def catalog(tmp_path):
    return Catalog(parse_yaml(YAML.format(dir=tmp_path)))


def test_spec_has_one_device_per_unit_with_nodes_and_mounts(tmp_path):
    cat = catalog(tmp_path)
    cat.publish_inventory((drm_node("card0"), drm_node("renderD128")))
    files = sorted(os.listdir(tmp_path))
    assert files == ["acme.io-gpu.json"]  # nothing for the resource with cdi: false
    spec = json.loads((tmp_path / "acme.io-gpu.json").read_text())
    assert spec["cdiVersion"] == "0.6.0"
    assert spec["kind"] == "acme.io/gpu"
    (device,) = spec["devices"]
    gpu = cat.resources()["hostkit.io/gpu"]
    base = gpu.units[0].id
    assert device["name"] == base
    assert device["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/dri/card0", "hostPath": "/dev/dri/card0", "permissions": "rwm"},
        {"path": "/dev/dri/renderD128", "hostPath": "/dev/dri/renderD128", "permissions": "rwm"},
    ]
    assert device["containerEdits"]["mounts"] == [
        {"hostPath": "/usr/lib/gpu", "containerPath": "/opt/gpu", "options": ["rbind", "ro"]}]
    # Both share copies name the same CDI device.
    ids = [u.id for u in gpu.snapshot().units]
    assert gpu.allocate(ids).cdi_devices == (f"acme.io/gpu={base}",)


def test_spec_is_rewritten_on_change_and_removed_at_close(tmp_path):
    cat = catalog(tmp_path)
    path = tmp_path / "acme.io-gpu.json"
    cat.publish_inventory((drm_node("card0"), drm_node("renderD128")))
    first_inode = path.stat().st_ino
    cat.publish_inventory((drm_node("card0"), drm_node("renderD128")))
    assert path.stat().st_ino == first_inode  # unchanged content: not rewritten
    cat.publish_inventory((drm_node("card0"), drm_node("renderD128"),
                           drm_node("card1", "0000:41:00.0")))
    assert len(json.loads(path.read_text())["devices"]) == 2
    assert path.stat().st_ino != first_inode  # replaced by rename, never edited in place
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    cat.close()
    assert os.listdir(tmp_path) == []


def test_spec_removed_when_resource_removed_by_reload(tmp_path):
    cat = catalog(tmp_path)
    cat.publish_inventory((drm_node("card0"),))
    assert (tmp_path / "acme.io-gpu.json").exists()
    smaller = parse_yaml(f"cdi: {{enabled: true, dir: {tmp_path}}}\nresources:\n"
                         "  - {name: plain, match: [{subsystem: misc}]}\n")
    assert cat.apply_config(smaller)
    assert not (tmp_path / "acme.io-gpu.json").exists()


def test_write_atomically_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    assert write_atomically(str(target), b"one")
    assert not write_atomically(str(target), b"one")

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", boom)
    try:
        write_atomically(str(target), b"two")
    except OSError:
        pass
    else:
        raise AssertionError("fsync failure must propagate")
    assert target.read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["x.json"]


def test_writer_remove_is_idempotent(tmp_path):
    config = parse_yaml(YAML.format(dir=tmp_path)).resources[0]
    writer = CdiWriter(str(tmp_path), "acme.io")
    writer.remove(config)
    writer.write(config, [])
    writer.remove(config)
    assert os.listdir(tmp_path) == []
