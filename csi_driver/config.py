"""The CSI driver's configuration: YAML in, frozen dataclasses out.

Every option is declared once, in ``OPTIONS``, with its type, default and a
sentence of documentation.  The same table drives validation at load time
(errors name the offending key as a dotted path, e.g. ``pools[1].reserve_percent``)
and the operator reference ``docs/reference/csi-driver-config.md``
(``render_reference()``; a unit test fails when the committed document is stale).

With no file the driver runs on ``default_config()``: one thin image-file pool
named ``default`` under ``<state-dir>/pools/default``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from plugin_runtime.errors import InvalidArgument

FS_TYPES = ("ext4", "xfs", "btrfs")
BACKING_FS_TYPES = ("xfs", "btrfs")
POOL_TYPES = ("image", "disk", "subvolume")
QUOTA_MODES = ("auto", "simple", "full")
DEFAULT_STATE_DIR = "/var/lib/hostkit-csi"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]i?)?[Bb]?\s*$")
_UNITS = {
    None: 1,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}


class ConfigError(InvalidArgument):
    """The configuration is invalid; the message names the key."""


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string such as ``10Gi``/``500M``; ConfigError names ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size (bytes or e.g. 10Gi), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _UNITS[match.group(2)]
    raise ConfigError(f"{key}: expected a size (bytes or e.g. 10Gi), got {value!r}")


@dataclass(frozen=True)
class Option:
    """One configuration key: how to read it and what it means."""

    kind: str  # "str", "int", "bool", "float", "size", "path", "map", "enum", "list"
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    required: bool = False
    check: Callable[[Any, str], None] | None = None


def _non_negative(value: Any, key: str) -> None:
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")


def _percent(value: Any, key: str) -> None:
    if not 0 <= value < 100:
        raise ConfigError(f"{key}: must be in [0, 100), got {value}")


def _ratio(value: Any, key: str) -> None:
    if value < 1.0:
        raise ConfigError(f"{key}: must be >= 1.0 (1.0 = no overcommit), got {value}")


def _pool_name(value: Any, key: str) -> None:
    if not NAME_RE.match(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid pool name (lowercase letters, digits and '-', "
            "at most 63 characters, starting and ending alphanumeric)"
        )


TOP_OPTIONS: dict[str, Option] = {
    "node_id": Option("str", None, "Node id reported by NodeGetInfo and used as the topology "
                      "value; `--node-id` overrides it. Required from one of the two."),
    "max_volumes_per_node": Option("int", 0, "NodeGetInfo.max_volumes_per_node, the number of "
                                   "volumes the kubelet may put on this node; 0 means unlimited.",
                                   check=_non_negative),
    "kubelet_root": Option("path", DEFAULT_KUBELET_ROOT, "The kubelet's root directory; "
                           "`--kubelet-root` overrides it."),
    "restrict_paths": Option("bool", True, "Refuse staging and target paths outside "
                             "`kubelet_root` (INVALID_ARGUMENT). Turn off only for tests that "
                             "use their own directories."),
    "lock_wait_seconds": Option("float", 10.0, "How long an RPC waits for another operation on "
                                "the same volume or name before answering ABORTED.",
                                check=_non_negative),
    "pools": Option("list", None, "The pools (below). Default: one image pool named `default` "
                    "under `<state-dir>/pools/default`."),
}

_COMMON_POOL_OPTIONS: dict[str, Option] = {
    "name": Option("str", None, "Pool name, chosen by the StorageClass parameter `pool`; "
                   "the first pool is the default.", required=True, check=_pool_name),
    "type": Option("enum", None, "`image` (image files in a directory), `disk` (whole disks "
                   "found through udev) or `subvolume` (btrfs subvolumes with a quota limit, "
                   "in a directory of a mounted btrfs filesystem).", choices=POOL_TYPES,
                   required=True),
    "default_fs_type": Option("enum", "ext4", "Filesystem for mount volumes when neither the "
                              "StorageClass nor the capability names one.", choices=FS_TYPES),
}

_IMAGE_OPTIONS: dict[str, Option] = {
    "thin": Option("bool", True, "Default provisioning: sparse images (true) or fully "
                   "preallocated ones (false); the StorageClass parameter `thin` overrides it."),
    "overcommit_ratio": Option("float", 2.0, "Thin pools: volumes may promise up to "
                               "(pool capacity x ratio) in total.", check=_ratio),
    "reserve_bytes": Option("size", 0, "Space always kept free on the pool filesystem.",
                            check=_non_negative),
    "reserve_percent": Option("float", 5.0, "Space kept free as a percentage of the pool "
                              "filesystem; the larger of the two reserves applies.",
                              check=_percent),
    "direct_io": Option("bool", True, "Attach loop devices with direct I/O (no double caching "
                        "in the page cache)."),
}

IMAGE_POOL_OPTIONS: dict[str, Option] = {
    **_COMMON_POOL_OPTIONS,
    "path": Option("path", None, "Directory holding the images (created if missing).",
                   required=True),
    **_IMAGE_OPTIONS,
}

_SUBVOLUME_OPTIONS: dict[str, Option] = {
    "quota_mode": Option("enum", "full", "How btrfs accounts each volume against its limit: "
                         "`full` qgroups (the default: shared data counts for every volume "
                         "that references it, so the limit bounds everything a volume, clone "
                         "or restore can hold; random writes slow down after snapshots), "
                         "`simple` quotas (kernel 6.7+: every extent charged once to the "
                         "volume that wrote it, so a restore or clone is charged only for what "
                         "it writes itself and can hold more than its capacity), or `auto` "
                         "(simple where the kernel has it, else full). Quotas already on keep "
                         "their mode.", choices=QUOTA_MODES),
}

SUBVOLUME_POOL_OPTIONS: dict[str, Option] = {
    "name": _COMMON_POOL_OPTIONS["name"],
    "type": _COMMON_POOL_OPTIONS["type"],
    "path": Option("path", None, "Directory on a mounted btrfs filesystem holding the "
                   "subvolumes (created if missing; anything else than btrfs is refused).",
                   required=True),
    "thin": Option("bool", True, "Default provisioning: thin volumes promise their size only "
                   "against `overcommit_ratio`; thick (false) volumes keep their whole unused "
                   "limit counted as taken, so they can always fill up; the StorageClass "
                   "parameter `thin` overrides it."),
    "overcommit_ratio": _IMAGE_OPTIONS["overcommit_ratio"],
    "reserve_bytes": _IMAGE_OPTIONS["reserve_bytes"],
    "reserve_percent": _IMAGE_OPTIONS["reserve_percent"],
    **_SUBVOLUME_OPTIONS,
}

DISK_POOL_OPTIONS: dict[str, Option] = {
    **_COMMON_POOL_OPTIONS,
    "selector": Option("map", None, "Which disks belong to the pool (below).", required=True),
    "mode": Option("enum", "volume", "`volume`: each disk is one volume (raw or formatted); "
                   "`backing`: the disks are formatted and mounted under "
                   "`<state-dir>/disks/<id>` and back image files.",
                   choices=("volume", "backing")),
    "backing_fs_type": Option("enum", "xfs", "`backing` mode: filesystem put on the disks "
                              "(xfs and btrfs give reflink snapshots).",
                              choices=BACKING_FS_TYPES),
    "volume_kind": Option("enum", "image", "`backing` mode: what a volume is on the disks, "
                          "`image` files or btrfs `subvolume`s (needs `backing_fs_type: "
                          "btrfs`).", choices=("image", "subvolume")),
    **_IMAGE_OPTIONS,
    **_SUBVOLUME_OPTIONS,
}

SELECTOR_OPTIONS: dict[str, Option] = {
    "properties": Option("map", {}, "udev properties that must match (values are shell-style "
                         "globs), e.g. `ID_MODEL: 'SAMSUNG*'`."),
    "attributes": Option("map", {}, "sysfs attributes that must match (globs), e.g. "
                         "`queue/rotational: '0'`."),
    "kernel": Option("str", None, "Glob on the kernel name, e.g. `nvme*n1` or `loop*`."),
    "min_size": Option("size", 0, "Smallest disk accepted."),
    "max_size": Option("size", 0, "Largest disk accepted (0 = no limit)."),
}

OPTIONS: dict[str, dict[str, Option]] = {
    "": TOP_OPTIONS,
    "pools[] (type: image)": IMAGE_POOL_OPTIONS,
    "pools[] (type: disk)": DISK_POOL_OPTIONS,
    "pools[] (type: subvolume)": SUBVOLUME_POOL_OPTIONS,
    "pools[].selector": SELECTOR_OPTIONS,
}


@dataclass(frozen=True)
class SelectorConfig:
    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    kernel: str | None = None
    min_size: int = 0
    max_size: int = 0


# Field defaults come from the option tables above, so a pool built in code (the
# default pool) and one read from YAML cannot disagree about a default.
@dataclass(frozen=True)
class PoolConfig:
    name: str
    type: str
    default_fs_type: str = _COMMON_POOL_OPTIONS["default_fs_type"].default
    path: str = ""
    thin: bool = _IMAGE_OPTIONS["thin"].default
    overcommit_ratio: float = _IMAGE_OPTIONS["overcommit_ratio"].default
    reserve_bytes: int = _IMAGE_OPTIONS["reserve_bytes"].default
    reserve_percent: float = _IMAGE_OPTIONS["reserve_percent"].default
    direct_io: bool = _IMAGE_OPTIONS["direct_io"].default
    selector: SelectorConfig | None = None
    mode: str = DISK_POOL_OPTIONS["mode"].default
    backing_fs_type: str = DISK_POOL_OPTIONS["backing_fs_type"].default
    volume_kind: str = DISK_POOL_OPTIONS["volume_kind"].default
    quota_mode: str = _SUBVOLUME_OPTIONS["quota_mode"].default


@dataclass(frozen=True)
class DriverConfig:
    node_id: str | None = None
    max_volumes_per_node: int = TOP_OPTIONS["max_volumes_per_node"].default
    kubelet_root: str = TOP_OPTIONS["kubelet_root"].default
    restrict_paths: bool = TOP_OPTIONS["restrict_paths"].default
    lock_wait_seconds: float = TOP_OPTIONS["lock_wait_seconds"].default
    pools: tuple[PoolConfig, ...] = ()

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.name == name), None)


def _read(value: Any, opt: Option, key: str) -> Any:
    kind = opt.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif kind == "size":
        value = parse_size(value, key)
    elif kind in ("str", "enum"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        if kind == "enum" and value not in opt.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(opt.choices)}")
    elif kind == "path":
        if not isinstance(value, str) or not os.path.isabs(value):
            raise ConfigError(f"{key}: expected an absolute path, got {value!r}")
        value = os.path.normpath(value)
    elif kind == "map":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    elif kind == "list" and not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if opt.check is not None:
        opt.check(value, key)
    return value


def _section(data: Any, options: dict[str, Option], prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    out: dict[str, Any] = {}
    for key in data:
        if key not in options:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown option (known: {', '.join(sorted(options))})")
    for key, opt in options.items():
        where = f"{prefix}.{key}" if prefix else key
        if key in data and data[key] is not None:
            out[key] = _read(data[key], opt, where)
        elif opt.required:
            raise ConfigError(f"{where}: required option is missing")
        else:
            out[key] = opt.default
    return out


def _string_map(data: Any, key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        if not isinstance(k, str) or not isinstance(v, str | int) or isinstance(v, bool):
            raise ConfigError(f"{key}.{k}: expected a string value, got {v!r}")
        out[k] = str(v)
    return out


def _pool(data: Any, index: int) -> PoolConfig:
    prefix = f"pools[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    kind = data.get("type")
    if kind == "image":
        values = _section(data, IMAGE_POOL_OPTIONS, prefix)
        return PoolConfig(**values)
    if kind == "disk":
        values = _section(data, DISK_POOL_OPTIONS, prefix)
        sel = _section(values.pop("selector"), SELECTOR_OPTIONS, f"{prefix}.selector")
        sel["properties"] = _string_map(sel["properties"], f"{prefix}.selector.properties")
        sel["attributes"] = _string_map(sel["attributes"], f"{prefix}.selector.attributes")
        if sel["max_size"] and sel["max_size"] < sel["min_size"]:
            raise ConfigError(f"{prefix}.selector.max_size: smaller than min_size")
        if not (sel["properties"] or sel["attributes"] or sel["kernel"]):
            raise ConfigError(
                f"{prefix}.selector: give at least one of properties, attributes or kernel "
                "(an empty selector would claim every unused disk)"
            )
        if values["volume_kind"] == "subvolume":
            if values["mode"] != "backing" or values["backing_fs_type"] != "btrfs":
                raise ConfigError(
                    f"{prefix}.volume_kind: subvolume volumes need mode: backing and "
                    "backing_fs_type: btrfs"
                )
            if data.get("default_fs_type") not in (None, "btrfs"):
                raise ConfigError(
                    f"{prefix}.default_fs_type: subvolume volumes are on the disks' btrfs; "
                    "leave it out or set btrfs"
                )
            values["default_fs_type"] = "btrfs"
        return PoolConfig(**values, selector=SelectorConfig(**sel))
    if kind == "subvolume":
        values = _section(data, SUBVOLUME_POOL_OPTIONS, prefix)
        # A subvolume's filesystem is the pool's own: always btrfs.
        return PoolConfig(**values, default_fs_type="btrfs")
    raise ConfigError(
        f"{prefix}.type: expected one of {', '.join(POOL_TYPES)}, got {kind!r}"
    )


def default_pools(state_dir: str) -> tuple[PoolConfig, ...]:
    return (PoolConfig(name="default", type="image",
                       path=os.path.join(state_dir, "pools", "default")),)


def parse_config(data: Any, state_dir: str = DEFAULT_STATE_DIR) -> DriverConfig:
    """Validate a parsed YAML document; ConfigError names the first bad key."""
    if data is None:
        data = {}
    values = _section(data, TOP_OPTIONS, "")
    raw_pools = values.pop("pools")
    if raw_pools is None:
        pools = default_pools(state_dir)
    else:
        if not raw_pools:
            raise ConfigError("pools: at least one pool is needed")
        pools = tuple(_pool(p, i) for i, p in enumerate(raw_pools))
    seen: set[str] = set()
    for i, pool in enumerate(pools):
        if pool.name in seen:
            raise ConfigError(f"pools[{i}].name: duplicate pool name {pool.name!r}")
        seen.add(pool.name)
    paths = [p.path for p in pools if p.type in ("image", "subvolume")]
    for i, path in enumerate(paths):
        for other in paths[i + 1:]:
            if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                raise ConfigError(f"pools: pool paths {path} and {other} overlap")
    return DriverConfig(**values, pools=pools)


def load_config(path: str | None, state_dir: str = DEFAULT_STATE_DIR) -> DriverConfig:
    """Read and validate ``path`` (None: the embedded default)."""
    if path is None:
        return parse_config(None, state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return parse_config(data, state_dir)


def _default_text(opt: Option) -> str:
    if opt.required:
        return "required"
    if opt.default is None:
        return "-"
    if isinstance(opt.default, bool):
        return "true" if opt.default else "false"
    if opt.default == {}:
        return "{}"
    return str(opt.default)


def render_reference() -> str:
    """The Markdown reference of every option, generated from ``OPTIONS``."""
    lines = [
        "# CSI driver configuration reference",
        "",
        "<!-- Generated from csi_driver/config.py by `python -m csi_driver config-doc`;"
        " do not edit. -->",
        "",
        "The driver reads one YAML file (`--config`). Unknown keys are errors; every error",
        "names the key. Sizes accept bytes or suffixes (`K`, `M`, `G`, `T` and `Ki`, `Mi`,",
        "`Gi`, `Ti`). Without a file the driver runs one thin image pool named `default`",
        "under `<state-dir>/pools/default`.",
        "",
    ]
    for section, options in OPTIONS.items():
        lines += [f"## {section or 'Top level'}", "", "| Key | Type | Default | Meaning |",
                  "|---|---|---|---|"]
        for key, opt in options.items():
            kind = opt.kind if not opt.choices else " \\| ".join(opt.choices)
            lines.append(f"| `{key}` | {kind} | {_default_text(opt)} | {opt.doc} |")
        lines.append("")
    lines += [
        "## Example",
        "",
        "```yaml",
        "node_id: worker-1",
        "max_volumes_per_node: 0",
        "pools:",
        "  - name: fast",
        "    type: image",
        "    path: /var/lib/hostkit-csi/pools/fast",
        "    thin: true",
        "    overcommit_ratio: 2.0",
        "    reserve_percent: 5",
        "  - name: nvme",
        "    type: disk",
        "    mode: backing",
        "    backing_fs_type: xfs",
        "    selector:",
        "      kernel: 'nvme*n1'",
        "      min_size: 100Gi",
        "  - name: subvol",
        "    type: subvolume",
        "    path: /srv/btrfs/hostkit",
        "    quota_mode: full",
        "```",
        "",
    ]
    return "\n".join(lines)
