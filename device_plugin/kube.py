"""The Kubernetes API client of the DRA side: how it is configured and built.

Only DRA needs the API server (ResourceSlices are published there, ResourceClaims
read from there), so this module is imported only when some resource is served
through DRA: the device-plugin-only process never loads lightkube or its HTTP
stack (tests/unit/device_plugin/test_kube_client.py pins that).  Both DRA layers
build their client here: the slice publisher and the kubelet-side DRA service.

Configuration: ``--kubeconfig FILE`` (its current context) for running outside a
pod, else the pod's service account (token, CA and the ``KUBERNETES_SERVICE_*``
environment; lightkube re-reads the token file, so the kubelet's rotation of bound
tokens is followed).  A missing or malformed configuration raises ``ConfigError``
naming what was wrong, before anything is started.

lightkube is the client: typed models of ``resource.k8s.io/v1`` (lightkube-models
1.36 is pinned to the API this code is tested against), a sync httpx client, and
no hand-written REST layer here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from plugin_runtime.errors import InvalidArgument

if TYPE_CHECKING:
    from lightkube import Client

FIELD_MANAGER = "hostkit-device-plugin"
# Every API call is bounded; a stuck API server turns into a retry, never a hang.
REQUEST_TIMEOUT_SECONDS = 10.0


class KubeConfigError(InvalidArgument):
    """No usable API server configuration; the message says which source failed."""


@dataclass(frozen=True)
class ApiAccess:
    """Where the API configuration comes from: a kubeconfig file, or (None) the pod's
    service account."""

    kubeconfig: str | None = None

    def describe(self) -> str:
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster service account"


def make_client(access: ApiAccess, *, timeout: float = REQUEST_TIMEOUT_SECONDS) -> Client:
    """A lightkube ``Client`` for ``access``; raises ``KubeConfigError`` when the
    configuration cannot be loaded.  Does not contact the API server."""
    import httpx2
    from lightkube import Client, KubeConfig
    from lightkube.core.exceptions import ConfigError as LightkubeConfigError

    try:
        if access.kubeconfig is not None:
            if not os.path.isfile(access.kubeconfig):
                raise KubeConfigError(f"--kubeconfig {access.kubeconfig}: no such file")
            config = KubeConfig.from_file(access.kubeconfig)
        else:
            config = KubeConfig.from_service_account()
    except KubeConfigError:
        raise
    except (LightkubeConfigError, OSError, ValueError, KeyError, TypeError) as exc:
        raise KubeConfigError(
            f"cannot load the API server configuration from the {access.describe()}: {exc}"
        ) from None
    return Client(config=config, field_manager=FIELD_MANAGER, lazy=True,
                  timeout=httpx2.Timeout(timeout), trust_env=False)


def node_name(explicit: str | None) -> str:
    """This node's name: ``--node-name``, else ``NODE_NAME`` (the DaemonSet sets it from
    ``spec.nodeName``), else the host name, lower-cased as the kubelet registers it."""
    name = explicit or os.environ.get("NODE_NAME") or os.uname().nodename
    return name.strip().lower()


__all__ = ["FIELD_MANAGER", "ApiAccess", "KubeConfigError", "make_client", "node_name"]
