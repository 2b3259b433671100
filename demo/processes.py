"""Starting and stopping the real daemons for the demo.

Each daemon runs as ``python -m <package> serve ...`` from the same interpreter,
with its log in a file the demo shows when a step fails.  Stopping sends
SIGTERM (what the kubelet sends a DaemonSet pod) and waits; SIGKILL only if the
daemon ignores it, which the demo reports as a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log_path: str

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM and wait; True when it exited by itself with status 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                return False
        return self.process.returncode == 0


def start_daemon(name: str, module: str, args: Sequence[str], log_dir: str) -> Daemon:
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Daemon(name, process, log_path)


def wait_for_path(path: str, daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not daemon.alive():
            raise RuntimeError(
                f"{daemon.name} exited with status {daemon.process.returncode}:\n"
                + daemon.log_tail()
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{daemon.name} did not create {path} within {timeout:g} s")
        time.sleep(0.02)
