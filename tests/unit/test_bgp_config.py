"""A node's BGP configuration (mesh, route reflectors, explicit peers, routes) and BIRD's text for it.

The rendered text is checked by BIRD itself (`bird -p`, no root needed)."""

import shutil
import subprocess

import pytest

from podnet.agent.view import BlockRecord
from podnet.bgp.config import compile_node
from podnet.bgp.render import quoted, render, symbol
from podnet.model.objects import BGPConfiguration, BGPPeer, IPPool, Node

BIRD = shutil.which("bird") or "/usr/sbin/bird"


def node(name, ip, labels=None, **bgp):
    return Node.model_validate({"metadata": {"name": name, "labels": labels or {}}, "spec": {"bgp": bgp},
                                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


def plain_node(name, ip):
    return Node.model_validate({"metadata": {"name": name},
                                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


def pool(name, cidr, encap="None", **extra):
    return IPPool.model_validate({"metadata": {"name": name},
                                  "spec": {"cidr": cidr, "encapsulation": encap, "blockSize": 26, **extra}})


def config(**spec):
    return BGPConfiguration.model_validate({"metadata": {"name": "default"}, "spec": spec})


def bgppeer(name, **spec):
    return BGPPeer.model_validate({"metadata": {"name": name}, "spec": spec})


POOLS = [pool("global", "10.244.0.0/16"), pool("private", "10.245.0.0/16", disableBGPExport=True),
         pool("overlay", "10.246.0.0/16", encap="VXLAN")]


def three(**extra):
    return [node("a", "10.0.0.11", **extra), node("b", "10.0.0.12"), node("c", "10.0.0.13")]


def bird_accepts(text, tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(text)
    proc = subprocess.run([BIRD, "-p", "-c", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\n" + text


def test_node_without_spec_bgp_runs_no_bgp():
    assert compile_node("a", [plain_node("a", "10.0.0.11")], None, [], POOLS, []) is None
    assert compile_node("x", three(), None, [], POOLS, []) is None


def test_full_mesh_one_side_opens(tmp_path):
    nodes = three()
    cfgs = {n.name: compile_node(n.name, nodes, None, [], POOLS, []) for n in nodes}
    a = cfgs["a"]
    assert a.router_id == "10.0.0.11" and a.asn == 64512 and a.listen_port == 179
    assert [(p.name, p.passive, p.cluster) for p in a.peers] == [("Mesh_10_0_0_12", True, True),
                                                                 ("Mesh_10_0_0_13", True, True)]
    assert [p.passive for p in cfgs["c"].peers] == [False, False]  # the lower address opens
    # every pair has exactly one active side
    for x in nodes:
        for p in cfgs[x.name].peers:
            other = next(q for q in cfgs[{"10.0.0.11": "a", "10.0.0.12": "b", "10.0.0.13": "c"}[p.address]].peers
                         if q.address == x.bgp_address)
            assert p.passive != other.passive
    for c in cfgs.values():
        bird_accepts(render(c, str(tmp_path / "bird.log")), tmp_path)


def test_mesh_off_and_non_bgp_nodes_skipped():
    nodes = [*three(), plain_node("d", "10.0.0.14")]
    a = compile_node("a", nodes, config(nodeToNodeMeshEnabled=False), [], POOLS, [])
    assert a.peers == ()
    a = compile_node("a", nodes, None, [], POOLS, [])
    assert "10.0.0.14" not in {p.address for p in a.peers}


def reflectors(n_clients=4, k=2):
    rrs = [node(f"rr{i}", f"10.0.0.{i + 1}", {"route-reflector": "true"}, routeReflectorClusterID="244.0.0.1")
           for i in range(k)]
    clients = [node(f"n{i}", f"10.0.1.{i + 1}") for i in range(n_clients)]
    peers = [bgppeer("to-rr", peerSelector={"matchLabels": {"route-reflector": "true"}})]
    return rrs, clients, peers


def test_route_reflectors_sessions_per_client_equal_reflectors(tmp_path):
    rrs, clients, peers = reflectors()
    nodes = rrs + clients
    cfg = config(nodeToNodeMeshEnabled=False)
    for c in clients:
        got = compile_node(c.name, nodes, cfg, peers, POOLS, [])
        assert [p.name for p in got.peers] == ["Node_10_0_0_1", "Node_10_0_0_2"]
        assert not any(p.rr_client for p in got.peers)
        bird_accepts(render(got), tmp_path)
    rr = compile_node("rr0", nodes, cfg, peers, POOLS, [])
    assert rr.cluster_id == "244.0.0.1"
    by_addr = {p.address: p for p in rr.peers}
    assert len(rr.peers) == len(nodes) - 1  # the other reflector and every client (reverse peering)
    assert not by_addr["10.0.0.2"].rr_client  # same cluster ID: a plain iBGP peer
    assert all(by_addr[c.bgp_address].rr_client for c in clients)
    text = render(rr)
    assert text.count("rr client;") == len(clients) and "rr cluster id 244.0.0.1;" in text
    bird_accepts(text, tmp_path)


def test_reflectors_leave_the_mesh_and_clients_mesh_among_themselves():
    rrs, clients, peers = reflectors(n_clients=3)
    nodes = rrs + clients
    rr = compile_node("rr0", nodes, None, peers, POOLS, [])
    assert not any(p.kind == "Mesh" for p in rr.peers)
    c = compile_node("n0", nodes, None, peers, POOLS, [])
    assert sorted(p.name for p in c.peers) == ["Mesh_10_0_1_2", "Mesh_10_0_1_3", "Node_10_0_0_1", "Node_10_0_0_2"]


def test_explicit_external_peer_by_node_selector(tmp_path):
    nodes = [node("a", "10.0.0.11", {"rack": "r1"}), node("b", "10.0.1.11", {"rack": "r2"})]
    peers = [bgppeer("tor-r1", peerIP="10.0.0.1", asNumber=65001, nodeSelector="rack=r1", password="pw-1",
                     maxRestartTime="300s"),
             bgppeer("edge", peerIP="192.0.2.1:1790", asNumber=65000, keepOriginalNextHop=True)]
    a = compile_node("a", nodes, None, peers, POOLS, [])
    b = compile_node("b", nodes, None, peers, POOLS, [])
    tor = next(p for p in a.peers if p.address == "10.0.0.1")
    assert (tor.name, tor.asn, tor.cluster, tor.password, tor.restart_time) == ("Node_10_0_0_1", 65001, False,
                                                                                "pw-1", 300)
    assert "10.0.0.1" not in {p.address for p in b.peers}
    edge = next(p for p in b.peers if p.address == "192.0.2.1")
    assert (edge.name, edge.port, edge.keep_next_hop, edge.kind) == ("Global_192_0_2_1_port_1790", 1790, True,
                                                                     "Global")
    text = render(a)
    assert 'password "pw-1";' in text and "graceful restart time 300;" in text
    assert "import filter podnet_external_import; export filter podnet_external_export;" in text
    bird_accepts(text, tmp_path)
    bird_accepts(render(b), tmp_path)


def test_peer_ip_of_a_cluster_node_is_a_cluster_peer():
    nodes = three()
    a = compile_node("a", nodes, config(nodeToNodeMeshEnabled=False),
                     [bgppeer("to-b", peerIP="10.0.0.12", asNumber=64512, node="a")], POOLS, [])
    assert [(p.name, p.cluster) for p in a.peers] == [("Node_10_0_0_12", True)]


def test_blocks_borrowed_addresses_and_pools():
    blocks = [BlockRecord("10.244.1.0/26", "global", "a", ((3, "b"),)),  # b borrowed .3 from a's block
              BlockRecord("10.244.2.0/26", "global", "b", ((5, "a"),)),  # a borrowed .5 from b's block
              BlockRecord("10.245.0.0/26", "private", "a", ()),
              BlockRecord("10.246.0.0/26", "overlay", "a", ()),
              BlockRecord("10.247.0.0/26", "gone", "a", ()),  # its pool was deleted
              BlockRecord("10.244.3.0/26", "global", "c", ())]
    a = compile_node("a", three(), config(serviceClusterIPs=[{"cidr": "10.96.0.0/16"}]), [], POOLS, blocks)
    assert a.blocks == ("10.244.1.0/26", "10.245.0.0/26", "10.246.0.0/26")
    assert a.borrowed == ("10.244.2.5/32",)
    assert a.services == ("10.96.0.0/16",)
    assert a.cluster_pools == ("10.244.0.0/16", "10.245.0.0/16")  # BGP routes only pools without encapsulation
    assert a.export_pools == ("10.244.0.0/16", "10.246.0.0/16")  # disableBGPExport keeps a pool in
    text = render(a)
    assert "route 10.244.1.0/26 blackhole;" in text and "route 10.244.2.5/32 blackhole;" in text
    assert "route 10.244.3.0/26" not in text
    assert "return net ~ [ 10.244.1.0/26, 10.245.0.0/26, 10.246.0.0/26 ];" in text  # own blocks, exactly


def test_render_is_deterministic_and_ordered():
    nodes = three()
    blocks = [BlockRecord("10.244.9.0/26", "global", "a", ()), BlockRecord("10.244.1.0/26", "global", "a", ())]
    one = render(compile_node("a", nodes, None, [], POOLS, blocks))
    two = render(compile_node("a", list(reversed(nodes)), None, [], list(reversed(POOLS)), list(reversed(blocks))))
    assert one == two
    assert one.index("10.244.1.0/26 blackhole") < one.index("10.244.9.0/26 blackhole")


def test_communities_and_listen_port(tmp_path):
    cfg = config(listenPort=1790, asNumber=65010, communities=[{"name": "edge", "value": "65010:100"}],
                 prefixAdvertisements=[{"cidr": "10.244.0.0/16", "communities": ["edge", "65010:1:2"]}],
                 nodeMeshMaxRestartTime="90s")
    a = compile_node("a", three(), cfg, [], POOLS, [])
    text = render(a)
    assert "local 10.0.0.11 port 1790 as 65010;" in text and "neighbor 10.0.0.12 port 1790 as 65010;" in text
    assert "bgp_community.add((65010,100));" in text and "bgp_large_community.add((65010,1,2));" in text
    assert "graceful restart time 90;" in text
    bird_accepts(text, tmp_path)


def test_node_as_overrides_and_ebgp_between_nodes(tmp_path):
    nodes = [node("a", "10.0.0.11", asNumber=65101), node("b", "10.0.0.12", asNumber=65102)]
    a = compile_node("a", nodes, None, [], POOLS, [])
    assert a.asn == 65101 and a.peers[0].asn == 65102
    bird_accepts(render(a), tmp_path)


@pytest.mark.parametrize("bad", ['x"; protocol', "a\\b", "new\nline", "\x00"])
def test_strings_bird_cannot_hold_are_refused(bad):
    with pytest.raises(ValueError):
        quoted(bad)


@pytest.mark.parametrize("bad", ["Mesh-1", "1abc", "a b", "x" * 65, "Mesh_1;"])
def test_symbols_are_checked(bad):
    with pytest.raises(ValueError):
        symbol(bad)


def test_a_large_mesh_renders_one_protocol_per_other_node():
    nodes = [node(f"n{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256 + 1 if i % 256 < 254 else 1}")
             for i in range(2000)]
    nodes = list({n.bgp_address: n for n in nodes}.values())
    cfg = compile_node(nodes[0].name, nodes, None, [], POOLS, [])
    text = render(cfg)
    assert len(cfg.peers) == len(nodes) - 1 and text.count("protocol bgp ") == len(nodes) - 1


def test_routes_dataplane_leaves_direct_pools_to_bird_on_a_bgp_node():
    from podnet.dataplane.routing import BlockOwner, Borrowed, desired_routing

    blocks = [BlockOwner("10.244.1.0/26", "a", "None"), BlockOwner("10.244.2.0/26", "b", "None"),
              BlockOwner("10.246.2.0/26", "b", "VXLAN")]
    borrowed = [Borrowed("10.244.1.9", "b", "None")]
    ips = {"a": "10.0.0.11", "b": "10.0.0.12"}
    plain = desired_routing("a", blocks, borrowed, ips, True)
    bgp = desired_routing("a", blocks, borrowed, ips, True, bgp=True)
    assert {(r.dst, r.kind) for r in plain.routes} == {("10.244.1.0/26", "blackhole"), ("10.244.2.0/26", "direct"),
                                                       ("10.246.2.0/26", "vxlan"), ("10.244.1.9/32", "direct")}
    assert {(r.dst, r.kind) for r in bgp.routes} == {("10.244.1.0/26", "blackhole"), ("10.246.2.0/26", "vxlan")}
