"""The device plugin's configuration: YAML in, frozen dataclasses out.

This module owns the configuration schema.  Every option is described once, in
``SECTIONS`` (key, type, default, meaning); the validators read their defaults
and allowed keys from there, and ``reference_markdown()`` renders the operator
reference (docs/reference/device-plugin-config.md) from the same table, so the
documentation cannot drift from what is accepted.

Validation happens entirely at load: a value of the wrong type, an unknown key,
a resource name the kubelet would refuse, or a matcher that cannot select a
device node raises ``ConfigError`` whose message starts with the key path, e.g.
``resources[1].match[0].parent.attributes.idVendor: must be a string``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources as package_resources
from pathlib import Path
from typing import Any

import yaml

from device_plugin.sysfs import attribute_name_problem
from plugin_runtime.errors import InvalidArgument

DEFAULT_CONFIG_RESOURCE = "default-config.yaml"

# Upper bound of a resource's share count.  With IDs of at most 63 bytes a
# ListAndWatch entry costs well under 100 bytes, so even 10,000 copies of a
# few devices stay far under the kubelet's 4 MiB message limit.
MAX_SHARE = 10_000

ENV_PLACEHOLDERS = ("ids", "paths", "resource", "count")
PATH_PLACEHOLDERS = ("path", "name")


class ConfigError(InvalidArgument):
    """The configuration is invalid; the message names the key and the problem."""


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Option:
    """One documented configuration key."""

    key: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class Section:
    title: str
    path: str
    doc: str
    options: tuple[Option, ...]

    def option(self, key: str) -> Option:
        for opt in self.options:
            if opt.key == key:
                return opt
        raise KeyError(key)

    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.options)


SECTIONS: dict[str, Section] = {
    "top": Section(
        "Top level",
        "",
        "The whole file.  When no file is given the plugin uses its embedded default "
        "(`device_plugin/default-config.yaml`: /dev/fuse, /dev/net/tun, /dev/kvm).",
        (
            Option("domain", "string (DNS subdomain)", "hostkit.io",
                   "Prefix of resource names given without a `/`: `fuse` becomes "
                   "`hostkit.io/fuse`."),
            Option("resync_seconds", "number >= 1", 300,
                   "Safety-net full re-enumeration period.  Discovery is driven by uevents; "
                   "this only repairs a missed event."),
            Option("cdi", "mapping (see `cdi`)", {},
                   "Container Device Interface output, off by default."),
            Option("dra", "mapping (see `dra`)", {},
                   "Dynamic Resource Allocation: the driver that publishes the resources "
                   "marked `dra: true` as ResourceSlices."),
            Option("resources", "list of resource", [],
                   "The extended resources to advertise, one kubelet endpoint each."),
        ),
    ),
    "cdi": Section(
        "cdi",
        "cdi",
        "With CDI on, one spec file per resource (`<vendor>-<class>.json`) is written "
        "atomically to `dir` and rewritten when its devices change; Allocate then answers "
        "with fully qualified CDI names `<vendor>/<class>=<device-id>` (the class is the "
        "part of the resource name after `/`) plus the environment, and the device nodes "
        "and mounts come from the spec.  Spec files are removed at shutdown and when a "
        "resource is removed.",
        (
            Option("enabled", "boolean", False, "Write CDI specs and answer with CDI names."),
            Option("dir", "absolute path", "/var/run/cdi", "Where spec files are written."),
            Option("vendor", "string", "<domain>", "CDI vendor; defaults to `domain`."),
        ),
    ),
    "dra": Section(
        "dra",
        "dra",
        "Resources marked `dra: true` are published as ResourceSlices (API group "
        "`resource.k8s.io/v1`) instead of being registered as extended resources: one pool "
        "per resource and node, named `<node>-<resource short name>`, one device per unit "
        "with udev/sysfs attributes under the driver's name as CEL domain "
        "(`device.attributes[\"<driver>\"].<id>`).  The API client is loaded only when "
        "some resource uses DRA.",
        (
            Option("driver", "string (DNS subdomain, at most 63)", "<domain>",
                   "DRA driver name (`spec.driver` of the slices and DeviceClass "
                   "selectors); defaults to `domain`."),
        ),
    ),
    "resource": Section(
        "resources[]",
        "resources[i]",
        "One extended resource.  A device vanishing from udev LEAVES the snapshot (the "
        "kubelet lowers capacity); when it comes back it has the same ID.  A failing "
        "`health` probe keeps it in the snapshot as `Unhealthy` until it recovers.",
        (
            Option("name", "string", REQUIRED,
                   "Resource name, `<domain>/<name>` or a full `vendor.example/name`; checked "
                   "with the kubelet's extended-resource rules."),
            Option("match", "list of matcher", REQUIRED,
                   "A udev device matching ANY entry is selected.  Devices without a device "
                   "node are never handed out."),
            Option("group_by", "mapping (see `group_by`)", None,
                   "Hand out all matched nodes that share an ancestor as ONE unit (e.g. a "
                   "GPU's card and render nodes under one PCI device)."),
            Option("symlinks", "boolean", False,
                   "Also hand out the udev symlinks (DEVLINKS, e.g. /dev/serial/by-id/...) "
                   "when udev provides them."),
            Option("container_path", "template", "{path}",
                   "Path of each node inside the container; placeholders `{path}` (host "
                   "path) and `{name}` (its base name)."),
            Option("permissions", "string, subset of `rwm`", "rw",
                   "cgroup device permissions of every node."),
            Option("mounts", "list of mount", [], "Extra bind mounts for every allocation."),
            Option("env", "mapping name -> template", {},
                   "Environment variables; placeholders `{ids}` (comma-separated allocated "
                   "IDs), `{paths}` (comma-separated container paths), `{resource}`, "
                   "`{count}`."),
            Option("share", f"integer 1..{MAX_SHARE}", 1,
                   "How many containers may use one device at once: each device is "
                   "advertised as `<id>-<i>` for i in 0..share-1 when above 1."),
            Option("health", "mapping (see `health`)", None,
                   "Optional probe; without it every present device is Healthy."),
            Option("cdi", "boolean", None,
                   "Per-resource override of `cdi.enabled` (unset: follow it)."),
            Option("pre_start", "mapping (see `pre_start`)", None,
                   "Checks run before each container start; PreStartContainer is "
                   "advertised only when one is enabled."),
            Option("dra", "boolean", False,
                   "Serve the resource through Dynamic Resource Allocation (ResourceSlices, "
                   "see `dra`) instead of the device plugin API."),
            Option("device_plugin", "boolean", "<not dra>",
                   "Serve the resource through the device plugin API.  A resource is served "
                   "by one API only (the kubelet would hand a device out twice): `true` "
                   "together with `dra: true` is refused, naming the resource; `share` and "
                   "`pre_start` are device plugin options and are refused with `dra`."),
        ),
    ),
    "matcher": Section(
        "matcher",
        "resources[i].match[j]",
        "All given keys must hold (at least one key is required).  Globs use shell "
        "syntax (`*`, `?`, `[...]`).  Attribute values are compared with trailing "
        "whitespace removed, as udev does.",
        (
            Option("subsystem", "string", None, "udev subsystem, exact (e.g. `tty`)."),
            Option("devtype", "string", None, "udev DEVTYPE, exact (e.g. `disk`)."),
            Option("kernel", "glob", None, "Kernel name (e.g. `ttyUSB*`)."),
            Option("devnode", "glob under /dev/", None, "Device node path."),
            Option("properties", "mapping name -> glob", {},
                   "udev properties of the device (e.g. `ID_VENDOR_ID: \"0403\"`)."),
            Option("attributes", "mapping name -> glob", {},
                   "sysfs attributes of the device itself."),
            Option("parent", "mapping (see `parent`)", None,
                   "Ancestor match: the device or ONE of its ancestors must satisfy all "
                   "keys, like udev's SUBSYSTEMS/KERNELS/ATTRS."),
        ),
    ),
    "parent": Section(
        "parent",
        "resources[i].match[j].parent",
        "Walks from the device up through its parents; the first one (possibly the "
        "device itself) that satisfies every key matches.",
        (
            Option("subsystem", "string", None, "Ancestor subsystem, exact (e.g. `usb`)."),
            Option("devtype", "string", None, "Ancestor DEVTYPE (e.g. `usb_device`)."),
            Option("kernel", "glob", None, "Ancestor kernel name."),
            Option("attributes", "mapping name -> glob", {},
                   "Ancestor sysfs attributes (e.g. `idVendor: \"0403\"`)."),
            Option("properties", "mapping name -> glob", {}, "Ancestor udev properties."),
        ),
    ),
    "group_by": Section(
        "group_by",
        "resources[i].group_by",
        "Matched nodes whose nearest ancestor of this subsystem is the same device form "
        "one unit; a node without such an ancestor is a unit of its own.",
        (
            Option("subsystem", "string", REQUIRED, "Ancestor subsystem (e.g. `pci`)."),
            Option("devtype", "string", None, "Optionally also the ancestor's DEVTYPE."),
        ),
    ),
    "mount": Section(
        "mounts[]",
        "resources[i].mounts[j]",
        "A bind mount added to every allocation of the resource.",
        (
            Option("host_path", "absolute path", REQUIRED, "Path on the host."),
            Option("container_path", "absolute path", "<host_path>", "Path in the container."),
            Option("read_only", "boolean", True, "Mount read-only."),
        ),
    ),
    "health": Section(
        "health",
        "resources[i].health",
        "A probe per unit, run every `interval_seconds` and right after each discovery "
        "change.  A failing probe marks the unit (all its share copies) Unhealthy, with the "
        "reason in logs and `discover`; it turns Healthy again when the probe passes.",
        (
            Option("probe", "`attribute` or `open`", REQUIRED,
                   "`attribute`: a sysfs attribute of the device must have one of "
                   "`healthy_values`; `open`: the device node must open (non-blocking).  "
                   "Opening a serial port raises DTR/RTS and resets many boards: prefer "
                   "`attribute` there."),
            Option("attribute", "relative sysfs path", None,
                   "Attribute of the unit's first device (probe `attribute` only); "
                   "`device/enabled` reads the parent's through the `device` link."),
            Option("healthy_values", "list of globs", [],
                   "Accepted attribute values (probe `attribute` only)."),
            Option("interval_seconds", "number >= 0.1", 10, "Probe period."),
        ),
    ),
    "pre_start": Section(
        "pre_start",
        "resources[i].pre_start",
        "Checks before each container start (PreStartContainer).",
        (
            Option("open", "boolean", False,
                   "Every node of the allocated units must open (non-blocking).  "
                   "PreStartContainer is advertised only when this is true."),
        ),
    ),
}


# --------------------------------------------------------------------------- #
# Frozen configuration values


Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ParentMatch:
    subsystem: str | None = None
    devtype: str | None = None
    kernel: str | None = None
    attributes: Pairs = ()
    properties: Pairs = ()


@dataclass(frozen=True)
class Matcher:
    subsystem: str | None = None
    devtype: str | None = None
    kernel: str | None = None
    devnode: str | None = None
    properties: Pairs = ()
    attributes: Pairs = ()
    parent: ParentMatch | None = None


@dataclass(frozen=True)
class GroupBy:
    subsystem: str
    devtype: str | None = None


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True)
class HealthProbe:
    probe: str
    attribute: str | None = None
    healthy_values: tuple[str, ...] = ()
    interval_seconds: float = 10.0


@dataclass(frozen=True)
class PreStart:
    open: bool = False


@dataclass(frozen=True)
class CdiConfig:
    enabled: bool = False
    dir: str = "/var/run/cdi"
    vendor: str = "hostkit.io"


@dataclass(frozen=True)
class DraConfig:
    driver: str = "hostkit.io"


@dataclass(frozen=True)
class ResourceConfig:
    name: str
    match: tuple[Matcher, ...]
    group_by: GroupBy | None = None
    symlinks: bool = False
    container_path: str = "{path}"
    permissions: str = "rw"
    mounts: tuple[Mount, ...] = ()
    env: Pairs = ()
    share: int = 1
    health: HealthProbe | None = None
    cdi: bool = False
    pre_start: PreStart | None = None
    # Served through DRA (ResourceSlices) rather than the device plugin API.
    dra: bool = False

    @property
    def short_name(self) -> str:
        """The part after ``/``: the CDI class and the readable part of file names."""
        return self.name.split("/", 1)[1]

    @property
    def pre_start_required(self) -> bool:
        return self.pre_start is not None and self.pre_start.open


@dataclass(frozen=True)
class Config:
    domain: str = "hostkit.io"
    resync_seconds: float = 300.0
    cdi: CdiConfig = field(default_factory=CdiConfig)
    resources: tuple[ResourceConfig, ...] = ()
    source: str = "<embedded default>"
    dra: DraConfig = field(default_factory=DraConfig)

    @property
    def dra_enabled(self) -> bool:
        """Whether some resource is served through DRA (the API client is needed)."""
        return any(r.dra for r in self.resources)

    def device_plugin_resources(self) -> tuple[ResourceConfig, ...]:
        return tuple(r for r in self.resources if not r.dra)

    def dra_resources(self) -> tuple[ResourceConfig, ...]:
        return tuple(r for r in self.resources if r.dra)

    def subsystems(self) -> frozenset[str] | None:
        """Subsystems discovery must watch; None when some matcher has none (watch all)."""
        found: set[str] = set()
        for res in self.resources:
            for m in res.match:
                if m.subsystem is None:
                    return None
                found.add(m.subsystem)
        return frozenset(found)


# --------------------------------------------------------------------------- #
# Kubernetes name rules (k8s.io/apimachinery validation, core/v1 helpers)

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_QUALIFIED_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CDI_VENDOR = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


def dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return "must be at most 253 characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return ("must be a DNS subdomain: lower-case alphanumerics, '-' and '.', "
                "starting and ending with an alphanumeric")
    return None


def _qualified_name_problem(value: str) -> str | None:
    parts = value.split("/")
    if len(parts) > 2:
        return "must have at most one '/'"
    name = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            return "prefix before '/' must not be empty"
        problem = dns_subdomain_problem(parts[0])
        if problem:
            return f"prefix {parts[0]!r} {problem}"
    if not name:
        return "name after '/' must not be empty"
    if len(name) > 63:
        return f"name part {name!r} must be at most 63 characters"
    if not _QUALIFIED_NAME_PART.fullmatch(name):
        return (f"name part {name!r} must consist of alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def extended_resource_name_problem(name: str) -> str | None:
    """Why the kubelet would refuse ``name`` as an extended resource, or None."""
    if "/" not in name:
        return "must contain '/' (domain/name)"
    if "kubernetes.io/" in name:
        return "must not be in the kubernetes.io/ or *.kubernetes.io/ namespace"
    if name.startswith("requests."):
        return "must not start with 'requests.'"
    problem = _qualified_name_problem("requests." + name)
    if problem:
        return problem.replace("requests.", "", 1)
    return None


# --------------------------------------------------------------------------- #
# Reading YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            mark = key_node.start_mark
            raise ConfigError(
                f"line {mark.line + 1} column {mark.column + 1}: duplicate key {key!r}"
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


class _Reader:
    """A YAML mapping being validated against one section of ``SECTIONS``."""

    def __init__(self, raw: object, path: str, section: str) -> None:
        self.path = path
        self.section = SECTIONS[section]
        where = path or "the configuration"
        if raw is None and not path:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a mapping, got {_type_name(raw)}")
        allowed = self.section.keys()
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"{where}: keys must be strings, got {key!r}")
            if key not in allowed:
                raise ConfigError(
                    f"{_join(path, key)}: unknown key (allowed: {', '.join(allowed)})"
                )
        self.raw: dict[str, Any] = raw

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def value(self, key: str) -> Any:
        default = self.section.option(key).default
        if key not in self.raw or self.raw[key] is None:
            if default is REQUIRED:
                raise ConfigError(f"{self.at(key)}: is required")
            return default
        return self.raw[key]

    def string(self, key: str, *, allow_empty: bool = False) -> Any:
        value = self.value(key)
        if value is None:
            return None
        return _string(value, self.at(key), allow_empty=allow_empty)

    def boolean(self, key: str) -> Any:
        value = self.value(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise ConfigError(f"{self.at(key)}: must be true or false, got {_type_name(value)}")
        return value

    def number(self, key: str, minimum: float) -> float:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.at(key)}: must be a number, got {_type_name(value)}")
        if value < minimum:
            raise ConfigError(f"{self.at(key)}: must be at least {minimum:g}, got {value}")
        return float(value)

    def integer(self, key: str, minimum: int, maximum: int) -> int:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.at(key)}: must be an integer, got {_type_name(value)}")
        if not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.at(key)}: must be between {minimum} and {maximum}, got {value}"
            )
        return value

    def items(self, key: str) -> list[tuple[str, Any]]:
        value = self.value(key)
        if not isinstance(value, list):
            raise ConfigError(f"{self.at(key)}: must be a list, got {_type_name(value)}")
        return [(_join(self.at(key), i), item) for i, item in enumerate(value)]

    def string_map(self, key: str) -> Pairs:
        value = self.value(key)
        if not isinstance(value, dict):
            raise ConfigError(f"{self.at(key)}: must be a mapping, got {_type_name(value)}")
        pairs = []
        for name, item in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{self.at(key)}: keys must be non-empty strings, got {name!r}")
            pairs.append((name, _string(item, _join(self.at(key), name))))
        return tuple(pairs)


def _string(value: object, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, int | float) and not isinstance(value, bool):
            hint = " (quote it: YAML reads 0403 as a number)"
        raise ConfigError(f"{path}: must be a string, got {_type_name(value)}{hint}")
    if not value and not allow_empty:
        raise ConfigError(f"{path}: must not be empty")
    return value


def _absolute_path(value: str, path: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"{path}: must be an absolute path, got {value!r}")
    return value


def _template(value: str, path: str, allowed: tuple[str, ...]) -> str:
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ConfigError(f"{path}: malformed template {value!r}: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            raise ConfigError(
                f"{path}: unknown placeholder {{{name}}} (allowed: "
                + ", ".join("{" + a + "}" for a in allowed) + "; write {{ for a brace)"
            )
    return value


def _attribute_names(pairs: Pairs, path: str) -> Pairs:
    for name, _value in pairs:
        problem = attribute_name_problem(name)
        if problem:
            raise ConfigError(f"{_join(path, name)}: attribute name {problem}")
    return pairs


def _parent(raw: object, path: str) -> ParentMatch:
    r = _Reader(raw, path, "parent")
    parent = ParentMatch(
        subsystem=r.string("subsystem"),
        devtype=r.string("devtype"),
        kernel=r.string("kernel"),
        attributes=_attribute_names(r.string_map("attributes"), r.at("attributes")),
        properties=r.string_map("properties"),
    )
    if parent == ParentMatch():
        raise ConfigError(
            f"{path}: an empty ancestor match selects nothing; give at least one of "
            + ", ".join(SECTIONS["parent"].keys())
        )
    return parent


def _matcher(raw: object, path: str) -> Matcher:
    r = _Reader(raw, path, "matcher")
    devnode = r.string("devnode")
    if devnode is not None and not devnode.startswith("/dev/"):
        raise ConfigError(
            f"{r.at('devnode')}: {devnode!r} can never match: device nodes live under /dev/"
        )
    matcher = Matcher(
        subsystem=r.string("subsystem"),
        devtype=r.string("devtype"),
        kernel=r.string("kernel"),
        devnode=devnode,
        properties=r.string_map("properties"),
        attributes=_attribute_names(r.string_map("attributes"), r.at("attributes")),
        parent=_parent(r.raw["parent"], r.at("parent")) if r.has("parent") else None,
    )
    if matcher == Matcher():
        raise ConfigError(
            f"{path}: an empty matcher would select every device; give at least one of "
            + ", ".join(SECTIONS["matcher"].keys())
        )
    return matcher


def _health(raw: object, path: str) -> HealthProbe:
    r = _Reader(raw, path, "health")
    probe = r.string("probe")
    interval = r.number("interval_seconds", 0.1)
    if probe == "open":
        for key in ("attribute", "healthy_values"):
            if r.has(key):
                raise ConfigError(f"{r.at(key)}: only allowed with probe: attribute")
        return HealthProbe("open", interval_seconds=interval)
    if probe != "attribute":
        raise ConfigError(f"{r.at('probe')}: must be 'attribute' or 'open', got {probe!r}")
    attribute = r.string("attribute")
    if attribute is None:
        raise ConfigError(f"{r.at('attribute')}: is required with probe: attribute")
    problem = attribute_name_problem(attribute)
    if problem:
        raise ConfigError(f"{r.at('attribute')}: {attribute!r} {problem}")
    values = tuple(_string(v, p, allow_empty=True) for p, v in r.items("healthy_values"))
    if not values:
        raise ConfigError(f"{r.at('healthy_values')}: give at least one accepted value")
    return HealthProbe("attribute", attribute, values, interval)


def _resource(raw: object, path: str, domain: str, cdi_default: bool) -> ResourceConfig:
    r = _Reader(raw, path, "resource")
    name = r.string("name")
    full = name if "/" in name else f"{domain}/{name}"
    problem = extended_resource_name_problem(full)
    if problem:
        raise ConfigError(f"{r.at('name')}: {full!r} is not a valid extended resource name: "
                          f"{problem}")
    matches = tuple(_matcher(item, p) for p, item in r.items("match"))
    if not matches:
        raise ConfigError(f"{r.at('match')}: give at least one matcher")
    group_by = None
    if r.has("group_by"):
        g = _Reader(r.raw["group_by"], r.at("group_by"), "group_by")
        group_by = GroupBy(g.string("subsystem"), g.string("devtype"))
    permissions = r.string("permissions")
    if not set(permissions) <= set("rwm") or len(set(permissions)) != len(permissions):
        raise ConfigError(
            f"{r.at('permissions')}: must be some of 'r', 'w', 'm' (each once), "
            f"got {permissions!r}"
        )
    mounts = []
    for p, item in r.items("mounts"):
        m = _Reader(item, p, "mount")
        host = _absolute_path(m.string("host_path"), m.at("host_path"))
        container = m.string("container_path")
        container = host if container == "<host_path>" else container
        mounts.append(Mount(host, _absolute_path(container, m.at("container_path")),
                            m.boolean("read_only")))
    env = r.string_map("env")
    for key, template in env:
        if not _ENV_NAME.fullmatch(key):
            raise ConfigError(f"{_join(r.at('env'), key)}: not a valid environment variable name")
        _template(template, _join(r.at("env"), key), ENV_PLACEHOLDERS)
    pre_start = None
    if r.has("pre_start"):
        ps = _Reader(r.raw["pre_start"], r.at("pre_start"), "pre_start")
        pre_start = PreStart(open=ps.boolean("open"))
    container = _template(r.string("container_path"), r.at("container_path"), PATH_PLACEHOLDERS)
    if not container.startswith(("/", "{path}")):
        raise ConfigError(f"{r.at('container_path')}: must be an absolute path template, "
                          f"got {container!r}")
    cdi = r.boolean("cdi")
    dra = r.boolean("dra")
    device_plugin = r.boolean("device_plugin") if r.has("device_plugin") else not dra
    if dra and device_plugin:
        raise ConfigError(
            f"{path}: resource {full!r} is served through both the device plugin API and DRA "
            "(device_plugin: true and dra: true); the kubelet would hand the same device out "
            "twice: choose one"
        )
    if not dra and not device_plugin:
        raise ConfigError(f"{r.at('device_plugin')}: resource {full!r} is served by no API "
                          "(device_plugin: false without dra: true)")
    if dra:
        if r.has("share") and r.raw["share"] != 1:
            raise ConfigError(f"{r.at('share')}: resource {full!r} uses DRA, where a device "
                              "is allocated whole; share is a device plugin option")
        if r.has("pre_start"):
            raise ConfigError(f"{r.at('pre_start')}: resource {full!r} uses DRA; pre_start "
                              "is a device plugin option")
    return ResourceConfig(
        name=full,
        match=matches,
        group_by=group_by,
        symlinks=r.boolean("symlinks"),
        container_path=container,
        permissions=permissions,
        mounts=tuple(mounts),
        env=env,
        share=r.integer("share", 1, MAX_SHARE),
        health=_health(r.raw["health"], r.at("health")) if r.has("health") else None,
        cdi=cdi_default if cdi is None else cdi,
        pre_start=pre_start,
        dra=dra,
    )


def parse_config(raw: object, source: str = "<memory>") -> Config:
    """Validate an already-parsed YAML document."""
    r = _Reader(raw, "", "top")
    domain = r.string("domain")
    problem = dns_subdomain_problem(domain)
    if problem:
        raise ConfigError(f"domain: {domain!r} {problem}")
    c = _Reader(r.value("cdi"), "cdi", "cdi")
    vendor = c.string("vendor")
    vendor = domain if vendor == "<domain>" else vendor
    if not _CDI_VENDOR.fullmatch(vendor):
        raise ConfigError(f"cdi.vendor: {vendor!r} must be alphanumerics, '-', '_' or '.'")
    cdi = CdiConfig(
        enabled=c.boolean("enabled"),
        dir=_absolute_path(c.string("dir"), "cdi.dir"),
        vendor=vendor,
    )
    d = _Reader(r.value("dra"), "dra", "dra")
    driver = d.string("driver")
    driver = domain if driver == "<domain>" else driver
    problem = dns_subdomain_problem(driver)
    if problem or len(driver) > 63:
        raise ConfigError(f"dra.driver: {driver!r} "
                          f"{problem or 'must be at most 63 characters'}")
    resources = tuple(
        _resource(item, p, domain, cdi.enabled) for p, item in r.items("resources")
    )
    seen: dict[str, int] = {}
    for i, res in enumerate(resources):
        if res.name in seen:
            raise ConfigError(
                f"resources[{i}].name: {res.name!r} is already used by resources[{seen[res.name]}]"
            )
        seen[res.name] = i
    return Config(
        domain=domain,
        resync_seconds=r.number("resync_seconds", 1),
        cdi=cdi,
        resources=resources,
        source=source,
        dra=DraConfig(driver=driver),
    )


def parse_yaml(text: str, source: str = "<memory>") -> Config:
    """Parse and validate YAML text; malformed YAML names line and column."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}:{where}: malformed YAML: {problem}") from None
    return parse_config(raw, source)


