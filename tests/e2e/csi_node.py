"""The CSI node pod of ``daemonsets/`` run as host processes against the tier's cluster.

Owns turning the rendered ``hostkit-csi-node`` DaemonSet (``kubectl kustomize
daemonsets/overlays/default``) into host processes, and running them:

* each container's ``command`` + ``args`` and ``env``, with ``$(VAR)`` expanded
  from the container's env as the kubelet does (field references: the node, the
  stand-in pod's name and namespace);
* every path translated the way the pod's mounts make it: a container path
  goes to its volume's host path (``hostPath``; the ConfigMap volume to a
  directory holding the rendered ConfigMap's files), and host paths under the
  manifests' kubelet root and state dir move under the tier's.  A ``hostPath``
  the tier has no place for is an error, so a new mount cannot slip through;
* listeners the pod opens on every address of the node (``:9808``) bind to
  127.0.0.1: the tier listens on loopback only;
* what a container gets from its pod rather than from its args: the
  registrar's default ``/registration`` directory becomes
  ``--plugin-registration-path``, and the sidecars that mount the
  ServiceAccount token get ``--kubeconfig`` with a token of that ServiceAccount
  (TokenRequest, bound to the stand-in pod), so their RBAC is the manifests';
* a stand-in pod (busybox ``sleep``, the DaemonSet's labels and
  ServiceAccount) that owns the provisioner's CSIStorageCapacity objects
  (``--capacity-ownerref-level=0`` looks it up by POD_NAME/NAMESPACE);
* every process started in the node's mount namespace (``Node.in_node()``),
  where the kubelet and containerd run, so the driver's mounts are the
  kubelet's as on a real node;
* the sidecars restarted when they exit, as the kubelet restarts containers
  (they exit when the driver's socket goes away), and the cluster-wide
  snapshot-controller (``--enable-distributed-snapshotting``, admin identity:
  it is not part of our manifests).

The driver's image pool is the rendered ConfigMap's, with its path translated
by the same rule (``/var/lib/hostkit-csi/...`` -> the tier's state dir), so it
is an image-file pool in a temporary directory of the tier.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.manifests import DAEMONSETS, container, find, load_all, overlay_root
from tests.e2e.processes import BASE_PATH, Daemon

OVERLAY = "default"
DAEMONSET = "hostkit-csi-node"
DRIVER = "csi-driver"
SIDECARS = ("node-driver-registrar", "csi-provisioner", "csi-snapshotter", "csi-resizer",
            "liveness-probe")
# Container name -> the shared binary that is its image.
SIDECAR_BINARIES = {
    "node-driver-registrar": "csi-node-driver-registrar",
    "csi-provisioner": "csi-provisioner",
    "csi-snapshotter": "csi-snapshotter",
    "csi-resizer": "csi-resizer",
    "liveness-probe": "livenessprobe",
}
STATE_DIR = "/var/lib/hostkit-csi"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Directories the containers use at a binary's default path, not through an arg.
DEFAULT_PATH_FLAGS = {"node-driver-registrar": {"/registration": "--plugin-registration-path"}}
# Host paths the pod shares with the host as they are (devices and udev's database).
SHARED_HOST_PATHS = ("/dev", "/run/udev")
STANDIN_POD = "hostkit-csi-node-e2e"


@dataclass(frozen=True)
class HostLayout:
    """Where the tier puts what the DaemonSet keeps on the node."""

    kubelet_root: Path  # the tier kubelet's --root-dir
    state_dir: Path  # instead of /var/lib/hostkit-csi
    config_dir: Path  # the rendered ConfigMap's files
    kubeconfig: Path  # the sidecars' API access instead of the token mount
    node_name: str
    namespace: str
    pod_name: str

    def relocations(self) -> list[tuple[str, str]]:
        return [(overlay_root(OVERLAY), str(self.kubelet_root)), (STATE_DIR, str(self.state_dir))]


@dataclass(frozen=True)
class HostCommand:
    """One container of the pod as a host process."""

    name: str
    argv: list[str]
    env: dict[str, str]


def _relocate(path: str, relocations: list[tuple[str, str]]) -> str:
    for real, tier in relocations:
        if path == real or path.startswith(real + "/"):
            return tier + path[len(real):]
    return path


class PodTranslation:
    """Container paths, env and listeners of the rendered pod, as on this host."""

    def __init__(self, daemonset: dict[str, Any], layout: HostLayout) -> None:
        self.spec = daemonset["spec"]["template"]["spec"]
        self.layout = layout
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}

    def volume_host_path(self, name: str) -> str | None:
        """The host directory behind a volume; None for the ServiceAccount token."""
        vol = self.volumes[name]
        if "hostPath" in vol:
            path = str(vol["hostPath"]["path"])
            moved = _relocate(path, self.layout.relocations())
            if moved == path and not any(
                    path == p or path.startswith(p + "/") for p in SHARED_HOST_PATHS):
                raise AssertionError(f"hostPath {path} of volume {name}: the tier has no "
                                     "place for it (add a relocation or a shared path)")
            return moved
        if "configMap" in vol:
            return str(self.layout.config_dir)
        if "projected" in vol:
            return None
        raise AssertionError(f"volume {name}: kind not handled by the tier: {sorted(vol)}")

    def path(self, cont: dict[str, Any], path: str) -> str:
        """A path as the container sees it -> the host path it reaches."""
        mounts = sorted(cont.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
        for m in mounts:
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                base = self.volume_host_path(m["name"])
                if base is None:
                    raise AssertionError(f"{cont['name']}: {path} is in the token mount")
                return base + path[len(mp):]
        return _relocate(path, self.layout.relocations())

    def value(self, cont: dict[str, Any], value: str) -> str:
        """Translate one arg: ``--flag=VALUE`` or ``VALUE`` (paths, unix://, :port)."""
        prefix, rest = "", value
        if value.startswith("-"):
            if "=" not in value:
                return value
            flag, _, rest = value.partition("=")
            prefix = flag + "="
        scheme = "unix://" if rest.startswith("unix://") else ""
        rest = rest[len(scheme):]
        if rest.startswith("/"):
            rest = self.path(cont, rest)
        elif rest.startswith(":") and rest[1:].isdigit():
            rest = "127.0.0.1" + rest
        return prefix + scheme + rest

    def env(self, cont: dict[str, Any]) -> dict[str, str]:
        """The container's env: literal values and the field references a pod gets."""
        fields = {"spec.nodeName": self.layout.node_name,
                  "metadata.name": self.layout.pod_name,
                  "metadata.namespace": self.layout.namespace}
        out: dict[str, str] = {}
        for e in cont.get("env", []):
            if "value" in e:
                out[e["name"]] = str(e["value"])
            else:
                ref = e["valueFrom"]["fieldRef"]["fieldPath"]
                assert ref in fields, f"{cont['name']}: env {e['name']} from {ref}"
                out[e["name"]] = fields[ref]
        return out

    def command(self, name: str, executable: str) -> HostCommand:
        cont = next(c for c in self.spec["containers"] if c["name"] == name)
        env = self.env(cont)

        def expand(value: str) -> str:
            for key, val in env.items():
                value = value.replace(f"$({key})", val)
            assert "$(" not in value, f"{name}: unexpanded {value}"
            return value

        args = [self.value(cont, expand(str(a))) for a in cont.get("args", [])]
        given = {a.split("=", 1)[0] for a in args}
        mount_paths = {m["mountPath"] for m in cont.get("volumeMounts", [])}
        for path, flag in DEFAULT_PATH_FLAGS.get(name, {}).items():
            if path in mount_paths and flag not in given:
                args.append(f"{flag}={self.path(cont, path)}")
        if TOKEN_MOUNT in mount_paths:
            args.append(f"--kubeconfig={self.layout.kubeconfig}")
        command = [str(c) for c in cont.get("command", [])]
        argv = [executable, *command[1:], *args] if command else [executable, *args]
        host_env = {"PATH": BASE_PATH}
        host_env.update({k: self.value(cont, v) for k, v in env.items()})
        return HostCommand(name=name, argv=argv, env=host_env)


def rendered_docs(kubectl: str) -> list[dict[str, Any]]:
    """``kubectl kustomize daemonsets/overlays/default`` with the tier's kubectl."""
    from plugin_runtime import commands
    out = commands.run([kubectl, "kustomize", str(DAEMONSETS / "overlays" / OVERLAY)],
                       timeout=60)
    return load_all(out.stdout)


def driver_config(docs: list[dict[str, Any]], translation: PodTranslation) -> str:
    """The rendered ConfigMap's config.yaml with its pool paths as the driver sees them."""
    maps = [d for d in docs if d["kind"] == "ConfigMap"
            and d["metadata"]["name"].startswith("hostkit-csi-config")]
    assert len(maps) == 1, "one hostkit-csi-config ConfigMap"
    config = yaml.safe_load(maps[0]["data"]["config.yaml"])
    driver = container(find(docs, "DaemonSet", DAEMONSET), DRIVER)
    for pool in config.get("pools", []):
        if "path" in pool:
            pool["path"] = translation.path(driver, pool["path"])
    return str(yaml.safe_dump(config, sort_keys=False))


def driver_executable() -> str:
    """The ``csi-driver`` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "csi-driver"
    assert script.is_file(), f"{script} missing: run scripts/setup.sh"
    return str(script)


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

    def __init__(self, docs: list[dict[str, Any]], layout: HostLayout, log_dir: Path,
                 sidecar_binary: Callable[[str], str], admin_kubeconfig: Path,
                 in_node: list[str]) -> None:
        """``in_node`` prefixes every argv: the node's mount namespace, as in a pod."""
        self.layout = layout
        self.log_dir = log_dir
        daemonset = find(docs, "DaemonSet", DAEMONSET)
        self.translation = PodTranslation(daemonset, layout)
        layout.config_dir.mkdir(parents=True, exist_ok=True)
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        (layout.config_dir / "config.yaml").write_text(driver_config(docs, self.translation))
        self.commands = {DRIVER: self.translation.command(DRIVER, driver_executable())}
        for name in SIDECARS:
            self.commands[name] = self.translation.command(name, sidecar_binary(
                SIDECAR_BINARIES[name]))
        socket_vol = next(m for m in container(daemonset, DRIVER)["volumeMounts"]
                          if m["name"] == "socket-dir")
        self.socket = Path(self.translation.path(container(daemonset, DRIVER),
                                                 socket_vol["mountPath"])) / "csi.sock"
        self.driver = Daemon(DRIVER, [*in_node, *self.commands[DRIVER].argv], log_dir,
                             env=self.commands[DRIVER].env)
        self.sidecars = {
            name: Supervised(Daemon(name, [*in_node, *self.commands[name].argv], log_dir,
                                    env=self.commands[name].env))
            for name in SIDECARS
        }
        self.snapshot_controller = Supervised(Daemon(
            "snapshot-controller",
            [sidecar_binary("snapshot-controller"), f"--kubeconfig={admin_kubeconfig}",
             "--enable-distributed-snapshotting", "--v=2"],
            log_dir))

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
            return (self.log_dir / f"{name}.log").read_text(errors="replace")
        return ""

    @property
    def pool_dir(self) -> Path:
        config = yaml.safe_load((self.layout.config_dir / "config.yaml").read_text())
        return Path(config["pools"][0]["path"])


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


def mounts_under(mountinfo: Path, *directories: Path) -> list[str]:
    """Mount points (from ``mountinfo``, a /proc/PID/mountinfo) under ``directories``."""
    prefixes = [str(d) for d in directories]
    found = []
    for line in mountinfo.read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return found

