"""The ``device-plugin`` command: ``serve`` (the DaemonSet's process) and ``discover``.

``serve`` loads and validates the configuration (an invalid one exits with code
2 and the message naming the key), starts the domain (udev discovery, health,
reload), then one kubelet endpoint per resource through ``PluginManager``, and
waits for SIGTERM/SIGINT; shutdown stops every endpoint and removes its socket.

``discover`` enumerates once and prints what would be advertised (resource,
device ID, nodes, health, NUMA) without a kubelet and without importing gRPC.

Liveness: each plugin socket serves the standard gRPC health service, but the
socket names change on every registration, so a probe cannot name one.
``--health-address`` therefore serves ``GET /healthz`` over HTTP: 200 while the
directory watch and the catalog follower are alive and every resource's
lifecycle thread has woken up within 60 s (each wakes at least every 30 s),
503 naming the stuck part otherwise.  It is off unless set, like
``--metrics-address``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from plugin_runtime.logs import configure_logging

if TYPE_CHECKING:
    from device_plugin.config import Config
    from plugin_runtime.metrics import HttpEndpoint

log = logging.getLogger("device_plugin")

# Same as api.DEFAULT_KUBELET_DIR; spelled out so `discover` never imports gRPC
# (tests/grpc/device_plugin/test_daemon.py keeps the two equal).
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
# Same as api.POD_RESOURCES_SOCKET (tests/grpc/device_plugin/test_status.py).
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# /healthz fails when a lifecycle thread has not woken up for this long; they wake
# at least every idle interval (30 s, lifecycle.PluginServer) and a Register call
# is bounded by 15 s.
HEALTH_MAX_AGE_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-plugin",
        description="Kubernetes device plugin for udev-discovered host devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML configuration (default: the embedded default configuration)",
        )
        p.add_argument("--log-level", default="info", help="debug, info, warning or error")
        p.add_argument("--log-format", default="text", choices=("text", "json"))

    serve = sub.add_parser("serve", help="serve the configured resources to the kubelet")
    common(serve)
    serve.add_argument(
        "--kubelet-dir",
        default=DEFAULT_KUBELET_DIR,
        metavar="DIR",
        help=f"the kubelet's device-plugin directory (default {DEFAULT_KUBELET_DIR})",
    )
    serve.add_argument(
        "--cdi-dir",
        metavar="DIR",
        help="where CDI spec files are written; overrides cdi.dir of the configuration",
    )
    serve.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on HOST:PORT (off when unset)",
    )
    serve.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="API server access for DRA resources when running outside a pod (default: the "
        "pod's service account); unused when no resource uses DRA",
    )
    serve.add_argument(
        "--kubelet-root",
        metavar="DIR",
        help="the kubelet's root directory (its --root-dir), where DRA plugins register "
        "(plugins_registry/) and serve (plugins/<driver>/); default: the parent of "
        "--kubelet-dir.  Set it where the kubelet root is moved: the kubelet keeps its "
        "device-plugin directory at /var/lib/kubelet/device-plugins whatever its root",
    )
    serve.add_argument(
        "--node-name",
        metavar="NAME",
        help="this node's name for DRA ResourceSlices (default: $NODE_NAME, else the host name)",
    )
    serve.add_argument(
        "--pod-resources-socket",
        default=DEFAULT_POD_RESOURCES_SOCKET,
        metavar="PATH",
        help="the kubelet's pod-resources socket, read on each /metrics scrape for held "
        f"devices that vanished (default {DEFAULT_POD_RESOURCES_SOCKET})",
    )
    serve.add_argument(
        "--health-address",
        metavar="HOST:PORT",
        help="serve GET /healthz for a liveness probe on HOST:PORT (off when unset)",
    )

    discover = sub.add_parser("discover", help="print what would be advertised, then exit")
    common(discover)
    discover.add_argument("--json", action="store_true", help="one JSON document on stdout")

    status = sub.add_parser(
        "status", help="list each device with the pod, namespace and container holding it "
        "(the kubelet's pod-resources API), including held devices that vanished")
    common(status)
    status.add_argument("--pod-resources-socket", default=DEFAULT_POD_RESOURCES_SOCKET,
                        metavar="PATH",
                        help=f"the kubelet's pod-resources socket (default "
                        f"{DEFAULT_POD_RESOURCES_SOCKET})")
    status.add_argument("--pod", metavar="NAMESPACE/NAME",
                        help="only this pod's allocations (pod-resources Get)")
    status.add_argument("--node-name", metavar="NAME",
                        help="this node's name, for DRA pool names (default: $NODE_NAME, "
                        "else the host name)")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"device-plugin: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "discover":
        return _discover(args)
    if args.command == "status":
        return _status(args)
    return _serve(args)


def _bad_config(exc: Exception) -> int:
    print(f"device-plugin: invalid configuration: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _discover(args: argparse.Namespace) -> int:
    from device_plugin.config import ConfigError
    from device_plugin.plugin import discover

    try:
        rows = discover(args.config)
    except ConfigError as exc:
        return _bad_config(exc)
    if args.json:
        json.dump({"devices": [r.as_dict() for r in rows]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    table = [("RESOURCE", "ID", "HEALTH", "NUMA", "NODES")]
    for r in rows:
        health = r.health if not r.reason else f"{r.health} ({r.reason})"
        numa = ",".join(str(n) for n in r.numa_nodes) or "-"
        table.append((r.resource, r.id, health, numa, " ".join(r.nodes) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        print("  ".join([*cells, row[4]]).rstrip())
    if not rows:
        print("(no devices matched)", file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from device_plugin import podresources
    from device_plugin.config import ConfigError, load_config
    from device_plugin.holders import device_status, vanished_held
    from device_plugin.kube import node_name
    from device_plugin.plugin import discover
    from plugin_runtime.errors import DomainError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _bad_config(exc)
    try:
        if args.pod:
            namespace, _, pod = args.pod.partition("/")
            if not namespace or not pod:
                print(f"device-plugin: --pod {args.pod!r}: give NAMESPACE/NAME",
                      file=sys.stderr)
                return EXIT_BAD_INPUT
            held = podresources.held_by_pod(namespace, pod, args.pod_resources_socket)
        else:
            held = podresources.held_on_node(args.pod_resources_socket)
    except DomainError as exc:
        print(f"device-plugin: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rows = device_status(config, node_name(args.node_name), discover(config), held)
    if args.pod:
        rows = [r for r in rows if r.holders]
    vanished = vanished_held(rows)
    if args.json:
        json.dump({"devices": [r.as_dict() for r in rows], "vanished_held": vanished},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    table = [("RESOURCE", "API", "DEVICE", "STATE", "HELD BY")]
    for r in rows:
        state = r.health if r.present else "VANISHED"
        held_by = ", ".join(str(h) for h in r.holders) or "-"
        table.append((r.resource, r.api, r.device, state, held_by))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join([*(row[i].ljust(widths[i]) for i in range(4)), row[4]]).rstrip())
    total = sum(vanished.values())
    if total:
        print(f"{total} held device(s) no longer present: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(vanished.items())), file=sys.stderr)
    return EXIT_OK


def _with_cdi_dir(cdi_dir: str | None) -> Callable[[Config], Config]:
    def apply(config: Config) -> Config:
        if cdi_dir is None:
            return config
        return dataclasses.replace(config, cdi=dataclasses.replace(config.cdi, dir=cdi_dir))

    return apply


def _serve(args: argparse.Namespace) -> int:
    from device_plugin.config import ConfigError
    from device_plugin.lifecycle import PluginManager, socket_name
    from device_plugin.plugin import DevicePluginDomain
    from device_plugin.registry import DevicePluginView
    from plugin_runtime.errors import DomainError
    from plugin_runtime.metrics import parse_address, start_metrics_endpoint
    from plugin_runtime.server import ShutdownSignals

    try:
        socket_name("hostkit.io/x", args.kubelet_dir)
    except ValueError as exc:
        print(f"device-plugin: --kubelet-dir: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.cdi_dir is not None and not args.cdi_dir.startswith("/"):
        print(f"device-plugin: --cdi-dir {args.cdi_dir!r} must be absolute", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        domain = DevicePluginDomain(args.config, transform=_with_cdi_dir(args.cdi_dir))
    except ConfigError as exc:
        return _bad_config(exc)
    try:
        health_address = None
        if args.health_address:
            health_address = parse_address(args.health_address, "--health-address")
        metrics = start_metrics_endpoint(args.metrics_address)
    except (ValueError, OSError) as exc:
        print(f"device-plugin: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    signals = ShutdownSignals()
    signals.install()
    try:
        domain.start()
    except DomainError as exc:
        log.error("cannot start: %s", exc)
        domain.stop()
        return EXIT_FAILED
    manager = PluginManager(DevicePluginView(domain.catalog), args.kubelet_dir)
    health: HttpEndpoint | None = None
    publisher = None
    held_collector = None
    dra_plugin = None
    try:
        if domain.config.dra_enabled:
            # Only now is the API client imported: a device-plugin-only process never is.
            try:
                publisher = _start_slice_publisher(domain, args)
            except DomainError as exc:
                log.error("cannot publish DRA resources: %s", exc)
                return EXIT_BAD_INPUT
            dra_plugin = _start_dra_plugin(domain, args)
        else:
            _warn_when_dra_appears(domain)
        manager.start()
        if metrics is not None:
            held_collector = _collect_held_vanished(domain, args)
        if health_address is not None:
            health = _start_health_endpoint(health_address, manager.healthy)
        log.info(
            "serving %d resources from %s to the kubelet in %s",
            len(domain.catalog.resources()),
            args.config or "the embedded default configuration",
            args.kubelet_dir,
        )
        log.info("received %s; shutting down", signals.wait())
    finally:
        if health is not None:
            health.stop()
        if dra_plugin is not None:
            dra_plugin.stop()
        if publisher is not None:
            publisher.stop()
        if held_collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(held_collector)
        manager.stop()
        domain.stop()
        if metrics is not None:
            metrics.stop()
    return EXIT_OK


def _warn_when_dra_appears(domain: Any) -> None:
    """DRA is set up at start only (API client, kubelet plugin): a reload that marks a
    resource ``dra: true`` in a process started without one leaves that resource
    unserved (the device plugin API drops it) until a restart; say so, once."""
    warned = False

    def check() -> None:
        nonlocal warned
        if not warned and domain.catalog.config.dra_enabled:
            warned = True
            log.error("the reloaded configuration serves %s through DRA, which this process "
                      "did not start with: restart the device plugin to publish them",
                      ", ".join(r.name for r in domain.catalog.config.dra_resources()))

    domain.catalog.subscribe(check)


def _collect_held_vanished(domain: Any, args: argparse.Namespace) -> Any:
    """Export the held-but-vanished device count on /metrics (read at each scrape)."""
    from prometheus_client import REGISTRY

    from device_plugin.holders import device_status
    from device_plugin.kube import node_name
    from device_plugin.plugin import catalog_devices
    from device_plugin.podresources import HeldVanishedCollector

    node = node_name(args.node_name)
    collector = HeldVanishedCollector(
        lambda held: device_status(domain.config, node, catalog_devices(domain.catalog), held),
        args.pod_resources_socket,
    )
    REGISTRY.register(collector)
    return collector


def _start_slice_publisher(domain: Any, args: argparse.Namespace) -> Any:
    """Build the API client (``--kubeconfig`` or the service account) and start
    publishing the DRA resources as ResourceSlices."""
    from device_plugin.kube import ApiAccess, make_client, node_name
    from device_plugin.slice_publisher import SlicePublisher

    access = ApiAccess(args.kubeconfig)
    make_client(access).close()  # a bad configuration fails here, before any thread
    publisher = SlicePublisher(domain.catalog, lambda: make_client(access),
                               node_name(args.node_name))
    publisher.start()
    return publisher


class _DraKubeletPlugin:
    """The kubelet side of DRA as the CLI starts and stops it."""

    def __init__(self, plugin: Any, feed: Any) -> None:
        self.plugin, self.feed = plugin, feed

    def stop(self) -> None:
        self.feed.close()
        self.plugin.stop()


def _start_dra_plugin(domain: Any, args: argparse.Namespace) -> _DraKubeletPlugin:
    """Serve the kubelet's DRA plugin API (prepare/unprepare, health) for the DRA
    resources and register it through the plugin watcher.  Claims are read with the
    same API access as the slice publisher; prepared claims are checkpointed under
    ``<kubelet root>/plugins/<driver>/claims``."""
    import os

    from device_plugin.dra.checkpoint import CheckpointStore
    from device_plugin.dra.claims import ApiClaimReader
    from device_plugin.dra.devices import CatalogDevices
    from device_plugin.dra.health import HealthFeed
    from device_plugin.dra.lifecycle import DraPlugin
    from device_plugin.dra.prepare import ClaimPreparer
    from device_plugin.kube import ApiAccess, make_client, node_name

    config = domain.config
    driver = config.dra.driver
    root = args.kubelet_root or os.path.dirname(os.path.abspath(args.kubelet_dir))

    def dra_resources() -> dict[str, Any]:
        return {n: s for n, s in domain.catalog.resources().items() if s.config.dra}

    devices = CatalogDevices(node_name(args.node_name), dra_resources)
    preparer = ClaimPreparer(
        driver, devices, ApiClaimReader(make_client(ApiAccess(args.kubeconfig))),
        CheckpointStore(os.path.join(root, "plugins", driver, "claims")),
        config.cdi.dir, config.cdi.vendor,
    )
    feed = HealthFeed(devices)
    domain.catalog.subscribe(feed.changed)
    plugin = DraPlugin(driver, preparer, feed, root)
    try:
        plugin.start()
    except BaseException:
        feed.close()
        raise
    return _DraKubeletPlugin(plugin, feed)


def _start_health_endpoint(
    address: tuple[str, int], check: Callable[[float], tuple[bool, str]]
) -> HttpEndpoint:
    from http.server import BaseHTTPRequestHandler

    from plugin_runtime.metrics import HttpEndpoint

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            ok, reason = check(HEALTH_MAX_AGE_SECONDS)
            body = (reason + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("healthz: " + format, *args)

    endpoint = HttpEndpoint(*address, Handler, "healthz")
    log.info("serving /healthz on %s:%d", endpoint.host, endpoint.port)
    return endpoint


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
