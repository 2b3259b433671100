"""The kubelet-facing DevicePlugin service for one resource: translation only.

``SnapshotFeed`` follows one ``model.Resource`` on a thread of its own and keeps
the encoded ``ListAndWatchResponse`` of the latest generation, built once and
shared by every stream (the kubelet opens one; a re-registration briefly opens
a second).  Streams wait on the feed's condition, which the servicer owns, so a
cancelled stream's ``StreamCall`` callback wakes its worker thread at once,
whatever the domain's ``wait_for_change`` does with its ``stop`` event.

A snapshot whose serialized size would pass the kubelet's 4 MiB receive limit
is never sent: the stream ends with RESOURCE_EXHAUSTED and a message naming the
size and the resource (the kubelet logs it and marks the resource's devices
unhealthy), and the lifecycle re-registers only once the resource changes.

``DevicePluginServicer`` maps proto requests to ``model.Resource`` calls and back;
each method goes through ``RpcBoundary`` so domain errors become their status
codes and every call is logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from device_plugin import api, model
from plugin_runtime import errors
from plugin_runtime.rpc import RpcBoundary, StreamCall

log = logging.getLogger(__name__)

# A ListAndWatch stream ends CANCELLED whenever the kubelet restarts or re-dials:
# routine, so DEBUG; the lifecycle logs the re-registration and the feed logs a
# refused snapshot at ERROR itself.
_BOUNDARY = RpcBoundary(api.DEVICE_PLUGIN_SERVICE, quiet=frozenset({"ListAndWatch"}))

_HEALTH = {True: api.HEALTHY, False: api.UNHEALTHY}


def snapshot_response(snapshot: model.ResourceSnapshot) -> api.ListAndWatchResponse:
    """The full ListAndWatch message for one snapshot."""
    response = api.ListAndWatchResponse()
    devices = response.devices
    for unit in snapshot.units:
        device = devices.add(ID=unit.id, health=_HEALTH[unit.healthy])
        if unit.numa_nodes:
            nodes = device.topology.nodes
            for numa in unit.numa_nodes:
                nodes.add(ID=numa)
    return response


@dataclass(frozen=True)
class EncodedSnapshot:
    """One generation as it goes on the wire, or why it cannot."""

    generation: int
    units: int
    healthy: int
    response: api.ListAndWatchResponse | None
    size: int
    build_seconds: float
    refusal: str = ""


def encode_snapshot(
    resource: str, snapshot: model.ResourceSnapshot, limit: int = api.MAX_MESSAGE_BYTES
) -> EncodedSnapshot:
    started = time.perf_counter()
    response = snapshot_response(snapshot)
    size = response.ByteSize()
    elapsed = time.perf_counter() - started
    healthy = sum(1 for u in snapshot.units if u.healthy)
    if size > limit:
        refusal = (
            f"ListAndWatch snapshot of {resource} (generation {snapshot.generation}, "
            f"{len(snapshot.units)} devices) is {size} bytes, over the kubelet's "
            f"{limit}-byte message limit; not sending it (lower the share count or "
            f"split the resource)"
        )
        return EncodedSnapshot(
            snapshot.generation, len(snapshot.units), healthy, None, size, elapsed, refusal
        )
    return EncodedSnapshot(
        snapshot.generation, len(snapshot.units), healthy, response, size, elapsed
    )


class SnapshotFeed:
    """The latest encoded snapshot of one resource, followed on a daemon thread."""

    def __init__(
        self,
        resource: model.Resource,
        *,
        limit: int = api.MAX_MESSAGE_BYTES,
        on_change: Callable[[EncodedSnapshot], None] | None = None,
    ) -> None:
        self.resource = resource
        self.name = resource.name
        self._limit = limit
        self._on_change = on_change
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._current = self._encode(resource.snapshot())
        self._thread: threading.Thread | None = None

    def _encode(self, snapshot: model.ResourceSnapshot) -> EncodedSnapshot:
        encoded = encode_snapshot(self.name, snapshot, self._limit)
        if encoded.refusal:
            log.error("%s", encoded.refusal, extra={"resource": self.name})
        else:
            log.debug(
                "snapshot of %s generation %d: %d devices (%d healthy), %d bytes in %.1f ms",
                self.name,
                encoded.generation,
                encoded.units,
                encoded.healthy,
                encoded.size,
                encoded.build_seconds * 1000,
            )
        return encoded

    @property
    def current(self) -> EncodedSnapshot:
        with self._cond:
            return self._current

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._follow, name=f"feed-{self.name}", daemon=True
            )
            self._thread.start()
        if self._on_change is not None:
            self._on_change(self.current)

    def _follow(self) -> None:
        generation = self.current.generation
        while not self._closed.is_set():
            try:
                snapshot = self.resource.wait_for_change(generation, self._closed, timeout=None)
            except Exception:
                log.exception("following %s failed; retrying", self.name)
                self._closed.wait(1.0)
                continue
            if self._closed.is_set():
                break
            if snapshot.generation == generation:
                continue
            encoded = self._encode(snapshot)
            generation = encoded.generation
            with self._cond:
                self._current = encoded
                self._cond.notify_all()
            if self._on_change is not None:
                self._on_change(encoded)

    def wait_newer(self, generation: int, stop: threading.Event) -> EncodedSnapshot | None:
        """The first snapshot newer than ``generation``; None once ``stop`` is set or closed."""
        with self._cond:
            while True:
                if stop.is_set() or self._closed.is_set():
                    return None
                if self._current.generation != generation:
                    return self._current
                self._cond.wait()

    def wake(self) -> None:
        """Wake every waiter so it re-checks its stop event."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        self.wake()
        # The domain's wait blocks without polling and notices a bare stop only after
        # its safety slice (30 s in the registry); its ``wake`` hook releases it now.
        wake = getattr(self.resource, "wake", None)
        if callable(wake):
            wake()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            # The domain's wait returns on stop; do not hang shutdown if it does not.
            thread.join(timeout=1.0)


