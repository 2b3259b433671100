"""The CSI node pod of ``daemonsets/`` run as host processes against the tier's cluster.

Owns what the CSI scenarios add to ``tests.e2e.daemonsets.HostPod`` (which turns
the rendered ``hostkit-csi-node`` pod template into host processes: argv, env,
paths through the pod's mounts, loopback ports):

* the host places of the pod's node paths: the kubelet root is the fixture's,
  the state dir ``/var/lib/hostkit-csi`` a directory of the run, so the driver's
  image pool (the rendered ConfigMap's, its path mapped through the state-dir
  mount like every other path) is an image-file pool in a temporary directory;
* what a container gets from its pod rather than from its args: the
  registrar's default ``/registration`` directory becomes
  ``--plugin-registration-path``, and the sidecars that mount the
  ServiceAccount token get ``--kubeconfig`` with a token of that ServiceAccount
  (TokenRequest, bound to the stand-in pod), so their RBAC is the manifests';
* every process in the node's mount namespace (``Node.in_node()``), where the
  kubelet and containerd run, so the driver's mounts are the kubelet's;
* the sidecars restarted when they exit, as the kubelet restarts containers
  (they exit when the driver's socket goes away or the kubelet refuses a
  registration), and the cluster-wide snapshot-controller
  (``--enable-distributed-snapshotting``, admin identity: it is not part of
  our manifests);
* host-side views for the checks: loop devices by backing file, and which
  processes still hold a volume's mounts.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.daemonsets import HostPod
from tests.e2e.processes import Daemon

DAEMONSET = "hostkit-csi-node"
DRIVER = "csi-driver"
# Container name -> the shared binary that is its image.
SIDECAR_BINARIES = {
    "node-driver-registrar": "csi-node-driver-registrar",
    "csi-provisioner": "csi-provisioner",
    "csi-snapshotter": "csi-snapshotter",
    "csi-resizer": "csi-resizer",
    "liveness-probe": "livenessprobe",
}
KUBELET_ROOT = "/var/lib/kubelet"
STATE_DIR = "/var/lib/hostkit-csi"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Directories a container uses at its binary's default path, not through an arg.
DEFAULT_PATH_FLAGS = {"node-driver-registrar": {"/registration": "--plugin-registration-path"}}
STANDIN_POD = "hostkit-csi-node-e2e"


@dataclass
class Supervised:
    """A container's process, restarted when it exits (as the kubelet does)."""

    daemon: Daemon
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.daemon.start()
        self.thread = threading.Thread(target=self._watch, name=f"watch-{self.daemon.name}",
                                       daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            proc = self.daemon.proc
            assert proc is not None
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 5.0)
            self.daemon.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)
        self.daemon.stop()


class CsiNode:
    """The driver and its sidecars as host processes, plus the snapshot-controller."""

    def __init__(self, docs: list[dict[str, Any]], *, directory: Path, kubelet_root: Path,
                 node_name: str, log_dir: Path, sidecar_binary: Callable[[str], str],
                 sidecar_kubeconfig: Path, admin_kubeconfig: Path,
                 in_node: list[str]) -> None:
        self.state_dir = directory / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pod = HostPod(docs, DAEMONSET, directory=directory,
                           host_paths={KUBELET_ROOT: kubelet_root, STATE_DIR: self.state_dir},
                           node_name=node_name, pod_name=STANDIN_POD)
        self._map_pool_paths()
        self.driver = self.pod.daemon(DRIVER, log_dir, prefix=in_node)
        spec = self.pod.spec
        self.sidecars: dict[str, Supervised] = {}
        for cont in spec["containers"]:
            name = cont["name"]
            if name == DRIVER:
                continue
            mounts = {m["mountPath"] for m in cont.get("volumeMounts", [])}
            given = {str(a).partition("=")[0] for a in cont.get("args", [])}
            extra = [f"{flag}={self.pod.map_container_path(name, path)}"
                     for path, flag in DEFAULT_PATH_FLAGS.get(name, {}).items()
                     if path in mounts and flag not in given]
            if TOKEN_MOUNT in mounts:
                extra.append(f"--kubeconfig={sidecar_kubeconfig}")
            self.sidecars[name] = Supervised(self.pod.daemon(
                name, log_dir, executable=sidecar_binary(SIDECAR_BINARIES[name]),
                extra_args=extra, prefix=in_node))
        socket_dir = next(m["mountPath"] for m in self.pod.container(DRIVER)["volumeMounts"]
                          if m["name"] == "socket-dir")
        self.socket = Path(self.pod.map_container_path(DRIVER, socket_dir)) / "csi.sock"
        self.snapshot_controller = Supervised(Daemon(
            "snapshot-controller",
            [sidecar_binary("snapshot-controller"), f"--kubeconfig={admin_kubeconfig}",
             "--enable-distributed-snapshotting", "--v=2"],
            log_dir))

    def _map_pool_paths(self) -> None:
        """The rendered config with its pool paths as the driver's mounts make them."""
        volume = next(m["name"] for m in self.pod.container(DRIVER)["volumeMounts"]
                      if m["mountPath"] == "/etc/hostkit/csi")
        configmap = next(v for v in self.pod.spec["volumes"] if v["name"] == volume)
        data = next(d for d in self.pod.docs if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == configmap["configMap"]["name"])["data"]
        config = yaml.safe_load(data["config.yaml"])
        for pool in config.get("pools", []):
            if "path" in pool:
                pool["path"] = self.pod.map_container_path(DRIVER, pool["path"])
        self.pool_dir = Path(config["pools"][0]["path"])
        self.pod.override_config(volume, {"config.yaml": yaml.safe_dump(config,
                                                                        sort_keys=False)})

    def port(self, container_port: int) -> int:
        """The loopback port the tier gave one of the pod's container ports."""
        return self.pod.ports[container_port]

    def url(self, container: str, probe: str) -> str:
        return self.pod.probe_url(container, probe)

    def start_driver(self) -> None:
        self.driver.start()
        self.driver.wait_until(self.socket.exists, "driver socket", timeout=30)

    def start(self) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.start_driver()
        for sidecar in self.sidecars.values():
            sidecar.start()
        self.snapshot_controller.start()

    def restart_driver(self) -> None:
        self.driver.stop()
        self.start_driver()

    def stop(self) -> None:
        self.snapshot_controller.stop()
        for sidecar in self.sidecars.values():
            sidecar.stop()
        self.driver.stop()

    def logs(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.driver.log.parent / f"{name}.log").read_text(errors="replace")
        return ""


def loop_devices_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(directory) + "/"):
                found.append("/dev/" + backing.parent.parent.name)
    return found


def backing_file(device: str) -> str:
    """The file behind a loop device ('' when it has none)."""
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def holders(*needles: str) -> str:
    """Diagnostics for a volume that stays busy: processes whose mounts mention it."""
    found = []
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        with contextlib.suppress(OSError):
            text = info.read_text()
            if any(n in text for n in needles):
                cmd = (info.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"pid {info.parent.name}: {cmd[:160]}")
    return "processes whose mount table still holds it: " + ("; ".join(found) or "none")
