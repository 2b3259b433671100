"""``csi-driver`` command line: serve, pools, config-doc.

- ``serve`` runs the driver on a unix socket until SIGTERM/SIGINT.
- ``pools`` prints the pools, the disks their selectors find, capacity, volumes,
  snapshots and reconcile findings (orphans, drift); ``--json`` for machines.
  It only reads: nothing is attached, mounted or deleted.
- ``config-doc`` prints the configuration reference (docs/reference/csi-driver-config.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from csi_driver import DRIVER_NAME, __version__
from csi_driver.config import DEFAULT_KUBELET_ROOT, DEFAULT_STATE_DIR, load_config, render_reference
from plugin_runtime.errors import DomainError
from plugin_runtime.logs import configure_logging

log = logging.getLogger("csi_driver")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csi-driver", description=f"{DRIVER_NAME} {__version__}: node-local CSI volumes"
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the CSI services on a unix socket")
    serve.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
    serve.add_argument("--node-id", default=None, help="this node's name (topology value)")
    serve.add_argument("--kubelet-root", default=None,
                       help=f"kubelet root directory (default {DEFAULT_KUBELET_ROOT})")
    serve.add_argument("--metrics-address", default=None, help="host:port for /metrics")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", default="text", choices=("text", "json"))
    pools = sub.add_parser("pools", help="print pools, disks, capacity and volumes")
    pools.add_argument("--json", action="store_true", help="machine-readable output")
    for p in (serve, pools):
        p.add_argument("--config", default=None, help="YAML configuration file")
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                       help=f"records and default pool (default {DEFAULT_STATE_DIR})")
    sub.add_parser("config-doc", help="print the configuration reference (Markdown)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-doc":
        sys.stdout.write(render_reference())
        return 0
    try:
        if args.command == "serve":
            return _serve(args)
        return _pools(args)
    except DomainError as exc:
        print(f"csi-driver: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"csi-driver: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from csi_driver.server import Driver
    from plugin_runtime.metrics import start_metrics_endpoint
    from plugin_runtime.server import ShutdownSignals

    configure_logging(args.log_level, args.log_format)
    _limit_malloc_arenas()
    config = load_config(args.config, args.state_dir)
    if args.kubelet_root:
        config = dataclasses.replace(config, kubelet_root=args.kubelet_root)
    node_id = args.node_id or config.node_id
    if not node_id:
        raise ValueError("a node id is required: --node-id or node_id in the config")
    if len(node_id.encode()) > 256:
        raise ValueError("the node id is longer than 256 bytes")
    signals = ShutdownSignals()
    signals.install()
    endpoint = start_metrics_endpoint(args.metrics_address)
    driver = Driver(config, node_id, args.state_dir, args.endpoint)
    driver.start()
    log.info("%s %s serving node %s", DRIVER_NAME, __version__, node_id)
    try:
        log.info("received %s, stopping", signals.wait())
    finally:
        driver.stop()
        if endpoint is not None:
            endpoint.stop()
    return 0


M_ARENA_MAX = -8


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas before the gRPC workers start.

    By default every thread that allocates may get its own arena (up to 8 per
    core), which holds on to freed memory; with 16 workers that is most of the
    driver's growth in RSS.  Two arenas are plenty for a control-plane daemon.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        log.debug("mallopt is not available; keeping the default malloc arenas")


def _capacity(cap: Any) -> dict[str, int] | None:
    return dataclasses.asdict(cap) if cap is not None else None


def _pools(args: argparse.Namespace) -> int:
    from csi_driver.pools import build_pools
    from csi_driver.reconcile import find_orphans
    from csi_driver.store import Store
    from csi_driver.volumes import VolumeService

    configure_logging("warning")
    config = load_config(args.config, args.state_dir)
    store = Store(args.state_dir, read_only=True)  # the driver may be running
    pools = build_pools(config, args.state_dir)
    for pool in pools:
        inspect = getattr(pool, "inspect", None)
        if inspect is not None:
            inspect()
        else:
            pool.start()
    service = VolumeService(config, config.node_id or "-", store, pools)
    reports = service.pool_reports()
    orphans = find_orphans(service)
    volumes = store.volumes()
    snapshots = store.snapshots()
    data: dict[str, Any] = {
        "pools": [
            {
                "name": r.name, "type": r.kind, "ready": r.ready, "volumes": r.volumes,
                "capacity_thin": _capacity(r.capacity_thin),
                "capacity_thick": _capacity(r.capacity_thick), **r.detail,
            }
            for r in reports
        ],
        "volumes": [
            {"id": v.id, "name": v.name, "pool": v.pool, "capacity_bytes": v.capacity_bytes,
             "fs_type": v.fs_type or "block", "thin": v.thin, "state": v.state,
             "staged_at": v.staging.path if v.staging else None,
             "published_at": sorted(v.publications)}
            for v in volumes
        ],
        "snapshots": [
            {"id": s.id, "name": s.name, "source_volume": s.source_volume,
             "size_bytes": s.size_bytes, "state": s.state}
            for s in snapshots
        ],
        "findings": [dataclasses.asdict(o) for o in orphans],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for pool in data["pools"]:
        print(f"pool {pool['name']} ({pool['type']}): "
              f"{'ready' if pool['ready'] else 'NOT READY'}, {pool['volumes']} volumes")
        for key in ("capacity_thin", "capacity_thick"):
            cap = pool.get(key)
            if cap:
                print(f"  {key[9:]:5}: size {_h(cap['total_bytes'])}, free {_h(cap['free_bytes'])},"
                      f" reserve {_h(cap['reserve_bytes'])}, provisioned "
                      f"{_h(cap['provisioned_bytes'])}, available {_h(cap['available_bytes'])},"
                      f" max volume {_h(cap['maximum_volume_bytes'])}")
        if "quota_mode" in pool:
            print(f"  quotas: {pool['quota_mode']}"
                  + (f" ({pool['quota_reason']})" if pool.get("quota_reason") else ""))
        if pool.get("problem"):
            print(f"  problem: {pool['problem']}")
        for disk in pool.get("disks", []):
            print(f"  disk {disk}")
    print(f"volumes: {len(volumes)}")
    for v in data["volumes"]:
        where = f" staged at {v['staged_at']}" if v["staged_at"] else ""
        print(f"  {v['id']} {v['name']} pool={v['pool']} {_h(v['capacity_bytes'])} "
              f"{v['fs_type']} {'thin' if v['thin'] else 'thick'} {v['state']}{where}")
    print(f"snapshots: {len(snapshots)}")
    for s in data["snapshots"]:
        print(f"  {s['id']} {s['name']} of {s['source_volume']} {_h(s['size_bytes'])} "
              f"{s['state']}")
    print(f"findings: {len(orphans)}")
    for o in orphans:
        print(f"  {o.kind}: {o.path} (pool {o.pool or '-'}) {o.detail}")
    return 0


def _h(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