@dataclass(frozen=True)
class StreamEnd:
    """How a ListAndWatch stream ended, for the lifecycle."""

    refused_generation: int | None  # set when we ended it over the size limit


class DevicePluginServicer(api.DevicePluginServicer):  # type: ignore[misc]
    """Serves one resource to the kubelet over one socket."""

    def __init__(
        self,
        feed: SnapshotFeed,
        *,
        on_stream_end: Callable[[StreamEnd], None] | None = None,
        on_allocate: Callable[[int], None] | None = None,
    ) -> None:
        self._feed = feed
        self._resource = feed.resource
        self._on_stream_end = on_stream_end
        self._on_allocate = on_allocate
        self._closing = threading.Event()
        self._streams: set[threading.Event] = set()
        self._lock = threading.Lock()

    @property
    def resource(self) -> model.Resource:
        return self._resource

    def options_message(self) -> api.DevicePluginOptions:
        options = self._resource.options
        return api.DevicePluginOptions(
            pre_start_required=options.pre_start_required,
            get_preferred_allocation_available=options.get_preferred_allocation_available,
        )

    def close(self) -> None:
        """End every open stream now; ends after this are not reported."""
        self._closing.set()
        with self._lock:
            streams = list(self._streams)
        for stop in streams:
            stop.set()
        self._feed.wake()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # --- RPCs ---------------------------------------------------------------------------

    @_BOUNDARY.inline
    def GetDevicePluginOptions(
        self, request: api.Empty, context: grpc.ServicerContext
    ) -> api.DevicePluginOptions:
        return self.options_message()

    @_BOUNDARY.stream
    def ListAndWatch(
        self, request: api.Empty, call: StreamCall
    ) -> Iterator[api.ListAndWatchResponse]:
        stop = threading.Event()

        def cancelled() -> None:
            stop.set()
            self._feed.wake()

        call.add_callback(cancelled)
        with self._lock:
            self._streams.add(stop)
        if self._closing.is_set():
            stop.set()
        refused: int | None = None
        try:
            encoded: EncodedSnapshot | None = self._feed.current
            while encoded is not None and not stop.is_set():
                if encoded.response is None:
                    refused = encoded.generation
                    raise errors.ResourceExhausted(encoded.refusal)
                yield encoded.response
                log.debug(
                    "sent %s generation %d (%d devices, %d bytes)",
                    self._resource.name,
                    encoded.generation,
                    encoded.units,
                    encoded.size,
                )
                encoded = self._feed.wait_newer(encoded.generation, stop)
        finally:
            with self._lock:
                self._streams.discard(stop)
            if not self._closing.is_set() and self._on_stream_end is not None:
                self._on_stream_end(StreamEnd(refused))

    @_BOUNDARY.inline
    def GetPreferredAllocation(
        self, request: api.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api.PreferredAllocationResponse:
        if not self._resource.options.get_preferred_allocation_available:
            raise errors.Unimplemented(
                f"{self._resource.name} does not advertise GetPreferredAllocation"
            )
        response = api.PreferredAllocationResponse()
        many = len(request.container_requests) > 1
        for index, creq in enumerate(request.container_requests):
            if creq.allocation_size < 0:
                raise errors.InvalidArgument(
                    f"container request {index}: allocation_size {creq.allocation_size} "
                    "is negative"
                )
            with _numbered(index, many):
                ids = self._resource.preferred_allocation(
                    list(creq.available_deviceIDs),
                    list(creq.must_include_deviceIDs),
                    creq.allocation_size,
                )
            response.container_responses.add(deviceIDs=ids)
        return response

    @_BOUNDARY.inline
    def Allocate(
        self, request: api.AllocateRequest, context: grpc.ServicerContext
    ) -> api.AllocateResponse:
        if not request.container_requests:
            raise errors.InvalidArgument("AllocateRequest has no container_requests")
        response = api.AllocateResponse()
        many = len(request.container_requests) > 1
        for index, creq in enumerate(request.container_requests):
            if not creq.devices_ids:
                raise errors.InvalidArgument(f"container request {index} has no devices_ids")
            with _numbered(index, many):
                grant = self._resource.allocate(list(creq.devices_ids))
            _fill_container_response(response.container_responses.add(), grant)
        # Each grant is a container getting devices: INFO, once the whole request is
        # answered (a request refused halfway granted nothing).
        for index, creq in enumerate(request.container_requests):
            ids = list(creq.devices_ids)
            log.info("Allocate %s: container request %d of %d granted devices %s",
                     self._resource.name, index + 1, len(request.container_requests),
                     ", ".join(ids), extra={"resource": self._resource.name, "device_ids": ids})
        if self._on_allocate is not None:
            self._on_allocate(len(request.container_requests))
        return response

    @_BOUNDARY.unary
    def PreStartContainer(
        self, request: api.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api.PreStartContainerResponse:
        self._resource.pre_start(list(request.devices_ids))
        return api.PreStartContainerResponse()


def _fill_container_response(
    out: api.ContainerAllocateResponse, grant: model.ContainerAllocation
) -> None:
    for spec in grant.devices:
        out.devices.add(
            container_path=spec.container_path,
            host_path=spec.host_path,
            permissions=spec.permissions,
        )
    for mount in grant.mounts:
        out.mounts.add(
            container_path=mount.container_path,
            host_path=mount.host_path,
            read_only=mount.read_only,
        )
    out.envs.update(grant.envs)
    out.annotations.update(grant.annotations)
    for name in grant.cdi_devices:
        out.cdi_devices.add(name=name)


@contextlib.contextmanager
def _numbered(index: int, many: bool) -> Iterator[None]:
    """Prefix a domain error with the container request's index when there are several."""
    try:
        yield
    except errors.DomainError as exc:
        if not many:
            raise
        raise type(exc)(f"container request {index}: {exc.message}") from exc
