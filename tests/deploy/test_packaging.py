"""The package builds, sdist and wheel, without a single warning.

setuptools announces what it will stop accepting (``project.license`` as a TOML
table was one) only as warnings printed during a build, long before they turn
into errors; ``pip install`` shows them to every user.  This test turns any
warning into a failure so it is fixed when it appears.

It calls the PEP 517 hooks of the backend pyproject.toml names, the way
``python -m build`` does (``build_sdist``, then ``build_wheel`` in the unpacked
sdist, which also proves the sdist is complete), with every warning shown, in a
subprocess and on a copy of the source tree (nothing is written into the
checkout).  The backend is the venv's setuptools, not an isolated download, so
no index is needed; the test checks that it satisfies ``build-system.requires``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

_BUILD = textwrap.dedent("""
    import os, sys, tarfile, warnings
    warnings.simplefilter("always")
    from setuptools import build_meta as backend
    source, out, unpacked = sys.argv[1:4]
    os.chdir(source)
    sdist = backend.build_sdist(out)
    with tarfile.open(os.path.join(out, sdist)) as archive:
        archive.extractall(unpacked, filter="data")
    os.chdir(os.path.join(unpacked, sdist.removesuffix(".tar.gz")))
    wheel = backend.build_wheel(out)
    print("built", sdist, wheel)
""")


def test_the_venv_backend_satisfies_build_system_requires() -> None:
    installed = Version(metadata.version("setuptools"))
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        assert requirement.name == "setuptools", f"unexpected build requirement {text}"
        assert requirement.specifier.contains(installed), (
            f"the venv has setuptools {installed}, pyproject.toml needs {text}: "
            "rerun scripts/setup.sh"
        )


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[str, Path]]:
    """(build output, directory holding the sdist and the wheel)."""
    with tempfile.TemporaryDirectory(prefix="hostkit-build.") as tmp:
        work = Path(tmp)
        source = work / "src"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".*", "*.egg-info", "__pycache__", "build", "dist"))
        out = work / "out"
        out.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", _BUILD, str(source), str(out), str(work / "unpacked")],
            cwd=work, capture_output=True, text=True, timeout=240, check=False,
            # PYTHONDONTWRITEBYTECODE (set in some shells and CI) makes setuptools warn
            # that it skips byte-compiling: the caller's setting, not the package's.
            env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        kept = Path(tempfile.mkdtemp(prefix="hostkit-dist."))
        for artefact in out.iterdir():
            shutil.copy(artefact, kept)
    try:
        yield output, kept
    finally:
        shutil.rmtree(kept)


def test_building_sdist_and_wheel_prints_no_warning(built: tuple[str, Path]) -> None:
    output, _ = built
    warned = [line for line in output.splitlines()
              if re.search(r"warn|deprecat", line, re.IGNORECASE)]
    assert not warned, "the build warns:\n" + "\n".join(warned)


def test_the_wheel_declares_the_spdx_license_and_ships_its_text(
    built: tuple[str, Path],
) -> None:
    _, dist = built
    (wheel,) = dist.glob("hostkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
        info_dir = metadata.rsplit("/", 1)[0]
        for name in PYPROJECT["project"]["license-files"]:
            assert f"{info_dir}/licenses/{name}" in names
    assert f"License-Expression: {PYPROJECT['project']['license']}" in headers
    assert not [h for h in headers if h.startswith("License:")], "the old free-text field"
    (sdist,) = dist.glob("hostkit-*.tar.gz")
    with tarfile.open(sdist) as archive:
        assert any(m.name.endswith("/LICENSE") for m in archive.getmembers())
