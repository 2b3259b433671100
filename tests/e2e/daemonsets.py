"""Our DaemonSets' containers run as host processes, read from the rendered manifests.

Owns the translation of a pod template of ``daemonsets/overlays/default`` (rendered
with the shared ``kubectl kustomize``) into host processes, so the tier proves that
the manifests' flags, environment and paths agree with the real kubelet:

* argv = the container's ``command`` (resolved in the venv's ``bin``; an image
  entrypoint is passed as ``executable``) + ``args`` with ``$(VAR)`` expanded from
  the container's env exactly as the kubelet does;
* env = the container's env: literal values, and ``fieldRef`` values
  (``spec.nodeName`` -> the node, ``metadata.name``/``metadata.namespace`` -> the
  pod identity given), plus PATH (the image's);
* paths: an argument that starts with a container ``mountPath`` is rewritten to the
  volume's host path (longest mount first), then every host path goes through
  ``host_paths`` (``/var/lib/kubelet`` -> the fixture's kubelet root,
  ``/var/run/cdi`` -> the run's CDI dir, ...), so ``$(KUBELET_ROOT)/device-plugins``
  lands in the fixture's ``<root>/device-plugins`` as the real mount would;
  ConfigMap volumes become files in the run's directory (from the rendered
  ConfigMap, or a test's replacement), emptyDirs fresh directories; projected
  service-account volumes have no host equivalent (sidecars take ``--kubeconfig``
  through ``extra_args``);
* ports: every ``containerPort`` of the pod gets a free port on 127.0.0.1 (two runs
  share the machine's network namespace): ``=:PORT`` becomes ``=127.0.0.1:NEW``
  and ``=PORT`` becomes ``=NEW``; ``probe_url`` follows a probe's named port the
  same way.

Nothing else is changed: the manifests are the source, not a copy in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from plugin_runtime import commands
from tests.deploy.manifests import DAEMONSETS, container, find, load_all
from tests.e2e.binaries import ROOT
from tests.e2e.cluster import free_port
from tests.e2e.processes import BASE_PATH, Daemon

DEFAULT_OVERLAY = DAEMONSETS / "overlays" / "default"
VENV_BIN = ROOT / ".venv" / "bin"


def render(kubectl: str, overlay: Path = DEFAULT_OVERLAY) -> list[dict[str, Any]]:
    """The overlay's objects, rendered offline with ``kubectl kustomize``."""
    return load_all(commands.run([kubectl, "kustomize", str(overlay)], timeout=60).stdout)


