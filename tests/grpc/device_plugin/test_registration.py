"""Registration with a kubelet that dials back inside Register, and re-registration."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.kubelet import KubeletStandIn, is_extended_resource_name, socket_names
from device_plugin import api, cli, model
from device_plugin.lifecycle import PluginManager, PluginServer
from tests.grpc.device_plugin.doubles import FakeCatalog, FakeResource, unit


def wait_until(predicate, timeout=10.0):
    """Bounded wait for something nothing notifies us about (a log line)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_serves_before_register_and_sends_the_same_options_both_ways(kubelet, run_manager):
    options = model.ResourceOptions(
        pre_start_required=True, get_preferred_allocation_available=False
    )
    resource = FakeResource("hostkit.io/fake", [unit("a"), unit("b", healthy=False)], options)
    run_manager(resource)
    endpoint = kubelet.wait_registered("hostkit.io/fake")
    # The stand-in dialled back inside Register and got the options: we were serving.
    assert endpoint.options.pre_start_required is True
    assert endpoint.options.get_preferred_allocation_available is False
    assert endpoint.request_options == endpoint.options
    assert endpoint.socket.startswith("hostkit-hostkit.io_fake-")
    assert endpoint.socket.endswith(".sock")
    assert os.path.dirname(os.path.join(kubelet.directory, endpoint.socket)) == kubelet.directory
    assert stat.S_IMODE(os.stat(os.path.join(kubelet.directory, endpoint.socket)).st_mode) == 0o600
    assert kubelet.rejections == []


def test_kubelet_rejects_a_bad_version_and_a_bad_name_like_the_real_one(kubelet):
    with grpc.insecure_channel(f"unix://{kubelet.socket}") as channel:
        stub = api.RegistrationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(
                api.RegisterRequest(version="v1alpha", endpoint="x.sock", resource_name="a.io/b"),
                timeout=5,
            )
        assert info.value.details() == 'requested API version "v1alpha" is not supported by kubelet'
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(
                api.RegisterRequest(version="v1beta1", endpoint="x.sock", resource_name="fuse"),
                timeout=5,
            )
        assert info.value.details() == 'the ResourceName "fuse" is invalid'
    assert is_extended_resource_name("hostkit.io/fuse")
    assert not is_extended_resource_name("kubernetes.io/fuse")
    assert not is_extended_resource_name("hostkit.io/" + "x" * 64)


def test_refused_registration_is_logged_with_the_kubelets_reason(kubelet, run_manager, caplog):
    caplog.set_level(logging.DEBUG, logger="device_plugin.lifecycle")
    manager = run_manager(FakeResource("hostkit.io/bad name", [unit("a")]))
    kubelet.wait_for(lambda: kubelet.rejections, 10, "a rejection")
    wait_until(lambda: any("refused registration" in r.message for r in caplog.records))
    record = next(r for r in caplog.records if "refused registration" in r.message)
    assert record.levelno == logging.ERROR
    assert 'the ResourceName "hostkit.io/bad name" is invalid' in record.getMessage()
    # The safety check retries; the same refusal is not logged at ERROR again.
    manager.servers["hostkit.io/bad name"].request("safety check")
    kubelet.wait_for(lambda: len(kubelet.rejections) >= 2, 10, "a second rejection")
    wait_until(lambda: sum("refused registration" in r.message for r in caplog.records) >= 2)
    errors_logged = [
        r for r in caplog.records
        if "refused registration" in r.message and r.levelno >= logging.ERROR
    ]
    assert len(errors_logged) == 1


def test_kubelet_restart_re_registers_on_a_new_socket(kubelet, run_manager):
    run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    first = kubelet.wait_registered("hostkit.io/fake")
    for _ in range(3):
        kubelet.restart()
        again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket)
        assert again.snapshots[-1].healthy() == {"a"}
        assert again.socket in socket_names(kubelet.directory)
        assert first.socket not in socket_names(kubelet.directory)
        first = again


def test_kubelet_sock_recreated_alone_re_registers(kubelet, kubelet_dir):
    # A kubelet restart also wipes our socket and ends our stream, and either makes
    # us re-register; here only kubelet.sock comes back, with the safety checks an
    # hour away, so only the kubelet.sock watch can bring the new registration.
    manager = PluginManager(
        FakeCatalog([FakeResource("hostkit.io/fake", [unit("a")])]),
        kubelet_dir,
        safety_interval=3600.0,
        idle_interval=3600.0,
    )
    manager.start()
    try:
        first = kubelet.wait_registered("hostkit.io/fake")
        kubelet.recreate_socket()
        again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket)
        assert again.snapshots[-1].healthy() == {"a"}
        assert manager.servers["hostkit.io/fake"].reregister_reasons == ["kubelet.sock created"]
        assert first.socket not in socket_names(kubelet_dir)
    finally:
        manager.stop()


