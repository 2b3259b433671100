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
        "device_plugin/podresources.py",
        "device_plugin/dra/api.py",
        "device_plugin/dra/servicer.py",
        "device_plugin/dra/lifecycle.py",
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


# The two kubelet wire layers of the device plugin process: neither imports the other.
DEVICE_PLUGIN_WIRE = ("device_plugin.api", "device_plugin.servicer", "device_plugin.lifecycle")
DRA_WIRE = ("device_plugin.dra.api", "device_plugin.dra.servicer", "device_plugin.dra.lifecycle")


def _imported_modules(relative: Path) -> list[str]:
    package = _module_package(relative)
    names: list[str] = []
    tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"), str(relative))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def _imports_any(relative: Path, prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in _imported_modules(relative)
            if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_the_dra_and_device_plugin_wire_layers_do_not_import_each_other():
    offenders = {}
    for relative in _modules():
        dotted = relative.with_suffix("").as_posix().replace("/", ".")
        if dotted in DRA_WIRE:
            found = _imports_any(relative, DEVICE_PLUGIN_WIRE)
        elif dotted in DEVICE_PLUGIN_WIRE:
            found = _imports_any(relative, ("device_plugin.dra",))
        else:
            continue
        if found:
            offenders[relative.as_posix()] = found
    assert offenders == {}


def test_the_dra_domain_imports_no_wire_module():
    domain = [p for p in _modules() if p.parts[:2] == ("device_plugin", "dra")
              and p.with_suffix("").as_posix().replace("/", ".") not in DRA_WIRE]
    assert any(p.name == "prepare.py" for p in domain)
    offenders = {p.as_posix(): found for p in domain
                 if (found := _imports_any(p, DEVICE_PLUGIN_WIRE + DRA_WIRE))}
    assert offenders == {}


def test_the_api_client_is_imported_only_inside_functions():
    """lightkube may be imported only where a DRA object is built, never at module level,
    so importing any module of the daemon does not load it."""
    offenders: dict[str, list[str]] = {}
    for relative in _modules():
        tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"), str(relative))
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] == "lightkube"]
            if bad:
                offenders.setdefault(relative.as_posix(), []).extend(bad)
    assert offenders == {}


def test_the_device_plugin_process_does_not_load_the_api_client():
    import subprocess
    import sys

    modules = sorted(p.with_suffix("").as_posix().replace("/", ".") for p in _modules()
                     if p.parts[0] == "device_plugin" and p.name != "__main__.py")
    code = ("import sys\n"
            "for m in sys.argv[1:]:\n"
            "    __import__(m)\n"
            "print(len(sys.argv) - 1,\n"
            "      sorted(m for m in sys.modules if m.startswith('lightkube')))\n")
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True,
                            text=True, timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{len(modules)} []"
