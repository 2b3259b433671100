"""`device-plugin serve` with a DRA resource registers the DRA plugin with the kubelet.

The real daemon in a subprocess, the plugin-watcher stand-in on its kubelet root
(the parent of ``--kubelet-dir``).  The API server of its kubeconfig does not
answer, which shows the kubelet side's own behaviour: registration needs no API
server, an unknown claim unprepares fine, and a claim that cannot be read fails
only that claim, naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from demo.dra_kubelet import PluginWatcherStandIn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_serve_registers_the_dra_plugin_and_answers_the_kubelet(kubelet_root):
    config = os.path.join(kubelet_root, "config.yaml")
    with open(config, "w") as f:
        cdi = os.path.join(kubelet_root, "cdi")
        f.write(f"cdi: {{dir: {cdi}}}\n"
                "resources: [{name: zero, dra: true, match: [{subsystem: mem, kernel: zero}]}]\n")
    kubeconfig = os.path.join(kubelet_root, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(KUBECONFIG)
    watcher = PluginWatcherStandIn(kubelet_root)
    watcher.start()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "device_plugin", "serve", "--config", config,
         "--kubelet-dir", os.path.join(kubelet_root, "device-plugins"),
         "--kubeconfig", kubeconfig, "--node-name", "n1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        plugin = watcher.wait_registered("hostkit.io", timeout=30)
        assert plugin.endpoint == os.path.join(kubelet_root, "plugins", "hostkit.io", "dra.sock")
        assert plugin.version == "v1.DRAPlugin"
        gone = watcher.unprepare("hostkit.io", [("default", "old", "uid-old")])
        assert gone.claims["uid-old"].error == ""
        response = watcher.prepare("hostkit.io", [("default", "c1", "uid-1")])
        assert "reading ResourceClaim default/c1 failed" in response.claims["uid-1"].error
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            _, stderr = daemon.communicate(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while watcher.plugin("hostkit.io") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.stop()
    assert daemon.returncode == 0, stderr
    assert watcher.deregistrations == ["hostkit.io"]
    assert os.listdir(os.path.join(kubelet_root, "plugins_registry")) == []
