"""Matchers over plain records, including udev-style ancestor matches."""

from __future__ import annotations

import pytest

from device_plugin.config import parse_yaml
from device_plugin.matching import (
    DeviceInfo,
    attribute_needs,
    matched_ancestor,
    matches,
    resource_matches,
    select,
)
from tests.unit.device_plugin.records import drm_node, ftdi_tty, misc


def matcher(yaml_text: str):
    config = parse_yaml(f"resources:\n  - name: x\n    match:\n      - {yaml_text}\n")
    return config.resources[0].match[0]


def test_simple_keys_and_globs():
    fuse = misc("fuse")
    assert matches(matcher("{subsystem: misc, kernel: fuse}"), fuse)
    assert matches(matcher("{kernel: 'fu*'}"), fuse)
    assert matches(matcher("{devnode: '/dev/f[u]se'}"), fuse)
    assert not matches(matcher("{subsystem: block}"), fuse)
    assert not matches(matcher("{subsystem: misc, kernel: tun}"), fuse)
    assert not matches(matcher("{devtype: disk}"), fuse)


def test_subsystem_is_exact_not_a_glob():
    assert not matches(matcher("{subsystem: 'mis*'}"), misc("fuse"))


def test_properties_and_attributes_need_presence_and_glob_match():
    dev = DeviceInfo("/sys/x", "block", "disk", "loop3", "/dev/loop3",
                     properties={"ID_FS_TYPE": "ext4"},
                     attributes={"loop/backing_file": "/tmp/dp-x/disk.img", "ro": "0"})
    assert matches(matcher("{properties: {ID_FS_TYPE: 'ext*'}}"), dev)
    assert not matches(matcher("{properties: {ID_FS_UUID: '*'}}"), dev)
    assert matches(matcher("{attributes: {loop/backing_file: '/tmp/dp-x/*', ro: '0'}}"), dev)
    assert not matches(matcher("{attributes: {loop/backing_file: '/var/*'}}"), dev)


def test_ancestor_match_selects_the_tty_of_the_right_usb_device():
    m = matcher("{subsystem: tty, parent: {subsystem: usb, attributes: "
                "{idVendor: '0403', idProduct: '6001', serial: 'A10K*'}}}")
    assert matches(m, ftdi_tty())
    assert not matches(m, ftdi_tty(serial="B999"))
    assert not matches(m, ftdi_tty(vendor="067b"))


def test_one_ancestor_must_satisfy_all_parent_keys():
    # idVendor lives on the usb_device, bInterfaceNumber on the interface: no single
    # ancestor has both, so (like udev ATTRS in one rule) this must not match.
    m = matcher("{parent: {attributes: {idVendor: '0403', bInterfaceNumber: '00'}}}")
    assert not matches(m, ftdi_tty())
    ok = matcher("{parent: {devtype: usb_interface, attributes: {bInterfaceNumber: '00'}}}")
    assert matches(ok, ftdi_tty())


def test_parent_walk_starts_at_the_device_itself_and_finds_the_nearest():
    tty = ftdi_tty()
    self_match = matcher("{parent: {subsystem: tty, kernel: 'ttyUSB*'}}")
    assert matches(self_match, tty)
    near = matched_ancestor(matcher("{parent: {subsystem: usb}}").parent, tty)
    assert near is not None and near.devtype == "usb_interface"
    pci = matched_ancestor(matcher("{parent: {subsystem: pci, kernel: '0000:*'}}").parent, tty)
    assert pci is not None and pci.kernel == "0000:00:14.0"


def test_a_device_without_node_is_never_selected():
    config = parse_yaml("resources:\n  - name: x\n    match: [{subsystem: usb}]\n")
    nodeless = DeviceInfo("/sys/devices/usb1", "usb", "usb_device", "usb1", None)
    assert not resource_matches(config.resources[0], nodeless)


def test_any_matcher_selects_and_order_is_by_sys_path():
    config = parse_yaml("""
resources:
  - name: gpu
    match:
      - {subsystem: drm, kernel: "card*"}
      - {subsystem: drm, kernel: "renderD*"}
""")
    devices = [drm_node("renderD128"), misc("fuse"), drm_node("card0")]
    picked = select(config.resources[0], devices)
    assert [d.kernel for d in picked] == ["card0", "renderD128"]


def test_attribute_needs_cover_matchers_probes_and_identity():
    config = parse_yaml("""
resources:
  - name: x
    match:
      - attributes: {ro: "0"}
        parent: {attributes: {idVendor: "0403"}}
    health: {probe: attribute, attribute: device/enabled, healthy_values: ["1"]}
""")
    needs = attribute_needs(config)
    assert {"ro", "idVendor", "device/enabled", "serial"} <= needs.device
    assert {"idVendor", "serial", "idProduct"} <= needs.ancestor


@pytest.mark.parametrize("value", ["0403\n", "0403   "])
def test_values_are_compared_as_captured(value):
    # discovery strips trailing whitespace (sysfs.read_attribute); a raw value would not match
    dev = DeviceInfo("/sys/x", "tty", None, "ttyS0", "/dev/ttyS0", attributes={"a": value})
    assert not matches(matcher("{attributes: {a: '0403'}}"), dev)
    assert matches(matcher("{attributes: {a: '0403*'}}"), dev)


def test_prefilter_only_uses_cheap_keys():
    config = parse_yaml("""
resources:
  - name: x
    match:
      - {subsystem: tty, kernel: "ttyUSB*", parent: {attributes: {idVendor: "0403"}}}
      - {subsystem: block, devnode: "/dev/loop*"}
""")
    needs = attribute_needs(config)
    assert needs.may_select("tty", None, "ttyUSB3", "/dev/ttyUSB3")  # parent checked later
    assert not needs.may_select("tty", None, "tty12", "/dev/tty12")
    assert needs.may_select("block", "disk", "loop0", "/dev/loop0")
    assert not needs.may_select("block", "disk", "vda", "/dev/vda")
    assert not needs.may_select("misc", None, "fuse", "/dev/fuse")
