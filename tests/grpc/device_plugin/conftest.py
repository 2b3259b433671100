"""Fixtures for the device-plugin wire tests: a kubelet dir, the stand-in, managers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from demo.kubelet import KubeletStandIn
from device_plugin.lifecycle import PluginManager
from tests.grpc.device_plugin.doubles import FakeCatalog, FakeResource


@pytest.fixture
def kubelet_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="dp", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def kubelet(kubelet_dir: str) -> Iterator[KubeletStandIn]:
    stand_in = KubeletStandIn(kubelet_dir)
    stand_in.start()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture
def run_manager(kubelet_dir: str) -> Iterator[Callable[..., PluginManager]]:
    managers: list[PluginManager] = []

    def start(*resources: FakeResource, catalog: FakeCatalog | None = None) -> PluginManager:
        manager = PluginManager(catalog or FakeCatalog(resources), kubelet_dir)
        manager.start()
        managers.append(manager)
        return manager

    try:
        yield start
    finally:
        for manager in managers:
            manager.stop()
