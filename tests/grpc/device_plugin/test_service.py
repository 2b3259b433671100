"""The DevicePlugin service over real gRPC: snapshots, allocation, errors, limits."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import grpc
import pytest

from device_plugin import api, model
from device_plugin.servicer import DevicePluginServicer, SnapshotFeed
from plugin_runtime.server import UnixSocketServer
from tests.grpc.device_plugin.doubles import FakeResource, unit

NAME = "hostkit.io/fake"


def _units() -> list[model.DeviceUnit]:
    return [unit("a", numa=(0,)), unit("b", numa=(1,)), unit("c", healthy=False), unit("d")]


def _stub(kubelet, resource=NAME):
    endpoint = kubelet.wait_registered(resource)
    channel = grpc.insecure_channel(f"unix://{os.path.join(kubelet.directory, endpoint.socket)}")
    return channel, api.DevicePluginStub(channel)


def test_first_snapshot_is_complete_with_exact_health_strings_and_numa(kubelet, run_manager):
    run_manager(FakeResource(NAME, _units()))
    snap = kubelet.wait_registered(NAME).snapshots[0]
    assert snap.devices == {
        "a": ("Healthy", (0,)),
        "b": ("Healthy", (1,)),
        "c": ("Unhealthy", ()),
        "d": ("Healthy", ()),
    }


def test_every_change_sends_a_full_snapshot(kubelet, run_manager):
    resource = FakeResource(NAME, _units())
    run_manager(resource)
    kubelet.wait_registered(NAME)
    resource.set_units([unit("a", healthy=False, numa=(0,)), unit("e")])
    snap = kubelet.wait_snapshot(NAME, lambda s: "e" in s.devices)
    assert snap.devices == {"a": ("Unhealthy", (0,)), "e": ("Healthy", ())}
    resource.set_units([])
    assert kubelet.wait_snapshot(NAME, lambda s: not s.devices).devices == {}


def test_allocate_round_trip_returns_every_grant(kubelet, run_manager):
    run_manager(FakeResource(NAME, _units()))
    kubelet.wait_registered(NAME)
    response = kubelet.allocate(NAME, ["a", "b"])
    assert [(d.container_path, d.host_path, d.permissions) for d in response.devices] == [
        ("/dev/fake-a", "/dev/fake-a", "rw"),
        ("/dev/fake-b", "/dev/fake-b", "rw"),
    ]
    assert [(m.container_path, m.host_path, m.read_only) for m in response.mounts] == [
        ("/etc/fake", "/tmp/fake", True)
    ]
    assert dict(response.envs) == {"FAKE_IDS": "a,b"}
    assert dict(response.annotations) == {"fake.hostkit.io/ids": "a,b"}
    assert [c.name for c in response.cdi_devices] == ["hostkit.io/fake=a", "hostkit.io/fake=b"]
    assert kubelet.allocate(NAME, ["a", "b"]) == response


@pytest.mark.parametrize(
    ("ids", "code", "text"),
    [
        (["zzz"], grpc.StatusCode.NOT_FOUND, "unknown device ID 'zzz'"),
        (["a", "c"], grpc.StatusCode.FAILED_PRECONDITION, "device 'c' is unhealthy"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "container request 0 has no devices_ids"),
    ],
)
def test_allocate_errors_carry_their_code_and_a_clear_message(
    kubelet, run_manager, ids, code, text
):
    run_manager(FakeResource(NAME, _units()))
    kubelet.wait_registered(NAME)
    with pytest.raises(grpc.RpcError) as info:
        kubelet.allocate(NAME, ids)
    assert info.value.code() == code
    assert text in str(info.value.details())


def test_allocate_handles_several_container_requests(kubelet, run_manager):
    run_manager(FakeResource(NAME, _units()))
    channel, stub = _stub(kubelet)
    with channel:
        request = api.AllocateRequest()
        request.container_requests.add(devices_ids=["a"])
        request.container_requests.add(devices_ids=["b", "d"])
        response = stub.Allocate(request, timeout=5)
        assert [dict(r.envs)["FAKE_IDS"] for r in response.container_responses] == ["a", "b,d"]
        request.container_requests.add(devices_ids=["nope"])
        with pytest.raises(grpc.RpcError) as info:
            stub.Allocate(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert str(info.value.details()).startswith("container request 2: ")
        with pytest.raises(grpc.RpcError) as info:
            stub.Allocate(api.AllocateRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_allocate_logs_each_grant_at_info_with_resource_and_device_ids(
    kubelet, run_manager, caplog
):
    run_manager(FakeResource(NAME, _units()))
    channel, stub = _stub(kubelet)
    caplog.set_level(logging.INFO, logger="device_plugin.servicer")
    with channel:
        request = api.AllocateRequest()
        request.container_requests.add(devices_ids=["b", "a"])
        request.container_requests.add(devices_ids=["d"])
        stub.Allocate(request, timeout=5)
        request.container_requests.add(devices_ids=["nope"])
        with pytest.raises(grpc.RpcError):
            stub.Allocate(request, timeout=5)  # refused: nothing granted, nothing logged
    lines = [r for r in caplog.records if r.name == "device_plugin.servicer"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.INFO, f"Allocate {NAME}: container request 1 of 2 granted devices b, a"),
        (logging.INFO, f"Allocate {NAME}: container request 2 of 2 granted devices d"),
    ]
    assert [(getattr(r, "resource", None), getattr(r, "device_ids", None)) for r in lines] == [
        (NAME, ["b", "a"]), (NAME, ["d"]),
    ]


def test_preferred_allocation_round_trip_and_unknown_ids(kubelet, run_manager):
    run_manager(FakeResource(NAME, _units()))
    kubelet.wait_registered(NAME)
    assert kubelet.preferred_allocation(NAME, ["a", "b", "d"], ["d"], 2) == ["d", "a"]
    with pytest.raises(grpc.RpcError) as info:
        kubelet.preferred_allocation(NAME, ["a", "ghost"], [], 1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown device ID 'ghost'" in str(info.value.details())
    channel, stub = _stub(kubelet)
    with channel:
        request = api.PreferredAllocationRequest()
        request.container_requests.add(available_deviceIDs=["a", "b"], allocation_size=1)
        request.container_requests.add(available_deviceIDs=["b", "d"], allocation_size=2)
        response = stub.GetPreferredAllocation(request, timeout=5)
        assert [list(r.deviceIDs) for r in response.container_responses] == [["a"], ["b", "d"]]
        bad = api.PreferredAllocationRequest()
        bad.container_requests.add(available_deviceIDs=["a"], allocation_size=-1)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetPreferredAllocation(bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_optional_rpcs_follow_the_advertised_options(kubelet, run_manager):
    resource = FakeResource(
        NAME,
        _units(),
        model.ResourceOptions(pre_start_required=True, get_preferred_allocation_available=False),
    )
    run_manager(resource)
    channel, stub = _stub(kubelet)
    with channel:
        request = api.PreferredAllocationRequest()
        request.container_requests.add(available_deviceIDs=["a"], allocation_size=1)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetPreferredAllocation(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=["a", "b"]), timeout=5)
        assert resource.pre_started == [["a", "b"]]
        with pytest.raises(grpc.RpcError) as info:
            stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=["x"]), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _server(resource):
    directory = tempfile.mkdtemp(prefix="dps", dir="/tmp")
    feed = SnapshotFeed(resource)
    feed.start()
    servicer = DevicePluginServicer(feed)
    server = UnixSocketServer(
        os.path.join(directory, "p.sock"),
        lambda s: api.add_DevicePluginServicer_to_server(servicer, s),
        max_workers=2,
    )
    server.start()
    return directory, feed, servicer, server


def test_a_cancelled_stream_frees_its_worker_at_once():
    resource = FakeResource(NAME, _units())
    directory, feed, servicer, server = _server(resource)
    try:
        with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
            stub = api.DevicePluginStub(channel)
            streams = [stub.ListAndWatch(api.Empty()) for _ in range(2)]
            for stream in streams:
                assert len(next(stream).devices) == 4
            assert servicer.open_streams == 2
            for stream in streams:
                stream.cancel()
            # Both workers of the 2-thread pool were parked in the streams; with them
            # released the next call is served at once (it would wait for a device
            # change otherwise, and this resource never changes).
            options = stub.GetDevicePluginOptions(api.Empty(), timeout=3)
            assert options.get_preferred_allocation_available is True
            done = threading.Event()
            for _ in range(300):
                if servicer.open_streams == 0:
                    done.set()
                    break
                done.wait(0.01)
            assert servicer.open_streams == 0
    finally:
        server.stop(0)
        feed.close()
        shutil.rmtree(directory, ignore_errors=True)


def _oversized() -> list[model.DeviceUnit]:
    # 62,000 IDs of 60 characters: about 4.5 MB on the wire, over the 4 MiB limit.
    return [model.DeviceUnit(f"{i:060d}", True) for i in range(62_000)]


def test_an_initial_snapshot_over_4mib_is_refused_and_registration_waits_for_a_change(
    kubelet, run_manager
):
    resource = FakeResource(NAME, _oversized())
    manager = run_manager(resource)
    endpoint = kubelet.wait_for(
        lambda: (ep := kubelet.endpoints.get(NAME)) is not None and ep.disconnected and ep, 20,
        "the stream to end",
    )
    assert endpoint.snapshots == []
    assert endpoint.stream_error.startswith("RESOURCE_EXHAUSTED: ListAndWatch snapshot of ")
    assert "over the kubelet's 4194304-byte message limit" in endpoint.stream_error
    resource.set_units(_units())
    again = kubelet.wait_registered(NAME, not_socket=endpoint.socket, timeout=20)
    assert set(again.snapshots[-1].devices) == {"a", "b", "c", "d"}
    # Exactly one registration before the change, one after: no re-register loop.
    assert [r for _t, r, _e in kubelet.registrations] == [NAME, NAME]
    assert manager.servers[NAME].reregister_reasons == [
        "resource changed after a refused snapshot"
    ]


def test_a_later_snapshot_over_4mib_ends_the_stream_with_a_clear_error(kubelet, run_manager):
    resource = FakeResource(NAME, _units())
    run_manager(resource)
    first = kubelet.wait_registered(NAME)
    resource.set_units(_oversized())
    kubelet.wait_for(lambda: first.disconnected, 20, "the stream to end")
    assert first.stream_error.startswith(f"RESOURCE_EXHAUSTED: ListAndWatch snapshot of {NAME} ")
    assert "over the kubelet's 4194304-byte message limit" in first.stream_error
    # The kubelet keeps the old IDs but marks them unhealthy; nothing oversized arrived.
    assert first.snapshots[-1].unhealthy() == {"a", "b", "c", "d"}
    resource.set_units([unit("z")])
    again = kubelet.wait_registered(NAME, not_socket=first.socket, timeout=20)
    assert again.snapshots[-1].healthy() == {"z"}


def test_the_stand_in_enforces_the_kubelets_4mib_receive_limit(kubelet, kubelet_dir):
    # Why the refusal exists: a plugin that sends the oversized snapshot anyway breaks
    # the kubelet's stream with gRPC's own error (k8s #109304).
    from device_plugin.lifecycle import PluginManager, PluginServer
    from tests.grpc.device_plugin.doubles import FakeCatalog

    manager = PluginManager(
        FakeCatalog([FakeResource(NAME, _oversized())]),
        kubelet_dir,
        server_factory=lambda r: PluginServer(r, kubelet_dir, message_limit=64 * 1024 * 1024),
    )
    manager.start()
    try:
        endpoint = kubelet.wait_for(
            lambda: (ep := kubelet.endpoints.get(NAME)) is not None and ep.disconnected and ep,
            20,
            "the stream to break",
        )
        assert endpoint.snapshots == []
        assert endpoint.stream_error.startswith("RESOURCE_EXHAUSTED")
        assert "larger than max" in endpoint.stream_error
    finally:
        manager.stop()
