"""Only the wire layer talks gRPC: the layering rule of docs/development.md, enforced.

Walks every module of device_plugin/, csi_driver/ and plugin_runtime/ with ``ast``
and fails when a module outside ``WIRE_MODULES`` (or the generated ``_proto``
packages) imports ``grpc``, ``grpc_health`` (any ``grpc*`` package) or any
``_proto`` module, directly or through a relative import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("device_plugin", "csi_driver", "plugin_runtime")

# The modules allowed to import gRPC and the generated stubs, relative to ROOT.
WIRE_MODULES = frozenset(
    {
        "device_plugin/api.py",
        "device_plugin/servicer.py",
        "device_plugin/lifecycle.py",
        "device_plugin/cli.py",
        "csi_driver/api.py",
        "csi_driver/identity_service.py",
        "csi_driver/controller_service.py",
        "csi_driver/node_service.py",
        "csi_driver/cli.py",
        "csi_driver/server.py",
        "plugin_runtime/rpc.py",
        "plugin_runtime/server.py",
    }
)


def _module_package(relative: Path) -> list[str]:
    # The package a relative import starts from: the directory, for a module and
    # for an __init__ alike.
    return list(relative.parent.parts)


def _is_forbidden(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "grpc" or parts[0].startswith("grpc_") or "_proto" in parts


def forbidden_imports(source: str, relative: Path) -> list[str]:
    """The gRPC/_proto imports of one module's source, as written (with line numbers)."""
    package = _module_package(relative)
    found: list[str] = []
    for node in ast.walk(ast.parse(source, str(relative))):
        if isinstance(node, ast.Import):
            found += [f"{a.name} (line {node.lineno})" for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                absolute = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                absolute = node.module or ""
            candidates = [absolute] + [f"{absolute}.{a.name}" for a in node.names]
            if any(_is_forbidden(c) for c in candidates if c):
                names = ", ".join(a.name for a in node.names)
                found.append(f"from {'.' * node.level}{node.module or ''} import {names} "
                             f"(line {node.lineno})")
    return found


def _modules() -> list[Path]:
    files: list[Path] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if "_proto" in relative.parts:
                continue
            files.append(relative)
    return files


def test_only_wire_modules_import_grpc_or_generated_stubs():
    offenders = {}
    for relative in _modules():
        if relative.as_posix() in WIRE_MODULES:
            continue
        found = forbidden_imports((ROOT / relative).read_text(encoding="utf-8"), relative)
        if found:
            offenders[relative.as_posix()] = found
    assert offenders == {}, (
        "these modules import gRPC or generated stubs; move the code to a wire module "
        f"({', '.join(sorted(WIRE_MODULES))}): {offenders}"
    )


def test_the_walk_covers_the_packages():
    names = {p.as_posix() for p in _modules()}
    assert "device_plugin/model.py" in names
    assert "plugin_runtime/errors.py" in names
    assert not any("_proto" in n for n in names)


def test_the_checker_catches_every_spelling():
    where = Path("device_plugin/registry.py")
    bad = {
        "import grpc": 1,
        "import grpc.experimental": 1,
        "from grpc import StatusCode": 1,
        "from grpc_health.v1 import health": 1,
        "import grpc_status": 1,
        "from device_plugin._proto.deviceplugin import api_pb2": 1,
        "from device_plugin import _proto": 1,
        "from ._proto.deviceplugin import api_pb2": 1,
        "from . import _proto": 1,
        "from .._proto import x": 1,
        "import device_plugin._proto.deviceplugin.api_pb2 as pb": 1,
        "def f():\n    import grpc\n": 1,
    }
    for source, count in bad.items():
        assert len(forbidden_imports(source, where)) == count, source
    good = [
        "import grpcio_like_name_is_not_grpc as x",
        "from device_plugin import model",
        "from . import api",
        "from plugin_runtime.errors import NotFound",
        "import protobuf_utils",
    ]
    for source in good:
        assert forbidden_imports(source, where) == [], source
