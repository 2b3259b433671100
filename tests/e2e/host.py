"""What the tier changes on the host, how it is undone, and the check that it was.

Owns every host-wide side effect of a run and its reversal:

* the node address: one /32 on ``lo`` (the kubelet refuses loopback node IPs and
  this kernel has no ``dummy`` links), chosen at random in 10.250.0.0/16 and
  added with ``ip addr add``, which fails if another run holds it;
* the kubelet's ``cgroupRoot``: ``/<run name>`` in every cgroup v1 hierarchy,
  removed depth-first after any process left in it is killed;
* state that the kubelet changes for the whole machine and that two runs share:
  kernel sysctls and ``KUBE-*`` iptables/ip6tables chains.  A reference-counted
  record under ``/tmp/hostkit-e2e-host`` (guarded by ``flock``) keeps the values
  and chain names from before the first concurrent run; the last run out
  restores the sysctls and deletes the chains that were not there before;
* mounts, loop devices, processes and network links of the run, all found by
  the run's directory or names, and processes left in the node's mount namespace;
* /var/lib/kubelet/device-plugins, the kubelet's fixed device-plugin directory:
  an empty mount point on the host (each run binds its own directory onto it in
  its node's mount namespace), removed by the last run out if it was absent;
* ``leaks``: the list of everything above still present after teardown, which
  the session fixture turns into a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from plugin_runtime import commands

CGROUP_FS = Path("/sys/fs/cgroup")
SHARED_DIR = Path("/tmp/hostkit-e2e-host")
SYSCTLS = (
    "vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "vm/panic_on_oom",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
)
IPTABLES = ("iptables", "ip6tables")
# Where the kubelet's device manager always puts its socket (not under --root-dir).
KUBELET_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
TABLES = ("filter", "nat", "mangle")
CHAIN_PREFIX = "KUBE-"


# ---------------------------------------------------------------- node address

def add_node_address(attempts: int = 20) -> str:
    """Add a fresh /32 to ``lo`` and return it (another run's address is refused)."""
    for _ in range(attempts):
        address = f"10.250.{random.randint(0, 255)}.{random.randint(1, 254)}"
        result = commands.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"],
                              timeout=10, check=False)
        if result.returncode == 0:
            return address
    raise RuntimeError("could not add a free 10.250.x.y/32 to lo")


def remove_node_address(address: str) -> None:
    if address_present(address):
        commands.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], timeout=10)


def address_present(address: str) -> bool:
    out = commands.run(["ip", "-o", "addr", "show", "dev", "lo"], timeout=10).stdout
    return f" {address}/32 " in out


# ---------------------------------------------------------------------- cgroups

def hierarchies() -> list[Path]:
    """Mounted cgroup v1 hierarchies (one directory per controller set)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split(" - ", 1)
        if len(parts) == 2 and parts[1].startswith("cgroup "):
            found.append(Path(parts[0].split()[4]))
    return found


def create_cgroup_root(name: str) -> None:
    """``/<name>`` in every hierarchy; cpuset gets its parent's CPUs and memory nodes."""
    for hierarchy in hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for item in ("cpuset.cpus", "cpuset.mems"):
            if (path / item).exists():
                (path / item).write_text((hierarchy / item).read_text())


def remove_cgroup_root(name: str, timeout: float = 20.0) -> None:
    """Kill what is left in ``/<name>`` and remove its cgroups, deepest first."""
    deadline = time.monotonic() + timeout
    for hierarchy in hierarchies():
        root = hierarchy / name
        if not root.exists():
            continue
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for directory in [*dirs, root]:
            while True:
                for pid in _cgroup_pids(directory):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


