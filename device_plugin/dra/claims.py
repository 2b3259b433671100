"""A ResourceClaim as this driver needs it, and reading one from the API server.

The kubelet's NodePrepareResources names a claim (namespace, name, UID) and
nothing more: the driver reads the claim itself and takes from
``status.allocation`` the results of its own driver (a claim may hold devices
of several drivers) and the opaque configs meant for it.  Who the claim is
reserved for is the kubelet's check, made before it calls the driver.
``parse_claim`` turns the API object (as a plain mapping, camelCase keys as on
the wire) into the frozen ``ResourceClaim`` below; it is pure, so the rules are
tested without a server.

``ApiClaimReader`` does the GET through lightkube.  lightkube is imported when a
reader is built, never at module import, so the device-plugin-only process
does not load the API client (``tests/unit/test_layering.py`` pins this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from plugin_runtime.errors import InvalidArgument, NotFound, Unavailable


@dataclass(frozen=True)
class AllocationResult:
    """One allocated device (``status.allocation.devices.results[]``)."""

    request: str  # "main" or "main/sub" (a prioritized-list subrequest)
    driver: str
    pool: str
    device: str
    admin_access: bool = False
    share_id: str | None = None

    @property
    def base_request(self) -> str:
        """The request name the pod's containers refer to (without ``/sub``)."""
        return self.request.split("/", 1)[0]


@dataclass(frozen=True)
class OpaqueConfig:
    """One ``status.allocation.devices.config[]`` entry with opaque parameters."""

    source: str  # FromClass or FromClaim
    requests: tuple[str, ...]
    driver: str
    parameters: Any

    def applies_to(self, driver: str, result: AllocationResult) -> bool:
        """Meant for ``driver`` and for the result's request (or all requests)."""
        if self.driver != driver:
            return False
        return not self.requests or result.request in self.requests or \
            result.base_request in self.requests


@dataclass(frozen=True)
class ResourceClaim:
    namespace: str
    name: str
    uid: str
    allocated: bool
    results: tuple[AllocationResult, ...] = ()
    configs: tuple[OpaqueConfig, ...] = ()

    def results_for(self, driver: str) -> tuple[AllocationResult, ...]:
        return tuple(r for r in self.results if r.driver == driver)

    def configs_for(self, driver: str, result: AllocationResult) -> tuple[OpaqueConfig, ...]:
        """Opaque configs for one result, class configs first (the API's order)."""
        return tuple(c for c in self.configs if c.applies_to(driver, result))


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"ResourceClaim {where}: expected an object")
    return value


def _list(value: object, where: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidArgument(f"ResourceClaim {where}: expected a list")
    return value


def _string(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"ResourceClaim {where}.{key}: missing or not a string")
    return value


def parse_claim(obj: Mapping[str, Any]) -> ResourceClaim:
    """The driver's view of a ResourceClaim object; InvalidArgument names a bad field."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _string(meta, "namespace", "metadata")
    name = _string(meta, "name", "metadata")
    uid = _string(meta, "uid", "metadata")
    status = _mapping(obj.get("status"), "status")
    allocation = status.get("allocation")
    if allocation is None:
        return ResourceClaim(namespace, name, uid, False)
    devices = _mapping(_mapping(allocation, "status.allocation").get("devices"),
                       "status.allocation.devices")
    results = []
    for i, raw in enumerate(_list(devices.get("results"), "status.allocation.devices.results")):
        where = f"status.allocation.devices.results[{i}]"
        r = _mapping(raw, where)
        share = r.get("shareID")
        results.append(AllocationResult(
            request=_string(r, "request", where),
            driver=_string(r, "driver", where),
            pool=_string(r, "pool", where),
            device=_string(r, "device", where),
            admin_access=bool(r.get("adminAccess") or False),
            share_id=share if isinstance(share, str) and share else None,
        ))
    configs = []
    for i, raw in enumerate(_list(devices.get("config"), "status.allocation.devices.config")):
        where = f"status.allocation.devices.config[{i}]"
        c = _mapping(raw, where)
        opaque = c.get("opaque")
        if opaque is None:
            continue
        o = _mapping(opaque, f"{where}.opaque")
        configs.append(OpaqueConfig(
            source=str(c.get("source", "")),
            requests=tuple(str(x) for x in _list(c.get("requests"), f"{where}.requests")),
            driver=_string(o, "driver", f"{where}.opaque"),
            parameters=o.get("parameters"),
        ))
    return ResourceClaim(namespace, name, uid, True, tuple(results), tuple(configs))


class ClaimReader(Protocol):
    def get(self, namespace: str, name: str) -> ResourceClaim:
        """The claim as the API server has it now.  ``NotFound`` when it does not exist,
        ``Unavailable`` when the server cannot be asked."""
        ...


class ApiClaimReader:
    """Reads claims with a lightkube ``Client`` (built by the caller: in-cluster or a
    kubeconfig).  ``timeout`` bounds each GET (the kubelet waits 45 s per call)."""

    def __init__(self, client: Any) -> None:
        from lightkube import ApiError
        from lightkube.resources.resource_v1 import ResourceClaim as ClaimResource

        self._client = client
        self._api_error = ApiError
        self._resource = ClaimResource

    def get(self, namespace: str, name: str) -> ResourceClaim:
        try:
            obj = self._client.get(self._resource, name, namespace=namespace)
        except self._api_error as exc:
            code = getattr(exc.status, "code", None)
            if code == 404:
                raise NotFound(f"ResourceClaim {namespace}/{name} not found") from exc
            raise Unavailable(
                f"reading ResourceClaim {namespace}/{name} failed: "
                f"{code} {getattr(exc.status, 'message', exc)}"
            ) from exc
        except OSError as exc:
            raise Unavailable(f"reading ResourceClaim {namespace}/{name} failed: {exc}") from exc
        except Exception as exc:  # httpx transport errors are not OSErrors
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise Unavailable(
                    f"reading ResourceClaim {namespace}/{name} failed: {exc}") from exc
            raise
        return parse_claim(obj.to_dict())

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()
