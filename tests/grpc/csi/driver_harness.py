"""The real CSI driver as a subprocess, plus a kubelet-shaped directory tree.

Owns everything the CSI conformance, robustness and fault suites share:

* ``DriverProcess`` starts ``python -m csi_driver serve`` on a short unix socket
  with its own state dir and kubelet root, waits (bounded) until Probe says
  ready, stops it (SIGTERM, then SIGKILL) and can kill -9 it on purpose.
* ``KubeletLayout`` creates directories exactly where and by whom the kubelet
  does (csi.md 2.2): the test creates the staging dir and the target's parent;
  the driver creates the target itself (a dir for mounts, a file for block).
* ``cleanup_kernel_objects`` unmounts every mount under the test's roots and
  detaches every loop device backed by a file under its state dir, so a failing
  test never leaks kernel objects (and never touches anyone else's).
* ``Csi`` bundles the four stubs and request builders; ``expect_code`` checks
  an error's code and the spec's rules for the status (readable message, no
  details).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import DRIVER_NAME
from csi_driver._proto import csi_pb2, csi_pb2_grpc
from plugin_runtime import commands

ROOT = Path(__file__).resolve().parents[3]
TOPOLOGY_KEY = "topology.local.csi.hostkit.io/node"
MiB = 1 << 20
GiB = 1 << 30

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def mount_cap(
    fs_type: str = "", mode: Any = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = (),
    group: str = "",
) -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(
            fs_type=fs_type, mount_flags=list(flags), volume_mount_group=group
        ),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block_cap(mode: Any = Mode.SINGLE_NODE_WRITER) -> Any:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def cap_for(kind: str, **kw: Any) -> Any:
    """A capability for access kind ``mount`` or ``block``."""
    if kind == "block":
        return block_cap(**{k: v for k, v in kw.items() if k == "mode"})
    return mount_cap(**kw)


def topology(node: str) -> Any:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node})


def expect_code(code: grpc.StatusCode, call: Callable[..., Any], request: Any) -> str:
    """Call and assert it fails with ``code``; the status must follow the spec's rules.

    Returns the status message.
    """
    try:
        call(request, timeout=60)
    except grpc.RpcError as err:
        got = err.code()
        assert got == code, f"expected {code.name}, got {got.name}: {err.details()}"
        assert err.details(), f"{code.name} without a message"
        trailers: Any = err.trailing_metadata() or ()
        keys = {item[0] for item in trailers}
        assert "grpc-status-details-bin" not in keys, "status.details must be empty"
        return str(err.details())
    raise AssertionError(f"expected {code.name}, the call succeeded")


def expect_ok_or(codes: set[grpc.StatusCode], call: Callable[..., Any], request: Any) -> Any:
    """Call; success or one of ``codes`` is acceptable.  Returns the response or the code."""
    try:
        return call(request, timeout=60)
    except grpc.RpcError as err:
        assert err.code() in codes, f"got {err.code().name}: {err.details()}"
        return err.code()


class Csi:
    """Stubs of the four services on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.identity = csi_pb2_grpc.IdentityStub(channel)
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.node = csi_pb2_grpc.NodeStub(channel)
        self.group = csi_pb2_grpc.GroupControllerStub(channel)
        self.metadata = csi_pb2_grpc.SnapshotMetadataStub(channel)

    def controller_caps(self) -> set[int]:
        resp = self.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30
        )
        return {c.rpc.type for c in resp.capabilities}

    def node_caps(self) -> set[int]:
        resp = self.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=30)
        return {c.rpc.type for c in resp.capabilities}

    def create(
        self, name: str, size: int = 64 * MiB, kind: str = "mount", fs_type: str = "",
        params: dict[str, str] | None = None, source: Any = None, limit: int | None = None,
        requirements: Any = None,
    ) -> Any:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(
                required_bytes=size, limit_bytes=size if limit is None else limit
            ),
            volume_capabilities=[cap_for(kind, fs_type=fs_type)],
            parameters=params or {},
        )
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        if requirements is not None:
            req.accessibility_requirements.CopyFrom(requirements)
        return self.controller.CreateVolume(req, timeout=120).volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)

    def stage(self, volume_id: str, staging: str, cap: Any, context: Any = None) -> Any:
        return self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, volume_capability=cap,
                volume_context=dict(context or {}),
            ),
            timeout=120,
        )

    def unstage(self, volume_id: str, staging: str) -> Any:
        return self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
            timeout=120,
        )

    def publish(
        self, volume_id: str, staging: str, target: str, cap: Any, readonly: bool = False,
        context: Any = None,
    ) -> Any:
        return self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, target_path=target,
                volume_capability=cap, readonly=readonly, volume_context=dict(context or {}),
            ),
            timeout=120,
        )

    def unpublish(self, volume_id: str, target: str) -> Any:
        return self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
            timeout=120,
        )


# ---------------------------------------------------------------------------
# The kubelet's directory layout
# ---------------------------------------------------------------------------


