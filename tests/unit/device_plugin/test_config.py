"""Configuration: every shipped config loads; bad ones are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_plugin.config import (
    MAX_SHARE,
    ConfigError,
    extended_resource_name_problem,
    load_config,
    parse_yaml,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples" / "device-plugin").glob("*.yaml"))


def test_embedded_default_finds_fuse_tun_kvm():
    config = load_config(None)
    assert [r.name for r in config.resources] == ["hostkit.io/fuse", "hostkit.io/tun",
                                                  "hostkit.io/kvm"]
    assert all(r.share > 1 for r in config.resources)
    assert config.source == "<embedded default>"
    assert config.cdi.vendor == "hostkit.io"


def test_there_are_the_three_examples():
    assert {p.name for p in EXAMPLES} >= {"usb-serial.yaml", "gpus.yaml", "loop-devices.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path):
    config = load_config(path)
    assert config.resources
    for res in config.resources:
        assert extended_resource_name_problem(res.name) is None


def test_examples_say_what_they_promise():
    serial = load_config(ROOT / "examples/device-plugin/usb-serial.yaml").resources[0]
    assert serial.symlinks
    parent = serial.match[0].parent
    assert parent is not None and dict(parent.attributes)["idVendor"] == "0403"
    gpus = load_config(ROOT / "examples/device-plugin/gpus.yaml")
    assert all(r.group_by is not None and r.group_by.subsystem == "pci" for r in gpus.resources)


def test_committed_reference_matches_the_generated_one():
    committed = (ROOT / "docs/reference/device-plugin-config.md").read_text()
    assert committed == reference_markdown(), (
        "docs/reference/device-plugin-config.md is stale; regenerate it (see its header)"
    )


def test_reference_documents_every_key_with_default():
    text = reference_markdown()
    for key in ("resync_seconds", "group_by", "symlinks", "healthy_values", "share",
                "container_path", "read_only", "pre_start"):
        assert f"`{key}`" in text
    assert "LEAVES the snapshot" in text


def test_defaults_and_short_names():
    config = parse_yaml("""
domain: example.com
resources:
  - name: thing
    match: [{subsystem: misc, kernel: thing}]
""")
    res = config.resources[0]
    assert res.name == "example.com/thing"
    assert res.permissions == "rw" and res.share == 1 and res.container_path == "{path}"
    assert res.cdi is False and res.pre_start is None and res.health is None
    assert config.resync_seconds == 300 and config.cdi.dir == "/var/run/cdi"
    assert config.cdi.vendor == "example.com"
    assert config.subsystems() == frozenset({"misc"})


def test_cdi_per_resource_override_and_mount_defaults():
    config = parse_yaml("""
cdi: {enabled: true, vendor: acme.io}
resources:
  - name: a
    match: [{subsystem: misc}]
    mounts: [{host_path: /opt/lib}]
  - name: b
    match: [{subsystem: misc}]
    cdi: false
