"""Assembling the driver: store, pools, services and the gRPC server on one socket.

``Driver.start`` binds the socket first and prepares the pools in the
background, so the kubelet and sidecars can connect at once; Probe answers
ready=false until every pool has started (or failed) and the start-up
reconcile has run.  A pool whose start fails does not stop the others: it
answers FAILED_PRECONDITION with its problem while they serve, and Probe says
ready.  Only when no pool can serve does Probe fail (FAILED_PRECONDITION, every
pool's problem), the CSI spec's answer for a plugin missing a dependency.
"""

from __future__ import annotations

import logging
import threading

import grpc

from csi_driver import metrics, reconcile
from csi_driver.api import pb_grpc
from csi_driver.config import DriverConfig
from csi_driver.controller_service import ControllerServicer
from csi_driver.identity_service import IdentityServicer
from csi_driver.node_service import NodeServicer
from csi_driver.node_volumes import NodeVolumes
from csi_driver.pools import build_pools
from csi_driver.pools.base import Orphan
from csi_driver.provisioning import Provisioner
from csi_driver.snapshots import SnapshotService
from csi_driver.store import Store
from csi_driver.volumes import VolumeService
from plugin_runtime.errors import DomainError
from plugin_runtime.server import UnixSocketServer

log = logging.getLogger(__name__)

WORKERS = 16


def _trim_heap() -> None:
    """Give the memory freed while importing and building descriptors back to the OS."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


class Driver:
    def __init__(
        self, config: DriverConfig, node_id: str, state_dir: str, endpoint: str
    ) -> None:
        self.config = config
        self.store = Store(state_dir)
        self.pools = build_pools(config, state_dir)
        self.volumes = VolumeService(config, node_id, self.store, self.pools)
        self.provisioner = Provisioner(self.volumes)
        self.node = NodeVolumes(self.volumes, self.provisioner)
        self.snapshots = SnapshotService(self.volumes)
        self.orphans: list[Orphan] = []
        self._prepared = threading.Event()
        self._collector: metrics.CsiCollector | None = None
        self.server = UnixSocketServer(endpoint, self._register, max_workers=WORKERS)
        self.failure: BaseException | None = None

    def ready(self) -> bool:
        return self._prepared.is_set() and self.volumes.probe()

    def _register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
            IdentityServicer(self.ready), server
        )
        pb_grpc.add_ControllerServicer_to_server(  # type: ignore[no-untyped-call]
            ControllerServicer(self.provisioner, self.snapshots), server
        )
        pb_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            NodeServicer(self.node, self.config.max_volumes_per_node), server
        )

    def prepare(self) -> None:
        """Start the pools and reconcile (blocking)."""
        try:
            for pool in self.pools:
                try:
                    pool.start()
                except (DomainError, OSError):
                    log.error("pool %s failed to start; it serves no volumes until the driver "
                              "restarts: %s", pool.name, pool.problem)
            self.orphans = reconcile.reconcile(self.volumes)
            _trim_heap()
            self._prepared.set()
            serving = [p.name for p in self.pools if p.ready]
            failed = [p.name for p in self.pools if not p.ready]
            if serving:
                log.info("driver ready: pools %s%s", ", ".join(serving),
                         f" (failed: {', '.join(failed)})" if failed else "")
            else:
                log.error("no pool can serve volumes (failed: %s); Probe fails",
                          ", ".join(failed))
        except BaseException as exc:
            self.failure = exc
            log.exception("preparing the pools failed; Probe stays not ready")

    def start(self, background: bool = True) -> None:
        self._collector = metrics.register(self.volumes, lambda: self.orphans)
        self.server.start()
        if background:
            threading.Thread(target=self.prepare, name="pool-prepare", daemon=True).start()
        else:
            self.prepare()

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace)
        for pool in self.pools:
            pool.stop()
        if self._collector is not None:
            metrics.unregister(self._collector)
            self._collector = None
