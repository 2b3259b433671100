"""The leak check the session ends with sees what a run can leave behind."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from plugin_runtime import commands
from tests.e2e import host


def test_leak_check_reports_a_process_a_mount_and_a_cgroup(e2e_binaries):
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="hke-leak-"))
    name = directory.name
    (directory / "mnt").mkdir()
    proc = subprocess.Popen(["sh", "-c", "sleep 60", str(directory)])
    try:
        commands.run(["mount", "-t", "tmpfs", "none", str(directory / "mnt")], timeout=10)
        host.create_cgroup_root(name)
        footprint = host.Footprint(run=name, directory=directory, cgroup_root=name)
        leaks = footprint.leaks()
        assert any(f"process {proc.pid}:" in leak for leak in leaks), leaks
        assert f"mount {directory / 'mnt'}" in leaks
        assert any(leak.startswith("cgroup ") and leak.endswith(name) for leak in leaks)
        assert f"directory {directory}" in leaks
    finally:
        proc.kill()
        proc.wait(10)
        host.unmount_under(directory)
        host.remove_cgroup_root(name)
        shutil.rmtree(directory)
    assert host.Footprint(run=name, directory=directory, cgroup_root=name).leaks() == []
