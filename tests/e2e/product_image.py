"""The project's container image, built from the Dockerfile without a Docker daemon.

Owns turning ``Dockerfile`` into an OCI archive containerd can import, on a
machine with neither a Docker engine nor a registry:

* the Dockerfile's base image (``python:3.11-slim-bookworm``) cannot be pulled,
  so a stand-in is assembled from Debian's own packages: ``debootstrap
  --variant=minbase`` of bookworm with ``python3``, ``python3-pip`` and
  ``python-is-python3``, pip allowed to install system-wide (Debian's
  ``EXTERNALLY-MANAGED`` marker removed, as the official image has none) and the
  official image's environment (``LANG``, ``PATH``); it is committed under the
  exact name the Dockerfile asks for, so ``FROM`` resolves locally (README,
  "End-to-end tier", says how faithful it is);
* ``buildah bud`` (Debian's buildah) runs the unchanged Dockerfile with the vfs
  storage driver and chroot isolation (no overlay mounts, no user namespaces,
  no daemon), ``--pull=never``, in a storage directory of its own that is
  removed afterwards; the result is pushed as an ``oci-archive`` named as the
  DaemonSets name the image;
* both steps are cached in ``HOSTKIT_E2E_IMAGE_CACHE`` (default
  ``~/.cache/hostkit/e2e-images``), keyed by their inputs: the stand-in by the
  suite, mirror and package list; the image by the stand-in's key, the
  Dockerfile, ``.dockerignore`` and every file of the build context
  (``.dockerignore``'s ``!`` entries).  Writers take a lock file (bounded wait)
  and rename a finished archive into place, so concurrent runs share one build.

The RUN steps of the Dockerfile fetch from PyPI and Debian (grpcio-tools, the
wheels, apt-get), like any build of it; they see the host's CA bundle through a
read-only bind mount (``HOST_CA_BUNDLE``), which no layer keeps.
``Built.seconds`` tells the caller how long the build took (0 when cached) so
the tier can print it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plugin_runtime import commands
from tests.e2e.binaries import ROOT

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What python:3.11-slim-bookworm offers that the Dockerfile uses: python (3.11),
# pip, and `python` as a command.
STANDIN_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
STANDIN_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
)
BASE_NAME = "docker.io/library/python:3.11-slim-bookworm"
# The RUN steps see the host's CA bundle (read-only, never stored in a layer): a
# machine that reaches PyPI through a TLS-inspecting proxy trusts its CA there only.
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEBOOTSTRAP_TIMEOUT = 1200.0
BUILD_TIMEOUT = 1800.0
LOCK_TIMEOUT = BUILD_TIMEOUT + DEBOOTSTRAP_TIMEOUT


class BuildFailed(Exception):
    """The image could not be built; the message names the step and its log."""


@dataclass(frozen=True)
class Built:
    """An image archive and how long making it took (0.0: taken from the cache)."""

    archive: Path
    name: str
    seconds: float
    standin_seconds: float


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "hostkit" / "e2e-images"
    return Path(os.environ.get("HOSTKIT_E2E_IMAGE_CACHE") or default)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:20]


def context_files(root: Path = ROOT) -> list[Path]:
    """The files of the build context: ``.dockerignore``'s ``!`` entries, no caches."""
    entries = [line[1:].strip() for line in (root / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    files: list[Path] = []
    for entry in entries:
        path = root / entry
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [p for p in candidates if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix != ".pyc"]
    return files


def standin_key() -> str:
    version = commands.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"],
                           timeout=30).stdout
    return _digest(SUITE.encode(), MIRROR.encode(), " ".join(STANDIN_PACKAGES).encode(),
                   "\n".join(STANDIN_ENV).encode(), version.encode())


def image_key(base: str, root: Path = ROOT) -> str:
    parts = [base.encode()]
    for path in [root / "Dockerfile", root / ".dockerignore", *context_files(root)]:
        parts += [str(path.relative_to(root)).encode(), path.read_bytes()]
    return _digest(*parts)


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildFailed(f"another build held {path} for {timeout:g} s") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(argv: list[str], log: Path, timeout: float, what: str) -> None:
    try:
        result = commands.run(argv, timeout=timeout, check=False)
    except commands.CommandTimeout as exc:
        raise BuildFailed(f"{what}: {exc}") from exc
    with open(log, "a") as out:
        out.write(f"==== {' '.join(argv)}\n{result.stdout}{result.stderr}"
                  f"==== exit {result.returncode} after {result.seconds:.1f} s\n")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise BuildFailed(f"{what} failed (exit {result.returncode}; full log {log}):\n{tail}")


def _standin_rootfs(cache: Path, key: str, log: Path) -> tuple[Path, float]:
    """A tar of the stand-in's root filesystem (debootstrap), cached by ``key``."""
    target = cache / f"standin-{key}.tar"
    if target.is_file():
        return target, 0.0
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="standin-", dir=cache))
    try:
        rootfs = work / "root"
        _run_logged(["debootstrap", "--variant=minbase",
                     f"--include={','.join(STANDIN_PACKAGES)}", SUITE, str(rootfs), MIRROR],
                    log, DEBOOTSTRAP_TIMEOUT, "debootstrap of the stand-in base")
        # As in the official image: pip installs into /usr/local, no apt caches.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
        for lists in (rootfs / "var" / "lib" / "apt" / "lists").glob("*_*"):
            lists.unlink()
        partial = work / "rootfs.tar"
        _run_logged(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf",
                     str(partial), "."], log, 600, "archiving the stand-in root")
        partial.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target, time.monotonic() - started


