"""Every manifest renders and is valid Kubernetes, offline.

Rendered overlays and the source files (resources and examples) are validated
with kubernetes-validate's strict schemas (unknown fields are errors) against
the oldest Kubernetes version we support and the newest the package knows.
Kinds that come from CRDs (the snapshot API) have no schema there: they are
checked structurally against the fields of snapshot.storage.k8s.io/v1, and any
other kind without a schema fails the test rather than passing unvalidated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config  # type: ignore[import-untyped]
from yamllint import linter as yamllint_linter  # type: ignore[import-untyped]

from tests.deploy.manifests import (
    DAEMONSETS,
    DEFAULT_KUBELET_ROOT,
    OVERLAYS,
    ROOT,
    find,
    kustomize,
    load_all,
    overlay_root,
)

OLDEST_SUPPORTED = "1.34"
VERSIONS = (OLDEST_SUPPORTED, kubernetes_validate.latest_version())

CRD_KINDS = {"VolumeSnapshotClass", "VolumeSnapshot"}
KUSTOMIZE_FILES = {"kustomization.yaml"}


def _check_snapshot_kind(doc: dict[str, Any]) -> None:
    """Structural check of the snapshot.storage.k8s.io/v1 objects we ship."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    assert doc["apiVersion"] == "snapshot.storage.k8s.io/v1", where
    assert isinstance(doc.get("metadata", {}).get("name"), str), where
    if doc["kind"] == "VolumeSnapshotClass":
        assert set(doc) <= {"apiVersion", "kind", "metadata", "driver", "deletionPolicy",
                            "parameters"}, f"{where}: unknown fields {sorted(doc)}"
        assert isinstance(doc.get("driver"), str) and doc["driver"], f"{where}: driver"
        assert doc.get("deletionPolicy") in ("Delete", "Retain"), f"{where}: deletionPolicy"
        params = doc.get("parameters", {})
        assert all(isinstance(v, str) for v in params.values()), f"{where}: parameters"
    else:
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, where
        spec = doc["spec"]
        assert set(spec) <= {"source", "volumeSnapshotClassName"}, f"{where}: {sorted(spec)}"
        source = spec["source"]
        assert len(source) == 1 and set(source) <= {
            "persistentVolumeClaimName", "volumeSnapshotContentName"}, f"{where}: source"
        assert all(isinstance(v, str) and v for v in source.values()), f"{where}: source"


def _validate(doc: dict[str, Any], version: str) -> None:
    if doc["kind"] in CRD_KINDS:
        _check_snapshot_kind(doc)
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"no schema for {doc['kind']} {doc['apiVersion']} ({exc.message}); "
                    "add a structural check for it")
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                    f"{version}: {path}: {exc.message}")