def load_config(path: str | Path | None) -> Config:
    """Load ``path``, or the embedded default when ``path`` is None."""
    if path is None:
        text = (package_resources.files("device_plugin") / DEFAULT_CONFIG_RESOURCE).read_text(
            encoding="utf-8"
        )
        return parse_yaml(text, "<embedded default>")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path))


# --------------------------------------------------------------------------- #
# Reference documentation


def _render_default(value: Any) -> str:
    if value is REQUIRED:
        return "**required**"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == {}:
        return "`{}`"
    if value == []:
        return "`[]`"
    return f"`{value}`"


def reference_markdown() -> str:
    """The operator reference for the configuration file, generated from ``SECTIONS``."""
    lines = [
        "# Device plugin configuration reference",
        "",
        "<!-- Generated by device_plugin.config.reference_markdown(); do not edit by hand."
        " Regenerate with: python -c 'from device_plugin.config import reference_markdown;"
        " print(reference_markdown(), end=\"\")' > docs/reference/device-plugin-config.md -->",
        "",
        "The file is YAML.  Every key is checked at load: unknown keys, wrong types,",
        "resource names the kubelet would refuse and matchers that can never select a",
        "device node are refused with an error naming the key path, e.g.",
        "`resources[1].match[0].parent.attributes.idVendor: must be a string`.  On a",
        "hot reload an invalid file is refused the same way and the last good",
        "configuration stays in force.",
        "",
        "Device IDs are derived from persistent identity: the udev `ID_SERIAL` (with the",
        "USB interface number) or, without udev, the USB ancestor's `serial`, `idVendor`",
        "and `idProduct` attributes; else `ID_PATH`; else the sysfs path.  They look like",
        "`ttyUSB-<hash12>`, are at most 63 characters, and stay the same across plugin",
        "restarts and re-plugging.  With `share` above 1 the IDs are `<id>-<i>`.",
        "",
        "Discovery listens to uevents: from udevd when `/run/udev` exists (mount it from",
        "the host), else raw kernel uevents.  Without udevd, udev-only properties",
        "(`ID_SERIAL`, `ID_PATH`, `DEVLINKS`, `ID_VENDOR_ID`...) are absent: match on",
        "sysfs `attributes` (e.g. the USB parent's `idVendor`) to work in both modes.",
        "",
        "Health: a device that vanishes leaves the snapshot (the kubelet lowers",
        "capacity); re-plugged, it returns with the same ID.  The optional probe marks a",
        "present device Unhealthy and Healthy again.  NUMA topology comes from the",
        "`numa_node` attribute of the device or its nearest ancestor (-1 is ignored).",
        "",
    ]
    for section in SECTIONS.values():
        heading = f"## `{section.path}`" if section.path else f"## {section.title}"
        lines += [heading, "", section.doc, "", "| Key | Type | Default | Meaning |",
                  "|---|---|---|---|"]
        for opt in section.options:
            doc = opt.doc.replace("|", "\\|")
            lines.append(f"| `{opt.key}` | {opt.type} | {_render_default(opt.default)} | {doc} |")
        lines.append("")
    return "\n".join(lines)

