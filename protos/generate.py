"""Generate the Python gRPC stubs from the schemas in protos/.

Owns the mapping from each schema to the package that imports it.  The
``-I<virtual>=<dir>`` mapping makes the generated imports package-absolute
(``from device_plugin._proto.deviceplugin import api_pb2``) without editing the
schemas or post-processing the output, and keeps each schema's ``package`` line
(the service name on the wire) untouched.

Usage:
    python protos/generate.py          # rewrite the committed stubs
    python protos/generate.py --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (virtual import dir, schema dir, schema file)
SCHEMAS: list[tuple[str, str, str]] = [
    ("device_plugin/_proto/deviceplugin", "protos/deviceplugin/v1beta1", "api.proto"),
    ("device_plugin/_proto/podresources", "protos/podresources/v1", "api.proto"),
    ("plugin_runtime/_proto/pluginregistration", "protos/pluginregistration/v1", "api.proto"),
    ("device_plugin/dra/_proto/v1", "protos/dra/v1", "api.proto"),
    ("device_plugin/dra/_proto/v1beta1", "protos/dra/v1beta1", "api.proto"),
    ("device_plugin/dra/_proto/health", "protos/dra-health/v1alpha1", "api.proto"),
    ("csi_driver/_proto", "protos/csi/v1", "csi.proto"),
]


def _protoc(out_dir: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).resolve().parent / "_proto"
    for virtual, schema_dir, name in SCHEMAS:
        schema = ROOT / schema_dir / name
        if not schema.exists():
            raise SystemExit(f"missing schema {schema}")
        args = [
            "grpc_tools.protoc",
            f"-I{virtual}={ROOT / schema_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"{virtual}/{name}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {schema}")
        # Every directory on the way down is a package.
        parts = Path(virtual).parts
        for depth in range(1, len(parts) + 1):
            init = out_dir.joinpath(*parts[:depth], "__init__.py")
            init.parent.mkdir(parents=True, exist_ok=True)
            init.touch()


def _generated_files(base: Path) -> list[Path]:
    found: list[Path] = []
    for virtual, _, _ in SCHEMAS:
        top = base / virtual
        if top.exists():
            found += [p.relative_to(base) for p in top.rglob("*") if p.is_file()]
    return sorted(set(found))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed stubs differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(out)
        fresh = [p for p in _generated_files(out) if "__pycache__" not in p.parts]
        if args.check:
            stale = [
                str(p)
                for p in fresh
                if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, shallow=False)
            ]
            if stale:
                print("stale generated code (run python protos/generate.py):", *stale, sep="\n  ")
                return 1
            print(f"generated code is current ({len(fresh)} files)")
            return 0
        for rel in fresh:
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, ROOT / rel)
        print(f"wrote {len(fresh)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