def _cgroup_pids(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def cgroup_leaks(name: str) -> list[str]:
    return [f"cgroup {h / name}" for h in hierarchies() if (h / name).exists()]


# ---------------------------------------------------- shared, reference-counted

def _read_sysctls() -> dict[str, str]:
    values = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            values[key] = (Path("/proc/sys") / key).read_text().strip()
    return values


def _chains() -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = {}
    for tool in IPTABLES:
        found[tool] = {}
        for table in TABLES:
            result = commands.run([tool, "-w", "5", "-t", table, "-S"], timeout=30, check=False)
            found[tool][table] = sorted(
                line.split()[1] for line in result.stdout.splitlines()
                if line.startswith("-N " + CHAIN_PREFIX)
            )
    return found


@contextlib.contextmanager
def _locked_record() -> Iterator[dict[str, object]]:
    SHARED_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(SHARED_DIR / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = SHARED_DIR / "record.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        # Runs whose pytest died are dropped; what they saved stays until restored.
        record["users"] = [u for u in record.get("users", []) if _alive(int(u["pid"]))]
        yield record
        if record.get("users"):
            path.write_text(json.dumps(record))
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def enter_shared(run: str) -> None:
    """Record this run; the first of concurrent runs saves sysctls, chains and which of
    the kubelet's fixed directories are absent."""
    with _locked_record() as record:
        users = record["users"]
        assert isinstance(users, list)
        if not users:
            if "sysctls" in record:  # left by runs killed before their teardown
                _restore(record)
            record["sysctls"] = _read_sysctls()
            record["chains"] = _chains()
            record["absent_dirs"] = [
                d for d in (str(Path(KUBELET_DEVICE_PLUGIN_DIR).parent),
                            KUBELET_DEVICE_PLUGIN_DIR)
                if not Path(d).exists()
            ]
        users.append({"run": run, "pid": os.getpid()})


def ensure_device_plugin_mount_point() -> None:
    """The (empty) host directory each node namespace binds its own directory onto."""
    Path(KUBELET_DEVICE_PLUGIN_DIR).mkdir(parents=True, exist_ok=True)


def leave_shared(run: str) -> list[str]:
    """Forget this run; the last one out restores the host.  Returns what stayed."""
    with _locked_record() as record:
        users = record["users"]
        assert isinstance(users, list)
        record["users"] = [u for u in users if u["run"] != run]
        if record["users"]:
            return []
        return _restore(record)


def restore_if_unused() -> list[str]:
    """Restore the host if every run that entered is gone (killed without teardown)."""
    with _locked_record() as record:
        if record["users"] or "sysctls" not in record:
            return []
        return _restore(record)


def _restore(record: dict[str, object]) -> list[str]:
    """Put back what the first run saved; returns what could not be put back."""
    saved = record.get("sysctls", {})
    chains = record.get("chains", {})
    assert isinstance(saved, dict) and isinstance(chains, dict)
    for key, value in saved.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)
    _delete_new_chains(chains)
    absent = record.get("absent_dirs", [])
    assert isinstance(absent, list)
    for directory in sorted(absent, key=len, reverse=True):
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
    left = [f"sysctl {k.replace('/', '.')}={v} (was {saved[k]})"
            for k, v in _read_sysctls().items() if saved.get(k) != v]
    now = _chains()
    for tool in IPTABLES:
        for table in TABLES:
            before = set(chains.get(tool, {}).get(table, []))
            left += [f"{tool} -t {table} chain {c}"
                     for c in now[tool][table] if c not in before]
    left += [f"directory {d}" for d in absent if Path(d).exists()]
    return left


def _delete_new_chains(before: dict[str, dict[str, list[str]]]) -> None:
    now = _chains()
    for tool in IPTABLES:
        for table in TABLES:
            new = [c for c in now[tool][table] if c not in before.get(tool, {}).get(table, [])]
            if not new:
                continue
            rules = commands.run([tool, "-w", "5", "-t", table, "-S"], timeout=30).stdout
            for line in rules.splitlines():
                words = line.split()
                if words[:1] == ["-A"] and any(w in new for w in words[1:]):
                    commands.run([tool, "-w", "5", "-t", table, "-D", *words[1:]],
                                 timeout=30, check=False)
            for chain in new:
                commands.run([tool, "-w", "5", "-t", table, "-X", chain],
                             timeout=30, check=False)


# ------------------------------------------------------- mounts, loops, links

def mounts_under(directory: Path, pid: int | str = "self") -> list[str]:
    """Mount points at or below ``directory`` in the mount namespace of ``pid``."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(directory) or point.startswith(prefix):
            found.append(point)
    return found


def unmount_under(directory: Path, pid: int | str = "self",
                  prefix: Sequence[str] = ()) -> None:
    """Unmount everything at or below ``directory``, deepest first (lazily if busy), in
    the mount namespace of ``pid`` (``prefix`` enters it, e.g. ``Node.in_node()``)."""
    for _ in range(5):
        points = mounts_under(directory, pid)
        if not points:
            return
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            result = commands.run([*prefix, "umount", point], timeout=30, check=False)
            if result.returncode != 0 and point in mounts_under(directory, pid):
                commands.run([*prefix, "umount", "--lazy", point], timeout=30, check=False)


def loops_backed_under(directory: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(directory) + "/"):
                found.append("/dev/" + backing.parent.parent.name)
    return found


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def delete_link(name: str) -> None:
    if link_exists(name):
        commands.run(["ip", "link", "delete", name], timeout=10, check=False)


# ------------------------------------------------------------------- processes

def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (our directory or socket)."""
    pids = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def processes_in_namespace(mount_ns: str) -> list[int]:
    """PIDs in the mount namespace ``mount_ns`` (``mnt:[inode]``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == mount_ns:
                    pids.append(int(entry.name))
    return pids


def kill_processes_mentioning(text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (pids := processes_mentioning(text)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


# ------------------------------------------------------------------ the verdict

FOOTPRINT_FILE = "footprint.json"
RUN_NAME = re.compile(r"hke-[0-9a-f]{8}")

@dataclass
class Footprint:
    """What one run put on the host; ``leaks`` lists what is still there."""

    run: str
    directory: Path
    node_address: str | None = None
    cgroup_root: str | None = None
    links: list[str] = field(default_factory=list)
    mount_namespace: str | None = None
    # An open handle on the mount namespace: namespace inode numbers are reused once
    # a namespace is gone, so "processes in mnt:[N]" only means ours while it is held.
    namespace_fd: int | None = None
    shared_left: list[str] = field(default_factory=list)

    def hold_namespace(self, pid: int) -> None:
        self.namespace_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.mount_namespace = os.readlink(f"/proc/{pid}/ns/mnt")

    def release_namespace(self) -> None:
        """Let the namespace (and whatever is still mounted only there) go."""
        if self.namespace_fd is not None:
            os.close(self.namespace_fd)
            self.namespace_fd = None

    def save(self) -> None:
        """Record the footprint (and its owner) before each change it describes, so that
        a later run can undo a run that was killed before its teardown."""
        (self.directory / FOOTPRINT_FILE).write_text(json.dumps({
            "owner": os.getpid(), "node_address": self.node_address,
            "cgroup_root": self.cgroup_root, "links": self.links,
            "mount_namespace": self.mount_namespace,
        }))

    def undo(self) -> None:
        """Remove everything of the footprint that is still there (a killed run's).

        Processes are found by the run's directory in their command line (node
        daemons, shims) and by its cgroups (containers), never by the recorded
        mount namespace: its number may belong to another run by now."""
        for pid in processes_mentioning(str(self.directory)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.cgroup_root:
            remove_cgroup_root(self.cgroup_root)
        unmount_under(self.directory)
        for dev in loops_backed_under(self.directory):
            commands.run(["losetup", "--detach", dev], timeout=30, check=False)
        for name in self.links:
            delete_link(name)
        if self.node_address:
            remove_node_address(self.node_address)
        if not mounts_under(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)

    def leaks(self) -> list[str]:
        pids = set(processes_mentioning(str(self.directory)))
        if self.mount_namespace and self.namespace_fd is not None:
            pids |= set(processes_in_namespace(self.mount_namespace))
        found = [f"process {pid}: {_cmdline(pid)}" for pid in sorted(pids)]
        found += [f"mount {m}" for m in mounts_under(self.directory)]
        found += [f"loop device {d}" for d in loops_backed_under(self.directory)]
        found += [f"network link {name}" for name in self.links if link_exists(name)]
        if self.node_address and address_present(self.node_address):
            found.append(f"address {self.node_address}/32 on lo")
        if self.cgroup_root:
            found += cgroup_leaks(self.cgroup_root)
        if self.directory.exists():
            found.append(f"directory {self.directory}")
        return found + self.shared_left


def reap_stale(parent: Path = Path("/tmp")) -> list[str]:
    """Undo the runs whose pytest process died without a teardown; names them."""
    reaped = []
    for directory in sorted(parent.glob("hke-*")):
        if not RUN_NAME.fullmatch(directory.name):
            continue
        try:
            data = json.loads((directory / FOOTPRINT_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(data["owner"])):
            continue
        Footprint(run=directory.name, directory=directory,
                  node_address=data.get("node_address"), cgroup_root=data.get("cgroup_root"),
                  links=list(data.get("links") or []),
                  mount_namespace=data.get("mount_namespace")).undo()
        reaped.append(directory.name)
    if reaped:
        restore_if_unused()
    return reaped


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    return re.sub(r"\s+", " ", raw.replace(b"\0", b" ").decode(errors="replace"))[:200]
