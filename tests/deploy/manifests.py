"""Reading the repo's manifests the way the cluster would: rendered and expanded.

Owns rendering with ``kubectl kustomize`` (offline; the only step that needs
kubectl, skipped with that reason when it is absent), locating objects,
containers, volumes and flags in them, and ``$(VAR)`` expansion as the
kubelet does it, so every deployment test reads manifests the same way.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DAEMONSETS = ROOT / "daemonsets"
OVERLAYS = sorted(p.name for p in (DAEMONSETS / "overlays").iterdir() if p.is_dir())
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"


def kustomize(directory: Path) -> str:
    """``kubectl kustomize DIR`` output; skips the test when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendering with kustomize is not checked here")
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return proc.stdout


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def overlay_root(overlay: str) -> str:
    """The kubelet root an overlay sets (its local-only kubelet-root ConfigMap)."""
    doc = yaml.safe_load((DAEMONSETS / "overlays" / overlay / "kubelet-root.yaml").read_text())
    path: str = doc["data"]["path"]
    return path


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected exactly one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(daemonset: dict[str, Any], name: str) -> dict[str, Any]:
    for c in daemonset["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"{daemonset['metadata']['name']} has no container {name}")


def arg(cont: dict[str, Any], flag: str) -> str:
    """Value of ``--flag=value`` in a container's args (exactly once)."""
    values = [a.split("=", 1)[1] for a in cont.get("args", []) if a.startswith(flag + "=")]
    assert len(values) == 1, f"{cont['name']}: expected one {flag}=..., got {values}"
    return str(values[0])


def env(cont: dict[str, Any], name: str) -> str:
    for e in cont.get("env", []):
        if e["name"] == name:
            return str(e["value"])
    raise AssertionError(f"{cont['name']}: no env {name} with a value")


def expand(cont: dict[str, Any], value: str) -> str:
    """Expand ``$(VAR)`` from the container's literal env, as the kubelet does."""
    for e in cont.get("env", []):
        if "value" in e:
            value = value.replace(f"$({e['name']})", str(e["value"]))
    return value


def volume(daemonset: dict[str, Any], name: str) -> dict[str, Any]:
    for v in daemonset["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == name:
            return dict(v)
    raise AssertionError(f"{daemonset['metadata']['name']} has no volume {name}")


def mount(cont: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [m for m in cont.get("volumeMounts", []) if m["name"] == name]
    assert len(hits) == 1, f"{cont['name']}: expected one mount of {name}, got {hits}"
    return dict(hits[0])

