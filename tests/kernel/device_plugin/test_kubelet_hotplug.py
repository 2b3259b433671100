"""Real kernel uevents on our own loop device reach the kubelet stand-in through the
real daemon (``python -m device_plugin serve``): the whole path, end to end."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

import pytest

from demo.kubelet import KubeletStandIn
from plugin_runtime import commands

BLKROSET = 0x125D
NAME = "hostkit.io/test-loop"


@pytest.fixture
def loop_device():
    directory = tempfile.mkdtemp(prefix="dpk", dir="/tmp")
    backing = os.path.join(directory, "loop.img")
    with open(backing, "wb") as img:
        img.truncate(1024 * 1024)
    device = commands.run(["losetup", "-f", "--show", backing], timeout=30).stdout.strip()
    try:
        yield device
    finally:
        commands.run(["losetup", "-d", device], timeout=30, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def _set_readonly(device: str, readonly: bool) -> None:
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(readonly)))
    finally:
        os.close(fd)
    # A real kernel uevent for our device only.
    with open(f"/sys/class/block/{os.path.basename(device)}/uevent", "w") as f:
        f.write("change")


def test_uevents_on_our_loop_device_reach_the_kubelet(loop_device):
    kernel = os.path.basename(loop_device)
    directory = tempfile.mkdtemp(prefix="dpk", dir="/tmp")
    kubelet_dir = os.path.join(directory, "k")
    config = os.path.join(directory, "config.yaml")
    with open(config, "w") as f:
        f.write(
            "domain: hostkit.io\n"
            "resources:\n"
            "  - name: test-loop\n"
            f"    match: [{{subsystem: block, kernel: {kernel}}}]\n"
            "    permissions: r\n"
            "    health: {probe: attribute, attribute: ro, healthy_values: ['0']}\n"
        )
    kubelet = KubeletStandIn(kubelet_dir)
    kubelet.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_plugin", "serve", "--config", config,
         "--kubelet-dir", kubelet_dir, "--cdi-dir", os.path.join(directory, "cdi")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = kubelet.wait_registered(NAME, timeout=30)
        (device_id,) = endpoint.snapshots[-1].healthy()
        response = kubelet.allocate(NAME, [device_id])
        assert [(d.host_path, d.permissions) for d in response.devices] == [(loop_device, "r")]
        _set_readonly(loop_device, True)
        kubelet.wait_snapshot(NAME, lambda s: s.unhealthy() == {device_id}, timeout=10)
        _set_readonly(loop_device, False)
        kubelet.wait_snapshot(NAME, lambda s: s.healthy() == {device_id}, timeout=10)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert sorted(os.listdir(kubelet_dir)) == ["kubelet.sock"]
    finally:
        _set_readonly(loop_device, False)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        kubelet.stop()
        shutil.rmtree(directory, ignore_errors=True)
