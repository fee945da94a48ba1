"""Route reflectors in a lab, with real BIRD: two reflectors (one cluster ID) and three clients,
the node-to-node mesh off, one BGPPeer selecting the reflectors.

- a client has one session per reflector (2, not n-1); a reflector has one with the other
  reflector and one per client; reflected routes keep the originating node as next hop;
- a node joining (its Node gets spec.bgp) converges: its block appears on every node; a
  node leaving (its Node deleted) has its block withdrawn everywhere and its BIRD stopped.
"""

import ipaddress
import os

import pytest

from podnet.bgp.status import sessions
from podnet.lab import bgp as lab_bgp
from podnet.lab.cluster import wait_programmed
from podnet.model.objects import Node
from tests.kernel.labs import running_lab
from tests.kernel.test_lab_bgp import enable_bgp, stop_birds
from tests.support.bgp import established, route_to, wait_until

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

REFLECTORS = ("rr-1", "rr-2")
CLIENTS = ("n-1", "n-2", "n-3")
PORT = [{"containerPort": 8080}]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.97.20.0/24"}, "resyncSeconds": 5,
            "nodes": [{"name": n, "labels": {"route-reflector": "true"} if n in REFLECTORS else {}}
                      for n in (*REFLECTORS, *CLIENTS)],
            "pods": [{"name": f"p-{n}", "node": n, "ports": PORT} for n in CLIENTS],
            "manifests": [
                {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                 "spec": {"cidr": "10.242.0.0/16", "encapsulation": "None", "blockSize": 26}},
                {"apiVersion": "podnet.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
                 "spec": {"nodeToNodeMeshEnabled": False}},
                {"apiVersion": "podnet.io/v1", "kind": "BGPPeer", "metadata": {"name": "reflectors"},
                 "spec": {"peerSelector": {"matchLabels": {"route-reflector": "true"}}}},
            ]}
    with running_lab(spec, "bgprr", timeout=90) as lab:
        try:
            enable_bgp(lab, REFLECTORS, routeReflectorClusterID="244.0.0.1")
            enable_bgp(lab, CLIENTS[:2])  # n-3 joins in a test
            for n in REFLECTORS:
                wait_until(lambda n=n: established(ctl(lab, n), peers=3), f"{n}: 3 sessions", 60)
            for n in CLIENTS[:2]:
                wait_until(lambda n=n: established(ctl(lab, n), peers=2), f"{n}: 2 sessions", 60)
            yield lab
        finally:
            stop_birds(lab)


def ctl(lab, node):
    return lab_bgp.node_bird(lab.node(node)).ctl


def block(lab, node):
    pod_ip = lab.pod(f"p-{node}")["ips"][0]
    return str(ipaddress.ip_network(f"{pod_ip}/26", strict=False))


def address(lab, node):
    return lab.node(node)["address"]


def test_sessions_per_client_equal_the_reflectors(lab):
    rr_addresses = {address(lab, n) for n in REFLECTORS}
    for n in CLIENTS[:2]:
        found = sessions(ctl(lab, n))
        assert {s.neighbor for s in found} == rr_addresses and all(s.established for s in found)
    for n in REFLECTORS:
        assert len(sessions(ctl(lab, n))) == len(REFLECTORS) - 1 + 2  # the other reflector + the clients in BGP


def test_reflected_routes_keep_the_originator_as_next_hop(lab):
    r = wait_until(lambda: route_to(lab.node("n-1")["netns"], block(lab, "n-2")), "n-1 learnt n-2's block")
    assert r["protocol"] == "bird" and r["gateway"] == address(lab, "n-2")
    (res,) = lab.probe("p-n-1", [f"tcp:{lab.pod('p-n-2')['ips'][0]}:8080"], timeout=5)
    assert res["ok"] and res["name"] == "p-n-2", res


def test_a_node_joins_and_leaves(lab):
    b3 = block(lab, "n-3")
    others = [n for n in (*REFLECTORS, *CLIENTS[:2])]
    assert all(route_to(lab.node(n)["netns"], b3) is None for n in others)
    enable_bgp(lab, ["n-3"])
    wait_until(lambda: established(ctl(lab, "n-3"), peers=2), "n-3: a session with each reflector", 60)
    for n in others:
        wait_until(lambda n=n: (route_to(lab.node(n)["netns"], b3) or {}).get("gateway") == address(lab, "n-3"),
                   f"{n}: route to n-3's block")
    (res,) = lab.probe("p-n-1", [f"tcp:{lab.pod('p-n-3')['ips'][0]}:8080"], timeout=5)
    assert res["ok"] and res["name"] == "p-n-3", res

    n3 = lab_bgp.node_bird(lab.node("n-3"))
    store = lab.store()
    rev, _ = store.delete_all([store.get(Node, "n-3")])
    wait_programmed(lab.state, rev, 60)
    for n in others:
        wait_until(lambda n=n: route_to(lab.node(n)["netns"], b3) is None, f"{n}: n-3's block withdrawn")
    for n in REFLECTORS:
        wait_until(lambda n=n: len(sessions(ctl(lab, n))) == 3, f"{n}: n-3's session gone")
    wait_until(lambda: n3.pid() is None, "n-3's agent stopped its BIRD")
