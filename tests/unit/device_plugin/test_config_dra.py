"""DRA in the configuration: the per-resource marking, the driver, and one API per resource."""

from __future__ import annotations

import pytest

from device_plugin.config import ConfigError, parse_yaml

LOOP = """
resources:
  - name: loop
    dra: true
    match: [{subsystem: block, kernel: "loop*"}]
  - name: fuse
    match: [{devnode: /dev/fuse}]
"""


def test_dra_marking_splits_the_resources_and_the_driver_defaults_to_the_domain():
    config = parse_yaml(LOOP)
    assert config.dra_enabled
    assert [r.name for r in config.dra_resources()] == ["hostkit.io/loop"]
    assert [r.name for r in config.device_plugin_resources()] == ["hostkit.io/fuse"]
    assert config.dra.driver == "hostkit.io"


def test_without_dra_resources_dra_is_off():
    config = parse_yaml("resources: [{name: fuse, match: [{devnode: /dev/fuse}]}]")
    assert not config.dra_enabled
    assert config.dra_resources() == ()


def test_driver_name_is_configurable_and_checked():
    assert parse_yaml("dra: {driver: udev.example.com}\n" + LOOP).dra.driver == "udev.example.com"
    with pytest.raises(ConfigError, match=r"^dra\.driver: 'Udev_x'"):
        parse_yaml("dra: {driver: Udev_x}")
    with pytest.raises(ConfigError, match=r"^dra\.driver: .*at most 63"):
        parse_yaml("dra: {driver: " + "a" * 64 + "}")


def test_a_resource_served_through_both_apis_is_refused_naming_it():
    text = """
resources:
  - name: serial
    dra: true
    device_plugin: true
    match: [{subsystem: tty}]
"""
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    message = str(info.value)
    assert message.startswith("resources[0]: resource 'hostkit.io/serial' is served through "
                              "both the device plugin API and DRA")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("share: 4", r"resources\[0\]\.share: resource 'hostkit.io/loop' uses DRA"),
        ("pre_start: {open: true}", r"resources\[0\]\.pre_start: resource 'hostkit.io/loop'"),
        ("device_plugin: 1", r"resources\[0\]\.device_plugin: must be true or false"),
    ],
)
def test_device_plugin_only_options_are_refused_with_dra(extra, message):
    text = f"""
resources:
  - name: loop
    dra: true
    {extra}
    match: [{{subsystem: block}}]
"""
    with pytest.raises(ConfigError, match=message):
        parse_yaml(text)


def test_a_resource_served_by_no_api_is_refused():
    with pytest.raises(ConfigError, match=r"resources\[0\]\.device_plugin: resource "
                                          r"'hostkit.io/loop' is served by no API"):
        parse_yaml("resources: [{name: loop, device_plugin: false, match: [{subsystem: x}]}]")
