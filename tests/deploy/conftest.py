"""Session fixtures of the deployment checks: every overlay rendered once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.manifests import DAEMONSETS, OVERLAYS, kustomize, load_all


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    """Every overlay rendered: overlay name -> YAML text."""
    return {overlay: kustomize(DAEMONSETS / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def default_docs(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return load_all(rendered["default"])
