"""CSI-specific metrics: pool capacity and usage, volume counts, orphans.

RPC counts by method and code and latency histograms come from
``plugin_runtime.rpc`` (hostkit_rpc_total, hostkit_rpc_duration_seconds).  The
figures here are computed at scrape time by a collector, from the same
VolumeService reports ``csi-driver pools`` prints, so they are never stale and
no background thread polls the pools.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from csi_driver.pools.base import Orphan
from csi_driver.volumes import VolumeService

log = logging.getLogger(__name__)


class CsiCollector(Collector):
    def __init__(self, volumes: VolumeService, orphans: Callable[[], list[Orphan]]) -> None:
        self.volumes = volumes
        self.orphans = orphans

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily("hostkit_csi_pool_size_bytes",
                                 "Size of the pool's filesystem or disks", labels=["pool"])
        free = GaugeMetricFamily("hostkit_csi_pool_free_bytes",
                                 "Real free space in the pool", labels=["pool"])
        avail = GaugeMetricFamily("hostkit_csi_pool_available_bytes",
                                  "Capacity still provisionable (GetCapacity)",
                                  labels=["pool", "provisioning"])
        prov = GaugeMetricFamily("hostkit_csi_pool_provisioned_bytes",
                                 "Sum of the capacities of the pool's volumes", labels=["pool"])
        count = GaugeMetricFamily("hostkit_csi_volumes", "Volumes per pool", labels=["pool"])
        ready = GaugeMetricFamily("hostkit_csi_pool_ready", "1 when the pool serves volumes",
                                  labels=["pool"])
        try:
            for rep in self.volumes.pool_reports():
                ready.add_metric([rep.name], 1.0 if rep.ready else 0.0)
                count.add_metric([rep.name], rep.volumes)
                if rep.capacity_thin and rep.capacity_thick:
                    size.add_metric([rep.name], rep.capacity_thin.total_bytes)
                    free.add_metric([rep.name], rep.capacity_thin.free_bytes)
                    prov.add_metric([rep.name], rep.capacity_thin.provisioned_bytes)
                    avail.add_metric([rep.name, "thin"], rep.capacity_thin.available_bytes)
                    avail.add_metric([rep.name, "thick"], rep.capacity_thick.available_bytes)
        except Exception:
            log.exception("cannot compute pool metrics")
        orphans = GaugeMetricFamily("hostkit_csi_orphans",
                                    "Objects found on the host that no record explains "
                                    "(at the last reconcile)", labels=["kind"])
        kinds: dict[str, int] = {}
        for orphan in self.orphans():
            kinds[orphan.kind] = kinds.get(orphan.kind, 0) + 1
        for kind, n in kinds.items():
            orphans.add_metric([kind], n)
        yield from (size, free, avail, prov, count, ready, orphans)


def register(volumes: VolumeService, orphans: Callable[[], list[Orphan]]) -> CsiCollector:
    collector = CsiCollector(volumes, orphans)
    REGISTRY.register(collector)
    return collector


def unregister(collector: CsiCollector) -> None:
    REGISTRY.unregister(collector)
