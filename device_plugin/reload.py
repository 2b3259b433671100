"""Configuration hot-reload: watch the file's directory, re-load, keep the last good.

The watch is on the directory (``plugin_runtime.inotify.DirectoryWatch``), not
the file, because the usual way a file changes in Kubernetes is a ConfigMap
volume update: the kubelet writes a new ``..<timestamp>`` directory, points a
``..data_tmp`` symlink at it and renames that over ``..data``; the file the
plugin was given (``config.yaml -> ..data/config.yaml``) is never touched
itself.  Any event naming the file, ``..data`` or another ``..`` entry (or a
queue overflow) triggers a re-load after a short debounce; editors that write
in place or rename over the file are covered by the same events.

A re-load whose bytes equal the last good file does nothing.  A valid new file
is handed to ``apply`` (the catalog and discovery adopt it).  An invalid one is
refused: the last good configuration stays, the reason is logged, and the
``hostkit_device_plugin_config_reloads_total{result="failure"}`` counter and the
``..._config_last_reload_success`` gauge (0) show it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device_plugin import metrics
from device_plugin.config import Config, ConfigError, parse_yaml
from plugin_runtime.inotify import IN_IGNORED, DirectoryWatch, Event

log = logging.getLogger(__name__)


class ConfigReloader:
    """Re-loads ``path`` when it changes and calls ``apply`` with each new valid config."""

    def __init__(
        self,
        path: str | Path,
        apply: Callable[[Config], None],
        *,
        initial: Config,
        debounce_seconds: float = 0.05,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._debounce = debounce_seconds
        self.current = initial
        self._digest = self._read_digest()
        self._bad_digest: str | None = None
        self.failures = 0
        self.successes = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._watch: DirectoryWatch | None = None
        self._wake_r = self._wake_w = -1

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def start(self) -> None:
        self._watch = DirectoryWatch(str(self.path.parent))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(timeout)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._thread = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _wait(self, watch: DirectoryWatch, timeout: float | None) -> list[Event]:
        """Events of ``watch``, waiting up to ``timeout`` (None: until an event or stop)."""
        readable, _, _ = select.select([watch.fileno(), self._wake_r], [], [], timeout)
        if watch.fileno() not in readable:
            return []
        return watch.read(0)

    def _relevant(self, name: str) -> bool:
        return name == self.path.name or name.startswith("..")

    def _run(self) -> None:
        while not self._stop.is_set():
            watch = self._watch
            if watch is None:
                break
            events = self._wait(watch, None)
            if not events:
                continue
            if any(e.mask & IN_IGNORED for e in events):
                # The directory itself went away; re-watch it when it is back.
                log.warning("config directory %s vanished; waiting for it", self.path.parent)
                watch.close()
                self._watch = None
                while not self._stop.is_set() and self._watch is None:
                    try:
                        self._watch = DirectoryWatch(str(self.path.parent))
                    except OSError:
                        self._stop.wait(1.0)
                self.reload_now()
                continue
            if not any(e.overflow or self._relevant(e.name) for e in events):
                continue
            # A ConfigMap swap is several events in a row: let it finish.
            deadline = time.monotonic() + self._debounce
            while (remaining := deadline - time.monotonic()) > 0:
                if not self._wait(watch, remaining):
                    break
            self.reload_now()

    def reload_now(self) -> bool:
        """Re-load the file; True when a new valid configuration was applied."""
        with self._lock:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                return self._refuse(f"{self.path}: cannot read: {exc.strerror or exc}")
            digest = hashlib.sha256(data).hexdigest()
            if digest in (self._digest, self._bad_digest):
                return False  # unchanged, or the same refused content again
            try:
                config = parse_yaml(data.decode("utf-8"), str(self.path))
            except UnicodeDecodeError as exc:
                self._bad_digest = digest
                return self._refuse(f"{self.path}: not UTF-8 text ({exc.reason})")
            except ConfigError as exc:
                self._bad_digest = digest
                return self._refuse(str(exc))
            self._digest = digest
            self._bad_digest = None
            self.current = config
            self.successes += 1
            self.last_error = None
            metrics.CONFIG_RELOADS.labels(result="success").inc()
            metrics.CONFIG_LAST_RELOAD_SUCCESS.set(1)
            metrics.CONFIG_LAST_RELOAD_TIMESTAMP.set(time.time())
            log.info("configuration %s reloaded (%d resources)", self.path,
                     len(config.resources))
            self._apply(config)
            return True

    def _refuse(self, reason: str) -> bool:
        self.failures += 1
        self.last_error = reason
        metrics.CONFIG_RELOADS.labels(result="failure").inc()
        metrics.CONFIG_LAST_RELOAD_SUCCESS.set(0)
        metrics.CONFIG_LAST_RELOAD_TIMESTAMP.set(time.time())
        log.error("configuration reload refused, keeping the last good one: %s", reason)
        return False

