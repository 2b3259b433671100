"""The publisher compares what the API server holds with what it would write by
meaning: canonical quantities, absent empty maps and the pool generation do not
count as a difference (else every round would write again)."""

from __future__ import annotations

from typing import Any

from device_plugin.slice_publisher import _same_content, quantity_value


def spec(generation: int, size: str, devices_key: bool = True) -> dict[str, Any]:
    device: dict[str, Any] = {
        "name": "loop-0123",
        "attributes": {"readOnly": {"bool": False, "int": None}},
        "capacity": {"size": {"value": size}},
    }
    out: dict[str, Any] = {"driver": "hostkit.io", "nodeName": "n1",
           "pool": {"name": "n1-loop", "generation": generation, "resourceSliceCount": 1}}
    if devices_key:
        out["devices"] = [device]
    return out


def test_quantities_compare_by_value():
    assert quantity_value("2Mi") == quantity_value("2097152") == 2097152
    assert quantity_value("1k") == 1000
    assert quantity_value("1500m") == 1.5
    assert quantity_value("odd") == "odd"


def test_same_content_ignores_canonical_forms_and_generation():
    assert _same_content(spec(1, "8388608"), spec(7, "8Mi"))
    assert not _same_content(spec(1, "8388608"), spec(1, "4Mi"))
    assert not _same_content(spec(1, "8Mi"), spec(1, "8Mi", devices_key=False))
    assert _same_content(spec(1, "8Mi", devices_key=False), {
        **spec(1, "8Mi", devices_key=False), "devices": None})
