"""Pool and device names are valid Kubernetes names and stable per unit."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from device_plugin.config import parse_config
from device_plugin.dra.devices import device_name, pool_name

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def test_unit_ids_become_dns_labels():
    assert device_name("ttyUSB-3f2a9c01d4") == "ttyusb-3f2a9c01d4"
    assert device_name("renderD-ab_cd.ef") == "renderd-ab-cd-ef"


@given(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", fullmatch=True))
def test_every_valid_unit_id_gives_a_dns_label(unit_id):
    name = device_name(unit_id)
    assert len(name) <= 63 and DNS_LABEL.fullmatch(name)


def test_the_pool_is_per_node_and_resource():
    config = parse_config({"resources": [{"name": "Serial_Ports", "match": [
        {"subsystem": "tty"}]}]})
    assert pool_name("node-1", config.resources[0]) == "node-1-serial-ports"
