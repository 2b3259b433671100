"""Session fixtures of the end-to-end tier: a real cluster, in layers.

Fixture API (for test modules of this tier; see ``tests/e2e/cluster.py``):

``e2e_binaries`` -> ``Binaries``
    every executable, the shared ones decompressed once into a cache.
``e2e_run`` -> ``Run``
    first undoes runs whose pytest was killed before teardown (their
    ``footprint.json`` names the owner and what they changed), then creates
    the run's directory ``/tmp/hke-<id>``; at the end of the session it is
    removed and the host is checked: any process, mount, loop device, network
    link, address, cgroup, sysctl or iptables chain of the run left behind
    fails the session (an error in the last test's teardown).
``control_plane`` -> ``ControlPlane``
    etcd + kube-apiserver only (a few seconds); ``.client()`` is a lightkube
    ``Client`` with cluster-admin rights, ``.kubeconfig(user, groups)`` a
    kubeconfig for another identity, ``.server`` the API URL.
``cluster`` -> ``Node``
    the full single node on top of ``control_plane``: controller manager,
    scheduler, containerd 2.3, kubelet; node Ready, images imported
    (``tests.e2e.images.BUSYBOX``, pull policy Never, hostNetwork pods).
    containerd and the kubelet run in the node's private mount namespace (the
    kubelet's device-plugin directory is fixed at /var/lib/kubelet/device-plugins,
    which each run binds to its own ``<root>/device-plugins`` there): start every
    node-side process (our daemons, CSI sidecars) with ``node.in_node()`` as argv
    prefix so that its mounts and the kubelet's are the same; files and sockets are
    reachable from the test process by their run paths.  Useful attributes:
    ``node_name``, ``node_ip``, ``kubelet_root``, ``device_plugin_dir``,
    ``pod_resources_socket``, ``cdi_dir``, ``binaries``, ``cp`` (the control
    plane), ``run`` (directory, logs), ``restart_kubelet()``, ``ctr(...)``,
    ``mounts(under)`` (mount points as the node sees them: the test process's
    own /proc/self/mountinfo does not show the node's mounts).

Our DaemonSets as host processes: ``tests/e2e/daemonsets.py`` (``render``,
``HostPod``: argv/env/paths/ports of a container from the rendered manifests,
``apply_objects``).  Pods and waits: ``tests/e2e/kube.py``.

All are session-scoped: a module that asks only for ``control_plane`` never
starts a kubelet.  The tier needs root and the binaries: without them it FAILS
with a message saying how to get them, unless ``SKIP_E2E_TESTS=1`` is set
explicitly (as ``SKIP_KERNEL_TESTS`` for the kernel tier), so CI can never pass
by skipping it.  When a test failed or something leaked, the component logs of
the run are kept in ``/tmp/hke-logs-<id>`` (named in the terminal summary).

``figure`` -> ``Callable[[str], None]``
    records a measured figure; all are printed in the terminal summary (also
    without ``-s``).  Figures are shown, never asserted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import binaries, host
from tests.e2e.cluster import ControlPlane, Node, Run

E2E_DIR = Path(__file__).parent
FIGURES: list[str] = []
NOTES: list[str] = []
FAILURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        FAILURES.append(report.nodeid)


@pytest.fixture(scope="session")
def figure() -> Callable[[str], None]:
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("end-to-end figures (measured, not asserted)")
        for line in FIGURES:
            terminalreporter.write_line(line)
    for line in NOTES:
        terminalreporter.write_line(f"end-to-end note: {line}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _refuse(reason: str) -> None:
    if os.environ.get("SKIP_E2E_TESTS") == "1":
        pytest.skip(f"end-to-end tier skipped (SKIP_E2E_TESTS=1): {reason}")
    pytest.fail(f"{reason} (set SKIP_E2E_TESTS=1 to skip the end-to-end tier explicitly)",
                pytrace=False)


@pytest.fixture(scope="session")
def e2e_binaries() -> binaries.Binaries:
    if os.geteuid() != 0:
        _refuse("the end-to-end tier needs root (it runs a kubelet and containerd)")
    problem = ""
    try:
        return binaries.locate()
    except binaries.Unavailable as exc:
        problem = str(exc)
    _refuse(problem)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def e2e_run(e2e_binaries: binaries.Binaries) -> Iterator[Run]:
    NOTES.extend(f"removed what the killed run {name} left behind"
                 for name in host.reap_stale())
    run = Run()
    yield run
    leaks = run.close(keep_logs=bool(FAILURES))
    if leaks and run.saved_logs is not None:
        (run.saved_logs / "leaks.txt").write_text("\n".join(leaks) + "\n")
    if run.saved_logs is not None:
        NOTES.append(f"component logs kept in {run.saved_logs}")
    if leaks:
        pytest.fail("the end-to-end tier left this behind:\n  " + "\n  ".join(leaks),
                    pytrace=False)


@pytest.fixture(scope="session")
def control_plane(e2e_run: Run, e2e_binaries: binaries.Binaries) -> Iterator[ControlPlane]:
    started = time.monotonic()
    cp = ControlPlane(e2e_run, e2e_binaries)
    try:
        cp.start()
        FIGURES.append(f"control plane (etcd + API server) ready: "
                       f"{time.monotonic() - started:.1f} s ({e2e_run.directory})")
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane) -> Iterator[Node]:
    started = time.monotonic()
    node = Node(control_plane)
    try:
        node.start()
        FIGURES.append(f"node {node.node_name} Ready after the control plane: "
                       f"{time.monotonic() - started:.1f} s")
        yield node
    finally:
        node.stop()
