"""Prometheus metrics of the device plugin, shared by the domain and wire layers.

Defined once here (default registry: the plugin is its own process) so both
layers update the same series.  Names and who updates them:

* ``hostkit_device_plugin_devices{resource,health}`` (gauge) - registry, on every
  snapshot: allocatable IDs by health (``Healthy``/``Unhealthy``);
* ``hostkit_device_plugin_allocations_total{resource,result}`` (counter) -
  domain ``allocate``: result ``ok`` or the error code name;
* ``hostkit_device_plugin_registrations_total{resource,result}`` (counter) - wire
  layer, per Register attempt (``ok``, ``error`` when the kubelet refused,
  ``unavailable`` when no kubelet answered);
* ``hostkit_device_plugin_registered{resource}`` (gauge) - wire layer, 1 while
  registered;
* ``hostkit_device_plugin_uevents_total{subsystem,action}`` (counter) - discovery;
* ``hostkit_device_plugin_uevent_to_snapshot_seconds{resource}`` (histogram) -
  registry: time from reading the first uevent of a burst to the new snapshot;
* ``hostkit_device_plugin_snapshot_bytes{resource}`` (gauge) - wire layer, size of
  the last ListAndWatch message sent;
* ``hostkit_device_plugin_snapshots_refused_total{resource}`` (counter) - wire
  layer, snapshots not sent because they pass the kubelet's 4 MiB limit;
* ``hostkit_device_plugin_config_reloads_total{result}`` (counter, ``success``/
  ``failure``), ``hostkit_device_plugin_config_last_reload_success`` (gauge 1/0),
  ``hostkit_device_plugin_config_last_reload_timestamp_seconds`` (gauge) - reload;
* ``hostkit_dra_slice_writes_total{operation}`` (counter: ``create``/``update``/
  ``delete``), ``hostkit_dra_slice_publish_failures_total`` (counter) and
  ``hostkit_dra_uevent_to_slice_seconds`` (histogram: first uevent of a burst to the
  ResourceSlice write acknowledged) - the DRA slice publisher;
* ``hostkit_device_plugin_held_devices_vanished{resource}`` (gauge) - collected on
  each scrape by ``podresources.HeldVanishedCollector``: devices the kubelet reports as
  held by a container that are no longer present.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

DEVICES = Gauge(
    "hostkit_device_plugin_devices",
    "Allocatable device IDs advertised, by resource and health",
    ["resource", "health"],
)
ALLOCATIONS = Counter(
    "hostkit_device_plugin_allocations_total",
    "Allocate requests by resource and result (ok or the error code)",
    ["resource", "result"],
)
REGISTRATIONS = Counter(
    "hostkit_device_plugin_registrations_total",
    "Registrations with the kubelet by resource and result",
    ["resource", "result"],
)
REGISTERED = Gauge(
    "hostkit_device_plugin_registered",
    "1 while the resource is registered with the kubelet",
    ["resource"],
)
UEVENTS = Counter(
    "hostkit_device_plugin_uevents_total",
    "udev/kernel uevents handled by subsystem and action",
    ["subsystem", "action"],
)
UEVENT_TO_SNAPSHOT = Histogram(
    "hostkit_device_plugin_uevent_to_snapshot_seconds",
    "Time from reading a uevent to publishing the changed snapshot",
    ["resource"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SNAPSHOT_BYTES = Gauge(
    "hostkit_device_plugin_snapshot_bytes",
    "Serialized size of the last ListAndWatch snapshot sent, by resource",
    ["resource"],
)
SNAPSHOTS_REFUSED = Counter(
    "hostkit_device_plugin_snapshots_refused_total",
    "Snapshots not sent because they would pass the kubelet's 4 MiB message limit",
    ["resource"],
)
CONFIG_RELOADS = Counter(
    "hostkit_device_plugin_config_reloads_total",
    "Configuration reload attempts by result (success or failure)",
    ["result"],
)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "hostkit_device_plugin_config_last_reload_success",
    "1 when the last configuration (re)load succeeded, 0 when it was refused",
)
CONFIG_LAST_RELOAD_TIMESTAMP = Gauge(
    "hostkit_device_plugin_config_last_reload_timestamp_seconds",
    "Unix time of the last configuration reload attempt",
)

SLICE_WRITES = Counter(
    "hostkit_dra_slice_writes_total",
    "ResourceSlice writes by operation (create, update, delete)",
    ["operation"],
)
SLICE_PUBLISH_FAILURES = Counter(
    "hostkit_dra_slice_publish_failures_total",
    "Publishing rounds that failed and were retried",
)
UEVENT_TO_SLICE = Histogram(
    "hostkit_dra_uevent_to_slice_seconds",
    "Time from reading a uevent to the ResourceSlice write acknowledged by the API server",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
)


def forget_resource(resource: str) -> None:
    """Drop the per-resource gauges of a resource that is no longer served."""
    for health in ("Healthy", "Unhealthy"):
        with contextlib.suppress(KeyError):
            DEVICES.remove(resource, health)
    with contextlib.suppress(KeyError):
        SNAPSHOT_BYTES.remove(resource)
