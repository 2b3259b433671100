"""Per-key locks: one operation at a time per volume, snapshot or name.

Keys are strings such as ``vol:<id>``, ``name:<pvc-name>``, ``snap:<id>``.
``hold(key)`` waits up to ``wait`` seconds and then raises ``Aborted`` (the
spec's "operation pending for this volume"), so the CO retries instead of
piling threads behind a slow mkfs.  ``hold_all`` takes several keys in a global
order, so two operations never deadlock by taking the same keys in different
orders.  Entries are reference counted and dropped when unused, so the table
does not grow with every volume ever seen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from plugin_runtime.errors import Aborted


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class KeyedLocks:
    def __init__(self, wait: float = 10.0) -> None:
        self.wait = wait
        self._table: dict[str, _Entry] = {}
        self._guard = threading.Lock()

    def _enter(self, key: str) -> _Entry:
        with self._guard:
            entry = self._table.get(key)
            if entry is None:
                entry = self._table[key] = _Entry()
            entry.users += 1
            return entry

    def _leave(self, key: str, entry: _Entry) -> None:
        with self._guard:
            entry.users -= 1
            if entry.users == 0:
                del self._table[key]

    def acquire(self, key: str, wait: float | None = None) -> None:
        entry = self._enter(key)
        timeout = self.wait if wait is None else wait
        if not entry.lock.acquire(timeout=timeout):
            self._leave(key, entry)
            raise Aborted(f"an operation on {key.partition(':')[2] or key} is already "
                          "in progress; retry later")

    def release(self, key: str) -> None:
        with self._guard:
            entry = self._table[key]
        entry.lock.release()
        self._leave(key, entry)

    def held(self, key: str) -> bool:
        with self._guard:
            entry = self._table.get(key)
        return entry is not None and entry.lock.locked()

    @contextmanager
    def hold(self, key: str, wait: float | None = None) -> Iterator[None]:
        self.acquire(key, wait)
        try:
            yield
        finally:
            self.release(key)

    @contextmanager
    def hold_all(self, *keys: str, wait: float | None = None) -> Iterator[None]:
        taken: list[str] = []
        try:
            for key in sorted(set(keys)):
                self.acquire(key, wait)
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self.release(key)

    def __len__(self) -> int:
        with self._guard:
            return len(self._table)
