"""The lab's data network (spec.dataNetwork) and how a pod's addresses are read from a merged
CNI result (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from podnet.errors import ValidationError
from podnet.lab.cluster import split_result
from podnet.lab.spec import load_lab, parse_lab

BASE = """
apiVersion: podnet.io/v1
kind: Lab
metadata: {name: mn}
spec:
  underlay: {cidr: 10.99.7.0/24}
  dataNetwork: DATA
  nodes: [{name: node-1}]
  manifests:
    - {apiVersion: podnet.io/v1, kind: IPPool, metadata: {name: pods}, spec: {cidr: 10.244.0.0/16}}
    - {apiVersion: podnet.io/v1, kind: IPPool, metadata: {name: global},
       spec: {cidr: 10.97.7.64/26, blockSize: 29, allowedUses: [Attachment]}}
"""


def lab(data: str):
    return parse_lab(BASE.replace("DATA", data), "mn.yaml")


def test_the_example_and_an_attachment_pool_on_the_data_network():
    spec = load_lab(Path(__file__).resolve().parents[2] / "examples" / "lab" / "multinet.yaml")
    assert spec.data_network is not None and spec.data_network.external is not None
    got = lab("{cidr: 10.97.7.0/24, external: {address: 10.97.7.1/24}}")
    assert got.data_network.cidr == "10.97.7.0/24"


@pytest.mark.parametrize("data, field, words", [
    ("{cidr: 10.99.7.0/25}", "spec.dataNetwork.cidr", "overlaps spec.underlay.cidr"),
    ("{cidr: 10.97.7.0/24, external: {address: 10.97.8.1/24}}", "spec.dataNetwork.external.address",
     "is not on the data network"),
    ("{cidr: 10.97.7.0/24, external: {address: 10.97.7.1/24, dns: true}}", "spec.dataNetwork.external.dns",
     "only spec.external serves DNS"),
    ("{cidr: 10.97.7.0/33}", "spec.dataNetwork.cidr", "not a valid CIDR"),
])
def test_bad_data_networks_name_the_field(data, field, words):
    with pytest.raises(ValidationError) as err:
        lab(data)
    assert f"field {field}" in str(err.value) and words in str(err.value), str(err.value)


def test_a_workload_pool_on_the_data_network_is_refused():
    text = BASE.replace("DATA", "{cidr: 10.97.7.0/24}").replace("allowedUses: [Attachment]", "natOutgoing: true")
    with pytest.raises(ValidationError, match="pool 10.97.7.64/26 overlaps spec.dataNetwork.cidr"):
        parse_lab(text, "mn.yaml")


def test_split_result_keeps_eth0s_addresses_apart_from_the_additional_networks():
    result = {"interfaces": [{"name": "pn1"}, {"name": "eth0", "sandbox": "/run/netns/p"},
                             {"name": "net1", "sandbox": "/run/netns/p"}],
              "ips": [{"address": "10.244.0.5/32", "interface": 1}, {"address": "10.97.7.70/24", "interface": 2}]}
    assert split_result(result, "eth0") == (["10.244.0.5"], {"net1": ["10.97.7.70"]})
    plain = {"interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [{"address": "10.244.0.6/32"}]}
    assert split_result(plain, "eth0") == (["10.244.0.6"], {})
