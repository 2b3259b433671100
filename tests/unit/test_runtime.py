"""Shared runtime: subprocess runner, inotify watches, unix socket server, boundary."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import tempfile
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plugin_runtime import commands, errors
from plugin_runtime.inotify import IN_CREATE, IN_DELETE, DirectoryWatch
from plugin_runtime.metrics import parse_address, start_metrics_endpoint
from plugin_runtime.server import UnixSocketServer, parse_unix_endpoint, remove_stale_socket


def test_run_captures_output_and_raises_with_stderr():
    assert commands.run(["sh", "-c", "echo hi"], timeout=5).stdout == "hi\n"
    with pytest.raises(commands.CommandError) as info:
        commands.run(["sh", "-c", "echo boom >&2; exit 3"], timeout=5)
    assert info.value.returncode == 3
    assert "boom" in str(info.value)
    assert info.value.code == "INTERNAL"


def test_run_kills_on_timeout_and_names_the_command():
    with pytest.raises(commands.CommandTimeout) as info:
        commands.run(["sleep", "5"], timeout=0.2)
    assert "sleep 5" in str(info.value)
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_run_missing_tool_is_a_clear_error():
    with pytest.raises(errors.Internal, match="not installed"):
        commands.run(["definitely-not-a-tool-xyz"], timeout=5)


def test_inotify_sees_create_and_delete():
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        with DirectoryWatch(d) as watch:
            assert watch.read(0.05) == []
            path = os.path.join(d, "kubelet.sock")
            open(path, "w").close()
            os.unlink(path)
            seen: list[tuple[int, str]] = []
            for _ in range(20):
                seen += [(e.mask, e.name) for e in watch.read(0.5)]
                if len(seen) >= 2:
                    break
        assert any(m & IN_CREATE and n == "kubelet.sock" for m, n in seen)
        assert any(m & IN_DELETE and n == "kubelet.sock" for m, n in seen)
    finally:
        os.rmdir(d)


def test_endpoint_parsing_names_the_problem():
    assert parse_unix_endpoint("unix:///tmp/x.sock") == "/tmp/x.sock"
    with pytest.raises(ValueError, match="only unix"):
        parse_unix_endpoint("tcp://1.2.3.4:5")
    with pytest.raises(ValueError, match="absolute"):
        parse_unix_endpoint("unix://rel.sock")
    with pytest.raises(ValueError, match="107"):
        parse_unix_endpoint("/tmp/" + "x" * 200)


def test_metrics_address_parsing():
    assert parse_address(":9100", "--metrics-address") == ("0.0.0.0", 9100)
    assert parse_address("127.0.0.1:0", "--metrics-address") == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match="port"):
        parse_address("localhost:http", "--metrics-address")
    with pytest.raises(ValueError, match=r"^--health-address 'foo' must be host:port"):
        parse_address("foo", "--health-address")


def test_metrics_endpoint_serves_and_sleeps_without_a_timeout(monkeypatch):
    # socketserver's serve_forever would wake every 0.5 s for nothing; this endpoint's
    # thread waits with no timeout and still stops at once.
    timeouts: list[float | None] = []
    base = selectors.DefaultSelector

    class Recording(base):  # type: ignore[misc,valid-type]
        def select(self, timeout=None):
            timeouts.append(timeout)
            return super().select(timeout)

    monkeypatch.setattr(selectors, "DefaultSelector", Recording)
    endpoint = start_metrics_endpoint("127.0.0.1:0")
    assert endpoint is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"hostkit_rpc_total" in r.read()
    finally:
        endpoint.stop()
    assert not endpoint._thread.is_alive()
    assert timeouts and all(t is None for t in timeouts)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
        ("127.0.0.1", endpoint.port), timeout=5
    ):
        pass
    endpoint.stop()  # idempotent


def test_remove_stale_socket_refuses_regular_files():
    d = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(d, "not-a-socket")
    open(path, "w").close()
    try:
        with pytest.raises(FileExistsError, match="not a socket"):
            remove_stale_socket(path)
        assert os.path.exists(path)
    finally:
        os.unlink(path)
        os.rmdir(d)


def test_server_socket_mode_health_and_cleanup():
    d = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(d, "s.sock")
    server = UnixSocketServer(path, lambda s: None, max_workers=2, health_services=["x.Svc"])
    server.start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with grpc.insecure_channel(f"unix://{path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="x.Svc"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert server.socket_is_ours()
    finally:
        server.stop(grace=1)
    assert not os.path.exists(path)
    os.rmdir(d)


def test_server_stop_leaves_a_newer_socket_alone():
    d = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(d, "s.sock")
    first = UnixSocketServer(path, lambda s: None, max_workers=2)
    first.start()
    second = UnixSocketServer(path, lambda s: None, max_workers=2)
    second.start()  # replaces the first one's socket file
    try:
        first.stop(grace=0.5)
        assert os.path.exists(path), "stopping the old server removed the new socket"
    finally:
        second.stop(grace=0.5)
        os.rmdir(d)


def test_server_start_refuses_to_replace_a_regular_file_and_keeps_it():
    d = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(d, "s.sock")
    with open(path, "w") as f:
        f.write("not a socket")
    server = UnixSocketServer(path, lambda s: None, max_workers=2)
    try:
        with pytest.raises(FileExistsError, match="not a socket"):
            server.start()
        assert not server.started
        with open(path) as f:
            assert f.read() == "not a socket"
        assert os.listdir(d) == ["s.sock"]  # nor a private socket left behind
    finally:
        server.stop(grace=0.5)
        os.unlink(path)
        os.rmdir(d)


def test_server_start_replaces_the_stale_socket_of_a_dead_process(caplog):
    d = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(d, "s.sock")
    # What a killed process leaves: a bound socket file nobody listens on.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
    server = UnixSocketServer(path, lambda s: None, max_workers=2)
    caplog.set_level(logging.INFO, logger="plugin_runtime.server")
    server.start()
    try:
        assert f"removed stale socket {path}" in caplog.messages
        assert server.socket_is_ours()
        with grpc.insecure_channel(f"unix://{path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=0.5)
        os.rmdir(d)
