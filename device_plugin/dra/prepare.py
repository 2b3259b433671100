"""NodePrepareResources and NodeUnprepareResources: claims to CDI specs and back.

For each claim the kubelet names, ``ClaimPreparer.prepare``:

1. answers from the checkpoint when the claim (same UID) is already prepared,
   so a repeated call returns exactly what the first one did and reads nothing
   (its CDI spec is written again if it is gone, e.g. after a reboot emptied a
   tmpfs CDI directory);
2. otherwise reads the claim from the API server, checks its UID (a claim
   deleted and re-created under the same name is another claim) and that it is
   allocated, and takes the results of this driver;
3. maps each result to the unit now behind ``<pool>/<device>`` on this node;
   a device that is gone or unhealthy, or already prepared for another claim
   (unless either allocation is admin access), fails the claim;
   opaque configuration for this driver is refused (there are no parameters:
   a device's edits come from its resource's configuration);
4. writes one CDI spec for the claim (``<cdi dir>/<vendor>-claim_<uid>.json``,
   kind ``<vendor>/claim``, one CDI device ``<uid>-<device>`` per device with
   its nodes, the resource's mounts and environment; none when the claim has
   no device of ours), then the checkpoint;
5. returns per device its base request name, pool, device, CDI ID and share ID.

A problem with one claim is that claim's ``error`` (``ClaimOutcome.error``),
never a gRPC error of the call; the other claims of that call are then answered
with an error too and left unprepared (all or nothing, see ``prepare``).
``unprepare`` removes the spec and the checkpoint (spec first: a crash in
between leaves a checkpoint, and the repeated unprepare finishes); an unknown
claim is success.

Environment: the resource's ``env`` templates are rendered per device with
``{ids}`` that unit's ID, ``{paths}`` its container paths, ``{count}`` 1 and
``{resource}`` the resource name, and put in that CDI device's edits (a static
spec cannot depend on which devices a container gets together).

Calls are serialized (one lock), as the upstream Go helper does by default:
prepare and unprepare are short and the conflict check needs a stable view of
what is prepared.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from device_plugin.allocation import container_path, device_grants, mount_grants
from device_plugin.cdi import CDI_VERSION, write_atomically
from device_plugin.dra.checkpoint import (
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
    safe_uid,
)
from device_plugin.dra.claims import AllocationResult, ClaimReader, ResourceClaim
from device_plugin.dra.devices import DeviceLookup, LocatedDevice
from plugin_runtime.errors import DomainError, InvalidArgument

log = logging.getLogger(__name__)

CDI_CLASS = "claim"


@dataclass(frozen=True)
class ClaimRef:
    """A claim as the kubelet names it."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"


@dataclass(frozen=True)
class ClaimOutcome:
    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


class ClaimProblem(Exception):
    """Why one claim cannot be prepared; becomes that claim's error, not a gRPC status."""


def validate_refs(refs: Sequence[ClaimRef]) -> None:
    """A malformed request fails the whole call (InvalidArgument naming the claim)."""
    for i, ref in enumerate(refs):
        missing = [k for k in ("namespace", "name", "uid") if not getattr(ref, k)]
        if missing:
            raise InvalidArgument(f"claims[{i}]: {', '.join(missing)} must be set")
        if not safe_uid(ref.uid):
            raise InvalidArgument(f"claims[{i}]: uid {ref.uid!r} is not a UID")


def cdi_spec_path(directory: str, vendor: str, uid: str) -> str:
    return os.path.join(directory, f"{vendor}-{CDI_CLASS}_{uid}.json")


def cdi_device_name(uid: str, device: str) -> str:
    return f"{uid}-{device}"


def _device_edits(located: LocatedDevice) -> dict[str, Any]:
    config, unit = located.config, located.unit
    grants = device_grants(config, unit)
    edits: dict[str, Any] = {
        "deviceNodes": [
            {"path": g.container_path, "hostPath": g.host_path, "permissions": g.permissions}
            for g in grants
        ]
    }
    mounts = mount_grants(config)
    if mounts:
        edits["mounts"] = [
            {"hostPath": m.host_path, "containerPath": m.container_path,
             "options": ["rbind", "ro" if m.read_only else "rw"]}
            for m in mounts
        ]
    if config.env:
        values = {
            "ids": unit.id,
            "paths": ",".join(container_path(config, n) for n in unit.nodes),
            "resource": config.name,
            "count": "1",
        }
        edits["env"] = [f"{name}={template.format(**values)}" for name, template in config.env]
    return edits