def test_the_plugin_socket_serves_grpc_health_until_it_stops(kubelet, run_manager):
    manager = run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    endpoint = kubelet.wait_registered("hostkit.io/fake")
    path = os.path.join(kubelet.directory, endpoint.socket)
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "v1beta1.DevicePlugin"):
            check = health_pb2.HealthCheckRequest(service=service)
            assert stub.Check(check, timeout=5).status == serving, service
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="v1beta1.DevicePlugin"),
                           timeout=30)
        assert next(watch).status == serving
        manager.stop()
        # A watcher is told before the server goes (graceful shutdown), then the
        # socket is gone: no client can find a half-stopped plugin.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not os.path.exists(path)


def test_own_socket_deleted_re_registers(kubelet, run_manager):
    manager = run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    first = kubelet.wait_registered("hostkit.io/fake")
    os.unlink(os.path.join(kubelet.directory, first.socket))
    again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket)
    assert again.snapshots[-1].healthy() == {"a"}
    server = manager.servers["hostkit.io/fake"]
    assert "own socket deleted" in server.reregister_reasons


def test_stream_ended_re_registers(kubelet, run_manager):
    manager = run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    first = kubelet.wait_registered("hostkit.io/fake")
    first.stopped = True
    first.channel.close()  # the kubelet's client goes away; the kubelet itself stays up
    again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket)
    assert again.snapshots[-1].healthy() == {"a"}
    assert "ListAndWatch stream ended" in manager.servers["hostkit.io/fake"].reregister_reasons
    assert first.socket not in socket_names(kubelet.directory)


def test_waits_quietly_for_kubelet_sock_then_registers(kubelet_dir, run_manager, caplog):
    caplog.set_level(logging.DEBUG)
    run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    kubelet = KubeletStandIn(kubelet_dir)
    try:
        wait_until(lambda: [r for r in caplog.records if "waiting for" in r.getMessage()])
        kubelet.start()
        endpoint = kubelet.wait_registered("hostkit.io/fake")
        assert endpoint.snapshots[-1].healthy() == {"a"}
    finally:
        kubelet.stop()
    waiting = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO
    noisy = [
        r for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("device_plugin")
    ]
    assert noisy == []


