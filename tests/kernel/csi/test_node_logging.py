"""What the driver's log says about the node operations of one volume.

An operator chasing a pod stuck in ContainerCreating reads the node's log at
the default level: every NodeStage/NodePublish/NodeUnpublish/NodeUnstage that
changed something is one INFO line (volume ID, path, device or bind source,
filesystem, duration); a repeat that changes nothing (the kubelet retries and
re-syncs all the time) is one DEBUG line.  The lines of one full cycle are
pinned here, read from the real driver's JSON log.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.grpc.csi.driver_harness import KubeletLayout, MiB, cap_for, running_driver

MS = r"\d+\.\d ms"


def _node_lines(log_text: str, volume_id: str) -> list[tuple[str, str]]:
    lines = []
    for raw in log_text.splitlines():
        if not raw.startswith("{"):
            continue  # the harness's own start markers
        entry = json.loads(raw)
        if entry["logger"] == "csi_driver.node_volumes" and entry.get("volume_id") == volume_id \
                and entry["msg"].startswith("Node"):
            lines.append((entry["level"], entry["msg"]))
    return lines


@pytest.mark.parametrize("kind", ["mount", "block"])
def test_one_cycle_logs_each_change_once_at_info_and_repeats_at_debug(kind):
    with running_driver(extra_args=("--log-level", "debug", "--log-format", "json")) as driver:
        csi = driver.csi()
        volume = csi.create(f"logged-{kind}", 32 * MiB, kind=kind, fs_type="ext4")
        vid = volume.volume_id
        staging, target = KubeletLayout(driver.kubelet_root).paths(kind, vid, "pv-log", "pod-l")
        cap = cap_for(kind)
        for _ in range(2):  # the second call of each is a repeat that changes nothing
            csi.stage(vid, staging, cap)
        for _ in range(2):
            csi.publish(vid, staging, target, cap)
        for _ in range(2):
            csi.unpublish(vid, target)
        for _ in range(2):
            csi.unstage(vid, staging)
        csi.delete(vid)
        lines = _node_lines(driver.log_path.read_text(), vid)

    fs = "ext4" if kind == "mount" else "raw block"
    device = r"/dev/loop\d+"
    source = re.escape(staging) if kind == "mount" else device
    q = re.escape
    expected = [
        ("info", rf"NodeStageVolume: volume {vid} staged at {q(staging)} "
                 rf"\(device ({device}), {fs}\) in {MS}"),
        ("debug", rf"NodeStageVolume: volume {vid} already staged at {q(staging)} "
                  rf"\(device {device}, {fs}\) - nothing to do, {MS}"),
        ("info", rf"NodePublishVolume: volume {vid} published at {q(target)} "
                 rf"\(bind of {source}, {fs}, read-write\) in {MS}"),
        ("debug", rf"NodePublishVolume: volume {vid} already published at {q(target)} "
                  rf"\(bind of {source}, {fs}, read-write\) - nothing to do, {MS}"),
        ("info", rf"NodeUnpublishVolume: volume {vid} unpublished from {q(target)} in {MS}"),
        ("debug", rf"NodeUnpublishVolume: volume {vid} already unpublished from {q(target)} "
                  rf"- nothing to do, {MS}"),
        ("info", rf"NodeUnstageVolume: volume {vid} unstaged from {q(staging)} "
                 rf"\(detached {device}\) in {MS}"),
        ("debug", rf"NodeUnstageVolume: volume {vid} already unstaged from {q(staging)} "
                  rf"\(no device attached\) - nothing to do, {MS}"),
    ]
    assert len(lines) == len(expected), "\n".join(f"{lv} {msg}" for lv, msg in lines)
    for (level, message), (want_level, pattern) in zip(lines, expected, strict=True):
        assert level == want_level and re.fullmatch(pattern, message), (level, message, pattern)
    # Every line names the same device: the one the stage attached.
    devices = {m.group(0) for _, msg in lines if (m := re.search(device, msg))}
    assert len(devices) == 1, devices
