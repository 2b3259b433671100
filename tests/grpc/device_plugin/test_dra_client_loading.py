"""The API client is paid for only with DRA: a device-plugin-only ``serve`` never
imports lightkube (or its HTTP stack), and a DRA ``serve`` with a bad
``--kubeconfig`` exits 2 naming the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from device_plugin.kube import ApiAccess, KubeConfigError, make_client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

# Runs the real `device-plugin serve` in the main thread; a timer thread looks at
# sys.modules once the daemon is up, prints the verdict and stops the daemon.
PROBE = textwrap.dedent("""
    import os, signal, sys, threading, time
    from device_plugin import cli

    def look():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "device_plugin.lifecycle" not in sys.modules:
            time.sleep(0.05)
        time.sleep(1.0)
        reload_to = os.environ.get("PROBE_RELOAD_CONFIG")
        if reload_to:
            with open(sys.argv[sys.argv.index("--config") + 1], "w") as f:
                f.write(reload_to)
            time.sleep(2.0)
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("lightkube", "httpx2", "msgspec")
                        or m in ("device_plugin.kube", "device_plugin.slice_publisher"))
        print("LOADED=" + ",".join(loaded), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=look, daemon=True).start()
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.fixture
def workdir():
    directory = tempfile.mkdtemp(prefix="dra", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_device_plugin_only_serve_never_imports_the_api_client(workdir):
    config = _write(workdir, "c.yaml", "resources: [{name: zero, match: [{subsystem: mem, "
                                       "kernel: zero}]}]\n")
    kubelet_dir = os.path.join(workdir, "kubelet")
    os.mkdir(kubelet_dir)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "serve", "--config", config, "--kubelet-dir", kubelet_dir,
         "--kubeconfig", "/nonexistent/kubeconfig"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED=\n" in result.stdout, result.stdout


def test_dra_serve_with_a_bad_kubeconfig_exits_2_naming_it(workdir):
    config = _write(workdir, "c.yaml", "resources: [{name: zero, dra: true, match: "
                                       "[{subsystem: mem, kernel: zero}]}]\n")
    kubelet_dir = os.path.join(workdir, "kubelet")
    os.mkdir(kubelet_dir)
    missing = os.path.join(workdir, "missing.kubeconfig")
    result = subprocess.run(
        [sys.executable, "-m", "device_plugin", "serve", "--config", config,
         "--kubelet-dir", kubelet_dir, "--kubeconfig", missing, "--node-name", "n1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert f"--kubeconfig {missing}: no such file" in result.stderr


def test_make_client_names_the_source_that_failed(workdir, monkeypatch):
    broken = _write(workdir, "broken", "apiVersion: v1\nkind: Config\nclusters: 3\n")
    with pytest.raises(KubeConfigError, match=f"kubeconfig {broken}"):
        make_client(ApiAccess(broken))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster service account"):
        make_client(ApiAccess(None))


def test_a_reload_that_turns_dra_on_says_a_restart_is_needed(workdir):
    config = _write(workdir, "c.yaml", "resources: [{name: zero, match: [{subsystem: mem, "
                                       "kernel: zero}]}]\n")
    kubelet_dir = os.path.join(workdir, "kubelet")
    os.mkdir(kubelet_dir)
    env = {**os.environ, "PROBE_RELOAD_CONFIG": "resources: [{name: zero, dra: true, match: "
                                                "[{subsystem: mem, kernel: zero}]}]\n"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "serve", "--config", config, "--kubelet-dir", kubelet_dir],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED=\n" in result.stdout, result.stdout
    assert "serves hostkit.io/zero through DRA, which this process did not start with" in \
        result.stderr
