"""Small, bounded helpers over lightkube for the tier's scenarios.

Owns the pod shape the tier runs (busybox from the imported image, host network,
pull policy Never, no service-account token, zero grace period) and waiting on
API objects with a deadline; a timeout names what was awaited and the last
state seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.models.core_v1 import Container, PodSpec, ResourceRequirements
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod

from tests.e2e.images import BUSYBOX

T = TypeVar("T")
WAIT = 60.0


def wait_for(
    fetch: Callable[[], T], ok: Callable[[T], bool], what: str, timeout: float = WAIT,
    interval: float = 0.2,
) -> T:
    """Call ``fetch`` until ``ok`` holds for its result; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fetch()
            if ok(last):
                return last  # type: ignore[no-any-return]
        except ApiError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                 f"last seen: {_brief(last)}")
        time.sleep(interval)


def _brief(obj: Any) -> str:
    status = getattr(obj, "status", None)
    return repr(status if status is not None else obj)[:2000]


def busybox_pod(
    name: str,
    script: str,
    *,
    node: str | None = None,
    limits: dict[str, str] | None = None,
    namespace: str = "default",
) -> Pod:
    """A hostNetwork busybox pod running ``sh -c script``."""
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace),
        spec=PodSpec(
            hostNetwork=True,
            automountServiceAccountToken=False,
            terminationGracePeriodSeconds=0,
            restartPolicy="Never",
            nodeName=None if node is None else node,
            containers=[Container(
                name="main", image=BUSYBOX, imagePullPolicy="Never",
                command=["sh", "-c", script],
                resources=ResourceRequirements(limits=limits) if limits else None,
            )],
        ),
    )


def phase(client: Client, name: str, namespace: str = "default") -> str:
    pod = client.get(Pod, name, namespace=namespace)
    assert pod.status is not None
    return pod.status.phase or ""


def wait_running(client: Client, name: str, namespace: str = "default",
                 timeout: float = WAIT, interval: float = 0.2) -> Pod:
    """The pod once Running; fails at once when it ended instead (admission errors)."""
    def running(pod: Pod) -> bool:
        phase = pod.status.phase if pod.status is not None else None
        if phase in ("Failed", "Succeeded"):
            raise AssertionError(f"pod {name} ended ({phase}) instead of running: "
                                 f"{_brief(pod)}")
        return phase == "Running"

    return wait_for(lambda: client.get(Pod, name, namespace=namespace), running,
                    f"pod {name} Running", timeout, interval)


def wait_log(client: Client, name: str, marker: str, namespace: str = "default",
             timeout: float = WAIT) -> str:
    """The container's log once it contains ``marker`` (read through the API)."""
    return wait_for(lambda: "".join(client.log(name, namespace=namespace)),
                    lambda text: marker in text, f"{marker!r} in the log of {name}", timeout)


def delete_pod(client: Client, name: str, namespace: str = "default",
               timeout: float = WAIT) -> None:
    """Delete and wait until the kubelet has removed it."""
    try:
        client.delete(Pod, name, namespace=namespace, grace_period=0)
    except ApiError as exc:
        if exc.status.code == 404:
            return
        raise

    def gone() -> bool:
        try:
            client.get(Pod, name, namespace=namespace)
        except ApiError as exc:
            return exc.status.code == 404
        return False

    wait_for(gone, bool, f"pod {name} deleted", timeout)
