"""Readable step-by-step output for the first-run demo.

Each step prints one line with its outcome and time, plus indented detail
lines; a failed step records why, so the demo can finish what still runs and
say at the end exactly which steps could not be done on this machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


class StepFailed(Exception):
    """A step could not be done; the message says why."""


@dataclass
class Outcome:
    title: str
    ok: bool
    seconds: float
    error: str = ""


@dataclass
class Steps:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    outcomes: list[Outcome] = field(default_factory=list)
    not_run: list[Outcome] = field(default_factory=list)

    def section(self, title: str) -> None:
        print(f"\n== {title}", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            print(f"     {line}", file=self.out, flush=True)

    def skipped(self, title: str, why: str) -> None:
        self.not_run.append(Outcome(title, False, 0.0, why))
        print(f"  -- {title}: not run ({why})", file=self.out, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except Exception as exc:
            elapsed = time.monotonic() - started
            self.outcomes.append(Outcome(title, False, elapsed, str(exc) or type(exc).__name__))
            print(f"  !! {title}: FAILED ({exc})", file=self.out, flush=True)
            raise StepFailed(f"{title}: {exc}") from exc
        elapsed = time.monotonic() - started
        self.outcomes.append(Outcome(title, True, elapsed))
        print(f"  ok {title} ({elapsed * 1000:.0f} ms)", file=self.out, flush=True)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]