def _named_for_containerd(archive: Path, name: str, target: Path) -> Path:
    """A copy of the pushed archive whose index carries ``io.containerd.image.name``
    (buildah writes only ``org.opencontainers.image.ref.name``, which ``ctr images
    import`` takes for a tag, not a name)."""
    with tarfile.open(archive) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            handle = src.extractfile(member) if member.isfile() else None
            if member.name.removeprefix("./") == "index.json" and handle is not None:
                index = json.loads(handle.read())
                for manifest in index["manifests"]:
                    manifest.setdefault("annotations", {})["io.containerd.image.name"] = name
                data = json.dumps(index).encode()
                member.size = len(data)
                handle = io.BytesIO(data)
            dst.addfile(member, handle)
    return target


def build(name: str, root: Path = ROOT) -> Built:
    """The Dockerfile's image as an OCI archive named ``name`` (from the cache if current)."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            raise BuildFailed(f"{tool} is not installed (scripts/setup.sh installs it as root)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    base = standin_key()
    key = image_key(base, root)
    target = cache / f"hostkit-{key}.tar"
    with _locked(cache / ".lock", LOCK_TIMEOUT):
        if target.is_file():
            return Built(target, name, 0.0, 0.0)
        started = time.monotonic()
        rootfs, standin_seconds = _standin_rootfs(cache, base, log)
        work = Path(tempfile.mkdtemp(prefix="buildah-", dir=cache))
        try:
            buildah = ["buildah", "--root", str(work / "storage"),
                       "--runroot", str(work / "run"), "--storage-driver", "vfs"]
            _run_logged([*buildah, "from", "--name", "standin", "scratch"], log, 120,
                        "buildah from scratch")
            _run_logged([*buildah, "add", "standin", str(rootfs), "/"], log, 600,
                        "adding the stand-in root")
            _run_logged([*buildah, "config", *(f"--env={e}" for e in STANDIN_ENV),
                         "--cmd", "python3", "--os", "linux", "--arch", "amd64", "standin"],
                        log, 60, "configuring the stand-in")
            _run_logged([*buildah, "commit", "--rm", "standin", BASE_NAME], log, 600,
                        "committing the stand-in")
            trust = ([f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
                     if Path(HOST_CA_BUNDLE).is_file() else [])
            _run_logged([*buildah, "bud", "--isolation", "chroot", "--pull=never",
                         "--layers=false", *trust, "-f", str(root / "Dockerfile"), "-t", name,
                         str(root)], log, BUILD_TIMEOUT, "buildah bud of the Dockerfile")
            pushed = work / "pushed.tar"
            _run_logged([*buildah, "push", name, f"oci-archive:{pushed}:{name}"], log, 600,
                        "buildah push to an OCI archive")
            partial = _named_for_containerd(pushed, name, work / "image.tar")
            partial.rename(target)
            for old in cache.glob("hostkit-*.tar"):
                if old != target:
                    old.unlink()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Built(target, name, time.monotonic() - started, standin_seconds)
