"""The committed stubs agree with the schemas and with pyproject's lower bounds.

grpcio refuses generated code stamped with a newer GRPC_GENERATED_VERSION, and
protobuf refuses gencode from a newer minor of its major; so the lower bounds
in pyproject.toml must be at least what grpcio-tools stamped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _lower_bound(dependencies: list[str], name: str) -> tuple[int, ...]:
    for dep in dependencies:
        match = re.fullmatch(rf"{name}\s*>=\s*([0-9.]+)(,.*)?", dep.strip())
        if match:
            return _version(match.group(1))
    raise AssertionError(f"pyproject has no lower bound for {name}")


def _generated(pattern: str) -> list[Path]:
    found = sorted(ROOT.glob(f"**/_proto/**/{pattern}"))
    assert found, f"no generated {pattern} files"
    return found


def test_pyproject_lower_bounds_cover_generator_stamps():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    grpc_floor = _lower_bound(project["dependencies"], "grpcio")
    protobuf_floor = _lower_bound(project["dependencies"], "protobuf")
    for path in _generated("*_pb2_grpc.py"):
        stamp = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", path.read_text())
        assert stamp, path
        assert grpc_floor >= _version(stamp.group(1)), f"{path}: grpcio>= {stamp.group(1)}"
    for path in _generated("*_pb2.py"):
        stamp = re.search(r"# Protobuf Python Version: ([0-9.]+)", path.read_text())
        assert stamp, path
        assert protobuf_floor >= _version(stamp.group(1)), f"{path}: protobuf>= {stamp.group(1)}"


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_plugin_wire_names():
    from device_plugin._proto.deviceplugin import api_pb2

    services = api_pb2.DESCRIPTOR.services_by_name
    assert api_pb2.DESCRIPTOR.package == "v1beta1"
    assert [m.name for m in services["DevicePlugin"].methods] == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    assert services["DevicePlugin"].methods_by_name["ListAndWatch"].server_streaming
    assert services["Registration"].full_name == "v1beta1.Registration"
    fields = {
        "RegisterRequest": {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4},
        "DevicePluginOptions": {"pre_start_required": 1, "get_preferred_allocation_available": 2},
        "Device": {"ID": 1, "health": 2, "topology": 3},
        "ContainerPreferredAllocationRequest": {
            "available_deviceIDs": 1,
            "must_include_deviceIDs": 2,
            "allocation_size": 3,
        },
        "ContainerPreferredAllocationResponse": {"deviceIDs": 1},
        "ContainerAllocateRequest": {"devices_ids": 1},
        "ContainerAllocateResponse": {
            "envs": 1,
            "mounts": 2,
            "devices": 3,
            "annotations": 4,
            "cdi_devices": 5,
        },
        "DeviceSpec": {"container_path": 1, "host_path": 2, "permissions": 3},
        "Mount": {"container_path": 1, "host_path": 2, "read_only": 3},
        "CDIDevice": {"name": 1},
        "NUMANode": {"ID": 1},
    }
    for message, expected in fields.items():
        descriptor = api_pb2.DESCRIPTOR.message_types_by_name[message]
        assert {f.name: f.number for f in descriptor.fields} == expected, message


def test_registration_and_podresources_wire_names():
    from device_plugin._proto.podresources import api_pb2 as podresources
    from plugin_runtime._proto.pluginregistration import api_pb2 as registration

    assert registration.DESCRIPTOR.package == "pluginregistration"
    info = registration.DESCRIPTOR.message_types_by_name["PluginInfo"]
    assert {f.name: f.number for f in info.fields} == {
        "type": 1,
        "name": 2,
        "endpoint": 3,
        "supported_versions": 4,
    }
    assert podresources.DESCRIPTOR.package == "v1"
    lister = podresources.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert [m.name for m in lister.methods] == ["List", "GetAllocatableResources", "Get"]
    devices = podresources.DESCRIPTOR.message_types_by_name["ContainerDevices"]
    assert {f.name: f.number for f in devices.fields} == {
        "resource_name": 1,
        "device_ids": 2,
        "topology": 3,
    }


def _fields(module, message: str) -> dict[str, int]:
    return {f.name: f.number for f in module.DESCRIPTOR.message_types_by_name[message].fields}


def test_dra_plugin_wire_names():
    from device_plugin.dra._proto.v1 import api_pb2 as v1
    from device_plugin.dra._proto.v1beta1 import api_pb2 as v1beta1

    for module, package in ((v1, "k8s.io.kubelet.pkg.apis.dra.v1"),
                            (v1beta1, "k8s.io.kubelet.pkg.apis.dra.v1beta1")):
        assert module.DESCRIPTOR.package == package
        service = module.DESCRIPTOR.services_by_name["DRAPlugin"]
        assert service.full_name == f"{package}.DRAPlugin"
        assert [m.name for m in service.methods] == [
            "NodePrepareResources", "NodeUnprepareResources"]
        assert _fields(module, "Claim") == {"namespace": 1, "uid": 2, "name": 3}
        assert _fields(module, "NodePrepareResourceResponse") == {"devices": 1, "error": 2}
        assert _fields(module, "NodeUnprepareResourceResponse") == {"error": 1}
        assert _fields(module, "NodePrepareResourcesResponse") == {"claims": 1}
    base = {"request_names": 1, "pool_name": 2, "device_name": 3, "cdi_device_ids": 4}
    assert _fields(v1beta1, "Device") == base
    assert _fields(v1, "Device") == {**base, "share_id": 5}
    share = v1.DESCRIPTOR.message_types_by_name["Device"].fields_by_name["share_id"]
    assert share.has_presence  # proto3 optional


def test_dra_health_wire_names():
    from device_plugin.dra._proto.health import api_pb2 as health

    assert health.DESCRIPTOR.package == "v1alpha1"
    service = health.DESCRIPTOR.services_by_name["DRAResourceHealth"]
    method = service.methods_by_name["NodeWatchResources"]
    assert method.server_streaming and not method.client_streaming
    assert _fields(health, "DeviceIdentifier") == {"pool_name": 1, "device_name": 2}
    assert _fields(health, "DeviceHealth") == {
        "device": 1, "health": 2, "last_updated_time": 3,
        "health_check_timeout_seconds": 4, "message": 5,
    }
    assert dict(health.HealthStatus.items()) == {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2}