def _source_resource_files() -> list[Path]:
    """Complete resources in the repo: kustomize resources lists plus examples."""
    files: list[Path] = []
    for kfile in DAEMONSETS.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kfile.read_text())
        for entry in spec.get("resources", []):
            path = (kfile.parent / entry).resolve()
            if path.is_file():
                files.append(path)
    files.extend(sorted((DAEMONSETS / "examples").glob("*.yaml")))
    return sorted(set(files))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_known_objects(rendered: dict[str, str], overlay: str) -> None:
    docs = load_all(rendered[overlay])
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("Namespace", "DaemonSet", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
                 "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "ConfigMap"):
        assert kind in kinds, f"{overlay}: no {kind} rendered"
    assert kinds.count("DaemonSet") == 2
    # The overlay's kubelet-root ConfigMap is local to kustomize, never applied.
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert "kubelet-root" not in names
    namespaced = [d for d in docs if d["kind"] in
                  ("DaemonSet", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                   "ResourceQuota")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"hostkit-system"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(rendered: dict[str, str], overlay: str, version: str) -> None:
    for doc in load_all(rendered[overlay]):
        _validate(doc, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_source_files_validate(version: str) -> None:
    files = _source_resource_files()
    assert any(f.parent.name == "examples" for f in files)
    assert len(files) >= 12
    for path in files:
        for doc in load_all(path.read_text()):
            _validate(doc, version)


def test_examples_cover_the_issue() -> None:
    docs = [d for f in sorted((DAEMONSETS / "examples").glob("*.yaml"))
            for d in load_all(f.read_text())]
    pods = [d for d in docs if d["kind"] == "Pod"]
    limits = [c.get("resources", {}).get("limits", {}) for p in pods
              for c in p["spec"]["containers"]]
    assert any(k.startswith("hostkit.io/") for lim in limits for k in lim), "extended resource"
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert any(p["spec"].get("volumeMode") == "Block" for p in pvcs), "raw block PVC"
    assert any(p["spec"].get("dataSource", {}).get("kind") == "VolumeSnapshot" for p in pvcs)
    assert any(d["kind"] == "VolumeSnapshot" for d in docs)
    volumes = [v for p in pods for v in p["spec"].get("volumes", [])]
    assert any("ephemeral" in v for v in volumes), "generic ephemeral volume"
    assert any(c.get("volumeDevices") for p in pods for c in p["spec"]["containers"])
    classes = {d["metadata"]["name"] for f in (
        DAEMONSETS / "base" / "csi" / "storageclasses.yaml",
        DAEMONSETS / "components" / "subvolumes" / "storageclasses.yaml",
    ) for d in load_all(f.read_text())}
    used = {p["spec"]["storageClassName"] for p in pvcs} | {
        v["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"]
        for v in volumes if "ephemeral" in v}
    assert used <= classes, f"examples use unknown StorageClasses {used - classes}"


def test_yamllint_clean() -> None:
    conf = yamllint_config.YamlLintConfig(file=str(ROOT / ".yamllint"))
    problems = []
    files = [*sorted(DAEMONSETS.rglob("*.yaml")), ROOT / ".yamllint", ROOT / ".hadolint.yaml"]
    assert len(files) > 20
    for path in files:
        for problem in yamllint_linter.run(path.read_text(), conf, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{problem.line}: {problem.message}")
    assert not problems, "\n".join(problems)


# The kubelet's device-plugin directory, the same under every root (k8s #68567).
FIXED_DEVICE_PLUGIN_DIR = f"{DEFAULT_KUBELET_ROOT}/device-plugins"


def _root_free(text: str, root: str) -> str:
    return text.replace(FIXED_DEVICE_PLUGIN_DIR, "<DP>").replace(root, "<ROOT>")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_moves_every_kubelet_path(rendered: dict[str, str], overlay: str) -> None:
    root = overlay_root(overlay)
    default = _root_free(rendered["default"], DEFAULT_KUBELET_ROOT)
    moved = _root_free(rendered[overlay], root)
    assert overlay == "default" or root != DEFAULT_KUBELET_ROOT
    # Nothing still points at the default root, and the overlay differs from
    # the default in the root alone.
    assert "/var/lib/kubelet" not in moved.replace("<ROOT>", "")
    assert moved == default
    # CSI: KUBELET_ROOT twice, pods/plugins mountPaths, four hostPaths (8); the device
    # plugin's directory (--kubelet-dir, hostPath, mountPath) stays where it is.
    assert default.count("<ROOT>") == 8
    assert default.count("<DP>") == moved.count("<DP>") == 3


def test_kubelet_root_component_takes_any_root(tmp_path: Path) -> None:
    root = "/srv/k8s node/kubelet"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = Path("..") / Path(*[".."] * (len(overlay.parts) - 1)) / DAEMONSETS.relative_to("/")
    (overlay / "kubelet-root.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubelet-root",
                     "annotations": {"config.kubernetes.io/local-config": "true"}},
        "data": {"path": root},
    }))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(rel / "base"), "kubelet-root.yaml"],
        "components": [str(rel / "components" / "kubelet-root")],
    }))
    text = kustomize(overlay)
    base = kustomize(DAEMONSETS / "base")
    assert "/var/lib/kubelet" not in _root_free(text, root)
    assert _root_free(text, root) == _root_free(base, DEFAULT_KUBELET_ROOT)


