"""Pure slice building: names, typed attributes and their limits, pools split at 128."""

from __future__ import annotations

import re

import pytest

from device_plugin.config import parse_yaml
from device_plugin.dra.devices import device_name
from device_plugin.matching import Ancestor, DeviceInfo
from device_plugin.slices import (
    MAX_ATTRIBUTES_PER_DEVICE,
    MAX_STRING_BYTES,
    PUBLISHED_ATTRIBUTES,
    STANDARD_PCI_BUS_ID,
    attribute_name_problem,
    device_attributes,
    dra_device,
    plan_pool,
    pool_devices,
    pool_name,
    slice_name,
)
from device_plugin.units import Unit, build_units
from tests.unit.device_plugin.records import drm_node, ftdi_tty

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SEMVER = re.compile(r"\d+\.\d+\.\d+([-+].*)?")


def loop(index: int, size_sectors: int = 2048, ro: str = "0") -> DeviceInfo:
    return DeviceInfo(
        sys_path=f"/sys/devices/virtual/block/loop{index}", subsystem="block", devtype="disk",
        kernel=f"loop{index}", devnode=f"/dev/loop{index}",
        properties={"MAJOR": "7", "MINOR": str(index), "DEVTYPE": "disk"},
        attributes={"size": str(size_sectors), "ro": ro, "removable": "0",
                    "loop/backing_file": "/tmp/x/" + "b" * 80},
    )


def unit_of(info: DeviceInfo, numa: tuple[int, ...] = ()) -> Unit:
    return Unit(f"{info.kernel.rstrip('0123456789')}-0123456789ab{info.kernel[-1]}", (info,),
                numa)


def check_device(device):
    assert DNS_LABEL.fullmatch(device.name)
    assert len(device.attributes) + len(device.capacity) <= MAX_ATTRIBUTES_PER_DEVICE
    for name, (kind, value) in device.attributes.items():
        assert attribute_name_problem(name) is None, name
        assert name in PUBLISHED_ATTRIBUTES, name
        assert kind in ("string", "int", "bool", "version")
        if kind == "string":
            assert isinstance(value, str) and len(value.encode()) <= MAX_STRING_BYTES
        elif kind == "int":
            assert isinstance(value, int) and not isinstance(value, bool)
        elif kind == "bool":
            assert isinstance(value, bool)
        else:
            assert SEMVER.fullmatch(value), value


def test_loop_device_attributes_are_typed_and_capacity_is_bytes():
    device = dra_device("hostkit.io/loop", unit_of(loop(3, size_sectors=4096, ro="1")),
                        "6.1.0-18-amd64")
    check_device(device)
    a = device.attributes
    assert a["resource"] == ("string", "hostkit.io/loop")
    assert a["subsystem"] == ("string", "block")
    assert a["kernelName"] == ("string", "loop3")
    assert a["devnode"] == ("string", "/dev/loop3")
    assert a["major"] == ("int", 7) and a["minor"] == ("int", 3)
    assert a["readOnly"] == ("bool", True) and a["removable"] == ("bool", False)
    assert a["kernelVersion"] == ("version", "6.1.0-18-amd64")
    assert len(a["loopBackingFile"][1]) == MAX_STRING_BYTES  # truncated, not refused
    assert device.capacity == {"size": str(4096 * 512)}
    assert device.as_api()["capacity"] == {"size": {"value": "2097152"}}
    assert device.as_api()["attributes"]["readOnly"] == {"bool": True}


def test_usb_serial_adapter_is_described_by_its_usb_device_not_the_host_controller():
    info = ftdi_tty(properties={"MAJOR": "188", "MINOR": "0", "ID_MODEL": "FT232R_USB_UART"})
    usb = info.ancestors[2]
    usb = Ancestor(usb.sys_path, usb.subsystem, usb.devtype, usb.kernel,
                   {**usb.attributes, "version": " 2.00", "busnum": "1", "speed": "12",
                    "manufacturer": "FTDI"}, {"DRIVER": "usb"})
    info = DeviceInfo(info.sys_path, info.subsystem, info.devtype, info.kernel, info.devnode,
                      info.properties, info.attributes,
                      (info.ancestors[0], info.ancestors[1], usb, info.ancestors[3]))
    a = device_attributes("hostkit.io/serial", info)
    assert a["idVendor"] == ("string", "0403") and a["idProduct"] == ("string", "6001")
    assert a["serial"] == ("string", "A10K5XYZ")
    assert a["usbBusPath"] == ("string", "1-2")
    assert a["usbBusNum"] == ("int", 1) and a["usbSpeedMbps"] == ("int", 12)
    assert a["usbVersion"] == ("version", "2.0.0")
    assert a["model"] == ("string", "FT232R_USB_UART")
    assert a["driver"] == ("string", "usb")
    assert "pciVendor" not in a and STANDARD_PCI_BUS_ID not in a


