"""The end-to-end tier's binary lookup: a missing binary is named, with how to get it."""

from __future__ import annotations

import lzma

import pytest

from tests.e2e import binaries


def test_missing_binaries_are_named_with_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTKIT_K8S_BIN", str(tmp_path))
    (tmp_path / "kubelet.xz").write_bytes(lzma.compress(b"#!/bin/sh\n"))
    with pytest.raises(binaries.Unavailable) as err:
        binaries.locate()
    message = str(err.value)
    assert str(tmp_path) in message and "kube-apiserver.xz" in message
    assert "kubelet.xz," not in message.split(". ", maxsplit=1)[0]  # present, so not listed
    assert "HOSTKIT_K8S_BIN" in message and "scripts/setup.sh" in message


def test_a_binary_is_decompressed_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTKIT_E2E_CACHE", str(tmp_path / "cache"))
    xz = tmp_path / "tool.xz"
    xz.write_bytes(lzma.compress(b"#!/bin/sh\necho hi\n"))
    first = binaries._decompressed(xz, binaries.cache_dir())
    assert first.read_bytes() == b"#!/bin/sh\necho hi\n" and first.stat().st_mode & 0o111
    mtime = first.stat().st_mtime_ns
    assert binaries._decompressed(xz, binaries.cache_dir()) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["tool"]
