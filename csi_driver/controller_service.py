"""Controller service: request shape checks, then one Provisioner/SnapshotService call.

No rule about idempotency or compatibility lives here (see ``provisioning.py``).
ControllerPublish/Unpublish and ControllerModifyVolume are not offered (no
attach step for node-local volumes) and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver import api
from csi_driver.api import CONTROLLER_CAPABILITIES, pb, pb_grpc
from csi_driver.provisioning import Provisioner
from csi_driver.snapshots import SnapshotService
from plugin_runtime.errors import InvalidArgument, Unimplemented
from plugin_runtime.rpc import RpcBoundary

rpc = RpcBoundary("csi.v1.Controller")


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, volumes: Provisioner, snapshots: SnapshotService) -> None:
        self.volumes = volumes
        self.snapshots = snapshots

    @rpc.unary
    def CreateVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        rec = self.volumes.create_volume(api.create_request(request))
        return pb.CreateVolumeResponse(volume=api.volume_message(rec, self.volumes.node_id))

    @rpc.unary
    def DeleteVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.volumes.delete_volume(api.require(request.volume_id, "volume_id"))
        return pb.DeleteVolumeResponse()

    @rpc.unary
    def ControllerPublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented("ControllerPublishVolume is not needed: volumes are node-local")

    @rpc.unary
    def ControllerUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented("ControllerUnpublishVolume is not needed: volumes are node-local")

    @rpc.unary
    def ValidateVolumeCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        caps = api.capabilities(request.volume_capabilities)
        params = api.check_map(request.parameters, "parameters")
        reason = self.volumes.validate_capabilities(volume_id, caps, params)
        if reason:
            return pb.ValidateVolumeCapabilitiesResponse(message=reason)
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    @rpc.unary
    def ListVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:
        page, token = self.volumes.list_volumes(request.max_entries, request.starting_token)
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=api.volume_message(rec, self.volumes.node_id),
                status=pb.ListVolumesResponse.VolumeStatus(
                    volume_condition=api.condition_message(cond)
                ),
            )
            for rec, cond in page
        ]
        return pb.ListVolumesResponse(entries=entries, next_token=token)

    @rpc.unary
    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:
        caps = api.capabilities(request.volume_capabilities)
        segments = (dict(request.accessible_topology.segments)
                    if request.HasField("accessible_topology") else None)
        cap, minimum = self.volumes.get_capacity(
            api.check_map(request.parameters, "parameters"), caps, segments
        )
        if cap is None:
            return pb.GetCapacityResponse(available_capacity=0)
        resp = pb.GetCapacityResponse(available_capacity=cap.available_bytes)
        resp.maximum_volume_size.value = cap.maximum_volume_bytes
        resp.minimum_volume_size.value = minimum
        return resp

    @rpc.unary
    def ControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ControllerGetCapabilitiesResponse(capabilities=CONTROLLER_CAPABILITIES)

    @rpc.unary
    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = api.require(request.name, "name")
        source = api.require(request.source_volume_id, "source_volume_id")
        snap = self.snapshots.create_snapshot(
            name, source, api.check_map(request.parameters, "parameters")
        )
        return pb.CreateSnapshotResponse(snapshot=api.snapshot_message(snap))

    @rpc.unary
    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.snapshots.delete_snapshot(api.require(request.snapshot_id, "snapshot_id"))
        return pb.DeleteSnapshotResponse()

    @rpc.unary
    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        snaps, token = self.snapshots.list_snapshots(
            request.max_entries, request.starting_token, request.snapshot_id,
            request.source_volume_id,
        )
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=api.snapshot_message(s))
                     for s in snaps],
            next_token=token,
        )

    @rpc.unary
    def GetSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        snap = self.snapshots.get_snapshot(api.require(request.snapshot_id, "snapshot_id"))
        return pb.GetSnapshotResponse(snapshot=api.snapshot_message(snap))

    @rpc.unary
    def ControllerExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        required, limit = api.capacity_range(request)
        cap = (api.capability(request.volume_capability)
               if request.HasField("volume_capability") else None)
        size, node_needed = self.volumes.controller_expand(volume_id, required, limit, cap)
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=node_needed
        )

    @rpc.unary
    def ControllerGetVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        rec, cond = self.volumes.get_volume(api.require(request.volume_id, "volume_id"))
        return pb.ControllerGetVolumeResponse(
            volume=api.volume_message(rec, self.volumes.node_id),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=api.condition_message(cond)
            ),
        )

    @rpc.unary
    def ControllerModifyVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented("ControllerModifyVolume is not offered (no MODIFY_VOLUME capability)")