def test_gpu_carries_pci_identity_numa_and_the_standard_bus_id():
    info = drm_node("card0", vendor="0x10de", numa=1)
    a = dra_device("hostkit.io/gpu", Unit("card-aaaaaaaaaaaa", (info,), (1,))).attributes
    assert a["pciVendor"] == ("string", "10de")
    assert a["pciAddress"] == ("string", "0000:01:00.0")
    assert a[STANDARD_PCI_BUS_ID] == ("string", "0000:01:00.0")
    assert a["numaNode"] == ("int", 1)


def test_the_attribute_limit_is_respected_in_a_fixed_order():
    info = loop(1)
    a = device_attributes("hostkit.io/loop", info, limit=3)
    assert list(a) == ["resource", "subsystem", "kernelName"]
    device = dra_device("hostkit.io/loop", unit_of(info))
    assert len(device.attributes) + len(device.capacity) <= MAX_ATTRIBUTES_PER_DEVICE


def test_device_and_pool_names_are_valid_and_stable():
    assert device_name("ttyUSB-3f2a9c01d4e7") == "ttyusb-3f2a9c01d4e7"
    assert device_name("a_b.c-0") == "a-b-c-0"
    long_id = "X" * 63
    assert DNS_LABEL.fullmatch(device_name(long_id))
    config = parse_yaml("resources: [{name: usb_serial, dra: true, match: [{subsystem: tty}]}]")
    assert pool_name("node-1", config.resources[0]) == "node-1-usb-serial"
    assert slice_name("node-1", "hostkit.io/loop", 17) == "node-1-loop-00011"
    assert len(slice_name("n" * 253, "hostkit.io/loop", 0)) <= 253


def test_unhealthy_units_are_left_out_and_devices_are_sorted():
    config = parse_yaml("resources: [{name: loop, dra: true, match: [{subsystem: block}]}]")
    res = config.resources[0]
    units = build_units(res, [loop(i) for i in range(5)])
    sick = frozenset({units[2].id})
    devices = pool_devices(res, units, sick)
    assert len(devices) == 4
    assert [d.name for d in devices] == sorted(d.name for d in devices)
    assert device_name(units[2].id) not in {d.name for d in devices}


@pytest.mark.parametrize(("count", "slices"), [(0, 1), (1, 1), (128, 1), (129, 2), (1000, 8)])
def test_pools_split_at_128_devices(count, slices):
    config = parse_yaml("resources: [{name: loop, dra: true, match: [{subsystem: block}]}]")
    units = build_units(config.resources[0], [loop(i) for i in range(count)])
    devices = pool_devices(config.resources[0], units)
    plan = plan_pool("hostkit.io", "node-1", config.resources[0], devices, generation=4)
    assert len(plan) == slices
    assert all(s.slice_count == slices and s.generation == 4 for s in plan)
    assert all(len(s.devices) <= 128 for s in plan)
    assert sum(len(s.devices) for s in plan) == count
    names = [d.name for s in plan for d in s.devices]
    assert len(set(names)) == count
    spec = plan[0].spec()
    assert spec["pool"] == {"name": "node-1-loop", "generation": 4,
                            "resourceSliceCount": slices}
    assert spec["nodeName"] == "node-1" and spec["driver"] == "hostkit.io"


def test_attribute_name_rule():
    assert attribute_name_problem("idVendor") is None
    assert attribute_name_problem("resource.kubernetes.io/pciBusID") is None
    assert attribute_name_problem("bad-name")
    assert attribute_name_problem("x" * 33)
    assert attribute_name_problem("Bad_Domain/x")
