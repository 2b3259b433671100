"""The one fake of the DRA wire tests: the API server's ResourceClaims."""

from __future__ import annotations

import threading
from typing import Any

from device_plugin.dra.claims import ResourceClaim, parse_claim
from plugin_runtime.errors import NotFound

DRIVER = "dra.hostkit.io"


class FakeClaims:
    """The API server's ResourceClaims, as plain objects; counts the reads."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads = 0
        self._lock = threading.Lock()

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[(meta["namespace"], meta["name"])] = obj

    def delete(self, namespace: str, name: str) -> None:
        self.objects.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> ResourceClaim:
        with self._lock:
            self.reads += 1
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise NotFound(f"ResourceClaim {namespace}/{name} not found")
        return parse_claim(obj)


def claim_object(name: str, uid: str, devices: list[str], *, pool: str = "",
                 namespace: str = "default", driver: str = DRIVER,
                 allocated: bool = True, request: str = "dev") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if allocated:
        status["allocation"] = {"devices": {"results": [
            {"request": request, "driver": driver, "pool": pool, "device": d}
            for d in devices]}}
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid}, "status": status}
