"""The real daemon end to end: the domain on real udev devices, the CLI, SIGTERM."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from demo.kubelet import socket_names
from device_plugin import cli, registry
from device_plugin.config import parse_yaml
from device_plugin.lifecycle import PluginManager
from device_plugin.plugin import DevicePluginDomain

# Memory character devices exist on every Linux host (and in every container).
CONFIG = """\
domain: hostkit.io
resources:
  - name: "null"
    match: [{subsystem: mem, kernel: "null"}]
    share: 3
  - name: zero
    match: [{subsystem: mem, kernel: zero}]
    env: {ZERO_IDS: "{ids}"}
  - name: full
    match: [{subsystem: mem, kernel: full}]
"""
RESOURCES = ("hostkit.io/null", "hostkit.io/zero", "hostkit.io/full")


@pytest.fixture
def config_file():
    directory = tempfile.mkdtemp(prefix="dpc", dir="/tmp")
    path = os.path.join(directory, "config.yaml")
    with open(path, "w") as f:
        f.write(CONFIG)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_real_domain_behind_the_wire(kubelet, kubelet_dir, config_file):
    domain = DevicePluginDomain(config_file, watch_config=False)
    domain.start()
    manager = PluginManager(domain.catalog, kubelet_dir)
    try:
        manager.start()
        endpoints = {name: kubelet.wait_registered(name) for name in RESOURCES}
        null_ids = endpoints["hostkit.io/null"].snapshots[-1].healthy()
        assert len(null_ids) == 3
        one = sorted(null_ids)[0]
        response = kubelet.allocate("hostkit.io/null", [one])
        assert [(d.host_path, d.container_path) for d in response.devices] == [
            ("/dev/null", "/dev/null")
        ]
        assert "r" in response.devices[0].permissions
        (zero_id,) = endpoints["hostkit.io/zero"].snapshots[-1].healthy()
        assert dict(kubelet.allocate("hostkit.io/zero", [zero_id]).envs) == {"ZERO_IDS": zero_id}
        assert kubelet.preferred_allocation("hostkit.io/null", sorted(null_ids), [], 2)
        with pytest.raises(grpc.RpcError) as info:
            kubelet.allocate("hostkit.io/null", ["no-such-id"])
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert "no-such-id" in str(info.value.details())
        kubelet.restart()
        again = kubelet.wait_registered(
            "hostkit.io/full", not_socket=endpoints["hostkit.io/full"].socket
        )
        assert len(again.snapshots[-1].healthy()) == 1
    finally:
        manager.stop()
        domain.stop()
    assert socket_names(kubelet_dir) == {"kubelet.sock"}


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# /dev/zero's sysfs "dev" attribute is "1:5": this probe fails, so zero is Unhealthy.
METRICS_CONFIG = CONFIG.replace(
    "    env: {ZERO_IDS: \"{ids}\"}\n",
    "    health: {probe: attribute, attribute: dev, healthy_values: [\"0:0\"]}\n",
)


def test_metrics_count_devices_allocations_and_registrations(kubelet, kubelet_dir):
    null = {"resource": "hostkit.io/null"}
    zero = {"resource": "hostkit.io/zero"}
    # Counters are process-wide: compare with their values before this test.
    before = {
        (name, result): _sample(name, **null, result=result)
        for name in ("hostkit_device_plugin_allocations_total",
                     "hostkit_device_plugin_registrations_total")
        for result in ("ok", "NOT_FOUND", "error")
    }

    def added(name: str, result: str) -> float:
        return _sample(name, **null, result=result) - before[(name, result)]

    assert "health:" in METRICS_CONFIG
    domain = DevicePluginDomain(config=parse_yaml(METRICS_CONFIG), watch_config=False)
    domain.start()
    manager = PluginManager(domain.catalog, kubelet_dir)
    try:
        manager.start()
        endpoint = kubelet.wait_registered("hostkit.io/null")
        assert len(kubelet.wait_registered("hostkit.io/zero").snapshots[-1].unhealthy()) == 1
        assert _sample("hostkit_device_plugin_devices", **null, health="Healthy") == 3
        assert _sample("hostkit_device_plugin_devices", **null, health="Unhealthy") == 0
        assert _sample("hostkit_device_plugin_devices", **zero, health="Healthy") == 0
        assert _sample("hostkit_device_plugin_devices", **zero, health="Unhealthy") == 1
        assert _sample("hostkit_device_plugin_registered", **null) == 1
        assert added("hostkit_device_plugin_registrations_total", "ok") == 1
        assert added("hostkit_device_plugin_registrations_total", "error") == 0
        assert added("hostkit_device_plugin_allocations_total", "ok") == 0
        kubelet.allocate("hostkit.io/null", sorted(endpoint.snapshots[-1].healthy())[:2])
        assert added("hostkit_device_plugin_allocations_total", "ok") == 1
        with pytest.raises(grpc.RpcError):
            kubelet.allocate("hostkit.io/null", ["no-such-id"])
        assert added("hostkit_device_plugin_allocations_total", "NOT_FOUND") == 1
        assert added("hostkit_device_plugin_allocations_total", "ok") == 1
    finally:
        manager.stop()
        domain.stop()
    assert _sample("hostkit_device_plugin_registered", **null) == 0
    # A resource no longer served leaves no device gauge behind.
    assert REGISTRY.get_sample_value(
        "hostkit_device_plugin_devices", {**null, "health": "Healthy"}
    ) is None


def test_shutdown_releases_every_domain_wait_at_once(kubelet, kubelet_dir, monkeypatch):
    # The registry's waits block without polling; only wake() releases them before
    # the safety slice (made an hour here), so this hangs if shutdown forgets one.
    monkeypatch.setattr(registry, "SAFETY_SLICE_SECONDS", 3600.0)
    catalog = registry.Catalog(parse_yaml(CONFIG))
    manager = PluginManager(catalog, kubelet_dir, safety_interval=3600.0)
    try:
        manager.start()
        for name in RESOURCES:
            kubelet.wait_registered(name)
        feeds = [server._feed._thread for server in manager.servers.values()]
        waiters = [*feeds, *manager._threads]
        assert len(waiters) == len(RESOURCES) + 2 and all(t and t.is_alive() for t in waiters)
    finally:
        manager.stop()
    for thread in waiters:
        assert thread is not None
        thread.join(5)
        assert not thread.is_alive(), f"{thread.name} still waiting after shutdown"


def test_healthz_reports_the_lifecycle_threads(kubelet, kubelet_dir, config_file):
    domain = DevicePluginDomain(config_file, watch_config=False)
    domain.start()
    manager = PluginManager(domain.catalog, kubelet_dir)
    try:
        manager.start()
        endpoint = cli._start_health_endpoint(("127.0.0.1", 0), manager.healthy)
        try:
            port = endpoint.port
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
            assert info.value.code == 404
            info.value.close()
            manager.stop()
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert info.value.code == 503
            assert b"shutting down" in info.value.read()
            info.value.close()
        finally:
            endpoint.stop()
    finally:
        manager.stop()
        domain.stop()


def _serve(kubelet_dir, config_file, *extra):
    cdi = tempfile.mkdtemp(prefix="dpcdi", dir="/tmp")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "device_plugin", "serve",
            "--config", config_file, "--kubelet-dir", kubelet_dir, "--cdi-dir", cdi,
            "--log-format", "json", *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, cdi


def _send_to_process(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def _send_to_another_thread(pid: int, sig: int) -> None:
    # A signal sent to a process may be taken by any of its threads (the kernel
    # picks one that does not block it).  Aim it at a thread other than the main
    # one with tgkill: the main thread, asleep in its wait, must still wake.
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the daemon runs more than one thread"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, others[-1], sig) == 0, ctypes.get_errno()


# SIGINT (Ctrl-C on a foreground run, or a runtime configured with STOPSIGNAL
# SIGINT) must be a clean stop like SIGTERM, not a KeyboardInterrupt traceback.
@pytest.mark.parametrize(
    ("sig", "send"),
    [(signal.SIGTERM, _send_to_process), (signal.SIGINT, _send_to_process),
     (signal.SIGTERM, _send_to_another_thread)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-on-another-thread"],
)
def test_a_stop_signal_on_the_daemon_exits_cleanly_and_removes_its_sockets(
    kubelet, kubelet_dir, config_file, sig, send
):
    proc, cdi = _serve(kubelet_dir, config_file)
    try:
        endpoints = [kubelet.wait_registered(name, timeout=30) for name in RESOURCES]
        assert socket_names(kubelet_dir) == {"kubelet.sock", *(e.socket for e in endpoints)}
        send(proc.pid, sig)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        shutil.rmtree(cdi, ignore_errors=True)
    assert socket_names(kubelet_dir) == {"kubelet.sock"}
    assert sorted(os.listdir(kubelet_dir)) == ["kubelet.sock"]
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(f"received {sig.name}" in line["msg"] for line in lines)
    assert not [line for line in lines if line["level"] in ("error", "critical")]


def test_bad_config_exits_2_naming_the_key(kubelet_dir, tmp_path_factory):
    directory = tempfile.mkdtemp(prefix="dpb", dir="/tmp")
    try:
        path = os.path.join(directory, "bad.yaml")
        with open(path, "w") as f:
            f.write("resources:\n  - name: x\n    match: [{subsystem: mem}]\n    sharing: 2\n")
        result = subprocess.run(
            [sys.executable, "-m", "device_plugin", "serve", "--config", path,
             "--kubelet-dir", kubelet_dir],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "sharing" in result.stderr
    assert os.listdir(kubelet_dir) == []


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_kubelet_dir_too_long_for_a_socket_path_exits_2(capsys, restore_logging):
    assert cli.main(["serve", "--kubelet-dir", "/tmp/" + "d" * 120]) == 2
    assert "--kubelet-dir" in capsys.readouterr().err
    assert cli.main(["serve", "--cdi-dir", "relative/cdi"]) == 2
    assert "must be absolute" in capsys.readouterr().err


def test_discover_prints_what_would_be_advertised(config_file, capsys, restore_logging):
    assert cli.main(["discover", "--config", config_file, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["devices"]
    assert {r["resource"] for r in rows} == set(RESOURCES)
    null = [r for r in rows if r["resource"] == "hostkit.io/null"]
    assert len(null) == 3 and all(r["nodes"] == ["/dev/null"] for r in null)
    assert all(r["health"] == "Healthy" for r in rows)
    assert cli.main(["discover", "--config", config_file]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RESOURCE", "ID", "HEALTH", "NUMA", "NODES"]
    assert len(table) == 1 + len(rows)


def test_kubelet_dir_default_matches_the_api_constant():
    from device_plugin import api

    assert cli.DEFAULT_KUBELET_DIR == api.DEFAULT_KUBELET_DIR
