"""The operator guide stays in step with the manifests and the code.

Reads the guide as text: every overlay and its kubelet root, every metric that
the code defines (found in the metrics modules' source, so no module has to be
importable), and every port the DaemonSets open must appear in it; its worked
configuration examples must load with the code's config parsers.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

import csi_driver.config
import device_plugin.config
from tests.deploy.manifests import DAEMONSETS, OVERLAYS, ROOT, find, overlay_root

GUIDE = ROOT / "docs" / "operator-guide.md"
METRICS_SOURCES = (
    "plugin_runtime/metrics.py",
    "device_plugin/metrics.py",
    "csi_driver/metrics.py",
)


def _guide() -> str:
    return GUIDE.read_text()


def test_guide_lists_every_overlay_with_its_root() -> None:
    text = _guide()
    for overlay in OVERLAYS:
        row = next((line for line in text.splitlines()
                    if line.startswith("|") and f"`overlays/{overlay}`" in line), None)
        assert row is not None, f"overlay {overlay} missing from the guide's table"
        assert f"`{overlay_root(overlay)}`" in row, f"{overlay}: root differs in the guide"
    for component in (p.name for p in (DAEMONSETS / "components").iterdir()):
        assert f"components/{component}" in text, f"component {component} not documented"


def test_guide_lists_every_metric_the_code_defines() -> None:
    text = _guide()
    defined: set[str] = set()
    for rel in METRICS_SOURCES:
        path = ROOT / rel
        if path.exists():
            defined |= set(re.findall(r'"(hostkit_[a-z0-9_]+)"', path.read_text()))
    assert "hostkit_rpc_total" in defined
    documented = set(re.findall(r"`(hostkit_[a-z0-9_]+)`", text))
    missing = sorted(defined - documented)
    assert not missing, f"metrics not in docs/operator-guide.md: {missing}"


def test_guide_lists_every_port(default_docs: list[dict[str, Any]]) -> None:
    text = _guide()
    table = {int(m.group(1)): m.group(2) for m in
             re.finditer(r"^\| (\d+) \| ([a-z-]+) \|", text, re.M)}
    opened = {}
    for name in ("hostkit-device-plugin", "hostkit-csi-node"):
        ds = find(default_docs, "DaemonSet", name)
        for cont in ds["spec"]["template"]["spec"]["containers"]:
            for port in cont.get("ports", []):
                opened[port["containerPort"]] = cont["name"]
    # The driver's healthz port is declared on the driver container but served
    # by the liveness-probe sidecar.
    opened[9808] = "liveness-probe"
    assert table == opened


def _yaml_blocks(first_key: str) -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", _guide(), re.S)
    return [b for b in blocks if b.startswith(f"{first_key}:")]



def test_guide_device_examples_load_with_the_code() -> None:
    blocks = _yaml_blocks("resources")
    assert len(blocks) == 3, "USB serial, GPU and fuse examples"
    for block in blocks:
        parsed = device_plugin.config.parse_yaml(block, "docs/operator-guide.md")
        assert parsed.resources, block


def test_guide_pool_examples_load_with_the_code() -> None:
    blocks = _yaml_blocks("pools")
    assert len(blocks) == 3, "image pool, disk pool and subvolume pool examples"
    for block in blocks:
        parsed = csi_driver.config.parse_config(yaml.safe_load(block), "/var/lib/hostkit-csi")
        assert parsed.pools, block
