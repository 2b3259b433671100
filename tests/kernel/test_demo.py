"""The README's main job: the first-run demo runs end to end and leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from demo.csi_flow import leftovers


def test_demo_runs_every_step_and_leaves_nothing_behind():
    before = set(os.listdir("/tmp"))
    result = subprocess.run(
        [sys.executable, "-m", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 failed, 0 not run" in output
    for step in ("Allocate one unit", "CreateSnapshot", "expand online", "nothing left behind"):
        assert step in output, output
    new = [n for n in set(os.listdir("/tmp")) - before if n.startswith("hostkit-demo-")]
    assert new == [], f"demo left {new} in /tmp"
    assert leftovers("/tmp/hostkit-demo-") == []
