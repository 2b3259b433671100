"""The demo says plainly what it could not run without root, and exits 2."""

from __future__ import annotations

import os

import pytest

from demo import cli


def test_demo_without_root_names_the_part_it_skipped(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status = cli.main(["--only", "csi"])
    out = capsys.readouterr().out
    assert status == 2
    assert "CSI driver part: not run (needs root" in out
    assert "0 failed, 1 not run" in out


def test_demo_rejects_unknown_part():
    with pytest.raises(SystemExit):
        cli.main(["--only", "nothing"])
