"""parse_claim: the driver's view of a ResourceClaim, and the errors that name a bad field."""

from __future__ import annotations

import pytest

from device_plugin.dra.claims import parse_claim
from plugin_runtime.errors import InvalidArgument

META = {"namespace": "ns", "name": "c", "uid": "u-1"}


def test_an_unallocated_claim():
    claim = parse_claim({"metadata": META, "status": {}})
    assert (claim.namespace, claim.name, claim.uid, claim.allocated) == ("ns", "c", "u-1", False)


def test_results_and_configs():
    claim = parse_claim({"metadata": META, "status": {
        "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-1"}],
        "allocation": {"devices": {
            "results": [
                {"request": "gpu/small", "driver": "d.io", "pool": "p", "device": "a",
                 "shareID": "s-1", "adminAccess": True},
                {"request": "other", "driver": "e.io", "pool": "q", "device": "b"},
            ],
            "config": [
                {"source": "FromClass", "requests": [], "opaque": {"driver": "d.io",
                                                                   "parameters": {"x": 1}}},
                {"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": "d.io"}},
                {"source": "FromClaim", "requests": ["other"], "opaque": {"driver": "d.io"}},
                {"source": "FromClaim", "requests": []},
            ],
        }},
    }})
    assert claim.allocated
    (mine,) = claim.results_for("d.io")
    assert (mine.request, mine.base_request, mine.share_id, mine.admin_access) == (
        "gpu/small", "gpu", "s-1", True)
    assert [c.source for c in claim.configs_for("d.io", mine)] == ["FromClass", "FromClaim"]
    assert claim.configs_for("e.io", claim.results[1]) == ()


@pytest.mark.parametrize(("obj", "named"), [
    ({"metadata": {"name": "c", "uid": "u"}}, "metadata.namespace"),
    ({"metadata": META, "status": {"allocation": {"devices": {"results": [
        {"request": "r", "driver": "d", "pool": "p"}]}}}},
     "status.allocation.devices.results[0].device"),
    ({"metadata": META, "status": {"allocation": {"devices": {"results": "x"}}}},
     "status.allocation.devices.results"),
    ({"metadata": META, "status": []}, "status"),
])
def test_a_malformed_claim_names_the_field(obj, named):
    with pytest.raises(InvalidArgument, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_claim(obj)
