"""A real single-node Kubernetes as host processes, in two layers.

Owns the tier's cluster: configuration, start order, readiness and teardown.

``Run``
    one directory ``/tmp/hke-<id>`` (short: unix sockets live in it), its
    ``Footprint`` on the host and the final leak check.  Everything of the run is
    named after ``<id>``, so two runs on one machine never meet.
``ControlPlane(run, binaries)``
    etcd (Debian's etcd-server) and kube-apiserver on 127.0.0.1 with free ports,
    the run's CA and certificates, an admin kubeconfig; ``client()`` returns a
    lightkube ``Client``; ``kubeconfig(user, groups)`` issues more identities.
    Fast (a few seconds): enough for API-only tests (DRA objects, RBAC).
``Node(control_plane)``
    adds kube-controller-manager, kube-scheduler, containerd 2.3 (the shared
    binary; root, state, sockets, NRI, runc root, CNI config and CDI spec dir in
    the run's directory) with the busybox/pause images imported, and a kubelet
    (root ``<run>/kubelet``, node ``hke-<id>`` on a /32 of ``lo``, cgroup root
    ``/hke-<id>``); ready when the node is Ready and the default ServiceAccount
    exists.  ``restart_kubelet()``, ``kubelet_root``, ``device_plugin_dir``,
    ``pod_resources_socket``, ``cdi_dir``, ``node_name`` serve the scenarios.
    containerd and the kubelet run in the node's own mount namespace (see
    ``_start_mount_namespace``: the kubelet's device-plugin directory is fixed at
    /var/lib/kubelet/device-plugins whatever its root); ``in_node()`` is the argv
    prefix that starts other node-side processes (our daemons, sidecars) there.

Teardown (``stop``) always runs to the end, whatever failed: pods are deleted
through the API, the kubelet and containerd stop, leftover shims, runc
containers and cgroups are killed and removed, mounts under the run's directory
are unmounted, the CNI bridge and node address are removed, and the last of
concurrent runs restores sysctls and removes ``KUBE-*`` chains (``host``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import yaml
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node as NodeResource
from lightkube.resources.core_v1 import Pod, ServiceAccount

from plugin_runtime import commands
from tests.e2e import host, images, pki
from tests.e2e.binaries import Binaries
from tests.e2e.processes import BASE_PATH, Daemon

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
NODE_READY_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Run:
    """The run's directory and host footprint; ``close`` removes it and lists leaks."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(4)
        self.name = f"hke-{self.id}"
        self.directory = Path(f"/tmp/{self.name}")
        self.directory.mkdir(mode=0o700)
        self.logs = self.directory / "logs"
        self.logs.mkdir()
        self.footprint = host.Footprint(run=self.name, directory=self.directory)
        self.footprint.save()
        self.saved_logs: Path | None = None

    def close(self, keep_logs: bool = False) -> list[str]:
        """Remove the directory (never across a mount) and return what leaked; the
        component logs are kept first with ``keep_logs`` (a test failed) or a leak."""
        host.unmount_under(self.directory)
        own_dir = f"directory {self.directory}"
        if keep_logs or [leak for leak in self.footprint.leaks() if leak != own_dir]:
            self._keep_logs()
        if self.directory.exists() and not host.mounts_under(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
        try:
            return self.footprint.leaks()
        finally:
            self.footprint.release_namespace()

    def _keep_logs(self) -> None:
        """Component logs survive a failed run in /tmp/hke-logs-<id>."""
        target = Path(f"/tmp/hke-logs-{self.id}")
        with contextlib.suppress(OSError):
            shutil.copytree(self.logs, target)
            self.saved_logs = target


def _https_ok(url: str, ca: Path, client: pki.KeyPair) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    with urllib.request.urlopen(url, context=context, timeout=2) as response:
        return bool(response.status == 200)


class ControlPlane:
    """etcd and kube-apiserver of a run."""

    def __init__(self, run: Run, binaries: Binaries) -> None:
        self.run = run
        self.binaries = binaries
        self.pki_dir = run.directory / "pki"
        self.ca = pki.Authority(self.pki_dir, f"hostkit-e2e-{run.id}")
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.admin = self.ca.issue("admin", "admin", organizations=("system:masters",))
        self.admin_kubeconfig = self.kubeconfig_for("admin", self.admin)
        self.daemons: list[Daemon] = []
        self._client: Client | None = None

    def kubeconfig_for(self, name: str, pair: pki.KeyPair) -> Path:
        return pki.kubeconfig(self.pki_dir / f"{name}.kubeconfig", self.server,
                              self.ca.cert, pair, name)

    def kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a new client identity ``user`` in ``groups``."""
        safe = user.replace(":", "-")
        return self.kubeconfig_for(safe, self.ca.issue(safe, user, organizations=groups))

    def client(self) -> Client:
        """The admin's lightkube client (one per control plane)."""
        if self._client is None:
            self._client = Client(KubeConfig.from_file(self.admin_kubeconfig),
                                  field_manager="hostkit-e2e")
        return self._client

    def start(self) -> None:
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = Daemon("etcd", [
            self.binaries["etcd"], "--name", self.run.name,
            "--data-dir", str(self.run.directory / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"{self.run.name}=http://127.0.0.1:{peer_port}",
            "--initial-cluster-state", "new", "--logger", "zap",
        ], self.run.logs)
        self.daemons.append(etcd.start())
        etcd.wait_until(lambda: _http_ok(f"{etcd_url}/health"), "etcd health", START_TIMEOUT)

        serving = self.ca.issue("apiserver", "kube-apiserver", server=True,
                                hosts=("127.0.0.1", "localhost", "kubernetes",
                                       "kubernetes.default", "kubernetes.default.svc"))
        kubelet_client = self.ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                       organizations=("system:masters",))
        self.service_account = pki.service_account_keys(self.pki_dir)
        apiserver = Daemon("kube-apiserver", [
            self.binaries["kube-apiserver"],
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={self.api_port}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--client-ca-file={self.ca.cert}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--kubelet-client-certificate={kubelet_client.cert}",
            f"--kubelet-client-key={kubelet_client.key}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={self.service_account.cert}",
            f"--service-account-signing-key-file={self.service_account.key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--profiling=false",
        ], self.run.logs)
        self.daemons.append(apiserver.start())
        apiserver.wait_until(
            lambda: _https_ok(f"{self.server}/readyz", self.ca.cert, self.admin),
            "readyz", START_TIMEOUT)

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        for daemon in reversed(self.daemons):
            daemon.stop()


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


class Node:
    """Controller manager, scheduler, containerd and the kubelet of a run."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self.cp = control_plane
        self.run = control_plane.run
        self.binaries = control_plane.binaries
        d = self.run.directory
        self.node_name = self.run.name
        self.kubelet_root = d / "kubelet"
        self.device_plugin_dir = self.kubelet_root / "device-plugins"
        self.pod_resources_socket = self.kubelet_root / "pod-resources" / "kubelet.sock"
        self.cdi_dir = d / "cdi"
        self.containerd_dir = d / "containerd"
        self.containerd_socket = self.containerd_dir / "containerd.sock"
        self.runc_root = d / "runc"
        self.bridge = f"hke{self.run.id}"
        self.node_ip: str | None = None
        self.daemons: dict[str, Daemon] = {}
        self.mount_ns: str | None = None
        self._entered_shared = False

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        fp = self.run.footprint
        host.enter_shared(self.run.name)
        self._entered_shared = True
        self.node_ip = host.add_node_address()
        fp.node_address = self.node_ip
        fp.cgroup_root = self.run.name
        fp.links.append(self.bridge)
        fp.save()
        host.create_cgroup_root(self.run.name)
        for path in (self.kubelet_root, self.cdi_dir, self.containerd_dir, self.runc_root,
                     self.device_plugin_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._start_mount_namespace()
        self._start_controllers()
        self._start_containerd()
        self._start_kubelet()
        self._wait_ready()

    def _start_mount_namespace(self) -> None:
        """The node's own mount namespace, with the device-plugin directory bound in.

        The kubelet's device manager ignores ``--root-dir``: its registration socket
        and checkpoint are always in /var/lib/kubelet/device-plugins.  Two runs would
        take that socket from each other (and every kubelet start wipes the plugin
        sockets there), so the node's processes live in a private mount namespace
        where that path is a bind mount of ``<root>/device-plugins``.  Files and
        sockets stay reachable from the host by their run paths; mounts made inside
        (kubelet volumes, container root filesystems) die with the namespace.
        """
        host.ensure_device_plugin_mount_point()
        holder = Daemon("mount-namespace", [
            "/usr/bin/unshare", "--mount", "--propagation", "private", "--",
            "/bin/sleep", "infinity"], self.run.logs).start()
        self.daemons["mount-namespace"] = holder
        own = os.readlink("/proc/self/ns/mnt")
        holder.wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/mnt") != own,
                          "a mount namespace of its own", START_TIMEOUT)
        self.run.footprint.hold_namespace(holder.pid)
        self.mount_ns = self.run.footprint.mount_namespace
        self.run.footprint.save()
        commands.run([*self.in_node(), "mount", "--bind", str(self.device_plugin_dir),
                      host.KUBELET_DEVICE_PLUGIN_DIR], timeout=30)

    def in_node(self) -> list[str]:
        """The argv prefix that runs a command in the node's mount namespace.

        Node-side processes (our daemons, CSI sidecars) start with it, so they see the
        kubelet's and containerd's mounts as on a real node."""
        holder = self.daemons["mount-namespace"]
        return ["/usr/bin/nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--"]

    def _start_controllers(self) -> None:
        cp = self.cp
        kcm = cp.kubeconfig("system:kube-controller-manager")
        sched = cp.kubeconfig("system:kube-scheduler")
        self.daemons["kube-controller-manager"] = Daemon("kube-controller-manager", [
            self.binaries["kube-controller-manager"],
            f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
            f"--authorization-kubeconfig={kcm}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--service-account-private-key-file={cp.service_account.key}",
            f"--root-ca-file={cp.ca.cert}", "--use-service-account-credentials=true",
            "--leader-elect=false", "--profiling=false",
        ], self.run.logs).start()
        self.daemons["kube-scheduler"] = Daemon("kube-scheduler", [
            self.binaries["kube-scheduler"],
            f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--profiling=false",
        ], self.run.logs).start()

    def _containerd_config(self) -> Path:
        c = self.containerd_dir
        cni_conf = c / "net.d"
        cni_conf.mkdir(exist_ok=True)
        subnet = f"10.251.{int(self.run.id[:2], 16)}.0/24"
        (cni_conf / "10-hke.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.run.name,
            "plugins": [{"type": "bridge", "bridge": self.bridge, "isGateway": False,
                         "ipMasq": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                                  "dataDir": str(c / "ipam")}}],
        }))
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        text = f"""version = 3
root = "{c / 'root'}"
state = "{c / 'state'}"
temp = "{c / 'tmp'}"
imports = []

[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins.'io.containerd.internal.v1.opt']
  path = "{c / 'opt'}"
[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = "{c / 'verifiers'}"
[plugins.'io.containerd.nri.v1.nri']
  socket_path = "{c / 'nri.sock'}"
  plugin_path = "{c / 'nri-plugins'}"
  plugin_config_path = "{c / 'nri-conf.d'}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{images.PAUSE}"
[{runtime}]
  enable_cdi = true
  cdi_spec_dirs = ["{self.cdi_dir}"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
[{runtime}.containerd]
  default_runtime_name = "runc"
[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtime}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{self.binaries['runc']}"
  Root = "{self.runc_root}"
[{runtime}.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "{cni_conf}"
"""
        path = c / "config.toml"
        path.write_text(text)
        return path

    def _start_containerd(self) -> None:
        config = self._containerd_config()
        env = {"PATH": f"{self.binaries.directory_of('containerd-shim-runc-v2')}:{BASE_PATH}"}
        daemon = Daemon("containerd", [*self.in_node(), self.binaries["containerd"],
                                       "--config", str(config)], self.run.logs, env=env)
        self.daemons["containerd"] = daemon.start()
        daemon.wait_until(self.containerd_socket.exists, "its socket", START_TIMEOUT)
        archive = images.build_archive(self.binaries["busybox"],
                                       self.run.directory / "images.tar")
        self.ctr("images", "import", "--all-platforms", str(archive))

    def ctr(self, *args: str) -> str:
        return commands.run([self.binaries["ctr"], "--address", str(self.containerd_socket),
                             "--namespace", "k8s.io", *args], timeout=120).stdout

    def _kubelet_config(self) -> Path:
        assert self.node_ip is not None
        cp = self.cp
        serving = cp.ca.issue("kubelet", self.node_name, server=True,
                              hosts=(self.node_ip, "127.0.0.1", self.node_name))
        endpoint = f"unix://{self.containerd_socket}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(cp.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.run.name}",
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": endpoint,
            "imageServiceEndpoint": endpoint,
            "podLogsDir": str(self.run.directory / "pod-logs"),
            "volumePluginDir": str(self.run.directory / "volume-plugins"),
            "protectKernelDefaults": False,
            "makeIPTablesUtilChains": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "resolvConf": "/etc/resolv.conf",
            "clusterDomain": "cluster.local",
        }
        path = self.run.directory / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.kubelet_healthz = f"http://127.0.0.1:{config['healthzPort']}/healthz"
        return path

    def _start_kubelet(self) -> None:
        config = self._kubelet_config()
        kubeconfig = self.cp.kubeconfig(f"system:node:{self.node_name}", ("system:nodes",))
        assert self.node_ip is not None
        self.daemons["kubelet"] = Daemon("kubelet", [
            *self.in_node(), self.binaries["kubelet"],
            f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.kubelet_root}", f"--node-ip={self.node_ip}",
            f"--hostname-override={self.node_name}", "--v=2",
        ], self.run.logs, env={"PATH": f"{BASE_PATH}"}).start()

    def _wait_ready(self) -> None:
        client = self.cp.client()

        def node_ready() -> bool:
            node = client.get(NodeResource, self.node_name)
            assert node.status is not None and node.status.conditions is not None
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)

        def default_sa() -> bool:
            client.get(ServiceAccount, "default", namespace="default")
            return True

        kubelet = self.daemons["kubelet"]
        kubelet.wait_until(node_ready, "Ready node", NODE_READY_TIMEOUT)
        self.daemons["kube-controller-manager"].wait_until(
            default_sa, "default ServiceAccount", NODE_READY_TIMEOUT)

    # ---------------------------------------------------------------- restarts
    def restart_kubelet(self) -> float:
        """Stop and start the kubelet; returns the monotonic time it was started."""
        kubelet = self.daemons["kubelet"]
        kubelet.stop()
        started = time.monotonic()
        kubelet.start()
        kubelet.wait_until(lambda: _http_ok(self.kubelet_healthz), "healthz", START_TIMEOUT)
        return started

    # -------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Undo everything ``start`` did, as far as it got; never stops half-way."""
        steps = [
            self._delete_pods,
            lambda: self._stop("kubelet"),
            lambda: self._stop("containerd"),
            self._remove_containers,
            lambda: host.remove_cgroup_root(self.run.name),
            self._unmount_in_node,
            self._empty_mount_namespace,
            lambda: host.unmount_under(self.run.directory),
            lambda: host.delete_link(self.bridge),
            self._remove_node_address,
            lambda: self._stop("kube-scheduler"),
            lambda: self._stop("kube-controller-manager"),
            self._leave_shared,
        ]
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("e2e teardown step failed; continuing")

    def mounts(self, under: Path) -> list[str]:
        """Mount points at or below ``under`` as the node (kubelet, containerd) sees them;
        the test process's own namespace does not see the node's mounts."""
        return host.mounts_under(under, self.daemons["mount-namespace"].pid)

    def _unmount_in_node(self) -> None:
        """What containerd or a driver left mounted in the node's namespace (the
        namespace would drop it anyway; this also releases loop devices at once)."""
        holder = self.daemons.get("mount-namespace")
        if holder is not None and holder.running():
            host.unmount_under(self.run.directory, holder.pid, self.in_node())

    def _empty_mount_namespace(self) -> None:
        """Stop the holder and whatever a test left in the namespace; it then vanishes."""
        self._stop("mount-namespace")
        if self.mount_ns is not None:
            deadline = time.monotonic() + 10
            while (pids := host.processes_in_namespace(self.mount_ns)) and \
                    time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                time.sleep(0.1)

    def _remove_node_address(self) -> None:
        if self.node_ip is not None:
            host.remove_node_address(self.node_ip)

    def _stop(self, name: str) -> None:
        if name in self.daemons:
            self.daemons[name].stop(grace=15.0)

    def _delete_pods(self, timeout: float = 60.0) -> None:
        """Let the kubelet tear its pods down (volumes, sandboxes) while it runs."""
        kubelet = self.daemons.get("kubelet")
        if kubelet is None or not kubelet.running():
            return
        client = self.cp.client()
        for pod in client.list(Pod, namespace="*"):
            assert pod.metadata is not None and pod.metadata.name is not None
            with contextlib.suppress(ApiError):
                client.delete(Pod, pod.metadata.name, namespace=pod.metadata.namespace,
                              grace_period=0)
        deadline = time.monotonic() + timeout
        while list(client.list(Pod, namespace="*")) and time.monotonic() < deadline:
            time.sleep(0.5)

    def _remove_containers(self) -> None:
        """Containers whose shim outlived containerd (README: runc delete -f)."""
        host.kill_processes_mentioning(str(self.containerd_socket))
        for namespace_root in self.runc_root.glob("*"):
            if not namespace_root.is_dir():
                continue
            for container in namespace_root.iterdir():
                commands.run([*self.in_node(), self.binaries["runc"], "--root", str(namespace_root),
                              "delete", "-f", container.name], timeout=30, check=False)

    def _leave_shared(self) -> None:
        if self._entered_shared:
            self._entered_shared = False
            self.run.footprint.shared_left = host.leave_shared(self.run.name)
