"""BGP objects: Calico's field names and defaults; a bad one is refused naming the object and field."""

import pytest

from podnet.model.bgp import check_as_number, parse_duration, split_peer_ip
from podnet.model.manifests import parse_documents
from podnet.model.objects import BGPConfiguration, BGPPeer, IPPool, Node


def load(text):
    objects, errors = parse_documents(text, "bgp.yaml")
    return objects, [str(e) for e in errors]


def peer(spec, name="tor"):
    return f"apiVersion: podnet.io/v1\nkind: BGPPeer\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def test_configuration_defaults_are_calicos():
    (cfg,), errors = load("apiVersion: podnet.io/v1\nkind: BGPConfiguration\nmetadata: {name: default}\n")
    assert not errors
    assert isinstance(cfg, BGPConfiguration)
    assert cfg.spec.as_number == 64512
    assert cfg.spec.node_to_node_mesh_enabled is True
    assert cfg.spec.listen_port == 179
    assert cfg.spec.service_cluster_ips == []


def test_configuration_fields_round_trip_with_upstream_names():
    text = """apiVersion: podnet.io/v1
kind: BGPConfiguration
metadata: {name: default}
spec:
  asNumber: 65001
  nodeToNodeMeshEnabled: false
  listenPort: 1790
  nodeMeshMaxRestartTime: 2m
  serviceClusterIPs: [{cidr: 10.96.0.0/16}]
  serviceExternalIPs: [{cidr: 192.0.2.0/24}]
  serviceLoadBalancerIPs: [{cidr: 198.51.100.0/24}]
  communities: [{name: edge, value: "65001:100"}]
  prefixAdvertisements: [{cidr: 10.244.0.0/16, communities: [edge, "1:2:3"]}]
"""
    (cfg,), errors = load(text)
    assert not errors
    d = cfg.to_dict()["spec"]
    assert d["serviceClusterIPs"] == [{"cidr": "10.96.0.0/16"}]
    assert d["nodeMeshMaxRestartTime"] == "2m"
    assert cfg.spec.service_cidrs == ["10.96.0.0/16", "192.0.2.0/24", "198.51.100.0/24"]
    assert cfg.spec.community_values(cfg.spec.prefix_advertisements[0]) == [(65001, 100), (1, 2, 3)]


def test_node_bgp_and_pool_export_flag():
    (node, pool), errors = load("""apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {bgp: {asNumber: 65010, ipv4Address: 10.0.0.5/24, routeReflectorClusterID: 244.0.0.1}}
status: {addresses: [{type: InternalIP, address: 10.0.0.9}]}
---
apiVersion: podnet.io/v1
kind: IPPool
metadata: {name: p}
spec: {cidr: 10.244.0.0/16, encapsulation: "None", disableBGPExport: true}
""")
    assert not errors
    assert isinstance(node, Node) and isinstance(pool, IPPool)
    assert node.bgp_address == "10.0.0.5"  # spec.bgp.ipv4Address wins over the InternalIP
    assert node.spec.bgp.route_reflector_cluster_id == "244.0.0.1"
    assert node.to_dict()["spec"]["bgp"]["routeReflectorClusterID"] == "244.0.0.1"
    assert pool.spec.disable_bgp_export and pool.to_dict()["spec"]["disableBGPExport"] is True


