"""The one subprocess runner of both daemons.

Every external tool (mkfs, blkid, resize2fs, xfs_growfs, fsfreeze, ...) runs
through ``run``: an argv list (never a shell), a mandatory timeout, ``LC_ALL=C``
so that messages can be classified, and captured output.  A failure raises
``CommandError`` carrying argv, exit status and stderr, which the callers turn
into domain errors; a hang raises ``CommandTimeout`` after killing the child.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from plugin_runtime.errors import DeadlineExceeded, Internal

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class CommandError(Internal):
    """A command exited non-zero."""

    def __init__(self, result: CommandResult) -> None:
        detail = (result.stderr or result.stdout).strip()
        super().__init__(
            f"{' '.join(result.argv)} exited with status {result.returncode}"
            + (f": {detail[-2000:]}" if detail else "")
        )
        self.result = result

    @property
    def returncode(self) -> int:
        return self.result.returncode

    @property
    def stderr(self) -> str:
        return self.result.stderr


class CommandTimeout(DeadlineExceeded):
    """A command did not finish in time and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{' '.join(argv)} did not finish within {timeout:g} s and was killed")
        self.argv = tuple(argv)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env["LC_ALL"] = "C"
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input_text: str | None = None,
) -> CommandResult:
    """Run ``argv`` and return its result.

    Raises ``CommandError`` on a non-zero exit when ``check`` is true, and
    ``CommandTimeout`` when it runs longer than ``timeout`` seconds.
    """
    if not argv:
        raise ValueError("empty argv")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_environment(),
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(argv, timeout) from exc
    except FileNotFoundError as exc:
        raise Internal(f"{argv[0]} is not installed or not on PATH") from exc
    result = CommandResult(
        argv=tuple(argv),
        returncode=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        seconds=time.monotonic() - started,
    )
    log.debug("ran %s -> %d in %.3fs", " ".join(argv), proc.returncode, result.seconds)
    if check and proc.returncode != 0:
        raise CommandError(result)
    return result
