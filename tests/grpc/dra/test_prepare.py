"""NodePrepareResources / NodeUnprepareResources and NodeWatchResources over real gRPC."""

from __future__ import annotations

import json
import os

from demo.dra_kubelet import PluginWatcherStandIn
from device_plugin.dra import api
from tests.grpc.dra.doubles import DRIVER, claim_object


def _devices(response, uid):
    entry = response.claims[uid]
    assert entry.error == ""
    return [(list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids))
            for d in entry.devices]


def test_prepare_writes_a_cdi_spec_per_claim_and_returns_its_ids(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    dev = driver.device(0)
    driver.claims.put(claim_object("c1", "uid-1", [dev], pool=driver.pool, request="main/sub"))
    response = driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")])
    assert _devices(response, "uid-1") == [
        (["main"], driver.pool, dev, [f"hostkit.io/claim=uid-1-{dev}"])]
    spec_path = os.path.join(driver.cdi_dir, "hostkit.io-claim_uid-1.json")
    with open(spec_path) as handle:
        spec = json.load(handle)
    assert spec["kind"] == "hostkit.io/claim"
    (device,) = spec["devices"]
    assert device["name"] == f"uid-1-{dev}"
    node = str(driver.dev_dir / "hk0")
    edits = device["containerEdits"]
    assert edits["deviceNodes"] == [{"path": node, "hostPath": node, "permissions": "rw"}]
    assert edits["mounts"] == [{"hostPath": "/usr/share", "containerPath": "/opt/share",
                                "options": ["rbind", "ro"]}]
    unit_id = next(u.id for u in driver.state.units if u.nodes == (node,))
    assert sorted(edits["env"]) == [f"WIDGET={unit_id}", f"WIDGET_PATHS={node}"]


def test_prepare_and_unprepare_are_idempotent(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    driver.claims.put(claim_object("c1", "uid-1", [driver.device(0)], pool=driver.pool))
    first = driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")])
    reads = driver.claims.reads
    again = driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")])
    assert again == first
    assert driver.claims.reads == reads  # answered from the checkpoint
    spec_path = os.path.join(driver.cdi_dir, "hostkit.io-claim_uid-1.json")
    for _ in range(2):
        response = driver.watcher.unprepare(DRIVER, [("default", "c1", "uid-1")])
        assert list(response.claims) == ["uid-1"]
        assert response.claims["uid-1"].error == ""
        assert not os.path.exists(spec_path)
        assert driver.preparer.prepared() == []


def test_a_lost_cdi_spec_is_written_again_on_the_next_prepare(make_driver):
    """After a reboot a tmpfs CDI directory is empty while the checkpoint survives."""
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    driver.claims.put(claim_object("c1", "uid-1", [driver.device(0)], pool=driver.pool))
    first = driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")])
    spec_path = os.path.join(driver.cdi_dir, "hostkit.io-claim_uid-1.json")
    with open(spec_path, "rb") as handle:
        spec = handle.read()
    os.unlink(spec_path)
    assert driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")]) == first
    with open(spec_path, "rb") as handle:
        assert handle.read() == spec


def test_each_claim_gets_its_own_error(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    d0, d1 = driver.device(0), driver.device(1)
    driver.claims.put(claim_object("good", "uid-good", [d0], pool=driver.pool))
    driver.claims.put(claim_object("replaced", "uid-new", [d1], pool=driver.pool))
    driver.claims.put(claim_object("pending", "uid-pending", [], allocated=False))
    driver.claims.put(claim_object("elsewhere", "uid-else", ["x"], pool="node-b-widget"))
    driver.claims.put(claim_object("taken", "uid-taken", [d0], pool=driver.pool))
    response = driver.watcher.prepare(DRIVER, [
        ("default", "good", "uid-good"),
        ("default", "missing", "uid-missing"),
        ("default", "replaced", "uid-old"),
        ("default", "pending", "uid-pending"),
        ("default", "elsewhere", "uid-else"),
        ("default", "taken", "uid-taken"),
    ])
    errors = {uid: entry.error for uid, entry in response.claims.items()}
    assert all(not entry.devices for entry in response.claims.values())
    assert "ResourceClaim default/missing not found" in errors["uid-missing"]
    assert "has UID uid-new, not uid-old" in errors["uid-old"]
    assert "is not allocated" in errors["uid-pending"]
    assert "node-b-widget/x" in errors["uid-else"] and "not on this node" in errors["uid-else"]
    assert "already prepared for claim default/good" in errors["uid-taken"]
    # All or nothing: the good claim is answered with an error and not left prepared,
    # so the kubelet's retry cannot cache its devices twice.
    assert errors["uid-good"].startswith("not prepared: other claims of this request failed")
    assert "default/missing" in errors["uid-good"]
    assert driver.preparer.prepared() == []
    assert os.listdir(driver.cdi_dir) == []
    # Alone, the good claim prepares.
    alone = driver.watcher.prepare(DRIVER, [("default", "good", "uid-good")])
    assert alone.claims["uid-good"].error == "" and len(alone.claims["uid-good"].devices) == 1


def test_only_this_drivers_results_are_prepared(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    obj = claim_object("mixed", "uid-m", [driver.device(1)], pool=driver.pool)
    obj["status"]["allocation"]["devices"]["results"].append(
        {"request": "gpu", "driver": "gpu.example.com", "pool": "p", "device": "g0"})
    driver.claims.put(obj)
    response = driver.watcher.prepare(DRIVER, [("default", "mixed", "uid-m")])
    assert [d[2] for d in _devices(response, "uid-m")] == [driver.device(1)]


def test_a_claim_without_devices_of_ours_is_prepared_without_a_spec(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    driver.claims.put(claim_object("theirs", "uid-t", ["g0"], pool="p", driver="gpu.example.com"))
    response = driver.watcher.prepare(DRIVER, [("default", "theirs", "uid-t")])
    assert response.claims["uid-t"].error == "" and not response.claims["uid-t"].devices
    assert not os.path.exists(driver.cdi_dir) or os.listdir(driver.cdi_dir) == []
    assert driver.watcher.unprepare(DRIVER, [("default", "theirs", "uid-t")]).claims[
        "uid-t"].error == ""
    assert driver.preparer.prepared() == []


def test_an_unhealthy_device_fails_its_claim(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    (driver.dev_dir / "hk1").unlink()
    driver.state.reprobe()
    driver.claims.put(claim_object("c", "uid-c", [driver.device(1)], pool=driver.pool))
    error = driver.watcher.prepare(DRIVER, [("default", "c", "uid-c")]).claims["uid-c"].error
    assert "is unhealthy" in error and "does not open" in error


def test_a_restarted_driver_unprepares_from_its_checkpoint(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    driver.claims.put(claim_object("c1", "uid-1", [driver.device(0)], pool=driver.pool))
    prepared = driver.watcher.prepare(DRIVER, [("default", "c1", "uid-1")])
    driver.feed.close()
    driver.plugin.stop()
    driver.claims.delete("default", "c1")  # the kubelet may unprepare a deleted claim
    again = make_driver(watcher=driver.watcher)
    again.watcher.wait_registered(DRIVER, after=2)
    # Prepare after the restart answers what the first instance answered.
    assert again.watcher.prepare(DRIVER, [("default", "c1", "uid-1")]) == prepared
    response = again.watcher.unprepare(DRIVER, [("default", "c1", "uid-1")])
    assert response.claims["uid-1"].error == ""
    assert os.listdir(again.cdi_dir) == []
    assert again.preparer.prepared() == []


def test_health_stream_sends_the_complete_list_and_every_change(make_driver):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    watch = driver.watcher.watch_health(DRIVER)
    try:
        first = watch.wait_for(lambda w: w.lists >= 1)
        assert [(d.device.pool_name, d.device.device_name, d.health) for d in first] == [
            (driver.pool, name, api.HEALTHY) for name in sorted(driver.names)]
        assert all(d.health_check_timeout_seconds == driver.feed.timeout_seconds and
                   d.last_updated_time > 0 for d in first)
        (driver.dev_dir / "hk0").unlink()
        driver.state.reprobe()
        changed = watch.wait_for(lambda w: any(d.health == api.UNHEALTHY for d in w.devices))
        bad = [d for d in changed if d.health == api.UNHEALTHY]
        assert [d.device.device_name for d in bad] == [driver.device(0)]
        assert "does not open" in bad[0].message
        # Resent without a change, so the kubelet never times a device out.
        seen = watch.lists
        watch.wait_for(lambda w: w.lists >= seen + 2, timeout=5.0)
    finally:
        watch.cancel()
    watch.wait_for(lambda w: w.ended)


def test_v1_returns_the_share_id_and_v1beta1_has_none(make_driver, kubelet_root):
    driver = make_driver()
    driver.watcher.wait_registered(DRIVER)
    obj = claim_object("shared", "uid-s", [driver.device(0)], pool=driver.pool)
    obj["status"]["allocation"]["devices"]["results"][0]["shareID"] = "5c1c4f4e-share"
    driver.claims.put(obj)
    (device,) = driver.watcher.prepare(DRIVER, [("default", "shared", "uid-s")]).claims[
        "uid-s"].devices
    assert device.HasField("share_id") and device.share_id == "5c1c4f4e-share"
    driver.plugin.stop()  # the same driver, registered with a v1beta1-only kubelet
    old = PluginWatcherStandIn(kubelet_root, ("v1beta1.DRAPlugin",))
    old.start()
    try:
        make_driver(watcher=old)
        assert old.wait_registered(DRIVER).version == "v1beta1.DRAPlugin"
        (device,) = old.prepare(DRIVER, [("default", "shared", "uid-s")]).claims[
            "uid-s"].devices
        assert "share_id" not in type(device).DESCRIPTOR.fields_by_name
        assert device.device_name == driver.device(0)
    finally:
        old.stop()
