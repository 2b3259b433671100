"""Hot reload through a real ConfigMap-style ``..data`` symlink swap: good, bad, good."""

from __future__ import annotations

import os
import threading

from prometheus_client import REGISTRY

from device_plugin.config import Config, load_config
from device_plugin.registry import Catalog
from device_plugin.reload import ConfigReloader

GOOD_1 = "resources:\n  - {name: fuse, match: [{subsystem: misc, kernel: fuse}]}\n"
GOOD_2 = (GOOD_1 + "  - {name: tun, match: [{subsystem: misc, kernel: tun}]}\n")
BAD = "resources:\n  - {name: fuse, match: [{subsystem: misc, colour: red}]}\n"


class ConfigMapDir:
    """What the kubelet does to a ConfigMap volume: timestamped dirs, ``..data`` swapped."""

    def __init__(self, root) -> None:
        self.root = root
        self.n = 0

    def publish(self, text: str) -> None:
        self.n += 1
        version = self.root / f"..2026_11_27_00_00_0{self.n}.000000001"
        version.mkdir()
        (version / "config.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.rename(tmp, self.root / "..data")  # the atomic swap
        if old:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()
        if not (self.root / "config.yaml").is_symlink():
            os.symlink("..data/config.yaml", self.root / "config.yaml")


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_symlink_swap_good_then_bad_then_good(tmp_path):
    cm = ConfigMapDir(tmp_path)
    cm.publish(GOOD_1)
    path = tmp_path / "config.yaml"
    initial = load_config(path)
    catalog = Catalog(initial)
    applied = threading.Semaphore(0)

    def apply(config):
        catalog.apply_config(config)
        applied.release()

    reloader = ConfigReloader(path, apply, initial=initial, debounce_seconds=0.02)
    failures_before = metric("hostkit_device_plugin_config_reloads_total",
                             {"result": "failure"})
    reloader.start()
    try:
        cm.publish(GOOD_2)
        assert applied.acquire(timeout=10), "a valid new config was not applied"
        assert set(catalog.resources()) == {"hostkit.io/fuse", "hostkit.io/tun"}
        assert reloader.successes == 1

        cm.publish(BAD)
        deadline = threading.Event()
        for _ in range(200):
            if reloader.failures:
                break
            deadline.wait(0.05)
        assert reloader.failures == 1
        assert "resources[0].match[0].colour: unknown key" in (reloader.last_error or "")
        assert set(catalog.resources()) == {"hostkit.io/fuse", "hostkit.io/tun"}  # kept
        assert reloader.current.resources[1].name == "hostkit.io/tun"
        assert metric("hostkit_device_plugin_config_last_reload_success") == 0
        assert metric("hostkit_device_plugin_config_reloads_total",
                      {"result": "failure"}) == failures_before + 1

        cm.publish(GOOD_1)
        assert applied.acquire(timeout=10), "recovery config was not applied"
        assert set(catalog.resources()) == {"hostkit.io/fuse"}
        assert reloader.last_error is None
        assert metric("hostkit_device_plugin_config_last_reload_success") == 1
    finally:
        reloader.stop()


def test_in_place_edit_and_unchanged_rewrite(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text(GOOD_1)
    seen: list[Config] = []
    reloader = ConfigReloader(path, seen.append, initial=load_config(path))
    assert not reloader.reload_now()  # same bytes: nothing to do
    path.write_text(GOOD_2)
    assert reloader.reload_now()
    assert [len(c.resources) for c in seen] == [2]
    path.write_text("resources: [")
    assert not reloader.reload_now()
    assert "malformed YAML" in (reloader.last_error or "")
    assert not reloader.reload_now()  # the same refused bytes are not counted twice
    assert reloader.failures == 1
    path.unlink()
    assert not reloader.reload_now()
    assert "cannot read" in (reloader.last_error or "")
