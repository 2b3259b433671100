"""The kustomize overlay that fits ``daemonsets/overlays/default`` to the tier's node.

Owns every difference between what an operator applies and what the tier
applies, each written as a kustomize patch in a directory of the run (the
product manifests stay as they are):

* the kubelet root: the default overlay's own kustomization with its one
  ``kubelet-root.yaml`` replaced by the fixture's root (the product's mechanism
  for every non-default root, ``components/kubelet-root``);
* ``components/without-udevd``: these machines run no udevd (no /run/udev),
  which is what that component is for; and the product components the run
  asks for (``components``: the tier's DaemonSet run adds ``subvolumes``);
* ``hostNetwork: true`` again (that component turns it off): the tier's node has
  no routable pod network (bridge without gateway, no kube-proxy), so only
  host-network pods reach the API server and the kubelet's probes reach them;
* ports: the machine is shared, so every ``containerPort`` becomes a free port
  and each ``--flag=:PORT`` argument listens on the node address (a /32 on
  ``lo``) at that port; named probe ports follow by name;
* the API server: ``KUBERNETES_SERVICE_HOST/PORT`` of the containers that mount
  a ServiceAccount token point at 127.0.0.1 and the API server's port (no
  kube-proxy, so the ``kubernetes`` Service's ClusterIP leads nowhere);
* host paths that would otherwise be the machine's own: the CSI state dir
  ``/var/lib/hostkit-csi`` and the CDI dir ``/var/run/cdi`` become directories of
  the run.

Everything else (images, commands, arguments, mounts and their propagation,
RBAC, probes, the ConfigMaps) is the product's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.manifests import DAEMONSETS, load_all

DEFAULT_OVERLAY = DAEMONSETS / "overlays" / "default"
WITHOUT_UDEVD = DAEMONSETS / "components" / "without-udevd"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _kustomization(directory: Path, kubelet_root: Path, components: Sequence[Path],
                   patches: list[dict[str, Any]]) -> None:
    source = yaml.safe_load((DEFAULT_OVERLAY / "kustomization.yaml").read_text())
    local = yaml.safe_load((DEFAULT_OVERLAY / "kubelet-root.yaml").read_text())
    local["data"]["path"] = str(kubelet_root)
    (directory / "kubelet-root.yaml").write_text(yaml.safe_dump(local))

    def moved(entry: str) -> str:
        if entry == "kubelet-root.yaml":
            return entry
        return os.path.relpath((DEFAULT_OVERLAY / entry).resolve(), directory)

    out = dict(source)
    out["resources"] = [moved(e) for e in source.get("resources", [])]
    out["components"] = [moved(e) for e in source.get("components", [])]
    out["components"] += [os.path.relpath(c, directory) for c in (WITHOUT_UDEVD, *components)]
    if patches:
        out["patches"] = patches
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(out, sort_keys=False))


def _ops(daemonset: dict[str, Any], *, node_ip: str, ports: Mapping[int, int],
         paths: Mapping[str, Path], api: tuple[str, int]) -> list[dict[str, Any]]:
    spec = daemonset["spec"]["template"]["spec"]
    base = "/spec/template/spec"
    ops: list[dict[str, Any]] = [
        {"op": "replace", "path": f"{base}/hostNetwork", "value": True},
        {"op": "replace", "path": f"{base}/dnsPolicy", "value": "ClusterFirstWithHostNet"},
    ]
    for i, volume in enumerate(spec.get("volumes", [])):
        host = volume.get("hostPath", {}).get("path")
        if host in paths:
            ops.append({"op": "replace", "path": f"{base}/volumes/{i}/hostPath/path",
                        "value": str(paths[host])})
    for c, cont in enumerate(spec["containers"]):
        at = f"{base}/containers/{c}"
        for p, port in enumerate(cont.get("ports", [])):
            ops.append({"op": "replace", "path": f"{at}/ports/{p}/containerPort",
                        "value": ports[port["containerPort"]]})
        for a, arg in enumerate(cont.get("args", [])):
            m = re.fullmatch(r"(--[\w-]+)=:(\d+)", str(arg))
            if m and int(m[2]) in ports:
                ops.append({"op": "replace", "path": f"{at}/args/{a}",
                            "value": f"{m[1]}={node_ip}:{ports[int(m[2])]}"})
        if any(m["mountPath"] == TOKEN_MOUNT for m in cont.get("volumeMounts", [])):
            env = [{"name": "KUBERNETES_SERVICE_HOST", "value": api[0]},
                   {"name": "KUBERNETES_SERVICE_PORT", "value": str(api[1])}]
            if "env" in cont:
                ops += [{"op": "add", "path": f"{at}/env/-", "value": e} for e in env]
            else:
                ops.append({"op": "add", "path": f"{at}/env", "value": env})
    return ops


def write(directory: Path, render: Callable[[Path], str], *, kubelet_root: Path,
          node_ip: str, api: tuple[str, int], paths: Mapping[str, Path],
          free_port: Callable[[], int], components: Sequence[Path] = ()
          ) -> list[dict[str, Any]]:
    """Write the overlay into ``directory`` and return its rendered objects.

    ``render`` is ``kubectl kustomize`` (directory -> YAML); ``paths`` maps host
    paths of the manifests to the run's directories; ``components`` are product
    components (``daemonsets/components/*``) to use as well.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _kustomization(directory, kubelet_root, components, [])
    unpatched = load_all(render(directory))
    patches = []
    for ds in (d for d in unpatched if d["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        ports = {p["containerPort"]: free_port()
                 for cont in spec["containers"] for p in cont.get("ports", [])}
        ops = _ops(ds, node_ip=node_ip, ports=ports, paths=paths, api=api)
        patches.append({"target": {"kind": "DaemonSet", "name": ds["metadata"]["name"]},
                        "patch": json.dumps(ops, indent=1)})
    _kustomization(directory, kubelet_root, components, patches)
    return load_all(render(directory))
