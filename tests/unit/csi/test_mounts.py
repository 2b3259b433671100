"""mountinfo parsing and mount option validation (no root needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi_driver import mounts
from plugin_runtime.errors import InvalidArgument

# Captured from a real host (a stacked /dev/pts, cgroups, an ext4 root with
# super options), plus lines written the way the kernel writes them for a bind
# mount of a subdirectory, shared-subtree tags and escaped spaces/tabs/newlines.
FIXTURE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334460k,nr_inodes=3083615,mode=755
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard,resv_strict,resuid=65534
29 26 0:26 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
120 27 7:3 / /var/lib/k/pv/x/globalmount rw,noatime shared:55 master:7 \
- xfs /dev/loop3 rw,attr2,inode64,noquota
121 27 7:3 /vols/a /var/lib/k/pods/u/kubernetes.io~csi/pv\\040one/mount \
ro,nosuid,nodev shared:55 - xfs /dev/loop3 rw,attr2
122 27 7:4 / /mnt/tab\\011and\\012newline\\134slash rw,relatime unbindable - ext4 /dev/loop4 rw
123 27 0:50 / /mnt/empty rw - tmpfs none\\040src
"""


def test_parses_every_field_of_a_plain_line():
    entry = mounts.parse_mountinfo(FIXTURE)[3]
    assert entry == mounts.MountEntry(
        mount_id=27,
        parent_id=1,
        major=254,
        minor=0,
        root="/",
        mount_point="/",
        mount_options=("rw", "relatime"),
        optional_fields=("shared:1",),
        fs_type="ext4",
        source="/dev/vda",
        super_options=("rw", "discard", "resv_strict", "resuid=65534"),
    )


def test_bind_mount_of_a_subdirectory_keeps_its_root_and_unescapes_the_path():
    entries = mounts.parse_mountinfo(FIXTURE)
    bind = entries[7]
    assert bind.root == "/vols/a"
    assert bind.mount_point == "/var/lib/k/pods/u/kubernetes.io~csi/pv one/mount"
    assert bind.read_only
    assert (bind.major, bind.minor) == (7, 3)
    assert bind.optional_fields == ("shared:55",)
    assert entries[6].optional_fields == ("shared:55", "master:7")
    assert not entries[6].read_only


def test_unescapes_tab_newline_backslash_and_source():
    entries = mounts.parse_mountinfo(FIXTURE)
    assert entries[8].mount_point == "/mnt/tab\tand\nnewline\\slash"
    assert entries[8].optional_fields == ("unbindable",)
    assert entries[9].source == "none src"
    assert entries[9].super_options == ()


def test_find_mount_returns_the_top_of_a_stack_and_only_exact_paths():
    entries = mounts.parse_mountinfo(FIXTURE)
    top = mounts.find_mount("/dev/pts", entries)
    assert top is not None and top.mount_id == 29
    assert mounts.find_mount("/dev/pts/0", entries) is None
    assert mounts.find_mount("/dev/pts/", entries) is not None


def test_mounts_of_device_finds_the_mount_and_its_binds():
    entries = mounts.parse_mountinfo(FIXTURE)
    assert [e.mount_id for e in mounts.mounts_of_device(7, 3, entries)] == [120, 121]
    assert mounts.mounts_of_device(7, 9, entries) == []


def test_malformed_line_raises_value_error():
    with pytest.raises(ValueError, match="separator"):
        mounts.parse_mountinfo("1 2 0:1 / / rw shared:1 ext4 /dev/x rw\n")


def test_reads_this_process_mount_table():
    entries = mounts.read_mounts()
    assert mounts.find_mount("/", entries) is not None
    assert mounts.is_mountpoint("/proc")


def test_split_options_turns_flags_into_ms_bits_and_keeps_data():
    flags, data = mounts.split_options(["ro", "nosuid", "noatime", "nouuid", "data=ordered"])
    assert flags == mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NOATIME
    assert data == "nouuid,data=ordered"
    flags, _ = mounts.split_options(["ro", "rw", "noatime", "relatime"])
    assert flags == mounts.MS_RELATIME


