"""Route reflectors in a lab, with real BIRD: two reflectors (one cluster ID) and three clients,
the node-to-node mesh off, one BGPPeer selecting the reflectors.

- a client has one session per reflector (2, not n-1); a reflector has one with the other
  reflector and one per client; reflected routes keep the originating node as next hop;
- a node joining (its Node gets spec.bgp) converges: its block appears on every node; a
  node leaving (its Node deleted) has its block withdrawn everywhere and its BIRD stopped;
- one reflector down (its agent and BIRD killed): a block claimed meanwhile reaches the
  other client through the second reflector; the first comes back with its sessions.
"""

import ipaddress
import json
import os
import secrets
import signal

import pytest

from podnet.bgp.status import sessions
from podnet.lab import bgp as lab_bgp
from podnet.lab.cluster import restart_agent, wait_programmed
from podnet.model.objects import IPPool, Namespace, Node
from tests.kernel.labs import running_lab
from tests.kernel.test_lab_bgp import enable_bgp, serving_pod, stop_birds
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


def test_one_reflector_down_the_other_carries_a_new_block(lab):
    """The block comes from a pool of its own (named by its namespace's annotation), so n-2
    claims a new block for one pod."""
    suffix = secrets.token_hex(3)
    ns, pool = f"more-{suffix}", f"more-{suffix}"
    store = lab.store()
    rev, _ = store.apply([
        Namespace.model_validate({"metadata": {"name": ns, "labels": {"pool": pool},
                                               "annotations": {"podnet.io/ippools": json.dumps([pool])}}}),
        IPPool.model_validate({"metadata": {"name": pool},
                               "spec": {"cidr": "10.243.0.0/16", "blockSize": 26, "encapsulation": "None",
                                        "namespaceSelector": {"matchLabels": {"pool": pool}}}})])
    wait_programmed(lab.state, rev, 60)
    rr1 = lab_bgp.node_bird(lab.node("rr-1"))

    def while_rr1_is_down():
        os.kill(rr1.pid(), signal.SIGKILL)
        for n in CLIENTS[:2]:
            wait_until(lambda n=n: not next(s for s in sessions(ctl(lab, n)) if s.neighbor == address(lab, "rr-1"))
                       .established, f"{n}: the session with rr-1 down")
        with serving_pod(lab, "late-n-2", "n-2", ns) as (_, pod_ip):
            new_block = str(ipaddress.ip_network(f"{pod_ip}/26", strict=False))
            assert new_block.startswith("10.243.")
            r = wait_until(lambda: route_to(lab.node("n-1")["netns"], new_block), "n-1: n-2's new block through rr-2")
            assert r["protocol"] == "bird" and r["gateway"] == address(lab, "n-2"), r
            out = lab.exec("p-n-1", ["socat", "-T", "3", "-", f"TCP:{pod_ip}:8080"], input="")
            assert out.stdout.strip() == "late-n-2", out

    try:
        restart_agent(lab.state, "rr-1", kill=True, while_down=while_rr1_is_down)
        wait_until(lambda: established(ctl(lab, "rr-1"), peers=3), "rr-1 back with its 3 sessions", 60)
        for n in CLIENTS[:2]:
            wait_until(lambda n=n: established(ctl(lab, n), peers=2), f"{n}: both reflectors again", 60)
    finally:
        store.delete_all([IPPool.model_validate({"metadata": {"name": pool}, "spec": {"cidr": "10.243.0.0/16"}}),
                          Namespace.model_validate({"metadata": {"name": ns}})])