class HostPod:
    """One DaemonSet's pod template realised as host processes in ``directory``."""

    def __init__(
        self,
        docs: list[dict[str, Any]],
        daemonset: str,
        *,
        directory: Path,
        host_paths: Mapping[str, Path],
        node_name: str,
        pod_name: str | None = None,
    ) -> None:
        self.docs = docs
        self.daemonset = find(docs, "DaemonSet", daemonset)
        self.spec: dict[str, Any] = self.daemonset["spec"]["template"]["spec"]
        self.namespace: str = self.daemonset["metadata"]["namespace"]
        self.directory = directory
        self.host_paths = sorted(host_paths.items(), key=lambda kv: len(kv[0]), reverse=True)
        self.fields = {
            "spec.nodeName": node_name,
            "metadata.name": pod_name or f"{daemonset}-host",
            "metadata.namespace": self.namespace,
        }
        self.ports = {
            p["containerPort"]: free_port()
            for c in self.spec["containers"] for p in c.get("ports", [])
        }
        self.config_overrides: dict[str, dict[str, str]] = {}

    # -------------------------------------------------------------- pieces
    def container(self, name: str) -> dict[str, Any]:
        return container(self.daemonset, name)

    def env(self, name: str) -> dict[str, str]:
        out = {"PATH": f"{VENV_BIN}:{BASE_PATH}"}
        for item in self.container(name).get("env", []):
            if "value" in item:
                out[item["name"]] = str(item["value"])
            else:
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                out[item["name"]] = self.fields[path]
        return out

    def map_host(self, path: str) -> str:
        """A host path of the manifests -> where it is for this run."""
        for prefix, target in self.host_paths:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return str(target) + path[len(prefix.rstrip("/")):]
        return path

    def volume_path(self, volume_name: str) -> Path:
        """Where a volume's contents are on the host for this run."""
        volume = next(v for v in self.spec["volumes"] if v["name"] == volume_name)
        if "hostPath" in volume:
            return Path(self.map_host(volume["hostPath"]["path"]))
        local = self.directory / "volumes" / volume_name
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = self.config_overrides.get(volume_name)
            if data is None:
                data = find(self.docs, "ConfigMap", volume["configMap"]["name"])["data"]
            for key, text in data.items():
                (local / key).write_text(text)
        return local

    def override_config(self, volume_name: str, data: dict[str, str]) -> None:
        """Serve ``data`` instead of the rendered ConfigMap behind ``volume_name``."""
        self.config_overrides[volume_name] = data

    def map_container_path(self, name: str, path: str) -> str:
        mounts = sorted(self.container(name).get("volumeMounts", []),
                        key=lambda m: len(m["mountPath"]), reverse=True)
        for m in mounts:
            point = m["mountPath"].rstrip("/")
            if path == point or path.startswith(point + "/"):
                return str(self.volume_path(m["name"])) + path[len(point):]
        return self.map_host(path)

    def _map_arg(self, name: str, arg: str, env: Mapping[str, str]) -> str:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        flag, eq, value = arg.partition("=")
        if not eq:
            return arg
        if value.startswith("unix://"):
            return f"{flag}=unix://{self.map_container_path(name, value[len('unix://'):])}"
        if value.startswith("/"):
            return f"{flag}={self.map_container_path(name, value)}"
        if (m := re.fullmatch(r":(\d+)", value)) and int(m[1]) in self.ports:
            return f"{flag}=127.0.0.1:{self.ports[int(m[1])]}"
        if value.isdigit() and int(value) in self.ports:
            return f"{flag}={self.ports[int(value)]}"
        return arg

    def argv(self, name: str, executable: str | None = None,
             extra_args: Sequence[str] = ()) -> list[str]:
        cont = self.container(name)
        env = self.env(name)
        if executable is None:
            command = list(cont["command"])
            resolved = VENV_BIN / command[0]
            executable = str(resolved) if resolved.exists() else command[0]
            rest = command[1:]
        else:
            rest = []
        args = [self._map_arg(name, a, env) for a in [*rest, *cont.get("args", [])]]
        return [executable, *args, *extra_args]

    def probe_url(self, name: str, probe: str = "readinessProbe") -> str:
        """The URL of an httpGet probe, with its named port mapped."""
        cont = self.container(name)
        get = cont[probe]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in cont["ports"] if p.get("name") == port)
        return f"http://127.0.0.1:{self.ports[port]}{get['path']}"

    def daemon(self, name: str, log_dir: Path, *, process_name: str | None = None,
               executable: str | None = None, extra_args: Sequence[str] = (),
               drop_args: Sequence[str] = (), prefix: Sequence[str] = ()) -> Daemon:
        """The container as a (not yet started) host process.

        ``prefix`` goes before the argv (``Node.in_node()``: the node's mount
        namespace).  ``drop_args`` removes manifest arguments by flag name, for
        scenarios that deliberately differ from the DaemonSet (the embedded default
        configuration).
        """
        argv = [*prefix, *(a for a in self.argv(name, executable, extra_args)
                           if a.partition("=")[0] not in drop_args)]
        return Daemon(process_name or name, argv, log_dir, env=self.env(name))


def apply_objects(client: Any, docs: list[dict[str, Any]], kinds: Sequence[str]) -> None:
    """Server-side apply the rendered objects of ``kinds`` (in that order)."""
    from lightkube import codecs

    for kind in kinds:
        for doc in docs:
            if doc["kind"] == kind:
                client.apply(codecs.from_dict(doc), force=True)