def test_node_without_bgp_has_no_bgp_address():
    n = Node.model_validate({"metadata": {"name": "n"}, "status": {"addresses": [{"type": "InternalIP",
                                                                                   "address": "10.0.0.1"}]}})
    assert n.bgp_address is None
    n = Node.model_validate({"metadata": {"name": "n"}, "spec": {"bgp": {}},
                             "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}})
    assert n.bgp_address == "10.0.0.1"


def test_peers_parse():
    (a, b, c), errors = load(peer("{peerIP: '10.0.0.1:1790', asNumber: 65000, password: 's3cret', "
                                  "maxRestartTime: 300s, nodeSelector: 'rack=a'}")
                             + "---\n" + peer("{peerSelector: {matchLabels: {rr: 'true'}}}", "rr")
                             + "---\n" + peer("{node: node-1, peerIP: 10.0.0.2, asNumber: '1.10'}", "n1"))
    assert not errors
    assert isinstance(a, BGPPeer)
    assert a.spec.peer_address == ("10.0.0.1", 1790)
    assert a.spec.node_selector.matches({"rack": "a"}) and not a.spec.node_selector.matches({"rack": "b"})
    assert b.spec.peer_selector.matches({"rr": "true"})
    assert c.spec.as_number == 65546 and c.spec.peer_address == ("10.0.0.2", None)


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("{peerIP: 10.0.0.1, asNumber: 4294967296}", "spec.asNumber", "out of range: expected 1-4294967295"),
    ("{peerIP: 10.0.0.1, asNumber: 0}", "spec.asNumber", "out of range"),
    ("{peerIP: 10.0.0.1, asNumber: seven}", "spec.asNumber", "not an AS number"),
    ("{peerIP: 10.0.0.1, asNumber: true}", "spec.asNumber", "not an AS number"),
    ("{peerIP: 10.0.0.1}", "spec.peerIP", "peerIP needs asNumber"),
    ("{peerIP: 'fd00::1', asNumber: 1}", "spec.peerIP", "only IPv4"),
    ("{peerIP: 10.0.0.1.5, asNumber: 1}", "spec.peerIP", "not an IPv4 address"),
    ("{peerIP: '10.0.0.1:0', asNumber: 1}", "spec.peerIP", "port must be 1-65535"),
    ("{node: a}", "spec", "set one of peerIP"),
    ("{peerIP: 10.0.0.1, asNumber: 1, peerSelector: {}}", "spec.peerSelector", "exactly one"),
    ("{asNumber: 1, peerSelector: {}}", "spec.peerSelector", "asNumber goes with peerIP"),
    ("{node: a, nodeSelector: {}, peerSelector: {}}", "spec.nodeSelector", "set one or neither"),
    ("{peerIP: 10.0.0.1, asNumber: 1, password: 'a\"b'}", "spec.password", "printable ASCII"),
    ("{peerIP: 10.0.0.1, asNumber: 1, password: \"a\\nb\"}", "spec.password", "printable ASCII"),
    ("{peerIP: 10.0.0.1, asNumber: 1, maxRestartTime: 2 hours}", "spec.maxRestartTime", "not a duration"),
    ("{peerIP: 10.0.0.1, asNumber: 1, maxRestartTime: 2h}", "spec.maxRestartTime", "out of range"),
    ("{peerIP: 10.0.0.1, asNumber: 1, sourceAddress: Loopback}", "spec.sourceAddress", "UseNodeIP"),
    ("{peerIP: 10.0.0.1, asNumber: 1, keepNextHop: true}", "spec.keepNextHop", "unknown field"),
])
def test_bad_peer_names_object_and_field(spec, field, message):
    objects, errors = load(peer(spec))
    assert not objects and len(errors) == 1
    assert errors[0].startswith("bgp.yaml: document 0 (BGPPeer/tor)")
    assert f"field {field}:" in errors[0]
    assert message in errors[0]


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("{asNumber: 99999999999}", "spec.asNumber", "out of range"),
    ("{listenPort: 0}", "spec.listenPort", "out of range"),
    ("{serviceClusterIPs: [{cidr: 10.96.0.1/16}]}", "spec.serviceClusterIPs[0].cidr", "not a valid CIDR"),
    ("{serviceClusterIPs: [{cidr: 'fd00::/108'}]}", "spec.serviceClusterIPs[0].cidr", "only IPv4"),
    ("{communities: [{name: a, value: '70000:1'}]}", "spec.communities[0].value", "0-65535"),
    ("{communities: [{name: A, value: '1:1'}]}", "spec.communities[0].name", "lowercase"),
    ("{prefixAdvertisements: [{cidr: 10.0.0.0/8, communities: [nope]}]}", "spec", "neither a name"),
])
def test_bad_configuration_names_field(spec, field, message):
    _, errors = load(f"apiVersion: podnet.io/v1\nkind: BGPConfiguration\nmetadata: {{name: default}}\nspec: {spec}\n")
    assert len(errors) == 1
    assert "(BGPConfiguration/default)" in errors[0] and f"field {field}:" in errors[0] and message in errors[0]


@pytest.mark.parametrize(("bgp", "field"), [
    ("{asNumber: -1}", "spec.bgp.asNumber"),
    ("{ipv4Address: 'fd00::1'}", "spec.bgp.ipv4Address"),
    ("{routeReflectorClusterID: rr-1}", "spec.bgp.routeReflectorClusterID"),
])
def test_bad_node_bgp(bgp, field):
    _, errors = load(f"apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nspec: {{bgp: {bgp}}}\n")
    assert len(errors) == 1 and "(Node/n1)" in errors[0] and f"field {field}:" in errors[0]


def test_helpers():
    assert check_as_number("65000") == 65000
    assert check_as_number("1.0") == 65536
    with pytest.raises(ValueError, match="asdot parts"):
        check_as_number("70000.1")
    assert parse_duration("1h30m", "t") == 5400
    assert parse_duration("500ms", "t") == 0.5
    assert split_peer_ip("192.0.2.1:179") == ("192.0.2.1", 179)