@dataclass
class KubeletLayout:
    """Paths under a fake kubelet root, created the way the kubelet creates them."""

    root: Path
    driver: str = DRIVER_NAME

    def staging_dir(self, volume_id: str) -> str:
        """Filesystem staging path; the kubelet creates it and vol_data.json beside it."""
        digest = hashlib.sha256(volume_id.encode()).hexdigest()
        path = self.root / "plugins/kubernetes.io/csi" / self.driver / digest / "globalmount"
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        (path.parent / "vol_data.json").write_text(
            json.dumps({"driverName": self.driver, "volumeHandle": volume_id})
        )
        return str(path)

    def target_dir(self, pod_uid: str, pv: str) -> str:
        """Filesystem target path; only the parent exists, the driver creates ``mount``."""
        parent = self.root / "pods" / pod_uid / "volumes/kubernetes.io~csi" / pv
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o750)
        (parent / "vol_data.json").write_text(
            json.dumps({"driverName": self.driver, "specVolID": pv})
        )
        return str(parent / "mount")

    def block_staging(self, pv: str) -> str:
        """Raw-block staging directory (csi_block.go); created by the kubelet."""
        path = self.root / "plugins/kubernetes.io/csi/volumeDevices/staging" / pv
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        return str(path)

    def block_target(self, pv: str, pod_uid: str) -> str:
        """Raw-block publish path: a FILE the driver creates inside a kubelet-made dir."""
        parent = self.root / "plugins/kubernetes.io/csi/volumeDevices/publish" / pv
        parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        return str(parent / pod_uid)

    def paths(self, kind: str, volume_id: str, pv: str, pod_uid: str) -> tuple[str, str]:
        """(staging, target) for access kind ``mount`` or ``block``."""
        if kind == "block":
            return self.block_staging(pv), self.block_target(pv, pod_uid)
        return self.staging_dir(volume_id), self.target_dir(pod_uid, pv)


