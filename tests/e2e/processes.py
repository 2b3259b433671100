"""Long-running host processes of the tier (etcd, API server, kubelet, our daemons).

Owns starting one process with an explicit argv and environment, its output in
``<run>/logs/<name>.log`` (appended across restarts, so a failure report can
show it), bounded readiness waits, and stopping: SIGTERM, then SIGKILL after a
grace period.  Short commands go through ``plugin_runtime.commands.run``; only
processes that must outlive a call are started here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Daemon:
    """One named host process of the run; restartable with the same argv."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else {"PATH": BASE_PATH}
        self.cwd = cwd
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        with open(self.log, "ab") as out:
            out.write(f"==== start {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``ready`` until true; fail with the log's tail if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(f"{self.name} exited before {what}:\n{self.tail()}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {what} within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            started = time.monotonic()
            how = f"signal {sig}"
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                how = f"SIGKILL after {grace:g} s"
                self.proc.kill()
                self.proc.wait(10)
            with open(self.log, "ab") as out:
                out.write(f"==== stopped ({how}) in {time.monotonic() - started:.2f} s, "
                          f"status {self.proc.returncode}\n".encode())
        # children left in the process group (none expected) go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        self.stop(grace=0.0, sig=signal.SIGKILL)
