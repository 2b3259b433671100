"""The DRA deployment manifests against the real kube-apiserver: the DeviceClass CEL
selectors compile, the claim templates are accepted, the ClusterRole is exactly
enough for the slice publisher, and the admission policy keeps the plugin's
ServiceAccount off slices when its credentials carry no node."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, Client, codecs
from lightkube.resources.resource_v1 import ResourceSlice

from device_plugin.config import parse_yaml
from device_plugin.kube import ApiAccess, make_client
from device_plugin.matching import DeviceInfo
from device_plugin.registry import Catalog
from device_plugin.slice_publisher import SlicePublisher

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "daemonsets" / "components" / "dra"
EXAMPLES = ROOT / "daemonsets" / "examples" / "dra"
PLUGIN_USER = "system:serviceaccount:hostkit-system:hostkit-device-plugin"
WAIT = 30.0


def _objects(path: Path) -> list[Any]:
    return [codecs.from_dict(d) for d in yaml.safe_load_all(path.read_text()) if d]


@contextlib.contextmanager
def applied(api: Client, paths: list[Path]) -> Iterator[list[Any]]:
    objs = [o for p in paths for o in _objects(p)]
    created = []
    try:
        for obj in objs:
            created.append(api.create(obj))
        yield created
    finally:
        for obj in reversed(created):
            with contextlib.suppress(ApiError):
                api.delete(type(obj), obj.metadata.name, namespace=obj.metadata.namespace)


def test_example_device_classes_and_claim_templates_are_accepted(control_plane):
    api = control_plane.client()
    templates = [p for p in sorted(EXAMPLES.glob("*.yaml")) if p.name != "deviceclasses.yaml"]
    with applied(api, [EXAMPLES / "deviceclasses.yaml"]) as classes:
        assert {c.metadata.name for c in classes} == {
            "hostkit-loop", "hostkit-usb-serial-ftdi", "hostkit-gpu-nvidia"}
        docs = [d for p in templates for d in yaml.safe_load_all(p.read_text())
                if d and d["kind"] == "ResourceClaimTemplate"]
        assert len(docs) == 3
        created = []
        try:
            for doc in docs:
                created.append(api.create(codecs.from_dict(doc)))
        finally:
            for obj in created:
                api.delete(type(obj), obj.metadata.name, namespace=obj.metadata.namespace)


def synthetic(count: int, node_tag: str) -> tuple[DeviceInfo, ...]:
    return tuple(DeviceInfo(f"/sys/devices/virtual/block/loop{i}", "block", "disk",
                            f"loop{i}", f"/dev/loop{i}", {"MAJOR": "7", "MINOR": str(i)},
                            {"size": "2048", "loop/backing_file": f"/{node_tag}/{i}"})
                 for i in range(count))


def _publisher(access: ApiAccess, node: str, count: int) -> tuple[Catalog, SlicePublisher]:
    catalog = Catalog(parse_yaml("resources: [{name: loop, dra: true, match: "
                                 "[{subsystem: block}]}]"))
    catalog.publish_inventory(synthetic(count, node))
    return catalog, SlicePublisher(catalog, lambda: make_client(access), node)


def test_the_cluster_role_is_enough_for_the_publisher_and_the_policy_guards_it(control_plane):
    api = control_plane.client()
    node = f"hk-rbac-{uuid.uuid4().hex[:6]}"
    access = ApiAccess(str(control_plane.kubeconfig(PLUGIN_USER)))
    rbac = COMPONENT / "rbac.yaml"
    with applied(api, [rbac]):
        _catalog, publisher = _publisher(access, node, 3)
        publisher.start()
        try:
            assert publisher.wait_synced(WAIT), publisher.stats.last_error
            assert publisher.stats.failures == 0, publisher.stats.last_error
            [slice_] = api.list(ResourceSlice, fields={"spec.nodeName": node})
            assert len(slice_.spec.devices) == 3
        finally:
            publisher.stop()
        # The policy: this identity has no node in its credentials, so every write of a
        # slice is refused once the policy is active.
        with applied(api, [COMPONENT / "admission-policy.yaml"]):
            client = make_client(access)
            try:
                deadline = time.monotonic() + WAIT
                while True:
                    try:
                        client.delete(ResourceSlice, slice_.metadata.name)
                    except ApiError as exc:
                        # A policy denial is 422 Invalid ("... is forbidden: ...").
                        assert exc.status.code == 422, exc.status.message
                        assert "not bound to a node" in (exc.status.message or ""), exc
                        assert "ValidatingAdmissionPolicy" in (exc.status.message or "")
                        break
                    api.create(_recreated(slice_))  # the policy is not active yet
                    assert time.monotonic() < deadline, "the policy never denied"
                    time.sleep(0.2)
            finally:
                client.close()
        for obj in api.list(ResourceSlice, fields={"spec.nodeName": node}):
            api.delete(ResourceSlice, obj.metadata.name)


def _recreated(obj: Any) -> Any:
    doc = obj.to_dict()
    doc["metadata"] = {"name": obj.metadata.name}
    return codecs.from_dict(doc)


def test_without_the_role_the_publisher_retries_and_reports_forbidden(control_plane):
    node = f"hk-norbac-{uuid.uuid4().hex[:6]}"
    access = ApiAccess(str(control_plane.kubeconfig("system:serviceaccount:other:x")))
    _catalog, publisher = _publisher(access, node, 1)
    publisher.start()
    try:
        deadline = time.monotonic() + WAIT
        while publisher.stats.failures == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "403" in publisher.stats.last_error
    finally:
        publisher.stop()
