"""Every image the rendered DaemonSets name, made locally and imported into the node.

Owns the images of ``daemonsets/`` for a node without a registry:

* ``ghcr.io/hostkit/hostkit:<tag>`` (whatever the rendered manifests name):
  the Dockerfile built by ``tests.e2e.product_image``;
* each CSI sidecar image (``registry.k8s.io/sig-storage/<sidecar>:<tag>``, the
  exact names and tags of the rendered manifests): the shared release binary of
  the same name, wrapped in a one-layer OCI image with the binary at
  ``/<name>`` as the entrypoint, as the upstream images have it (they are
  static Go programs on a distroless base; nothing else is needed to run them);
  a manifest naming a sidecar tag other than the shared binary's release fails
  here, so the manifests and the tier cannot drift apart;

Sidecar archives are cached next to the product image, keyed by the binaries'
content (their cache path) and the names.  Layers are stored uncompressed
(containerd accepts ``tar`` layers; compressing 250 MB of Go binaries per run
would cost more than it saves on a local import).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.e2e import product_image

# Container name in the CSI DaemonSet -> shared binary (and upstream image) name.
SIDECARS = {
    "node-driver-registrar": "csi-node-driver-registrar",
    "csi-provisioner": "csi-provisioner",
    "csi-snapshotter": "csi-snapshotter",
    "csi-resizer": "csi-resizer",
    "liveness-probe": "livenessprobe",
}


def images_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Container name -> image, over every DaemonSet of the rendered manifests."""
    found: dict[str, str] = {}
    for doc in docs:
        if doc["kind"] == "DaemonSet":
            for cont in doc["spec"]["template"]["spec"]["containers"]:
                found[cont["name"]] = cont["image"]
    return found


def shared_versions(readme: Path) -> dict[str, str]:
    """Binary -> release version, from the table of the shared folder's README."""
    versions: dict[str, str] = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"v\d+\.\d+\.\d+", cells[1]):
            for name in cells[0].split(","):
                versions[name.strip()] = cells[1]
    return versions


def _blob(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _binary_layer(binary: Path, name: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
        info = tar.gettarinfo(str(binary), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755
        info.mtime = 0
        with open(binary, "rb") as handle:
            tar.addfile(info, handle)
    return raw.getvalue()


def write_layout(target: Path, images: Mapping[str, tuple[Path, str]]) -> Path:
    """An OCI archive holding, for each image name, ``(binary, entry name)`` as a
    one-layer image whose entrypoint is ``/<entry name>``."""
    work = Path(tempfile.mkdtemp(prefix="layout-", dir=target.parent))
    try:
        blobs = work / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        manifests = []
        for image, (binary, entry) in sorted(images.items()):
            layer_bytes = _binary_layer(binary, entry)
            layer = _blob(blobs, layer_bytes)
            config = _blob(blobs, json.dumps({
                "architecture": "amd64", "os": "linux",
                "config": {"Entrypoint": [f"/{entry}"], "Env": ["PATH=/"]},
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
            }).encode())
            manifest = _blob(blobs, json.dumps({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
            }).encode())
            manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              **manifest, "annotations": {"io.containerd.image.name": image}})
        (work / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                     "manifests": manifests}))
        (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        with tarfile.open(partial, "w") as tar:
            for path in sorted(work.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
        partial.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def sidecar_archive(docs: list[dict[str, Any]], binary: Callable[[str], str],
                    shared_readme: Path) -> Path:
    """The sidecar images the manifests name, from the shared binaries (cached)."""
    wanted = images_of(docs)
    versions = shared_versions(shared_readme)
    images: dict[str, tuple[Path, str]] = {}
    for container, name in SIDECARS.items():
        image = wanted.get(container)
        if image is None:
            raise AssertionError(f"the CSI DaemonSet has no container {container!r}")
        repo, _, tag = image.rpartition(":")
        if not repo.endswith("/" + name) or versions.get(name) != tag:
            raise AssertionError(
                f"container {container} names {image}, but the shared binary is "
                f"{name} {versions.get(name)} (../shared/kubernetes/README.md)")
        images[image] = (Path(binary(name)), name)
    key = hashlib.sha256(json.dumps(
        {image: str(path) for image, (path, _) in sorted(images.items())}).encode()
    ).hexdigest()[:20]
    cache = product_image.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"sidecars-{key}.tar"
    if not target.is_file():
        write_layout(target, images)
    return target

