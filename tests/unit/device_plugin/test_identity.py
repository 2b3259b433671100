"""Device IDs: persistent, readable, valid, at most 63 characters; unit grouping."""

from __future__ import annotations

import dataclasses

from hypothesis import example, given
from hypothesis import strategies as st

from device_plugin import identity
from device_plugin.config import parse_yaml
from device_plugin.matching import Ancestor, DeviceInfo
from device_plugin.units import build_units
from tests.unit.device_plugin.records import drm_node, ftdi_tty, misc

OTHER_PORT = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4"


def test_same_serial_same_id_on_any_port_and_any_tty_number():
    a = identity.device_id(ftdi_tty("ttyUSB0"))
    b = identity.device_id(ftdi_tty("ttyUSB3", port=OTHER_PORT))
    assert a == b
    assert a.startswith("ttyUSB-")


def test_udev_serial_wins_and_is_port_independent():
    props = {"ID_SERIAL": "FTDI_FT232R_USB_UART_A10K5XYZ", "ID_USB_INTERFACE_NUM": "00",
             "ID_PATH": "pci-0000:00:14.0-usb-0:2:1.0"}
    a = identity.device_id(ftdi_tty("ttyUSB0", properties=props))
    moved = dict(props, ID_PATH="pci-0000:00:14.0-usb-0:4:1.0")
    b = identity.device_id(ftdi_tty("ttyUSB1", port=OTHER_PORT, properties=moved))
    assert a == b


def test_different_serials_differ():
    assert identity.device_id(ftdi_tty(serial="A")) != identity.device_id(ftdi_tty(serial="B"))


def test_without_serial_same_port_same_id_other_port_other_id():
    a = identity.device_id(ftdi_tty("ttyUSB0", serial=""))
    replugged = identity.device_id(ftdi_tty("ttyUSB2", serial=""))  # new tty number
    moved = identity.device_id(ftdi_tty("ttyUSB0", port=OTHER_PORT, serial=""))
    assert a == replugged
    assert a != moved


def test_id_path_is_used_when_no_serial():
    dev = DeviceInfo("/sys/devices/platform/serial8250/tty/ttyS4", "tty", None, "ttyS4",
                     "/dev/ttyS4", properties={"ID_PATH": "platform-serial8250"})
    assert identity.identity_key(dev).startswith("path:platform-serial8250")


def test_virtual_devices_use_the_sysfs_path_and_are_stable():
    assert identity.device_id(misc("fuse")) == identity.device_id(misc("fuse"))
    assert identity.device_id(misc("fuse")) != identity.device_id(misc("kvm"))
    assert identity.device_id(misc("fuse")).startswith("fuse-")


def test_partitions_of_one_serial_disk_differ():
    disk = {"ID_SERIAL": "Samsung_SSD_123"}
    a = DeviceInfo("/sys/b/sda", "block", "disk", "sda", "/dev/sda", properties=disk)
    p1 = DeviceInfo("/sys/b/sda/sda1", "block", "partition", "sda1", "/dev/sda1",
                    properties=dict(disk, PARTN="1"))
    p2 = DeviceInfo("/sys/b/sda/sda2", "block", "partition", "sda2", "/dev/sda2",
                    properties=dict(disk, PARTN="2"))
    assert len({identity.device_id(d) for d in (a, p1, p2)}) == 3


@given(st.text(min_size=1, max_size=300), st.text(max_size=300), st.integers(1, 10_000))
@example("ttyLONG" * 40, "devices/" * 30, 10_000)  # the longest readable prefix, always tried
def test_any_kernel_name_gives_a_valid_id(kernel, path, share):
    dev = DeviceInfo("/sys/" + path, "x", None, kernel, "/dev/x")
    base = identity.device_id(dev)
    assert identity.is_valid_id(base)
    # The kubelet's limit itself, not the module's constant: a raised constant must fail.
    assert len(base) <= 63
    for unit_id in identity.share_ids(base, share)[-2:]:
        assert identity.is_valid_id(unit_id), unit_id
        assert len(unit_id) <= 63, unit_id


def test_share_ids():
    assert identity.share_ids("fuse-abc", 1) == ("fuse-abc",)
    assert identity.share_ids("fuse-abc", 3) == ("fuse-abc-0", "fuse-abc-1", "fuse-abc-2")


GPU = parse_yaml("""
resources:
  - name: gpu
    match:
      - {subsystem: drm, kernel: "card*"}
      - {subsystem: drm, kernel: "renderD*"}
    group_by: {subsystem: pci}
""").resources[0]


def test_group_by_makes_card_and_render_one_unit_per_pci_device():
    devices = [drm_node("card0"), drm_node("renderD128"),
               drm_node("card1", "0000:41:00.0", numa=1),
               drm_node("renderD129", "0000:41:00.0", numa=1)]
    units = build_units(GPU, devices)
    assert len(units) == 2
    nodes = sorted(u.nodes for u in units)
    assert nodes == [("/dev/dri/card0", "/dev/dri/renderD128"),
                     ("/dev/dri/card1", "/dev/dri/renderD129")]
    assert sorted(u.numa_nodes for u in units) == [(0,), (1,)]
    # Stable across re-enumeration in another order.
    assert build_units(GPU, list(reversed(devices))) == units


def test_grouped_id_follows_the_pci_device_not_the_minor_numbers():
    first = build_units(GPU, [drm_node("card0"), drm_node("renderD128")])
    renumbered = build_units(GPU, [drm_node("card2"), drm_node("renderD130")])
    assert [u.id for u in first] == [u.id for u in renumbered]


def test_clashing_identities_do_not_hide_a_device():
    # Two adapters that (wrongly) report the same serial both stay visible.
    config = parse_yaml("resources:\n  - name: s\n    match: [{subsystem: tty}]\n")
    a = ftdi_tty("ttyUSB0")
    b = ftdi_tty("ttyUSB1", port=OTHER_PORT)
    units = build_units(config.resources[0], [a, b])
    assert len(units) == 2 and len({u.id for u in units}) == 2


def test_numa_ignores_unknown():
    dev = dataclasses.replace(misc("fuse"), numa_node=None)
    units = build_units(parse_yaml("resources:\n  - {name: f, match: [{kernel: fuse}]}\n")
                        .resources[0], [dev])
    assert units[0].numa_nodes == ()


def test_symlinks_are_collected_once():
    tty = ftdi_tty(links=("/dev/serial/by-id/usb-FTDI-if00-port0",
                          "/dev/serial/by-path/pci-usb-0:2:1.0-port0"))
    config = parse_yaml("resources:\n  - {name: s, match: [{subsystem: tty}]}\n")
    unit = build_units(config.resources[0], [tty])[0]
    assert unit.symlinks == tty.devlinks
    assert isinstance(unit.primary.ancestors[0], Ancestor)
