"""Lab files with BGP: nodes with spec.bgp, racks behind ToRs, the external router."""

from pathlib import Path

import pytest
import yaml

from podnet.errors import ValidationError
from podnet.lab.spec import load_lab, parse_lab

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab" / "bgp.yaml"


def lab(spec):
    return parse_lab(yaml.safe_dump({"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": "t"},
                                     "spec": spec}), "t.yaml")


BASE = {"underlay": {"cidr": "10.99.0.0/24"}, "router": {"asNumber": 65000},
        "racks": [{"name": "r1", "cidr": "10.99.1.0/24", "asNumber": 65001},
                  {"name": "r2", "cidr": "10.99.2.0/24", "asNumber": "65002"}]}


def test_example_loads_with_racks_and_bgp_nodes():
    spec = load_lab(EXAMPLE)
    assert [r.name for r in spec.racks] == ["rack-a", "rack-b"] and spec.router.as_number == 65000
    nodes = {n.name: n for n in spec.nodes}
    assert nodes["a-1"].address == "10.99.5.11" and nodes["b-3"].address == "10.99.6.13"
    assert spec.segment(nodes["b-1"]) == ("10.99.6.0/24", "10.99.6.1")
    assert [spec.tor_address(r.name) for r in spec.racks] == ["10.99.4.2", "10.99.4.3"]
    node_objects = {n.name: n for n in spec.node_objects()}
    assert node_objects["a-1"].spec.bgp.route_reflector_cluster_id == "244.0.0.1"
    assert node_objects["a-2"].bgp_address == "10.99.5.12"


def test_nodes_on_underlay_and_racks_count_addresses_per_segment():
    spec = lab({**BASE, "nodes": [{"name": "u", "bgp": True}, {"name": "a", "rack": "r1"}, {"name": "b", "rack": "r1"},
                                  {"name": "c", "rack": "r2", "bgp": {"asNumber": 65100}}]})
    assert [(n.name, n.address, n.index) for n in spec.nodes] == [("u", "10.99.0.11", 1), ("a", "10.99.1.11", 2),
                                                                  ("b", "10.99.1.12", 3), ("c", "10.99.2.11", 4)]
    assert spec.nodes[0].bgp is not None and spec.nodes[1].bgp is None and spec.nodes[3].bgp.as_number == 65100


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({**BASE, "router": None, "nodes": [{"name": "a"}]}, "spec.racks", "racks need spec.router"),
    ({**BASE, "nodes": [{"name": "a", "rack": "r9"}]}, "spec.nodes[0].rack", "not in spec.racks"),
    ({**BASE, "racks": [BASE["racks"][0], BASE["racks"][0]], "nodes": [{"name": "a"}]}, "spec.racks[1].name",
     "listed twice"),
    ({**BASE, "racks": [{"name": "r1", "cidr": "10.99.0.0/25", "asNumber": 1}], "nodes": [{"name": "a"}]},
     "spec.racks[0].cidr", "overlaps"),
    ({**BASE, "racks": [{"name": "r1", "cidr": "10.99.1.0/24", "asNumber": 0}], "nodes": [{"name": "a"}]},
     "spec.racks[0].asNumber", "out of range"),
    ({**BASE, "router": {"asNumber": "x"}, "nodes": [{"name": "a"}]}, "spec.router.asNumber", "not an AS number"),
    ({**BASE, "nodes": [{"name": "a", "bgp": {"routeReflectorClusterID": "nope"}}]},
     "spec.nodes[0].bgp.routeReflectorClusterID", "not a cluster ID"),
    ({**BASE, "racks": [{"name": "r1", "cidr": "10.99.1.0/28", "asNumber": 1}],
      "nodes": [{"name": f"n{i}", "rack": "r1"} for i in range(5)]}, "spec.nodes", "do not fit rack r1"),
])
def test_bad_lab_bgp_names_the_field(spec, field, message):
    if spec.get("router") is None:
        spec = {k: v for k, v in spec.items() if k != "router"}
    with pytest.raises(ValidationError) as e:
        lab(spec)
    assert f"field {field}" in str(e.value) and message in str(e.value), str(e.value)