# ---------------------------------------------------------------------------
# Kernel objects made by the driver under test
# ---------------------------------------------------------------------------


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of ``roots`` (from /proc/self/mountinfo)."""
    prefixes = [str(r.resolve()) for r in roots]
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = _unescape(line.split()[4])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return found


def loops_backed_by(state_dir: Path) -> list[str]:
    """Loop devices whose backing file lies under ``state_dir``."""
    prefix = str(state_dir.resolve()) + "/"
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            backing = (entry / "loop/backing_file").read_text().strip()
            backing = backing.removesuffix(" (deleted)")
            if backing.startswith(prefix):
                found.append(f"/dev/{entry.name}")
    return sorted(found)


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def cleanup_kernel_objects(roots: list[Path], state_dir: Path) -> list[str]:
    """Unmount everything under ``roots`` (deepest first) and detach our loops.

    Returns what had to be cleaned so callers can assert there was nothing.
    """
    cleaned: list[str] = []
    for _ in range(5):
        points = sorted(set(mounts_under(*roots)), key=len, reverse=True)
        if not points:
            break
        for point in points:
            # A kill -9 during a snapshot can leave a filesystem frozen; thaw first
            # (fails harmlessly when it is not frozen).
            commands.run(["fsfreeze", "--unfreeze", point], timeout=30, check=False)
            result = commands.run(["umount", point], timeout=30, check=False)
            if result.returncode == 0:
                cleaned.append(f"mount {point}")
    for loop in loops_backed_by(state_dir):
        result = commands.run(["losetup", "-d", loop], timeout=30, check=False)
        if result.returncode == 0:
            cleaned.append(f"loop {loop}")
    return cleaned


# ---------------------------------------------------------------------------
# The driver process
# ---------------------------------------------------------------------------


@dataclass
class DriverProcess:
    """``python -m csi_driver serve`` with private directories."""

    base: Path
    node_id: str = "node-a"
    config: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # e.g. --metrics-address
    module: str = "csi_driver"  # the ``python -m`` entry point (a test's own wrapper)
    command_prefix: list[str] = field(default_factory=list)  # e.g. setpriv dropping a cap
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    starts: int = 0

    @property
    def socket(self) -> Path:
        return self.base / "csi.sock"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def kubelet_root(self) -> Path:
        return self.base / "kubelet"

    @property
    def log_path(self) -> Path:
        return self.base / "driver.log"

    def argv(self) -> list[str]:
        argv = [
            *self.command_prefix,
            sys.executable, "-m", self.module, "serve",
            "--endpoint", f"unix://{self.socket}",
            "--node-id", self.node_id,
            "--state-dir", str(self.state_dir),
            "--kubelet-root", str(self.kubelet_root),
        ]
        if self.config is not None:
            config_file = self.base / "config.yaml"
            config_file.write_text(json.dumps(self.config))  # JSON is YAML
            argv += ["--config", str(config_file)]
        return argv + self.extra_args

    def pools_json(self) -> dict[str, Any]:
        """``csi-driver pools --json`` on this driver's state dir and config."""
        argv = [sys.executable, "-m", "csi_driver", "pools", "--json",
                "--state-dir", str(self.state_dir)]
        if self.config is not None:
            argv += ["--config", str(self.base / "config.yaml")]
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                             check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return dict(json.loads(out.stdout))

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """Start the driver; with ``wait``, until Probe answers ready (bounded)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.pop("HOSTKIT_CRASH_AT", None)
        full_env.update(self.env)
        full_env.update(env or {})
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} env={env or {}} ---\n".encode())
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = "socket never appeared"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"driver exited with {self.proc.returncode} during start:\n{self.log_tail()}"
                )
            if self.socket.exists():
                try:
                    ready = self.csi().identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
                    if not ready.HasField("ready") or ready.ready.value:
                        return
                    last = "Probe said not ready"
                except grpc.RpcError as err:
                    last = f"Probe failed: {err.code().name} {err.details()}"
            time.sleep(0.1)
        raise AssertionError(f"driver not ready after {timeout} s ({last}):\n{self.log_tail()}")

    def csi(self) -> Csi:
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        return Csi(self.channel)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait (bounded) for the process to exit on its own; its exit status."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._drop_channel()
        return code

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._drop_channel()

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._drop_channel()

    def _drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def cleanup(self) -> list[str]:
        """Stop and remove every kernel object and file the driver made."""
        self.stop()
        return cleanup_kernel_objects([self.kubelet_root, self.state_dir], self.state_dir)


# The kinds of pool the lifecycle, fuzz and crash suites run against.
POOL_KINDS = ("image", "subvolume")
SUBVOLUME_POOL = "subvol"


@contextlib.contextmanager
def btrfs_mount(base: Path, size: int = 1 << 30) -> Iterator[Path]:
    """A fresh btrfs at ``base/btrfs`` (mkfs on an image file, a loop device, a mount).

    Torn down after, even on failure: every mount under it (deepest first), then
    the loop device.  The driver's mounts of subvolumes must be gone first.
    """
    from csi_driver import loop, mounts
    from plugin_runtime.errors import FailedPrecondition

    image = base / "btrfs.img"
    with open(image, "xb") as handle:
        handle.truncate(size)
    commands.run(["mkfs.btrfs", "-q", "-f", str(image)], timeout=120)
    device = loop.attach(str(image))
    point = base / "btrfs"
    try:
        point.mkdir()
        mounts.mount(device, str(point), "btrfs", ())
        yield point
    finally:
        for mounted in sorted(set(mounts_under(point)), key=len, reverse=True):
            mounts.unmount(mounted)

        def detached() -> bool:
            try:
                loop.detach(device)
            except FailedPrecondition:
                return False  # btrfs can hold the device a moment after its unmount
            return True

        assert wait_until(detached, 30.0), f"{device} stays busy after unmounting {point}"


def subvolume_pool_config(fs: Path, **options: Any) -> dict[str, Any]:
    return {"pools": [{"name": SUBVOLUME_POOL, "type": "subvolume", "path": str(fs / "pool"),
                       **options}]}


@contextlib.contextmanager
def running_driver(
    node_id: str = "node-a", config: Callable[[Path], dict[str, Any]] | None = None,
    env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
    module: str = "csi_driver", command_prefix: tuple[str, ...] = (),
    pool_kind: str = "image", pool_options: dict[str, Any] | None = None,
) -> Iterator[DriverProcess]:
    """A started driver in a fresh short /tmp dir; everything is cleaned up after.

    ``pool_kind="subvolume"``: the driver's one pool is a subvolume pool on a btrfs
    made for it, with ``pool_options`` (``config`` may not name pools then).
    """
    base = Path(tempfile.mkdtemp(prefix="csi", dir="/tmp"))
    driver = DriverProcess(base=base, node_id=node_id, env=dict(env or {}),
                           extra_args=list(extra_args), module=module,
                           command_prefix=list(command_prefix))
    with contextlib.ExitStack() as stack:
        if config is not None:
            driver.config = config(base)
        if pool_kind == "subvolume":
            fs = stack.enter_context(btrfs_mount(base))
            assert driver.config is None or "pools" not in driver.config
            driver.config = {**(driver.config or {}),
                             **subvolume_pool_config(fs, **(pool_options or {}))}
        else:
            assert pool_kind == "image", pool_kind
        try:
            driver.start()
            yield driver
        finally:
            leftovers = driver.cleanup()
            if leftovers:
                print(f"cleaned after the driver in {base}: {leftovers}")
    # Never delete through a mount that could not be removed.
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------
# Fixtures (re-exported by the conftest of each CSI test directory)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[DriverProcess]:
    """One driver per test module, default config (one image pool under the state dir)."""
    with running_driver() as proc:
        yield proc


@pytest.fixture
def csi(driver: DriverProcess) -> Csi:
    if not driver.alive():  # a previous test killed it on purpose
        driver.start()
    return driver.csi()


@pytest.fixture
def kubelet(driver: DriverProcess) -> KubeletLayout:
    return KubeletLayout(driver.kubelet_root)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique, valid object names (PVC-like)."""

    def make(prefix: str = "pvc") -> str:
        return f"{prefix}-{uuid.uuid4()}"

    return make