""")
    a, b = config.resources
    assert a.cdi and not b.cdi
    assert a.mounts[0].container_path == "/opt/lib" and a.mounts[0].read_only


BAD = [
    ("resources: [\n  - name: x\n    match: [", "line"),
    ("resources:\n  - name: x\n    name: y\n", "duplicate key 'name'"),
    ("colour: red\n", "colour: unknown key (allowed: domain, resync_seconds, cdi, dra, resources)"),
    ("- a\n- b\n", "the configuration: must be a mapping, got list"),
    ("resources:\n  - name: x\n    match: [{subsystem: misc, vendor: x}]\n",
     "resources[0].match[0].vendor: unknown key"),
    ("resources:\n  - {name: x, match: [{subsystem: usb}]}\n"
     "  - name: y\n    match:\n      - parent:\n          attributes: {idVendor: 0403}\n",
     "resources[1].match[0].parent.attributes.idVendor: must be a string, got integer"),
    ("resources:\n  - {name: x}\n", "resources[0].match: is required"),
    ("resources:\n  - {match: [{subsystem: misc}]}\n", "resources[0].name: is required"),
    ("resources:\n  - {name: x, match: []}\n", "resources[0].match: give at least one matcher"),
    ("resources:\n  - {name: x, match: [{}]}\n", "resources[0].match[0]: an empty matcher"),
    ("resources:\n  - {name: x, match: [{parent: {}}]}\n",
     "resources[0].match[0].parent: an empty ancestor match"),
    ("resources:\n  - {name: x, match: [{devnode: /sys/foo}]}\n",
     "resources[0].match[0].devnode: '/sys/foo' can never match"),
    ("resources:\n  - {name: x, match: [{subsystem: misc, attributes: {../x: y}}]}\n",
     "resources[0].match[0].attributes.../x: attribute name"),
    ("resources:\n  - {name: kubernetes.io/x, match: [{subsystem: misc}]}\n",
     "resources[0].name: 'kubernetes.io/x' is not a valid extended resource name: must not be "
     "in the kubernetes.io/"),
    ("resources:\n  - {name: 'Bad_Name!', match: [{subsystem: misc}]}\n",
     "resources[0].name: 'hostkit.io/Bad_Name!' is not a valid extended resource name"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}]}\n"
     "  - {name: hostkit.io/x, match: [{subsystem: misc}]}\n",
     "resources[1].name: 'hostkit.io/x' is already used by resources[0]"),
    ("domain: Example.COM\n", "domain: 'Example.COM' must be a DNS subdomain"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], permissions: rwx}\n",
     "resources[0].permissions: must be some of 'r', 'w', 'm'"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], share: 0}\n",
     f"resources[0].share: must be between 1 and {MAX_SHARE}, got 0"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], share: 1000000}\n",
     "resources[0].share: must be between"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], share: '2'}\n",
     "resources[0].share: must be an integer, got string"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], symlinks: yes please}\n",
     "resources[0].symlinks: must be true or false"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], env: {A: '{nope}'}}\n",
     "resources[0].env.A: unknown placeholder {nope}"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], env: {1A: x}}\n",
     "resources[0].env.1A: not a valid environment variable name"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], container_path: '/c/{ids}'}\n",
     "resources[0].container_path: unknown placeholder {ids}"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], mounts: [{host_path: rel}]}\n",
     "resources[0].mounts[0].host_path: must be an absolute path"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], health: {probe: ping}}\n",
     "resources[0].health.probe: must be 'attribute' or 'open'"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], health: {probe: attribute}}\n",
     "resources[0].health.attribute: is required with probe: attribute"),
    ("resources:\n  - name: x\n    match: [{subsystem: misc}]\n"
     "    health: {probe: attribute, attribute: ro, healthy_values: []}\n",
     "resources[0].health.healthy_values: give at least one"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], health: {probe: open, attribute: a}}\n",
     "resources[0].health.attribute: only allowed with probe: attribute"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], group_by: {devtype: x}}\n",
     "resources[0].group_by.subsystem: is required"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], pre_start: {close: true}}\n",
     "resources[0].pre_start.close: unknown key"),
    ("resources:\n  - {name: x, match: [{subsystem: misc}], container_path: 'dev/{name}'}\n",
     "resources[0].container_path: must be an absolute path template"),
    ("cdi: {dir: relative}\n", "cdi.dir: must be an absolute path"),
    ("resync_seconds: 0\n", "resync_seconds: must be at least 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_is_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "test.yaml")
    assert message in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


def test_malformed_yaml_names_file_line_and_column():
    with pytest.raises(ConfigError) as info:
        parse_yaml("resources:\n  - name: [x\n", "bad.yaml")
    assert str(info.value).startswith("bad.yaml: line ")
    assert "malformed YAML" in str(info.value)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"domain: caf\xe9.io\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


@pytest.mark.parametrize(("name", "ok"), [
    ("hostkit.io/fuse", True),
    ("example.com/a.b_c-d", True),
    ("fuse", False),
    ("kubernetes.io/gpu", False),
    ("nvidia.kubernetes.io/gpu", False),
    ("requests.example.com/x", False),
    ("example.com/" + "a" * 64, False),
    ("example.com/" + "a" * 63, True),
    ("Example.com/x", False),
    ("example.com/-x", False),
    ("a/b/c", False),
    ("/x", False),
])
def test_extended_resource_name_rules(name, ok):
    assert (extended_resource_name_problem(name) is None) is ok
