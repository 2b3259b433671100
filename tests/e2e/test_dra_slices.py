"""DRA ResourceSlices against a real kube-apiserver + etcd (the tier's ``control_plane``).

What the real API server's validation accepts (every attribute type we emit, the
capacity, the owner reference), a pool split at 128 devices, updates on real
uevents of loop devices this module attaches (matched by their backing files in
a private directory, so nobody else's loop devices take part), the clean-up and
adoption of existing slices at start, and the two failure modes the publisher must
survive without losing a change: a resourceVersion conflict caused by another
writer, and an API server restart while the devices change.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node
from lightkube.resources.resource_v1 import ResourceSlice

from device_plugin.config import Config, parse_yaml
from device_plugin.kube import ApiAccess, make_client
from device_plugin.matching import DeviceInfo
from device_plugin.plugin import DevicePluginDomain
from device_plugin.registry import Catalog
from device_plugin.slice_publisher import SlicePublisher, quantity_value
from plugin_runtime import commands
from tests.loop_devices import LoopDevices, sparse_file

WAIT = 30.0
DRIVER = "dra.hostkit.io"


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="hkdra-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loops() -> Iterator[LoopDevices]:
    devices = LoopDevices()
    try:
        yield devices
    finally:
        devices.cleanup()


@pytest.fixture
def node_name() -> str:
    return f"hk-dra-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(control_plane: Any) -> Client:
    client: Client = control_plane.client()
    return client


@pytest.fixture
def access(control_plane: Any) -> ApiAccess:
    return ApiAccess(str(control_plane.admin_kubeconfig))


@pytest.fixture(autouse=True)
def _no_slices_left(api: Client, node_name: str) -> Iterator[None]:
    yield
    obj: Any
    for obj in api.list(ResourceSlice, fields={"spec.nodeName": node_name}):
        with contextlib.suppress(ApiError):
            api.delete(ResourceSlice, obj.metadata.name)
    with contextlib.suppress(ApiError):
        api.delete(Node, node_name)


def loop_config(directory: Path, health: str = "") -> Config:
    return parse_yaml(f"""
