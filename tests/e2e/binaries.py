"""Where the end-to-end tier finds the Kubernetes, containerd and Debian binaries.

Owns the one decision "can this machine run the tier": the shared Kubernetes and
containerd binaries (xz-compressed, outside the repository) and the Debian tools
(etcd, runc, CNI plugins, busybox, iptables).  The shared directory comes from
``HOSTKIT_K8S_BIN`` (default ``../shared/kubernetes/bin`` next to the repository);
each ``NAME.xz`` is decompressed once into a cache directory keyed by the file's
size and modification time (``HOSTKIT_E2E_CACHE``, default
``~/.cache/hostkit/e2e-bin``), written under a temporary name and renamed, so two
runs at once never see half a binary.  Anything missing raises ``Unavailable``
with a message that says how to get it.
"""

from __future__ import annotations

import lzma
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN_DIR = ROOT.parent / "shared" / "kubernetes" / "bin"

SHARED = (
    "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl",
    "containerd", "containerd-shim-runc-v2", "ctr",
)
# The CSI sidecars are optional for the device-plugin scenarios; ``Binaries.sidecar``
# decompresses one on demand.
DEBIAN = {
    "etcd": "etcd-server",
    "runc": "runc",
    "busybox": "busybox-static",
    "iptables": "iptables",
    "ip": "iproute2",
}
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")

HOW_TO_GET = (
    "The end-to-end tier (tests/e2e) runs a real single-node Kubernetes and needs the "
    "Kubernetes and containerd binaries of ../shared/kubernetes/bin (xz-compressed; see "
    "README.md, 'End-to-end tier'): set HOSTKIT_K8S_BIN to a directory holding "
    f"{', '.join(n + '.xz' for n in SHARED)}, and run scripts/setup.sh as root for the "
    "Debian packages (etcd-server runc containernetworking-plugins busybox-static iptables)."
)


class Unavailable(Exception):
    """The tier cannot run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every executable the tier starts."""

    source: Path
    cache: Path
    paths: dict[str, Path]

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])

    def directory_of(self, name: str) -> str:
        """The directory holding ``name`` (the shim must be on containerd's PATH)."""
        return str(self.paths[name].parent)

    def sidecar(self, name: str) -> str:
        """A CSI sidecar binary (``csi-provisioner``, ...), decompressed on first use."""
        if name not in self.paths:
            self.paths[name] = _decompressed(self.source / f"{name}.xz", self.cache)
        return str(self.paths[name])


def bin_dir() -> Path:
    """``HOSTKIT_K8S_BIN``, else ../shared/kubernetes/bin of this checkout or, in a git
    worktree, of the main checkout."""
    if os.environ.get("HOSTKIT_K8S_BIN"):
        return Path(os.environ["HOSTKIT_K8S_BIN"]).resolve()
    dot_git = ROOT / ".git"
    if not DEFAULT_BIN_DIR.is_dir() and dot_git.is_file():
        # a worktree: ".git" says "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(dot_git.read_text().split(":", 1)[1].strip())
        main = gitdir.parents[2]
        candidate = main.parent / "shared" / "kubernetes" / "bin"
        if candidate.is_dir():
            return candidate
    return DEFAULT_BIN_DIR


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "hostkit" / "e2e-bin"
    return Path(os.environ.get("HOSTKIT_E2E_CACHE") or default)


def locate() -> Binaries:
    """Every binary the tier needs, decompressing the shared ones once."""
    source = bin_dir()
    missing = [n + ".xz" for n in SHARED if not (source / f"{n}.xz").is_file()]
    if missing:
        raise Unavailable(f"{source} lacks {', '.join(missing)}. {HOW_TO_GET}")
    cache = cache_dir()
    paths = {name: _decompressed(source / f"{name}.xz", cache) for name in SHARED}
    absent = []
    for tool, package in DEBIAN.items():
        found = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
        if found is None:
            absent.append(f"{tool} (Debian package {package})")
        else:
            paths[tool] = Path(found)
    absent += [
        f"{CNI_DIR / p} (Debian package containernetworking-plugins)"
        for p in CNI_PLUGINS if not (CNI_DIR / p).is_file()
    ]
    if absent:
        raise Unavailable(f"missing {', '.join(absent)}. {HOW_TO_GET}")
    return Binaries(source=source, cache=cache, paths=paths)


def _decompressed(xz: Path, cache: Path) -> Path:
    stat = xz.stat()
    target_dir = cache / f"{stat.st_size}-{int(stat.st_mtime)}"
    target = target_dir / xz.name.removesuffix(".xz")
    if target.is_file():
        return target
    if not xz.is_file():
        raise Unavailable(f"{xz} does not exist. {HOW_TO_GET}")
    target_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    with lzma.open(xz) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    partial.chmod(0o755)
    partial.rename(target)
    return target
