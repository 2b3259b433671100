"""mkfs of fresh image files: which e2fsprogs can mark the inode tables as zeroed."""

from __future__ import annotations

import pytest

from csi_driver.pools.imagefile import image_mkfs_argv, mke2fs_version


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0\n", (1, 47, 0)),
        ("mke2fs 1.46.5 (30-Dec-2021)\n\tUsing EXT2FS Library version 1.46.5\n", (1, 46, 5)),
        ("mke2fs 1.47.2-rc1 (1-Jan-2025)\n", (1, 47, 2)),
        ("mke2fs: invalid option -- 'V'\n", None),
        ("", None),
    ],
)
def test_mke2fs_version_is_read_from_its_banner(text: str, version: tuple[int, ...] | None):
    assert mke2fs_version(text) == version


def test_ext4_images_are_marked_prezeroed_when_mke2fs_can():
    marked = image_mkfs_argv("/p/v.img", "ext4")
    assert marked[-1] == "/p/v.img"
    assert "assume_storage_prezeroed=1" in marked[marked.index("-E") + 1].split(",")
    plain = image_mkfs_argv("/p/v.img", "ext4", prezeroed=False)
    assert "assume_storage_prezeroed" not in " ".join(plain)
    assert "nodiscard" in plain[plain.index("-E") + 1]
    # xfs and btrfs have no lazily zeroed tables: the flag changes nothing for them.
    assert image_mkfs_argv("/p/v.img", "xfs") == image_mkfs_argv("/p/v.img", "xfs",
                                                                prezeroed=False)
