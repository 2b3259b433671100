"""The names and paths that must agree between the manifests and the code.

Driver name, socket paths, registration path, resource domain, image tag and
versions, read from the rendered manifests and compared with the package
(csi_driver.DRIVER_NAME, the __version__s, pyproject.toml).  The shipped
configs are loaded with the code's config loaders, and every flag the
DaemonSets pass is checked against ``serve --help``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

import csi_driver
import csi_driver.config
import csi_driver.volumes
import device_plugin
import device_plugin.cli
import device_plugin.config
from tests.deploy.manifests import (
    DAEMONSETS,
    DEFAULT_KUBELET_ROOT,
    OVERLAYS,
    ROOT,
    arg,
    container,
    expand,
    find,
    load_all,
    mount,
    overlay_root,
    volume,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"ghcr.io/hostkit/hostkit:{VERSION}"
DOMAIN = "hostkit.io"
SOCKET_IN_POD = "/csi/csi.sock"
STATE_DIR = "/var/lib/hostkit-csi"
SIDECARS = {
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
}
API_SIDECARS = {"csi-provisioner", "csi-snapshotter", "csi-resizer"}
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _config(docs: list[dict[str, Any]], prefix: str) -> str:
    maps = [d for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)]
    assert len(maps) == 1, f"one ConfigMap {prefix}*"
    return str(maps[0]["data"]["config.yaml"])


def test_versions_agree() -> None:
    assert VERSION == csi_driver.__version__ == device_plugin.__version__
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{VERSION}"' in dockerfile
    assert f"hostkit=={VERSION}" in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images(rendered: dict[str, str], overlay: str) -> None:
    docs = load_all(rendered[overlay])
    dp = find(docs, "DaemonSet", "hostkit-device-plugin")
    csi = find(docs, "DaemonSet", "hostkit-csi-node")
    assert container(dp, "device-plugin")["image"] == IMAGE
    assert container(csi, "csi-driver")["image"] == IMAGE
    names = [c["name"] for c in csi["spec"]["template"]["spec"]["containers"]]
    assert sorted(names) == sorted(["csi-driver", *SIDECARS])
    for name, image in SIDECARS.items():
        assert container(csi, name)["image"] == image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_driver_name_and_sockets(rendered: dict[str, str], overlay: str) -> None:
    docs = load_all(rendered[overlay])
    root = overlay_root(overlay)
    name = csi_driver.DRIVER_NAME
    assert find(docs, "CSIDriver")["metadata"]["name"] == name
    classes = [d for d in docs if d["kind"] == "StorageClass"]
    assert {c["metadata"]["name"] for c in classes} == {"hostkit-ext4", "hostkit-xfs",
                                                        "hostkit-block"}
    assert {c["provisioner"] for c in classes} == {name}
    assert find(docs, "VolumeSnapshotClass")["driver"] == name

    csi = find(docs, "DaemonSet", "hostkit-csi-node")
    driver = container(csi, "csi-driver")
    assert arg(driver, "--endpoint") == f"unix://{SOCKET_IN_POD}"
    socket_dir = volume(csi, "socket-dir")["hostPath"]["path"]
    assert socket_dir == f"{root}/plugins/{name}"
    registrar = container(csi, "node-driver-registrar")
    assert expand(registrar, arg(registrar, "--kubelet-registration-path")) == (
        f"{socket_dir}/{os.path.basename(SOCKET_IN_POD)}")
    assert volume(csi, "registration-dir")["hostPath"]["path"] == f"{root}/plugins_registry"
    assert mount(registrar, "registration-dir")["mountPath"] == "/registration"
    for cont in csi["spec"]["template"]["spec"]["containers"]:
        assert mount(cont, "socket-dir")["mountPath"] == os.path.dirname(SOCKET_IN_POD)
        if cont["name"] != "csi-driver":
            assert arg(cont, "--csi-address") == SOCKET_IN_POD


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_csi_node_paths_and_propagation(rendered: dict[str, str], overlay: str) -> None:
    docs = load_all(rendered[overlay])
    root = overlay_root(overlay)
    csi = find(docs, "DaemonSet", "hostkit-csi-node")
    driver = container(csi, "csi-driver")
    assert expand(driver, arg(driver, "--kubelet-root")) == root
    assert arg(driver, "--node-id") == "$(NODE_NAME)"
    for vol, path in (("pods-dir", f"{root}/pods"), ("plugins-dir", f"{root}/plugins")):
        assert volume(csi, vol)["hostPath"]["path"] == path
        m = mount(driver, vol)
        # The kubelet hands the driver host paths: the container must see
        # them at the same place, and its mounts must propagate back.
        assert m["mountPath"] == path
        assert m["mountPropagation"] == "Bidirectional"
    state = volume(csi, "state-dir")["hostPath"]
    assert state == {"path": STATE_DIR, "type": "DirectoryOrCreate"}
    assert arg(driver, "--state-dir") == STATE_DIR == mount(driver, "state-dir")["mountPath"]
    assert driver["securityContext"]["privileged"] is True
    assert arg(driver, "--metrics-address") == ":9501"
    probe = driver["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 9808
    assert arg(container(csi, "liveness-probe"), "--http-endpoint") == ":9808"
    config_dir = mount(driver, "config")["mountPath"]
    assert os.path.dirname(arg(driver, "--config")) == config_dir
    assert "subPath" not in mount(driver, "config")


def test_sidecar_modes(default_docs: list[dict[str, Any]]) -> None:
    csi = find(default_docs, "DaemonSet", "hostkit-csi-node")
    prov = container(csi, "csi-provisioner")
    for flag, value in (("--node-deployment", "true"), ("--enable-capacity", "true"),
                        ("--capacity-ownerref-level", "0"), ("--strict-topology", "true"),
                        ("--immediate-topology", "false"), ("--extra-create-metadata", "true")):
        assert arg(prov, flag) == value
    prov_env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in prov["env"]}
    assert prov_env == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name",
                        "NAMESPACE": "metadata.namespace"}
    snap = container(csi, "csi-snapshotter")
    assert arg(snap, "--node-deployment") == "true"
    assert {e["name"] for e in snap["env"]} == {"NODE_NAME"}
    resizer = container(csi, "csi-resizer")
    assert arg(resizer, "--leader-election") == "true"
    assert arg(resizer, "--leader-election-namespace") == "$(NAMESPACE)"


def test_service_account_token_only_where_needed(default_docs: list[dict[str, Any]]) -> None:
    for ds in (d for d in default_docs if d["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        for cont in spec["containers"]:
            has_token = any(m["mountPath"] == TOKEN_DIR for m in cont.get("volumeMounts", []))
            assert has_token == (cont["name"] in API_SIDECARS), cont["name"]
    for sa in (d for d in default_docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_rbac_is_bound_to_the_csi_node_account(default_docs: list[dict[str, Any]]) -> None:
    roles = {(d["kind"], d["metadata"]["name"]) for d in default_docs
             if d["kind"] in ("ClusterRole", "Role")}
    bindings = [d for d in default_docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings}
    assert roles == bound, "every role bound, every binding to a shipped role"
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "hostkit-csi-node",
                                  "namespace": "hostkit-system"}]
    for role in (d for d in default_docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role["metadata"]
    csc = find(default_docs, "Role", "hostkit-csi-provisioner")
    assert csc["metadata"]["namespace"] == "hostkit-system"
    assert any("csistoragecapacities" in r["resources"] for r in csc["rules"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_device_plugin(rendered: dict[str, str], overlay: str) -> None:
    docs = load_all(rendered[overlay])
    root = overlay_root(overlay)
    dp = find(docs, "DaemonSet", "hostkit-device-plugin")
    spec = dp["spec"]["template"]["spec"]
    cont = container(dp, "device-plugin")
    kubelet_dir = expand(cont, arg(cont, "--kubelet-dir"))
    # Fixed by the kubelet whatever its root (k8s #68567): never moved by an overlay.
    assert root and kubelet_dir == f"{DEFAULT_KUBELET_ROOT}/device-plugins"
    assert volume(dp, "device-plugins")["hostPath"]["path"] == kubelet_dir
    assert mount(cont, "device-plugins")["mountPath"] == kubelet_dir
    assert arg(cont, "--cdi-dir") == "/var/run/cdi" == mount(cont, "cdi")["mountPath"]
    assert volume(dp, "cdi")["hostPath"]["path"] == "/var/run/cdi"
    assert mount(cont, "run-udev") == {"name": "run-udev", "mountPath": "/run/udev",
                                       "readOnly": True}
    assert mount(cont, "dev")["mountPath"] == "/dev"
    # The config reaches the running plugin: a directory mount of a ConfigMap
    # with a stable name (no subPath, no content hash).
    config_mount = mount(cont, "config")
    assert "subPath" not in config_mount
    assert os.path.dirname(arg(cont, "--config")) == config_mount["mountPath"]
    cm_name = volume(dp, "config")["configMap"]["name"]
    assert cm_name == "hostkit-device-plugin-config"
    find(docs, "ConfigMap", cm_name)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert cont["securityContext"]["privileged"] is True
    ports = {p["name"]: p["containerPort"] for p in cont["ports"]}
    assert ports == {"metrics": 9500, "healthz": 9502}
    assert arg(cont, "--metrics-address") == ":9500"
    assert arg(cont, "--health-address") == ":9502"
    for probe in ("livenessProbe", "readinessProbe"):
        assert cont[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    res = cont["resources"]
    assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"cpu", "memory"}


def test_both_daemonsets_node_critical(default_docs: list[dict[str, Any]]) -> None:
    for ds in (d for d in default_docs if d["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        assert spec["priorityClassName"] == "system-node-critical"
        assert spec["tolerations"] == [{"operator": "Exists"}]
        for cont in spec["containers"]:
            assert "memory" in cont["resources"]["limits"], cont["name"]
            assert set(cont["resources"]["requests"]) == {"cpu", "memory"}, cont["name"]


def test_csidriver_fields(default_docs: list[dict[str, Any]]) -> None:
    spec = find(default_docs, "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["storageCapacity"] is True
    assert spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == "File"
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    for sc in (d for d in default_docs if d["kind"] == "StorageClass"):
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
        assert set(sc["parameters"]) <= {"pool", "csi.storage.k8s.io/fstype", "fsType", "thin"}


def test_resource_domain(default_docs: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(_config(default_docs, "hostkit-device-plugin-config"))
    assert config["domain"] == DOMAIN
    assert config["cdi"]["dir"] == "/var/run/cdi"
    examples = [d for f in sorted((DAEMONSETS / "examples").glob("*.yaml"))
                for d in load_all(f.read_text()) if d["kind"] == "Pod"]
    requested = {k for p in examples for c in p["spec"]["containers"]
                 for k in c.get("resources", {}).get("limits", {}) if "/" in k}
    names = {f"{DOMAIN}/{r['name']}" for r in config["resources"]}
    assert requested and requested <= names, f"examples request {requested}, config has {names}"



def test_device_plugin_config_loads_with_the_code(default_docs: list[dict[str, Any]]) -> None:
    config_module = device_plugin.config
    text = _config(default_docs, "hostkit-device-plugin-config")
    config = config_module.parse_yaml(text, "daemonsets/base/device-plugin/config.yaml")
    assert config.domain == DOMAIN
    default = config_module.SECTIONS["top"].option("domain").default
    assert default == DOMAIN


def test_csi_config_loads_with_the_code(default_docs: list[dict[str, Any]]) -> None:
    config_module = csi_driver.config
    text = _config(default_docs, "hostkit-csi-config")
    config = config_module.parse_config(yaml.safe_load(text), STATE_DIR)
    assert config.pools[0].name == "default"
    for pool in config.pools:
        if pool.type == "image":
            assert pool.path.startswith(STATE_DIR + "/"), "image pools live in the state dir"
    assert config_module.DEFAULT_STATE_DIR == STATE_DIR
    assert config_module.DEFAULT_KUBELET_ROOT == DEFAULT_KUBELET_ROOT
    classes = [d for d in default_docs if d["kind"] == "StorageClass"]
    assert {c["parameters"]["pool"] for c in classes} <= {p.name for p in config.pools}


@pytest.mark.parametrize(("module", "ds", "name"), [
    ("device_plugin.cli", "hostkit-device-plugin", "device-plugin"),
    ("csi_driver.cli", "hostkit-csi-node", "csi-driver"),
])
def test_daemonset_flags_exist_in_the_cli(default_docs: list[dict[str, Any]], module: str,
                                          ds: str, name: str) -> None:
    cont = container(find(default_docs, "DaemonSet", ds), name)
    assert cont["command"] == [name]
    assert name in PYPROJECT["project"]["scripts"]
    script = f"import sys; from {module} import main; sys.argv[0] = {name!r}; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", script, "serve", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    args = cont["args"]
    assert args[0] == "serve"
    for flag in (a.split("=", 1)[0] for a in args[1:]):
        assert flag in proc.stdout, f"{name} serve has no {flag}"


def test_topology_key() -> None:
    key = f"topology.{csi_driver.DRIVER_NAME}/node"
    assert key == csi_driver.volumes.TOPOLOGY_KEY
    assert f"`{key}`" in (ROOT / "docs" / "operator-guide.md").read_text()


def test_device_plugin_default_kubelet_dir() -> None:
    assert f"{DEFAULT_KUBELET_ROOT}/device-plugins" == device_plugin.cli.DEFAULT_KUBELET_DIR