resync_seconds: 3600
dra: {{driver: {DRIVER}}}
resources:
  - name: loop
    dra: true
    match:
      - subsystem: block
        kernel: "loop*"
        attributes:
          loop/backing_file: "{directory}/*"
{health}""")


def our_slices(api: Client, node: str) -> list[Any]:
    return sorted(api.list(ResourceSlice, fields={"spec.nodeName": node,
                                                  "spec.driver": DRIVER}),
                  key=lambda s: s.metadata.name)


def device_map(api: Client, node: str) -> dict[str, dict[str, Any]]:
    """Device name -> device (as a dict) over the newest generation of our slices."""
    found = our_slices(api, node)
    if not found:
        return {}
    newest = max(s.spec.pool.generation for s in found)
    return {d["name"]: d for s in found if s.spec.pool.generation == newest
            for d in (s.spec.to_dict().get("devices") or [])}


def backing_files(api: Client, node: str) -> set[str]:
    return {d["attributes"]["loopBackingFile"]["string"] for d in device_map(api, node).values()}


@contextlib.contextmanager
def running(domain: DevicePluginDomain, publisher: SlicePublisher) -> Iterator[None]:
    domain.start()
    try:
        publisher.start()
        try:
            yield
        finally:
            publisher.stop()
    finally:
        domain.stop()


def test_real_validation_accepts_every_attribute_type_capacity_and_owner(
    api, access, loops, private_dir, node_name
):
    node = api.create(Node(metadata=ObjectMeta(name=node_name)))
    loops.attach(sparse_file(private_dir, "rw.img", size_mib=8))
    loops.attach(sparse_file(private_dir, "ro.img", size_mib=4), read_only=True)
    domain = DevicePluginDomain(config=loop_config(private_dir), watch_config=False)
    publisher = SlicePublisher(domain.catalog, lambda: make_client(access), node_name)
    with running(domain, publisher):
        devices = wait_for(lambda: len(device_map(api, node_name)) == 2 and
                           device_map(api, node_name), "two devices published")
        # What the server stores (quantities in canonical form) compares equal to what
        # we publish: another round writes nothing.
        writes = publisher.stats.writes
        publisher.poke()
        assert publisher.wait_synced(WAIT)
        assert publisher.stats.writes == writes
    [slice_] = our_slices(api, node_name)
    assert slice_.spec.driver == DRIVER and slice_.spec.nodeName == node_name
    assert slice_.spec.pool.name == f"{node_name}-loop"
    assert slice_.spec.pool.resourceSliceCount == 1
    [owner] = slice_.metadata.ownerReferences
    assert (owner.kind, owner.name, owner.uid) == ("Node", node_name, node.metadata.uid)
    kinds: set[str] = set()
    sizes = set()
    read_only = {}
    for device in devices.values():
        for value in device["attributes"].values():
            kinds.update(value)
        sizes.add(quantity_value(device["capacity"]["size"]["value"]))
        read_only[device["attributes"]["loopBackingFile"]["string"]] = \
            device["attributes"]["readOnly"]["bool"]
        assert device["attributes"]["resource"] == {"string": "hostkit.io/loop"}
        assert device["attributes"]["major"] == {"int": 7}
    assert kinds == {"string", "int", "bool", "version"}
    assert sizes == {8 << 20, 4 << 20}
    assert read_only == {str(private_dir / "rw.img"): False, str(private_dir / "ro.img"): True}
    assert publisher.stats.failures == 0, publisher.stats.last_error


def synthetic_loops(count: int) -> tuple[DeviceInfo, ...]:
    return tuple(
        DeviceInfo(
            sys_path=f"/sys/devices/virtual/block/loop{i}", subsystem="block", devtype="disk",
            kernel=f"loop{i}", devnode=f"/dev/loop{i}",
            properties={"MAJOR": "7", "MINOR": str(i)},
            attributes={"size": "2048", "ro": "0", "loop/backing_file": f"/img/{i}"},
        )
        for i in range(count)
    )


def test_a_pool_of_300_devices_is_split_into_slices_of_at_most_128(api, access, node_name):
    config = parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: loop, dra: true, "
                        "match: [{subsystem: block}]}]")
    catalog = Catalog(config)
    catalog.publish_inventory(synthetic_loops(300))
    publisher = SlicePublisher(catalog, lambda: make_client(access), node_name)
    publisher.start()
    try:
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        found = our_slices(api, node_name)
        assert [len(s.spec.devices) for s in found] == [128, 128, 44]
        assert {s.spec.pool.resourceSliceCount for s in found} == {3}
        assert len({d.name for s in found for d in s.spec.devices}) == 300
        first = publisher.stats.writes
        # Shrinking to 100 devices: one slice, a new generation, the other two deleted.
        catalog.publish_inventory(synthetic_loops(100))
        assert publisher.wait_synced(WAIT)
        wait_for(lambda: len(our_slices(api, node_name)) == 1, "the pool shrank to one slice")
        [only] = our_slices(api, node_name)
        assert only.spec.pool.resourceSliceCount == 1 and len(only.spec.devices) == 100
        assert only.spec.pool.generation == found[0].spec.pool.generation + 1
        assert publisher.stats.writes - first == 3  # two deletes, one update
    finally:
        publisher.stop()


def test_real_uevents_update_the_slices(api, access, loops, private_dir, node_name):
    loops.attach(sparse_file(private_dir, "a.img"))
    domain = DevicePluginDomain(config=loop_config(private_dir), watch_config=False)
    publisher = SlicePublisher(domain.catalog, lambda: make_client(access), node_name)
    with running(domain, publisher):
        wait_for(lambda: backing_files(api, node_name) == {str(private_dir / "a.img")},
                 "the first loop device published")
        generation = our_slices(api, node_name)[0].spec.pool.generation
        dev = loops.attach(sparse_file(private_dir, "b.img"))
        wait_for(lambda: len(backing_files(api, node_name)) == 2, "the attached loop device")
        assert our_slices(api, node_name)[0].spec.pool.generation > generation
        loops.detach(dev)
        wait_for(lambda: backing_files(api, node_name) == {str(private_dir / "a.img")},
                 "the detached loop device removed")
        assert publisher.stats.failures == 0, publisher.stats.last_error


def test_a_health_change_updates_the_slices(api, access, loops, private_dir, node_name):
    """A loop device made read-only fails the probe: it leaves the pool (a new
    generation) and comes back when it is writable again."""
    health = """    health:
      probe: attribute
      attribute: ro
      healthy_values: ["0"]
      interval_seconds: 0.2
