"""Client of the kubelet's pod-resources API (v1): what each container was allocated.

A wire module (it talks gRPC through ``api.pod_resources_api()``): ``List`` for the
whole node and ``Get`` for one pod (KubeletPodResourcesGet, GA in 1.36; an older
kubelet answers Unimplemented and ``held_by_pod`` falls back to filtering ``List``).
Both extended-resource devices (``ContainerResources.devices``) and DRA devices
(``dynamic_resources``, each claim's ``claim_resources``) become
``holders.HeldDevice`` records; joining them with the present devices is the
domain's job (``device_plugin.holders``).

``HeldVanishedCollector`` exports ``hostkit_device_plugin_held_devices_vanished``
for the daemon's ``/metrics``: on each scrape it lists the allocations (the
kubelet allows 100 calls/s) and counts the held devices that are no longer
present, per resource.  A kubelet that cannot be reached exports nothing (and the
scrape still succeeds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from device_plugin import api
from device_plugin.holders import DeviceStatus, HeldDevice, Holder, vanished_held
from plugin_runtime.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

CALL_TIMEOUT_SECONDS = 5.0


def _held(pod: Any) -> Iterator[HeldDevice]:
    for container in pod.containers:
        base = Holder(pod.namespace, pod.name, container.name)
        for devices in container.devices:
            for device_id in devices.device_ids:
                yield HeldDevice(base, device_id, resource=devices.resource_name)
        for dynamic in container.dynamic_resources:
            holder = Holder(pod.namespace, pod.name, container.name,
                            f"{dynamic.claim_namespace}/{dynamic.claim_name}")
            for claimed in dynamic.claim_resources:
                yield HeldDevice(holder, claimed.device_name, driver=claimed.driver_name,
                                 pool=claimed.pool_name)


def _call(socket: str, method: str, request_factory: Callable[[Any], Any]) -> Any:
    pb, pb_grpc = api.pod_resources_api()
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = pb_grpc.PodResourcesListerStub(channel)
        try:
            return getattr(stub, method)(request_factory(pb), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"pod-resources {method}: {exc.details()}") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise _Unimplemented(method) from None
            raise Unavailable(
                f"the kubelet's pod-resources API at {socket} did not answer {method}: "
                f"{code.name if code else ''} {exc.details() if hasattr(exc, 'details') else exc}"
            ) from None


class _Unimplemented(Exception):
    pass


def held_on_node(socket: str = api.POD_RESOURCES_SOCKET) -> list[HeldDevice]:
    """Every device allocation on the node (``List``); ``Unavailable`` if the kubelet
    does not answer."""
    try:
        response = _call(socket, "List", lambda pb: pb.ListPodResourcesRequest())
    except _Unimplemented:
        raise Unavailable(f"the kubelet at {socket} does not serve pod-resources List") from None
    return [h for pod in response.pod_resources for h in _held(pod)]


def held_by_pod(namespace: str, pod: str, socket: str = api.POD_RESOURCES_SOCKET
                ) -> list[HeldDevice]:
    """One pod's allocations: ``Get`` where the kubelet serves it, else ``List``
    filtered; ``NotFound`` when the kubelet does not know the pod."""
    try:
        response = _call(socket, "Get", lambda pb: pb.GetPodResourcesRequest(
            pod_name=pod, pod_namespace=namespace))
    except _Unimplemented:
        log.debug("pod-resources Get is not served; filtering List")
        return [h for h in held_on_node(socket)
                if (h.holder.namespace, h.holder.pod) == (namespace, pod)]
    return list(_held(response.pod_resources))


class HeldVanishedCollector:
    """A Prometheus collector: held devices no longer present, per resource."""

    def __init__(self, rows: Callable[[Sequence[HeldDevice]], Iterable[DeviceStatus]],
                 socket: str = api.POD_RESOURCES_SOCKET) -> None:
        self._rows = rows
        self._socket = socket

    def describe(self) -> list[Any]:
        return []  # collected lazily; do not list at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            held = held_on_node(self._socket)
        except Unavailable as exc:
            log.debug("held devices not collected: %s", exc)
            return
        family = GaugeMetricFamily(
            "hostkit_device_plugin_held_devices_vanished",
            "Devices a container holds (kubelet pod-resources) that are no longer present",
            labels=["resource"],
        )
        for resource, count in sorted(vanished_held(self._rows(held)).items()):
            family.add_metric([resource], count)
        yield family