def _with_component(tmp_path: Path, component: str) -> list[dict[str, Any]]:
    """The default overlay plus one optional component, rendered and validated."""
    overlay = tmp_path / component
    overlay.mkdir()
    rel = Path("..") / Path(*[".."] * (len(overlay.parts) - 1)) / DAEMONSETS.relative_to("/")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(rel / "overlays" / "default")],
        "components": [str(rel / "components" / component)],
    }))
    docs = load_all(kustomize(overlay))
    for doc in docs:
        _validate(doc, VERSIONS[-1])
    return docs


def test_without_udevd_component(tmp_path: Path) -> None:
    docs = _with_component(tmp_path, "without-udevd")
    daemonsets = [d for d in docs if d["kind"] == "DaemonSet"]
    assert len(daemonsets) == 2
    for ds in daemonsets:
        spec = ds["spec"]["template"]["spec"]
        assert spec["hostNetwork"] is False
        assert "/run/udev" not in yaml.safe_dump(ds)
        assert all(v["name"] != "run-udev" for v in spec["volumes"])
        # Everything else is still there.
        assert any(v["name"] == "dev" for v in spec["volumes"])


def test_without_snapshots_component(tmp_path: Path, default_docs: list[dict[str, Any]]) -> None:
    docs = _with_component(tmp_path, "without-snapshots")
    assert not [d for d in docs if d["kind"] == "VolumeSnapshotClass"]
    assert not [d for d in docs if "snapshotter" in d["metadata"]["name"]]
    csi = find(docs, "DaemonSet", "hostkit-csi-node")
    names = [c["name"] for c in csi["spec"]["template"]["spec"]["containers"]]
    assert names == ["csi-driver", "node-driver-registrar", "csi-provisioner", "csi-resizer",
                     "liveness-probe"]
    # Nothing else changed.
    assert len(docs) == len(default_docs) - 3


def test_subvolumes_component(tmp_path: Path, default_docs: list[dict[str, Any]]) -> None:
    import csi_driver.config

    docs = _with_component(tmp_path, "subvolumes")
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StorageClass"}
    assert {"hostkit-subvol", "hostkit-subvol-nocow"} <= set(classes)
    configs = [d for d in docs if d["kind"] == "ConfigMap"
               and d["metadata"]["name"].startswith("hostkit-csi-config")]
    assert len(configs) == 1
    config = csi_driver.config.parse_config(yaml.safe_load(configs[0]["data"]["config.yaml"]))
    kinds = {p.name: p.type for p in config.pools}
    assert kinds == {"default": "image", "subvol": "subvolume"}
    subvol = config.pool("subvol")
    assert subvol is not None and subvol.path.startswith("/var/lib/hostkit-csi/"), \
        "only the state dir is mounted into the driver"
    for sc in classes.values():
        assert sc["parameters"]["pool"] in kinds
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert set(sc["parameters"]) <= {"pool", "csi.storage.k8s.io/fstype", "fsType",
                                         "thin", "nocow"}
    assert classes["hostkit-subvol-nocow"]["parameters"]["nocow"] == "true"
    # The DaemonSet mounts the config that names the subvolume pool.
    assert len(docs) == len(default_docs) + 2


def test_every_yaml_under_daemonsets_is_used() -> None:
    """A manifest nobody references would be neither deployed nor validated."""
    referenced: set[Path] = set()
    for kfile in DAEMONSETS.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kfile.read_text())
        entries = list(spec.get("resources", []))
        entries += [p["path"] for p in spec.get("patches", []) if "path" in p]
        for gen in spec.get("configMapGenerator", []):
            entries += [re.sub(r"^[^=]*=", "", f) for f in gen.get("files", [])]
        referenced |= {(kfile.parent / e).resolve() for e in entries}
    for path in DAEMONSETS.rglob("*.yaml"):
        if path.name in KUSTOMIZE_FILES or "examples" in path.relative_to(DAEMONSETS).parts:
            continue
        assert path.resolve() in referenced, f"{path.relative_to(ROOT)} is not referenced"