def build_claim_spec(vendor: str, uid: str, devices: Iterable[LocatedDevice]) -> dict[str, Any]:
    return {
        "cdiVersion": CDI_VERSION,
        "kind": f"{vendor}/{CDI_CLASS}",
        "devices": [
            {"name": cdi_device_name(uid, d.name), "containerEdits": _device_edits(d)}
            for d in devices
        ],
    }


class ClaimPreparer:
    """Prepares and unprepares this node's claims of one driver."""

    def __init__(
        self,
        driver: str,
        devices: DeviceLookup,
        reader: ClaimReader,
        store: CheckpointStore,
        cdi_dir: str,
        cdi_vendor: str,
    ) -> None:
        self.driver = driver
        self._devices = devices
        self._reader = reader
        self._store = store
        self.cdi_dir = cdi_dir
        self.cdi_vendor = cdi_vendor
        self._lock = threading.Lock()

    # --- prepare -----------------------------------------------------------------------

    def prepare(self, refs: Sequence[ClaimRef]) -> dict[str, ClaimOutcome]:
        """One outcome per claim UID; raises only for a malformed request.

        All or nothing: when a claim fails, the claims this call prepared are
        unprepared again and answered with an error naming the failed ones.  The
        kubelet fails the whole call on any claim error, yet caches the devices of
        the claims that succeeded and appends them again on its retry; answering no
        devices for a failing call keeps its cache free of duplicates."""
        validate_refs(refs)
        outcomes: dict[str, ClaimOutcome] = {}
        with self._lock:
            fresh: list[ClaimRef] = []
            for ref in refs:
                known = self._store.get(ref.uid) is not None
                try:
                    outcomes[ref.uid] = ClaimOutcome(self._prepare_one(ref))
                    if not known:
                        fresh.append(ref)
                except (ClaimProblem, DomainError) as exc:
                    log.warning("cannot prepare claim %s: %s", ref, exc)
                    outcomes[ref.uid] = ClaimOutcome(error=str(exc))
                except OSError as exc:
                    log.error("cannot prepare claim %s: %s", ref, exc)
                    outcomes[ref.uid] = ClaimOutcome(error=f"writing the claim's files: {exc}")
            failed = [r for r in refs if outcomes[r.uid].error]
            if failed:
                names = ", ".join(f"{r.namespace}/{r.name}" for r in failed)
                for ref in refs:
                    if outcomes[ref.uid].error:
                        continue
                    if ref in fresh:
                        self._unprepare_one(ref)
                    outcomes[ref.uid] = ClaimOutcome(
                        error=f"not prepared: other claims of this request failed ({names})")
        return outcomes

    def _prepare_one(self, ref: ClaimRef) -> tuple[PreparedDevice, ...]:
        done = self._store.get(ref.uid)
        if done is not None:
            if done.cdi_spec and not os.path.exists(done.cdi_spec):
                self._rewrite_spec(done)
            return done.devices
        claim = self._reader.get(ref.namespace, ref.name)
        if claim.uid != ref.uid:
            raise ClaimProblem(
                f"ResourceClaim {ref.namespace}/{ref.name} has UID {claim.uid}, not {ref.uid}: "
                "the claim was deleted and re-created")
        if not claim.allocated:
            raise ClaimProblem(f"ResourceClaim {ref.namespace}/{ref.name} is not allocated")
        located = self._locate(claim)
        spec_path = ""
        if located:  # a spec without devices is invalid CDI: none for a claim with no devices
            spec_path = cdi_spec_path(self.cdi_dir, self.cdi_vendor, claim.uid)
            spec = build_claim_spec(self.cdi_vendor, claim.uid, (d for d, _ in located))
            write_atomically(spec_path,
                             (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
        prepared = tuple(
            PreparedDevice(
                request_names=(result.base_request,),
                pool=d.pool,
                device=d.name,
                cdi_device_ids=(
                    f"{self.cdi_vendor}/{CDI_CLASS}={cdi_device_name(claim.uid, d.name)}",),
                share_id=result.share_id,
                admin_access=result.admin_access,
            )
            for d, result in located
        )
        self._store.put(PreparedClaim(claim.uid, claim.namespace, claim.name, prepared,
                                      spec_path))
        log.info("prepared claim %s: %s", ref,
                 ", ".join(f"{d.pool}/{d.device}" for d in prepared) or "no devices")
        return prepared

    def _rewrite_spec(self, done: PreparedClaim) -> None:
        """A prepared claim whose CDI spec is gone: the CDI directory is often on tmpfs
        (``/var/run/cdi``) while checkpoints survive a reboot, and the kubelet then
        prepares the claim again for the new sandbox.  Write the spec anew from the
        checkpoint's devices as they are plugged in now."""
        located = []
        for prepared in done.devices:
            device = self._devices.lookup(prepared.pool, prepared.device)
            if device is None:
                raise ClaimProblem(
                    f"device {prepared.pool}/{prepared.device} of the prepared claim is not "
                    "on this node now, and its CDI spec is gone")
            located.append(device)
        spec = build_claim_spec(self.cdi_vendor, done.uid, located)
        write_atomically(done.cdi_spec,
                         (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
        log.warning("CDI spec of prepared claim %s/%s was gone; wrote it again",
                    done.namespace, done.name)

    def _locate(self, claim: ResourceClaim) -> list[tuple[LocatedDevice, AllocationResult]]:
        in_use = self._in_use(exclude=claim.uid)
        located = []
        seen: dict[tuple[str, str], LocatedDevice] = {}
        for result in claim.results_for(self.driver):
            key = (result.pool, result.device)
            device = seen.get(key) or self._devices.lookup(result.pool, result.device)
            if device is None:
                raise ClaimProblem(
                    f"device {result.pool}/{result.device} (request {result.request}) is not "
                    f"on this node now: unplugged, or the pool is another node's")
            if not device.healthy:
                raise ClaimProblem(
                    f"device {result.pool}/{result.device} is unhealthy"
                    + (f": {device.reason}" if device.reason else ""))
            if claim.configs_for(self.driver, result):
                raise ClaimProblem(
                    f"request {result.request}: opaque configuration for driver {self.driver} "
                    "is not supported (devices take their settings from the resource's "
                    "configuration)")
            holder = in_use.get(key)
            if holder is not None and not result.admin_access and not holder[1]:
                raise ClaimProblem(
                    f"device {result.pool}/{result.device} is already prepared for claim "
                    f"{holder[0]}")
            seen[key] = device
            located.append((device, result))
        return located

    def _in_use(self, exclude: str) -> dict[tuple[str, str], tuple[str, bool]]:
        """(pool, device) -> (claim, admin access) over every other prepared claim."""
        used: dict[tuple[str, str], tuple[str, bool]] = {}
        for claim in self._store.all():
            if claim.uid == exclude:
                continue
            for d in claim.devices:
                if not d.admin_access:
                    used[(d.pool, d.device)] = (f"{claim.namespace}/{claim.name}", False)
                else:
                    used.setdefault((d.pool, d.device), (f"{claim.namespace}/{claim.name}", True))
        return used

    # --- unprepare ---------------------------------------------------------------------

    def unprepare(self, refs: Sequence[ClaimRef]) -> dict[str, str]:
        """An error message per claim UID ("" when done); unknown claims are done."""
        validate_refs(refs)
        errors: dict[str, str] = {}
        with self._lock:
            for ref in refs:
                try:
                    self._unprepare_one(ref)
                    errors[ref.uid] = ""
                except OSError as exc:
                    log.error("cannot unprepare claim %s: %s", ref, exc)
                    errors[ref.uid] = f"removing the claim's files: {exc}"
        return errors

    def _unprepare_one(self, ref: ClaimRef) -> None:
        record = self._store.get(ref.uid)
        paths = {cdi_spec_path(self.cdi_dir, self.cdi_vendor, ref.uid)}
        if record is not None and record.cdi_spec:
            paths.add(record.cdi_spec)  # written under another CDI dir before a reload
        removed = False
        for path in sorted(paths):
            try:
                os.unlink(path)
                removed = True
            except FileNotFoundError:
                pass
        removed = self._store.remove(ref.uid) or removed
        if removed:
            log.info("unprepared claim %s", ref)
        else:
            log.debug("claim %s was not prepared here", ref)

    def prepared(self) -> list[PreparedClaim]:
        """Every prepared claim on disk (for status and tests)."""
        return list(self._store.all())
