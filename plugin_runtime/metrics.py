"""Prometheus metrics endpoint and the RPC metrics both daemons export.

The endpoint is off unless an address is given (``--metrics-address``), so a
test process or the demo never opens a port it did not ask for.  Metrics live in
the default registry: each daemon is its own process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_TOTAL = Counter(
    "hostkit_rpc_total",
    "gRPC calls handled, by service, method and final status code",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "hostkit_rpc_duration_seconds",
    "gRPC handler latency by service and method",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


@dataclass
class MetricsEndpoint:
    host: str
    port: int
    _server: Any
    _thread: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_address(address: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``:port`` (all interfaces); raise ValueError naming the problem."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"metrics address {address!r} must be host:port or :port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"metrics address {address!r}: port {port_text!r} is not a number"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics address {address!r}: port {port} is out of range")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - a DaemonSet's metrics port is meant to be scraped
    return host, port


def start_metrics_endpoint(address: str | None) -> MetricsEndpoint | None:
    """Serve /metrics on ``address``; return None when ``address`` is empty."""
    if not address:
        return None
    host, port = parse_address(address)
    server, thread = start_http_server(port, addr=host)
    actual_port = server.server_address[1]
    log.info("serving metrics on %s:%d", host, actual_port)
    return MetricsEndpoint(host, actual_port, server, thread)