@pytest.mark.parametrize(
    "options",
    [
        ["ro", "nosuid", "nodev", "noexec", "sync", "dirsync", "noatime", "nodiratime"],
        ["relatime", "strictatime", "lazytime", "rw", "defaults"],
        ["discard", "nouuid", "noquota", "usrquota", "grpquota", "prjquota", "inode64"],
        ["data=ordered", "data=writeback", "data=journal", "commit=30", "barrier", "nobarrier"],
        ['context="system_u:object_r:container_file_t:s0:c0,c1"'],
        ["context=system_u:object_r:container_file_t:s0", "compress=zstd:3", "ssd"],
        ["space_cache=v2", "errors=remount-ro", "logbsize=256k", "allocsize=64m"],
    ],
)
def test_allowed_options_pass(options):
    assert mounts.validate_mount_options(options) == options


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("loop", "loop"),
        ("offset=1024", "offset"),
        ("sizelimit=1", "sizelimit"),
        ("noatime,loop", "comma"),
        ('context="a,b",loop', "comma"),
        ('context="a', "quotes"),
        ("suid", "suid"),
        ("dev", "dev"),
        ("errors=panic", "errors=panic"),
        ("data=bogus", "data=bogus"),
        ("commit=1;2", "commit"),
        ("subvol=../other", "path"),
        ("context=../x", "path"),
        ("", "empty"),
        ("no atime", "whitespace"),
        ("x" * 300, "longer"),
        ("silent", "silent"),
    ],
)
def test_refused_options_are_named(option, named):
    with pytest.raises(InvalidArgument, match=named):
        mounts.validate_mount_options(["noatime", option])


def test_duplicates_are_dropped_and_allow_list_is_exported():
    assert mounts.validate_mount_options(["ro", "ro", "nouuid"]) == ["ro", "nouuid"]
    assert {"ro", "nouuid", "data=", "context="} <= mounts.ALLOWED_MOUNT_OPTIONS
    assert "loop" not in mounts.ALLOWED_MOUNT_OPTIONS


def test_mount_refuses_smuggled_options_before_calling_the_kernel():
    with pytest.raises(InvalidArgument, match="comma"):
        mounts.mount("/dev/null", "/nonexistent", "ext4", ["nouuid,loop"])


def test_selinux_context_with_commas_stays_one_data_option():
    label = 'context="system_u:object_r:container_file_t:s0:c0,c1"'
    flags, data = mounts.split_options(["nosuid", label, "nouuid"])
    assert flags == mounts.MS_NOSUID
    assert data == f"{label},nouuid"


def _kernel_escape(path: str) -> str:
    # What the kernel's seq_path/mangle does for mountinfo: octal for these bytes.
    return "".join(f"\\{ord(ch):03o}" if ch in " \t\n\\" else ch for ch in path)


@settings(max_examples=200, deadline=None)
@given(
    mount_point=st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=40,
    ).map(lambda s: "/" + s),
    root=st.sampled_from(["/", "/sub dir", "/a\\b"]),
)
def test_mount_points_round_trip_through_kernel_escaping(mount_point, root):
    line = (
        f"50 27 7:1 {_kernel_escape(root)} {_kernel_escape(mount_point)} rw,nosuid shared:3 "
        f"- ext4 /dev/loop1 rw\n"
    )
    (entry,) = mounts.parse_mountinfo(line)
    assert entry.mount_point == mount_point
    assert entry.root == root
    assert entry.optional_fields == ("shared:3",)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_validation_never_accepts_smuggling_or_paths(option):
    try:
        accepted = mounts.validate_mount_options([option])
    except InvalidArgument:
        return
    assert accepted == [option]
    unquoted = option.split('"')[0::2]
    assert all("," not in part for part in unquoted)
    assert ".." not in option and "/" not in option
    assert not any(ch.isspace() for ch in option)
    key = option.partition("=")[0]
    assert key not in {"loop", "offset", "sizelimit", "suid", "dev", "subvol", "user"}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
               max_size=40))
def test_escape_writes_paths_as_mountinfo_does(path):
    assert mounts.escape(path) == _kernel_escape(path)
