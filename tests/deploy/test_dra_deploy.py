"""The DRA variant of the deployment: the component, its RBAC, the examples and the
docs that describe them, checked offline (the real API server accepts them in
tests/e2e/test_dra_manifests.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from device_plugin.config import load_config
from device_plugin.slices import PUBLISHED_ATTRIBUTES
from tests.deploy.manifests import (
    DAEMONSETS,
    ROOT,
    container,
    expand,
    find,
    kustomize,
    load_all,
)

DRA_VERSIONS = ("1.34", kubernetes_validate.latest_version())
EXAMPLES = sorted((DAEMONSETS / "examples" / "dra").glob("*.yaml"))
COMPONENT = DAEMONSETS / "components" / "dra"


def _render(tmp_path: Path, root: str | None = None) -> list[dict[str, Any]]:
    """Base + kubelet-root (default or ``root``) + the DRA component."""
    overlay = tmp_path / "dra"
    overlay.mkdir()
    rel = Path("..") / Path(*[".."] * (len(overlay.parts) - 1)) / DAEMONSETS.relative_to("/")
    kubelet_root = yaml.safe_load((DAEMONSETS / "overlays/default/kubelet-root.yaml").read_text())
    if root is not None:
        kubelet_root["data"]["path"] = root
    (overlay / "kubelet-root.yaml").write_text(yaml.safe_dump(kubelet_root))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(rel / "base"), "kubelet-root.yaml"],
        "components": [str(rel / "components" / "dra"),
                       str(rel / "components" / "kubelet-root")],
    }))
    return load_all(kustomize(overlay))


@pytest.mark.parametrize("root", ["/var/lib/kubelet", "/srv/k0s/kubelet"])
def test_component_mounts_the_kubelet_dirs_under_the_root_and_validates(tmp_path, root):
    docs = _render(tmp_path, root)
    for doc in docs:
        if doc["apiVersion"].startswith("snapshot.storage.k8s.io/"):
            continue  # a CRD kind, checked structurally by test_manifests
        for version in DRA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    dp = find(docs, "DaemonSet", "hostkit-device-plugin")
    spec = dp["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True
    cont = container(dp, "device-plugin")
    mounts = {m["name"]: m["mountPath"] for m in cont["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    for name, suffix in (("kubelet-plugins", "plugins"), ("plugins-registry", "plugins_registry"),
                         ("pod-resources", "pod-resources")):
        assert mounts[name] == volumes[name] == f"{root}/{suffix}", name
    # The kubelet keeps its device-plugin socket at this path whatever its root.
    assert mounts["device-plugins"] == volumes["device-plugins"] == \
        "/var/lib/kubelet/device-plugins"
    args = dict(a.split("=", 1) for a in cont["args"][1:])
    assert args["--kubelet-dir"] == "/var/lib/kubelet/device-plugins"
    assert expand(cont, args["--kubelet-root"]) == root
    assert expand(cont, args["--pod-resources-socket"]) == f"{root}/pod-resources/kubelet.sock"
    assert args["--node-name"] == "$(NODE_NAME)"
    others = yaml.safe_dump(dp).replace("/var/lib/kubelet/device-plugins", "")
    assert "/var/lib/kubelet" not in others or root == "/var/lib/kubelet"


def test_every_flag_of_the_dra_daemonset_exists(tmp_path):
    cont = container(find(_render(tmp_path), "DaemonSet", "hostkit-device-plugin"),
                     "device-plugin")
    proc = subprocess.run([sys.executable, "-m", "device_plugin", "serve", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in (a.split("=", 1)[0] for a in cont["args"][1:]):
        assert flag in proc.stdout, flag


def test_rbac_is_what_the_driver_does_and_nothing_more(tmp_path):
    docs = _render(tmp_path)
    role = find(docs, "ClusterRole", "hostkit-device-plugin-dra")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"])
             for r in role["rules"]}
    assert rules == {
        (("resource.k8s.io",), ("resourceslices",)):
            sorted(["list", "watch", "create", "update", "delete"]),
        (("resource.k8s.io",), ("resourceclaims",)): ["get"],
        (("",), ("nodes",)): ["get"],
    }
    binding = find(docs, "ClusterRoleBinding", "hostkit-device-plugin-dra")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "hostkit-device-plugin",
                                    "namespace": "hostkit-system"}]
    policy = find(docs, "ValidatingAdmissionPolicy", "hostkit-device-plugin-own-slices")
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:hostkit-system:hostkit-device-plugin" in condition
    assert find(docs, "ValidatingAdmissionPolicyBinding",
                "hostkit-device-plugin-own-slices")["spec"]["validationActions"] == ["Deny"]


def test_dra_examples_validate_and_cover_the_issue():
    docs = [d for p in EXAMPLES for d in load_all(p.read_text())]
    for doc in docs:
        for version in DRA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("DeviceClass") == 3
    assert kinds.count("ResourceClaimTemplate") == kinds.count("Pod") == 3
    classes = {d["metadata"]["name"] for d in docs if d["kind"] == "DeviceClass"}
    templates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ResourceClaimTemplate"}
    for pod in (d for d in docs if d["kind"] == "Pod"):
        [claim] = pod["spec"]["resourceClaims"]
        template = templates[claim["resourceClaimTemplateName"]]
        [request] = template["spec"]["spec"]["devices"]["requests"]
        assert request["exactly"]["deviceClassName"] in classes
        assert pod["spec"]["containers"][0]["resources"]["claims"] == [{"name": claim["name"]}]
    names = {d["metadata"]["name"] for d in docs}
    assert {"hostkit-usb-serial-ftdi", "hostkit-gpu-nvidia", "serial-console",
            "gpu-user"} <= names


def test_cel_selectors_use_only_attributes_we_publish():
    text = "\n".join(p.read_text() for p in EXAMPLES)
    text += (ROOT / "docs" / "operator-guide.md").read_text()
    used = set(re.findall(r'device\.attributes\["hostkit\.io"\]\.(\w+)', text))
    used |= set(re.findall(r'"(\w+)" in device\.attributes\["hostkit\.io"\]', text))
    assert used, "no attribute found"
    assert used <= set(PUBLISHED_ATTRIBUTES), used - set(PUBLISHED_ATTRIBUTES)
    capacities = set(re.findall(r'device\.capacity\["hostkit\.io"\]\.(\w+)', text))
    assert capacities <= {"size"}


def test_dra_loop_example_marks_its_resource_for_dra():
    config = load_config(ROOT / "examples" / "device-plugin" / "dra-loop-devices.yaml")
    assert [r.name for r in config.dra_resources()] == ["hostkit.io/loop"]
    assert config.dra.driver == "hostkit.io" and config.cdi.enabled


def test_guide_dra_example_loads_with_the_code():
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if b.startswith("dra:")]
    assert len(blocks) == 1
    from device_plugin.config import parse_yaml

    config = parse_yaml(blocks[0], "docs/operator-guide.md")
    assert [r.name for r in config.dra_resources()] == ["hostkit.io/ftdi-serial"]


def test_guide_lists_every_published_attribute():
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    missing = [a for a in PUBLISHED_ATTRIBUTES if f"`{a}`" not in guide]
    assert not missing, missing