"""
    keep = loops.attach(sparse_file(private_dir, "keep.img"))
    flip = loops.attach(sparse_file(private_dir, "flip.img"))
    domain = DevicePluginDomain(config=loop_config(private_dir, health), watch_config=False)
    publisher = SlicePublisher(domain.catalog, lambda: make_client(access), node_name)
    both = {str(private_dir / "keep.img"), str(private_dir / "flip.img")}
    try:
        with running(domain, publisher):
            wait_for(lambda: backing_files(api, node_name) == both, "both devices published")
            generation = our_slices(api, node_name)[0].spec.pool.generation
            commands.run(["blockdev", "--setro", flip], timeout=30)
            wait_for(lambda: backing_files(api, node_name) == {str(private_dir / "keep.img")},
                     "the read-only device left the pool")
            assert our_slices(api, node_name)[0].spec.pool.generation > generation
            commands.run(["blockdev", "--setrw", flip], timeout=30)
            wait_for(lambda: backing_files(api, node_name) == both, "the device back")
    finally:
        commands.run(["blockdev", "--setrw", flip], timeout=30, check=False)
    assert keep in loops.attached


def _foreign_slice(name: str, node: str, driver: str, pool: str, generation: int = 1) -> Any:
    return ResourceSlice.from_dict({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {"driver": driver, "nodeName": node,
                 "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
                 "devices": [{"name": "stale-0"}]},
    })


def test_at_start_stale_slices_are_removed_and_ours_adopted(api, access, node_name):
    other_node = f"{node_name}-other"
    api.create(_foreign_slice(f"{node_name}-loop-00000", node_name, DRIVER,
                              f"{node_name}-loop", generation=7))
    api.create(_foreign_slice(f"{node_name}-gone-00000", node_name, DRIVER,
                              f"{node_name}-gone"))
    api.create(_foreign_slice(f"{node_name}-otherdriver", node_name, "other.example.com",
                              f"{node_name}-x"))
    api.create(_foreign_slice(f"{other_node}-loop-00000", other_node, DRIVER,
                              f"{other_node}-loop"))
    try:
        config = parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: loop, dra: true, "
                            "match: [{subsystem: block}]}]")
        catalog = Catalog(config)
        catalog.publish_inventory(synthetic_loops(3))
        publisher = SlicePublisher(catalog, lambda: make_client(access), node_name)
        publisher.start()
        try:
            assert publisher.wait_synced(WAIT), publisher.stats.last_error
        finally:
            publisher.stop()
        [ours] = our_slices(api, node_name)
        assert ours.metadata.name == f"{node_name}-loop-00000"  # adopted, not duplicated
        assert ours.spec.pool.generation == 8
        assert len(ours.spec.devices) == 3
        left = {s.metadata.name for s in api.list(ResourceSlice)}
        assert f"{node_name}-gone-00000" not in left
        assert {f"{node_name}-otherdriver", f"{other_node}-loop-00000"} <= left
    finally:
        for name in (f"{node_name}-otherdriver", f"{other_node}-loop-00000"):
            with contextlib.suppress(ApiError):
                api.delete(ResourceSlice, name)


class ConflictingClient:
    """A real client whose first ``replace`` is overtaken by another writer: right
    before it, the same slice is updated through a second client, so the API server
    answers 409 Conflict to our stale resourceVersion."""

    def __init__(self, client: Client, other: Client) -> None:
        self._client = client
        self._other = other
        self.conflicts = 0

    def replace(self, obj: Any) -> Any:
        if self.conflicts == 0:
            current = self._other.get(ResourceSlice, obj.metadata.name)
            current.spec.devices = []
            self._other.replace(current)
        try:
            return self._client.replace(obj)
        except ApiError as exc:
            if exc.status.code == 409:
                self.conflicts += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_conflict_and_foreign_edits_and_deletes_are_repaired(api, access, node_name):
    config = parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: loop, dra: true, "
                        "match: [{subsystem: block}]}]")
    catalog = Catalog(config)
    catalog.publish_inventory(synthetic_loops(5))
    other = make_client(access)
    conflicting = ConflictingClient(make_client(access), other)
    clients: Iterator[Any] = iter([conflicting])
    publisher = SlicePublisher(catalog, lambda: next(clients, None) or make_client(access),
                               node_name)
    publisher.start()
    try:
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        # A change: the publisher's replace meets a foreign write first (409), retries.
        catalog.publish_inventory(synthetic_loops(6))
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        assert conflicting.conflicts == 1
        assert publisher.stats.failures >= 1
        wait_for(lambda: len(device_map(api, node_name)) == 6, "the change after the conflict")
        # Someone empties our slice: the watch notices, the content comes back.
        [current] = our_slices(api, node_name)
        current.spec.devices = []
        api.replace(current)
        wait_for(lambda: len(device_map(api, node_name)) == 6, "the edited slice repaired")
        # The kubelet deletes every slice of its node when it starts: recreated.
        api.delete(ResourceSlice, current.metadata.name)
        wait_for(lambda: len(device_map(api, node_name)) == 6, "the deleted slice recreated")
    finally:
        publisher.stop()
        other.close()


def test_a_change_during_an_api_server_restart_is_published_afterwards(
    control_plane, api, access, node_name
):
    apiserver = next(d for d in control_plane.daemons if d.name == "kube-apiserver")
    config = parse_yaml(f"dra: {{driver: {DRIVER}}}\nresources: [{{name: loop, dra: true, "
                        "match: [{subsystem: block}]}]")
    catalog = Catalog(config)
    catalog.publish_inventory(synthetic_loops(2))
    publisher = SlicePublisher(catalog, lambda: make_client(access), node_name)
    publisher.start()
    try:
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        apiserver.stop()
        failures = publisher.stats.failures
        catalog.publish_inventory(synthetic_loops(4))
        wait_for(lambda: publisher.stats.failures > failures, "a failed round while down")
        apiserver.start()
        wait_for(lambda: api.get(ResourceSlice, our_slices(api, node_name)[0].metadata.name),
                 "the API server back", timeout=90)
        wait_for(lambda: len(device_map(api, node_name)) == 4,
                 "the change made while the API server was down", timeout=60)
    finally:
        publisher.stop()
        if not apiserver.running():
            apiserver.start()


def test_a_reload_that_renames_the_driver_moves_the_slices(api, access, node_name):
    def config(driver: str) -> Config:
        return parse_yaml(f"dra: {{driver: {driver}}}\nresources: [{{name: loop, dra: true, "
                          "match: [{subsystem: block}]}]")

    catalog = Catalog(config(DRIVER))
    catalog.publish_inventory(synthetic_loops(2))
    publisher = SlicePublisher(catalog, lambda: make_client(access), node_name)
    publisher.start()
    try:
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        assert len(our_slices(api, node_name)) == 1
        catalog.apply_config(config("renamed.hostkit.io"))
        assert publisher.wait_synced(WAIT), publisher.stats.last_error
        assert our_slices(api, node_name) == []
        [moved] = api.list(ResourceSlice, fields={"spec.nodeName": node_name})
        assert moved.spec.driver == "renamed.hostkit.io" and len(moved.spec.devices) == 2
    finally:
        publisher.stop()
