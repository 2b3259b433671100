"""Runs the real ``python -m device_plugin serve`` against the kubelet stand-in.

The device-plugin benchmarks measure the daemon as operators run it: a separate
process (its own interpreter, GIL and threads) registered with the kubelet
stand-in of demo/kubelet.py in a short /tmp directory.  Also holds the
percentile helper and the table printer the benchmark scripts share.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from demo.kubelet import KubeletStandIn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEM_CONFIG = """\
domain: hostkit.io
resources:
  - name: "null"
    match: [{subsystem: mem, kernel: "null"}]
    share: 4
  - name: zero
    match: [{subsystem: mem, kernel: zero}]
  - name: full
    match: [{subsystem: mem, kernel: full}]
"""
MEM_RESOURCES = ("hostkit.io/null", "hostkit.io/zero", "hostkit.io/full")


@dataclass
class Running:
    proc: subprocess.Popen[str]
    kubelet: KubeletStandIn
    directory: str


@contextmanager
def daemon(
    config: str,
    resources: Sequence[str],
    *,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
) -> Iterator[Running]:
    """Start the stand-in and the daemon; yield once every resource registered."""
    directory = tempfile.mkdtemp(prefix="dpb", dir="/tmp")
    kubelet_dir = os.path.join(directory, "k")
    cfg = os.path.join(directory, "config.yaml")
    with open(cfg, "w") as f:
        f.write(config)
    kubelet = KubeletStandIn(kubelet_dir)
    kubelet.start()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "device_plugin", "serve", "--config", cfg,
            "--kubelet-dir", kubelet_dir, "--cdi-dir", os.path.join(directory, "cdi"),
            "--log-level", log_level, *extra_args,
        ],
        cwd=ROOT,
        text=True,
    )
    try:
        for name in resources:
            kubelet.wait_registered(name, timeout=30)
        yield Running(proc, kubelet, kubelet_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        kubelet.stop()
        shutil.rmtree(directory, ignore_errors=True)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: Sequence[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms)} p50={percentile(ms, 50):.2f} ms p90={percentile(ms, 90):.2f} ms "
        f"p99={percentile(ms, 99):.2f} ms max={max(ms):.2f} ms mean={statistics.fmean(ms):.2f} ms"
    )


def table(rows: Sequence[tuple[str, str, str]]) -> str:
    header = ("measure", "value", "goal")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
