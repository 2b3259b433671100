"""The device plugin's domain modules never import grpc or the generated stubs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "device_plugin"
DOMAIN = ["model", "config", "matching", "identity", "units", "sysfs", "discovery", "health",
          "registry", "allocation", "cdi", "reload", "metrics", "plugin",
          "dra/devices", "dra/claims", "dra/checkpoint", "dra/prepare", "dra/health"]


@pytest.mark.parametrize("module", DOMAIN)
def test_domain_module_imports_no_grpc(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
            imported += [f"{node.module}.{a.name}" for a in node.names]
    bad = [m for m in imported if m.split(".")[0] in ("grpc", "grpc_health") or "_proto" in m
           or m.startswith(("device_plugin.api", "device_plugin.servicer",
                            "device_plugin.lifecycle", "plugin_runtime.rpc",
                            "plugin_runtime.server", "device_plugin.dra.api",
                            "device_plugin.dra.servicer", "device_plugin.dra.lifecycle"))]
    assert bad == []
