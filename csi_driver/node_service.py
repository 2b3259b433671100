"""Node service: request shape checks, then one NodeVolumes call each."""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver import api
from csi_driver.api import NODE_CAPABILITIES, pb, pb_grpc
from csi_driver.node_volumes import NodeVolumes
from plugin_runtime.errors import InvalidArgument
from plugin_runtime.rpc import RpcBoundary

rpc = RpcBoundary("csi.v1.Node")


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, volumes: NodeVolumes, max_volumes: int) -> None:
        self.volumes = volumes
        self.max_volumes = max_volumes

    @rpc.unary
    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        staging = api.require(request.staging_target_path, "staging_target_path")
        cap = api.required_capability(request)
        self.volumes.node_stage(volume_id, staging, cap)
        return pb.NodeStageVolumeResponse()

    @rpc.unary
    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        staging = api.require(request.staging_target_path, "staging_target_path")
        self.volumes.node_unstage(volume_id, staging)
        return pb.NodeUnstageVolumeResponse()

    @rpc.unary
    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        target = api.require(request.target_path, "target_path")
        cap = api.required_capability(request)
        self.volumes.node_publish(
            volume_id, staging_path=request.staging_target_path, target_path=target,
            cap=cap, readonly=request.readonly,
        )
        return pb.NodePublishVolumeResponse()

    @rpc.unary
    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        target = api.require(request.target_path, "target_path")
        self.volumes.node_unpublish(volume_id, target)
        return pb.NodeUnpublishVolumeResponse()

    @rpc.unary
    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        path = api.require(request.volume_path, "volume_path")
        usage, cond = self.volumes.node_stats(volume_id, path, request.staging_target_path)
        unit = pb.VolumeUsage.Unit
        if usage.block:
            usages = [pb.VolumeUsage(unit=unit.BYTES, total=usage.bytes_total)]
        else:
            usages = [
                pb.VolumeUsage(unit=unit.BYTES, total=usage.bytes_total, used=usage.bytes_used,
                               available=usage.bytes_available),
                pb.VolumeUsage(unit=unit.INODES, total=usage.inodes_total,
                               used=usage.inodes_used, available=usage.inodes_free),
            ]
        return pb.NodeGetVolumeStatsResponse(
            usage=usages, volume_condition=api.condition_message(cond)
        )

    @rpc.unary
    def NodeExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        volume_id = api.require(request.volume_id, "volume_id")
        path = api.require(request.volume_path, "volume_path")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        cap = (api.capability(request.volume_capability)
               if request.HasField("volume_capability") else None)
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range bytes must not be negative")
        size = self.volumes.node_expand(
            volume_id, path, required=required, limit=limit, cap=cap,
            staging_path=request.staging_target_path,
        )
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc.unary
    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.NodeGetCapabilitiesResponse(capabilities=NODE_CAPABILITIES)

    @rpc.unary
    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.NodeGetInfoResponse(
            node_id=self.volumes.node_id,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=api.topology(self.volumes.node_id),
        )
