"""Pool metrics are computed at scrape time from the same reports as `csi-driver pools`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from csi_driver.config import parse_config
from csi_driver.metrics import CsiCollector
from csi_driver.pools.base import Orphan
from csi_driver.pools.imagefile import ImagePool
from csi_driver.store import READY, Store, VolumeRecord, new_volume_id
from csi_driver.volumes import VolumeService


def test_collector_reports_pools_volumes_and_orphans(tmp_path):
    config = parse_config({"pools": [{"name": "p", "type": "image",
                                      "path": str(tmp_path / "p")}]}, str(tmp_path))
    pool = ImagePool(config.pools[0])
    pool.start()
    store = Store(str(tmp_path / "state"))
    store.put_volume(VolumeRecord(id=new_volume_id(), name="v", pool="p",
                                  capacity_bytes=5 << 20, block=True, fs_type="", thin=True,
                                  state=READY))
    service = VolumeService(config, "n", store, [pool])
    orphans = [Orphan("image-without-record", "p", "/x"), Orphan("image-without-record", "p",
                                                                 "/y")]
    registry = CollectorRegistry()
    registry.register(CsiCollector(service, lambda: orphans))
    text = generate_latest(registry).decode()
    assert 'hostkit_csi_volumes{pool="p"} 1.0' in text
    assert 'hostkit_csi_pool_provisioned_bytes{pool="p"} 5.24288e+06' in text
    assert 'hostkit_csi_pool_available_bytes{pool="p",provisioning="thin"}' in text
    assert 'hostkit_csi_pool_ready{pool="p"} 1.0' in text
    assert 'hostkit_csi_orphans{kind="image-without-record"} 2.0' in text