class _RecordingCondition(threading.Condition):
    """A condition that records the timeout of every wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


def test_safety_checks_are_quick_until_registered_then_slow(kubelet_dir):
    # While unregistered the safety check retries every safety interval; once
    # registered there is nothing to retry and the idle lifecycle thread sleeps
    # the long idle interval, still within what /healthz allows.
    servers: list[PluginServer] = []

    def factory(resource: model.Resource) -> PluginServer:
        server = PluginServer(resource, kubelet_dir)
        server._cond = _RecordingCondition()
        servers.append(server)
        return server

    manager = PluginManager(
        FakeCatalog([FakeResource("hostkit.io/fake", [unit("a")])]),
        kubelet_dir,
        server_factory=factory,
    )
    kubelet = KubeletStandIn(kubelet_dir)
    try:
        manager.start()
        (server,) = servers
        cond = server._cond
        assert isinstance(cond, _RecordingCondition)
        quick, slow = server._safety_interval, server._idle_interval
        assert quick < slow
        wait_until(lambda: quick in cond.timeouts)  # no kubelet.sock yet
        assert slow not in cond.timeouts
        kubelet.start()
        kubelet.wait_registered("hostkit.io/fake")
        wait_until(lambda: slow in cond.timeouts)
        assert server.registered
    finally:
        manager.stop()
        kubelet.stop()
    # The slowest heartbeat: an idle wait, then a Register call that times out.
    assert slow + server._register_timeout < cli.HEALTH_MAX_AGE_SECONDS


def test_several_resources_one_socket_each(kubelet, run_manager):
    names = [f"hostkit.io/r{i}" for i in range(3)]
    run_manager(*(FakeResource(n, [unit(f"{n[-2:]}-{j}") for j in range(2)]) for n in names))
    endpoints = [kubelet.wait_registered(n) for n in names]
    assert len({e.socket for e in endpoints}) == 3
    assert {e.socket for e in endpoints} <= socket_names(kubelet.directory)
    for name, endpoint in zip(names, endpoints, strict=True):
        assert endpoint.snapshots[-1].healthy() == {f"{name[-2:]}-0", f"{name[-2:]}-1"}


def test_shutdown_removes_every_socket(kubelet, kubelet_dir):
    from device_plugin.lifecycle import PluginManager

    manager = PluginManager(
        FakeCatalog([FakeResource("hostkit.io/a", [unit("a")]), FakeResource("hostkit.io/b", [])]),
        kubelet_dir,
    )
    manager.start()
    kubelet.wait_registered("hostkit.io/a")
    kubelet.wait_registered("hostkit.io/b")
    assert len(socket_names(kubelet_dir)) == 3
    manager.stop()
    assert socket_names(kubelet_dir) == {"kubelet.sock"}
    assert [n for n in os.listdir(kubelet_dir) if n != "kubelet.sock"] == []


def test_catalog_change_adds_and_removes_servers(kubelet, run_manager):
    a = FakeResource("hostkit.io/a", [unit("a")])
    catalog = FakeCatalog([a])
    run_manager(catalog=catalog)
    first = kubelet.wait_registered("hostkit.io/a")
    catalog.set_resources([a, FakeResource("hostkit.io/b", [unit("b")])])
    kubelet.wait_registered("hostkit.io/b")
    assert kubelet.endpoint("hostkit.io/a") is first  # untouched
    catalog.set_resources([FakeResource("hostkit.io/b2", [unit("c")])])
    kubelet.wait_registered("hostkit.io/b2")
    kubelet.wait_for(
        lambda: first.socket not in socket_names(kubelet.directory), 10, "a's socket to go"
    )
    kubelet.wait_for(lambda: first.disconnected, 10, "a's stream to end")


class _MutableOptions(FakeResource):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.current_options = model.ResourceOptions()

    @property
    def options(self) -> model.ResourceOptions:
        return self.current_options


def test_changed_options_re_register_with_the_new_options(kubelet, run_manager):
    resource = _MutableOptions("hostkit.io/fake", [unit("a")])
    catalog = FakeCatalog([resource])
    run_manager(catalog=catalog)
    first = kubelet.wait_registered("hostkit.io/fake")
    assert first.options.pre_start_required is False
    resource.current_options = model.ResourceOptions(pre_start_required=True)
    catalog.set_resources([resource])  # same object, new options: a config reload
    again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket)
    assert again.options.pre_start_required is True
    assert again.request_options.pre_start_required is True


def test_sockets_of_dead_instances_are_removed_at_start(kubelet, run_manager):
    import socket

    dead = os.path.join(kubelet.directory, "hostkit-hostkit.io_fake-1.sock")
    alive = os.path.join(kubelet.directory, "hostkit-hostkit.io_other-2.sock")
    foreign = os.path.join(kubelet.directory, "other-vendor.sock")
    listeners = []
    for path in (dead, alive, foreign):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        listeners.append(s)
    listeners[0].close()  # the dead instance: its socket file stays, nobody listens
    listeners[2].close()  # not ours: never touched, even when dead
    try:
        run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
        kubelet.wait_registered("hostkit.io/fake")
        assert not os.path.exists(dead)
        assert os.path.exists(alive)
        assert os.path.exists(foreign)
    finally:
        listeners[1].close()


def _remove_tree(path: str, attempts: int = 50) -> None:
    """``shutil.rmtree`` while the plugin under test may bind a new socket in ``path``
    (its own socket just went) or remove its old one: try again."""
    import shutil

    for _ in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and exc.filename == path:
                return
            time.sleep(0.02)  # a socket appeared (ENOTEMPTY) or vanished mid-walk
    raise AssertionError(f"{path} could not be removed in {attempts} attempts")


def test_kubelet_dir_removed_and_recreated(kubelet, run_manager):
    run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    first = kubelet.wait_registered("hostkit.io/fake")
    kubelet.stop()
    _remove_tree(kubelet.directory)
    with kubelet._cond:
        kubelet.endpoints.clear()
    kubelet.start()  # re-creates the directory and kubelet.sock
    again = kubelet.wait_registered("hostkit.io/fake", not_socket=first.socket, timeout=20)
    assert again.snapshots[-1].healthy() == {"a"}


def test_a_stale_kubelet_sock_is_waited_out_with_one_warning(kubelet_dir, run_manager, caplog):
    import socket

    caplog.set_level(logging.DEBUG)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(kubelet_dir, "kubelet.sock"))
    stale.close()  # a dead kubelet's socket: the file stays, connecting is refused
    manager = run_manager(FakeResource("hostkit.io/fake", [unit("a")]))
    wait_until(lambda: any("not answering" in r.getMessage() for r in caplog.records))
    manager.servers["hostkit.io/fake"].request("safety check")  # retried quietly
    wait_until(
        lambda: sum("not answering" in r.getMessage() for r in caplog.records) >= 2, timeout=15
    )
    kubelet = KubeletStandIn(kubelet_dir)
    kubelet.start()
    try:
        assert kubelet.wait_registered("hostkit.io/fake").snapshots[-1].healthy() == {"a"}
    finally:
        kubelet.stop()
    warnings = [
        r for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("device_plugin")
    ]
    assert len(warnings) == 1 and "not answering" in warnings[0].getMessage()
