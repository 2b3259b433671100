"""CheckpointStore: atomic records per claim UID; damaged records are skipped, not fatal."""

from __future__ import annotations

import json

import pytest

from device_plugin.dra.checkpoint import CheckpointStore, PreparedClaim, PreparedDevice

CLAIM = PreparedClaim("u-1", "ns", "c", (
    PreparedDevice(("req",), "pool", "dev", ("v/claim=u-1-dev",), "share", False),), "/cdi/x.json")


def test_round_trip_and_remove(tmp_path):
    store = CheckpointStore(str(tmp_path / "claims"))
    assert store.get("u-1") is None
    store.put(CLAIM)
    assert store.get("u-1") == CLAIM
    assert list(store.all()) == [CLAIM]
    assert store.remove("u-1") is True
    assert store.remove("u-1") is False
    assert list(store.all()) == []


@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"uid": 1}).encode(),
                                     json.dumps({**CLAIM.as_dict(), "devices": [{}]}).encode()])
def test_a_damaged_record_is_treated_as_not_prepared(tmp_path, caplog, content):
    store = CheckpointStore(str(tmp_path))
    store.put(CLAIM)
    (tmp_path / "u-2.json").write_bytes(content)
    assert store.get("u-2") is None
    assert list(store.all()) == [CLAIM]
    assert "u-2" in caplog.text


def test_a_uid_that_is_not_a_uid_never_becomes_a_path(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for uid in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="is not a UID"):
            store.path(uid)
