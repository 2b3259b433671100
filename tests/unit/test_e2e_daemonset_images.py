"""The pure parts of the end-to-end tier's DaemonSet run: image archives, cache keys,
the node overlay's patches.  (The real build and cluster run in tests/e2e.)"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import daemonset_images, node_overlay, product_image


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            if handle is not None:
                out[m.name] = handle.read()
        return out


def test_shared_versions_read_the_table(tmp_path: Path) -> None:
    text = (
        "| binary | version | source |\n|---|---|---|\n"
        "| kubelet, kubectl | v1.36.2 | openshift |\n"
        "| csi-provisioner | v6.3.0 | kubernetes-csi/external-provisioner |\n"
        "| csi-snapshotter, snapshot-controller | v8.6.0 | external-snapshotter |\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(text)
    versions = daemonset_images.shared_versions(readme)
    assert versions["csi-provisioner"] == "v6.3.0"
    assert versions["snapshot-controller"] == "v8.6.0"
    assert versions["kubectl"] == "v1.36.2"


def test_layout_is_a_valid_oci_archive(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"#!/bin/sh\necho hi\n")
    archive = daemonset_images.write_layout(
        tmp_path / "out.tar", {"registry.example/sig/tool:v1": (binary, "tool")})
    files = _members(archive)
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "registry.example/sig/tool:v1"
    manifest = json.loads(files["blobs/sha256/" + entry["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["config"]["Entrypoint"] == ["/tool"]
    (layer,) = manifest["layers"]
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]
    with tarfile.open(fileobj=io.BytesIO(files["blobs/sha256/" + layer["digest"][7:]])) as t:
        member = t.getmember("tool")
        assert member.mode == 0o755 and member.uid == 0
        assert t.extractfile(member).read() == binary.read_bytes()  # type: ignore[union-attr]


def _csi_docs(tag: str) -> list[dict[str, Any]]:
    containers = [{"name": "csi-driver", "image": "ghcr.io/hostkit/hostkit:0.1.0"}]
    containers += [{"name": c, "image": f"registry.k8s.io/sig-storage/{b}:{tag}"}
                   for c, b in daemonset_images.SIDECARS.items()]
    return [{"kind": "DaemonSet", "spec": {"template": {"spec": {"containers": containers}}}}]


def test_sidecar_tag_must_be_the_shared_release(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTKIT_E2E_IMAGE_CACHE", str(tmp_path / "cache"))
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"| {b} | v1.0.0 | x |\n"
                              for b in daemonset_images.SIDECARS.values()))
    binary = tmp_path / "bin"
    binary.write_bytes(b"x")
    with pytest.raises(AssertionError, match="shared binary is"):
        daemonset_images.sidecar_archive(_csi_docs("v0.9.0"), lambda _: str(binary), readme)
    archive = daemonset_images.sidecar_archive(_csi_docs("v1.0.0"), lambda _: str(binary),
                                               readme)
    names = {m["annotations"]["io.containerd.image.name"]
             for m in json.loads(_members(archive)["index.json"])["manifests"]}
    assert names == {f"registry.k8s.io/sig-storage/{b}:v1.0.0"
                     for b in daemonset_images.SIDECARS.values()}


def _context(root: Path) -> None:
    (root / ".dockerignore").write_text("*\n!pyproject.toml\n!pkg\n**/__pycache__\n")
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / "pyproject.toml").write_text("[project]\n")
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "other.txt").write_text("not in the context\n")


def test_image_key_follows_the_build_context_only(tmp_path: Path) -> None:
    _context(tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in product_image.context_files(tmp_path)}
    assert files == {"pyproject.toml", "pkg/a.py"}
    key = product_image.image_key("base", tmp_path)
    (tmp_path / "other.txt").write_text("changed\n")
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1")
    assert product_image.image_key("base", tmp_path) == key
    (tmp_path / "pkg" / "a.py").write_text("A = 2\n")
    assert product_image.image_key("base", tmp_path) != key
    assert product_image.image_key("other-base", tmp_path) != product_image.image_key(
        "base", tmp_path)


def test_pushed_archive_gets_the_containerd_name(tmp_path: Path) -> None:
    src = tmp_path / "pushed.tar"
    with tarfile.open(src, "w") as tar:
        for name, data in (("oci-layout", b"{}"), ("index.json", json.dumps(
                {"manifests": [{"digest": "sha256:0", "annotations": {
                    "org.opencontainers.image.ref.name": "ghcr.io/x/y:1"}}]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = product_image._named_for_containerd(src, "ghcr.io/x/y:1", tmp_path / "named.tar")
    files = _members(out)
    assert files["oci-layout"] == b"{}"
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "ghcr.io/x/y:1",
                                    "io.containerd.image.name": "ghcr.io/x/y:1"}


def test_overlay_patches_ports_paths_and_api() -> None:
    daemonset = {"spec": {"template": {"spec": {
        "hostNetwork": False,
        "volumes": [{"name": "state", "hostPath": {"path": "/var/lib/hostkit-csi"}},
                    {"name": "dev", "hostPath": {"path": "/dev"}}],
        "containers": [
            {"name": "driver", "args": ["--endpoint=unix:///csi/csi.sock",
                                        "--metrics-address=:9501"],
             "ports": [{"name": "metrics", "containerPort": 9501}]},
            {"name": "sidecar", "args": ["--http-endpoint=:9808"],
             "volumeMounts": [{"mountPath": node_overlay.TOKEN_MOUNT}]},
        ]}}}}
    ops = node_overlay._ops(daemonset, node_ip="10.1.2.3", ports={9501: 40001, 9808: 40002},
                            paths={"/var/lib/hostkit-csi": Path("/tmp/run/state")},
                            api=("127.0.0.1", 6443))
    by_path = {op["path"]: op for op in ops}
    base = "/spec/template/spec"
    assert by_path[f"{base}/hostNetwork"]["value"] is True
    assert by_path[f"{base}/volumes/0/hostPath/path"]["value"] == "/tmp/run/state"
    assert f"{base}/volumes/1/hostPath/path" not in by_path
    assert by_path[f"{base}/containers/0/args/1"]["value"] == "--metrics-address=10.1.2.3:40001"
    assert f"{base}/containers/0/args/0" not in by_path
    assert by_path[f"{base}/containers/0/ports/0/containerPort"]["value"] == 40001
    assert by_path[f"{base}/containers/1/args/0"]["value"] == "--http-endpoint=10.1.2.3:40002"
    assert by_path[f"{base}/containers/1/env"]["value"] == [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]
    assert f"{base}/containers/0/env" not in by_path
