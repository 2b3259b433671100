"""Configuration: validation names the key, defaults, and the committed reference is fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.config import ConfigError, load_config, parse_config, parse_size, render_reference

ROOT = Path(__file__).resolve().parents[3]


def test_no_config_gives_one_default_image_pool_under_the_state_dir():
    config = parse_config(None, "/srv/state")
    assert [p.name for p in config.pools] == ["default"]
    pool = config.pools[0]
    assert (pool.type, pool.path, pool.thin, pool.default_fs_type) == (
        "image", "/srv/state/pools/default", True, "ext4")
    assert config.max_volumes_per_node == 0
    assert config.kubelet_root == "/var/lib/kubelet"


def test_full_config_parses_sizes_and_selectors():
    config = parse_config({
        "node_id": "n1",
        "max_volumes_per_node": 50,
        "pools": [
            {"name": "fast", "type": "image", "path": "/data/fast", "thin": False,
             "reserve_bytes": "10Gi", "overcommit_ratio": 3},
            {"name": "nvme", "type": "disk", "mode": "backing", "backing_fs_type": "btrfs",
             "selector": {"kernel": "nvme*n1", "min_size": "100G",
                          "properties": {"ID_MODEL": "X*"}}},
        ],
    })
    fast, nvme = config.pools
    assert fast.reserve_bytes == 10 * 2**30 and fast.overcommit_ratio == 3.0 and not fast.thin
    assert nvme.selector is not None and nvme.selector.min_size == 100 * 10**9
    assert nvme.selector.properties == {"ID_MODEL": "X*"}
    assert config.pool("nvme") is nvme


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"max_volumes_per_node": -1}, "max_volumes_per_node"),
        ({"max_volumes_per_node": "many"}, "max_volumes_per_node"),
        ({"pools": []}, "pools"),
        ({"pools": [{"name": "a", "type": "lvm"}]}, "pools[0].type"),
        ({"pools": [{"name": "a", "type": "image"}]}, "pools[0].path"),
        ({"pools": [{"name": "A_b", "type": "image", "path": "/x"}]}, "pools[0].name"),
        ({"pools": [{"name": "a", "type": "image", "path": "rel"}]}, "pools[0].path"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x", "thin": "yes"}]},
         "pools[0].thin"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x", "overcommit_ratio": 0.5}]},
         "pools[0].overcommit_ratio"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x", "reserve_percent": 100}]},
         "pools[0].reserve_percent"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x", "default_fs_type": "ntfs"}]},
         "pools[0].default_fs_type"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x", "reserve_bytes": "lots"}]},
         "pools[0].reserve_bytes"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x"},
                    {"name": "a", "type": "image", "path": "/y"}]}, "pools[1].name"),
        ({"pools": [{"name": "a", "type": "image", "path": "/x"},
                    {"name": "b", "type": "image", "path": "/x/y"}]}, "overlap"),
        ({"pools": [{"name": "d", "type": "disk"}]}, "pools[0].selector"),
        ({"pools": [{"name": "d", "type": "disk", "selector": {}}]}, "pools[0].selector"),
        ({"pools": [{"name": "d", "type": "disk", "selector": {"kernel": "x", "color": 1}}]},
         "pools[0].selector.color"),
        ({"pools": [{"name": "d", "type": "disk", "mode": "raid",
                     "selector": {"kernel": "x"}}]}, "pools[0].mode"),
        ({"pools": [{"name": "d", "type": "disk", "backing_fs_type": "ext4",
                     "selector": {"kernel": "x"}}]}, "pools[0].backing_fs_type"),
        ({"pools": [{"name": "d", "type": "disk",
                     "selector": {"kernel": "x", "min_size": "2G", "max_size": "1G"}}]},
         "pools[0].selector.max_size"),
        ({"pools": [{"name": "s", "type": "subvolume"}]}, "pools[0].path"),
        ({"pools": [{"name": "s", "type": "subvolume", "path": "/b", "direct_io": True}]},
         "pools[0].direct_io"),
        ({"pools": [{"name": "s", "type": "subvolume", "path": "/b", "quota_mode": "half"}]},
         "pools[0].quota_mode"),
        ({"pools": [{"name": "a", "type": "image", "path": "/b"},
                    {"name": "s", "type": "subvolume", "path": "/b/s"}]}, "overlap"),
        ({"pools": [{"name": "d", "type": "disk", "volume_kind": "subvolume",
                     "selector": {"kernel": "x"}}]}, "pools[0].volume_kind"),
        ({"pools": [{"name": "d", "type": "disk", "mode": "backing", "volume_kind": "subvolume",
                     "selector": {"kernel": "x"}}]}, "pools[0].volume_kind"),
        ({"pools": [{"name": "d", "type": "disk", "mode": "backing", "volume_kind": "subvolume",
                     "backing_fs_type": "btrfs", "default_fs_type": "xfs",
                     "selector": {"kernel": "x"}}]}, "pools[0].default_fs_type"),
    ],
)
def test_invalid_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/state")
    assert key in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


def test_parse_size_units():
    assert parse_size("1Ki", "k") == 1024
    assert parse_size("2G", "k") == 2 * 10**9
    assert parse_size(512, "k") == 512
    with pytest.raises(ConfigError, match="k:"):
        parse_size("1.5G", "k")
    with pytest.raises(ConfigError):
        parse_size(True, "k")


def test_load_config_reports_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    good = tmp_path / "g.yaml"
    good.write_text("node_id: n\npools:\n  - {name: p, type: image, path: /p}\n")
    assert load_config(str(good)).pools[0].path == "/p"


def test_committed_reference_matches_the_option_table():
    committed = (ROOT / "docs/reference/csi-driver-config.md").read_text()
    assert committed == render_reference(), (
        "docs/reference/csi-driver-config.md is stale: regenerate it with "
        "`python -m csi_driver config-doc > docs/reference/csi-driver-config.md`"
    )
    for key in ("overcommit_ratio", "reserve_percent", "backing_fs_type", "max_volumes_per_node"):
        assert f"`{key}`" in committed


def test_subvolume_pools_carry_btrfs_and_a_quota_mode():
    config = parse_config({"pools": [
        {"name": "s", "type": "subvolume", "path": "/srv/btrfs/hk"},
        {"name": "d", "type": "disk", "mode": "backing", "backing_fs_type": "btrfs",
         "volume_kind": "subvolume", "quota_mode": "full", "selector": {"kernel": "x"}},
    ]}, "/state")
    sub, disk = config.pools
    assert (sub.type, sub.default_fs_type, sub.quota_mode, sub.thin) == (
        "subvolume", "btrfs", "full", True)
    assert (disk.volume_kind, disk.default_fs_type, disk.quota_mode) == (
        "subvolume", "btrfs", "full")
