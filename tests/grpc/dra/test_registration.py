"""Registration through the plugin watcher, against the kubelet stand-in on real sockets."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time

import grpc
import pytest

from demo.dra_kubelet import PluginWatcherStandIn
from device_plugin.dra import api
from device_plugin.dra.lifecycle import DRA_SOCKET_GONE, REFUSED, REG_SOCKET_GONE
from tests.grpc.dra.doubles import DRIVER


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def test_get_info_names_the_driver_its_socket_and_versions_newest_first(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    assert plugin.registration_socket == os.path.join(
        driver.root, "plugins_registry", f"{DRIVER}-reg.sock")
    assert plugin.endpoint == os.path.join(driver.root, "plugins", DRIVER, "dra.sock")
    assert plugin.versions == ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth")
    assert plugin.version == "v1.DRAPlugin"
    wait_until(lambda: driver.plugin.registered is True)
    # Both sockets are private to root.
    for path in (plugin.registration_socket, plugin.endpoint):
        assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_v1beta1_kubelet_gets_the_v1beta1_service(make_driver):
    driver = make_driver(known_versions=("v1beta1.DRAPlugin",))
    assert driver.watcher.wait_registered(DRIVER).version == "v1beta1.DRAPlugin"
    response = driver.watcher.unprepare(DRIVER, [("default", "gone", "uid-1")])
    assert dict(response.claims) == {"uid-1": response.claims["uid-1"]}
    assert response.claims["uid-1"].error == ""


def test_a_refused_registration_is_logged_and_offered_again(make_driver, kubelet_root, caplog):
    watcher = PluginWatcherStandIn(kubelet_root)
    watcher.refuse.append("DRA driver validation failed: too many widgets")
    watcher.start()
    try:
        with caplog.at_level(logging.ERROR, logger="device_plugin.dra.lifecycle"):
            driver = make_driver(watcher=watcher)
            notes = watcher.wait_notifications(2)
        assert notes[0][1:] == (False, "DRA driver validation failed: too many widgets")
        assert notes[1][1:] == (True, "")
        assert watcher.wait_registered(DRIVER)
        assert REFUSED in driver.plugin.reasons
        assert driver.plugin.offers == 2
        assert "too many widgets" in caplog.text
        wait_until(lambda: driver.plugin.registered is True)
    finally:
        watcher.stop()


def test_a_deleted_registration_socket_is_offered_again(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    os.unlink(plugin.registration_socket)
    driver.watcher.wait_registered(DRIVER, after=2)
    assert REG_SOCKET_GONE in driver.plugin.reasons
    assert driver.watcher.deregistrations == [DRIVER]
    assert driver.watcher.unprepare(DRIVER, [("ns", "c", "u-1")]).claims["u-1"].error == ""


def test_a_deleted_dra_socket_is_served_again_and_re_registered(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    os.unlink(plugin.endpoint)
    driver.watcher.wait_registered(DRIVER, after=2)
    assert DRA_SOCKET_GONE in driver.plugin.reasons
    assert os.path.exists(plugin.endpoint)
    assert driver.watcher.unprepare(DRIVER, [("ns", "c", "u-1")]).claims["u-1"].error == ""


def test_stale_sockets_of_a_dead_instance_are_replaced(make_driver, kubelet_root):
    for path in (os.path.join(kubelet_root, "plugins_registry", f"{DRIVER}-reg.sock"),
                 os.path.join(kubelet_root, "plugins", DRIVER, "dra.sock")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()  # the file stays, nobody listens: what a killed driver leaves
    driver = make_driver()
    assert driver.watcher.wait_registered(DRIVER)
    assert driver.watcher.unprepare(DRIVER, [("ns", "c", "u-1")]).claims["u-1"].error == ""


def test_stop_removes_both_sockets_and_the_kubelet_deregisters(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    driver.plugin.stop()
    assert not os.path.exists(plugin.registration_socket)
    assert not os.path.exists(plugin.endpoint)
    wait_until(lambda: driver.watcher.plugin(DRIVER) is None)


def test_the_health_service_reports_every_served_service(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix://{plugin.endpoint}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in (api.V1_SERVICE, api.V1BETA1_SERVICE, api.HEALTH_SERVICE):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("claim", [("", "name", "uid"), ("ns", "", "uid"), ("ns", "n", ""),
                                   ("ns", "n", "../../etc")])
def test_a_malformed_claim_fails_the_call_with_invalid_argument(make_driver, claim):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    with pytest.raises(grpc.RpcError) as err:
        driver.watcher.prepare(DRIVER, [claim])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claims[0]" in (err.value.details() or "")


def _bind_over(path: str) -> socket.socket:
    """A listening socket moved onto ``path`` atomically, as another live instance's."""
    other = socket.socket(socket.AF_UNIX)
    temporary = f"{path}.new"
    other.bind(temporary)
    other.listen()
    os.rename(temporary, path)
    return other


def test_a_newer_instance_takes_over_without_a_fight(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    others = [_bind_over(plugin.endpoint), _bind_over(plugin.registration_socket)]
    try:
        wait_until(lambda: driver.plugin._taken_over)
        time.sleep(0.5)  # several safety and retry periods of the test driver
        assert driver.plugin.offers == 1 and driver.plugin.reasons == []
        driver.plugin.stop()  # the old instance leaves the new one's sockets alone
        assert os.path.exists(plugin.endpoint)
        assert os.path.exists(plugin.registration_socket)
    finally:
        for other in others:
            other.close()


def test_a_removed_plugin_directory_is_made_again_and_served(make_driver):
    driver = make_driver()
    plugin = driver.watcher.wait_registered(DRIVER)
    shutil.rmtree(os.path.dirname(plugin.endpoint))
    driver.watcher.wait_registered(DRIVER, after=2)
    assert DRA_SOCKET_GONE in driver.plugin.reasons
    assert driver.watcher.unprepare(DRIVER, [("ns", "c", "u-1")]).claims["u-1"].error == ""
