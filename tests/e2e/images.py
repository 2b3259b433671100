"""Container images without a registry: an OCI archive built from busybox-static.

Owns one image built from Debian's static ``/bin/busybox`` and its applet links
(one gzip layer, config, manifest, ``index.json`` and ``oci-layout``, sha256
digests), named twice in the index with ``io.containerd.image.name``: as the
pod sandbox (``PAUSE``, running ``sleep infinity``) and as the test image
(``BUSYBOX``).  Pods use ``imagePullPolicy: Never``; the kubelet's image GC
threshold is 100 % so imported images stay.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from plugin_runtime import commands

PAUSE = "localhost/hostkit-e2e/pause:1"
BUSYBOX = "localhost/hostkit-e2e/busybox:1"
NAMES = (PAUSE, BUSYBOX)


def _layer(busybox: str) -> bytes:
    applets = commands.run([busybox, "--list"], timeout=10).stdout.split()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "dev", "proc", "sys", "tmp", "etc", "var"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    return raw.getvalue()


def _blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_archive(busybox: str, target: Path) -> Path:
    """Write the OCI archive (a tar of an OCI image layout) to ``target``."""
    layout = target.with_suffix(".d")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tar_bytes = _layer(busybox)
    layer = _blob(blobs, gzip.compress(tar_bytes, mtime=0))
    config = _blob(blobs, json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sleep", "infinity"]},
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"]},
    }).encode())
    manifest = _blob(blobs, json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
             "annotations": {"io.containerd.image.name": name,
                             "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}
            for name in NAMES
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    with tarfile.open(target, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)
    return target
