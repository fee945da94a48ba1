"""BGP in a lab, with real BIRD and real packets: a full mesh of three nodes and a router
on the underlay's gateway (the external host's side).

- every node peers with the two others (one side opens each session) and the router;
  learnt routes are installed by BIRD (protocol bird), none by the agent, no VXLAN;
- pod-to-pod traffic crosses nodes; the external host reaches a global-pool pod by its
  own address (the pod sees the external address: no NAT) and not a pod of a pool
  with disableBGPExport; the router learns the Service range from every node;
- a block a node claims later (its first pod) is routable from every node and from
  the external host;
- an address a node borrowed from another node's block is announced as a /32 and
  reached at the borrowing node from the block's owner, a third node and outside;
- BIRD killed with SIGKILL and an agent killed and restarted: an established TCP
  connection keeps flowing (graceful restart), sessions and routes come back;
- a peer that never answers leaves the other sessions working; the node reports it
  in its health (CNI STATUS, the agent's /readyz), its metrics (sessions by state, per
  peer, routes per session) and `podnet bgp status` (exit 3).
"""

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import uuid
from contextlib import contextmanager

import pytest

from podnet.bgp.status import sessions
from podnet.lab import bgp as lab_bgp
from podnet.lab.cluster import AGENT_METRICS_PORT, agent_status, node_runtime, restart_agent, wait_programmed
from podnet.lab.runtime import RuntimeConf, k8s_args, result_ips
from podnet.model.bgp import NodeBGPSpec
from podnet.model.objects import BGPPeer, IPPool, Namespace, Node, ObjectMeta, Pod, PodSpec
from tests.kernel.labs import echo_connection, log_offsets, log_since, running_lab
from tests.kernel.test_agent_metrics import get, scrape, value
from tests.support.bgp import established, route_to, routes, wait_until

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

UNDERLAY = "10.97.10.0/24"
GATEWAY = "10.97.10.1"
EXTERNAL = "10.97.11.10/24"
ROUTER_AS = 65000
PORT = [{"name": "http", "containerPort": 8080}]


def manifests():
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "private", "labels": {"pool": "private"}}},
        {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "global"},
         "spec": {"cidr": "10.240.0.0/16", "encapsulation": "None", "blockSize": 26,
                  "namespaceSelector": {"matchExpressions": [{"key": "pool", "operator": "DoesNotExist"}]}}},
        {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "private"},
         "spec": {"cidr": "10.241.0.0/16", "encapsulation": "None", "blockSize": 26, "disableBGPExport": True,
                  "namespaceSelector": {"matchLabels": {"pool": "private"}}}},
        {"apiVersion": "podnet.io/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"serviceClusterIPs": [{"cidr": "10.96.0.0/16"}]}},
        {"apiVersion": "podnet.io/v1", "kind": "BGPPeer", "metadata": {"name": "gateway"},
         "spec": {"peerIP": GATEWAY, "asNumber": ROUTER_AS}},
    ]


def enable_bgp(lab, names, **bgp):
    """Give the nodes spec.bgp (as Calico's node does at start) and wait until every agent has it."""
    store = lab.store()
    rev = 0
    for name in names:
        node = store.get(Node, name)
        rev = store.update(node.model_copy(update={"spec": node.spec.model_copy(update={"bgp": NodeBGPSpec(**bgp)})}))
    wait_programmed(lab.state, rev, 60)


def ctl(lab, node):
    return lab_bgp.node_bird(lab.node(node)).ctl


def block_of(ip):
    return str(ipaddress.ip_network(f"{ip}/26", strict=False))


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": UNDERLAY}, "external": {"address": EXTERNAL}, "resyncSeconds": 5,
            "nodes": [{"name": "node-1"}, {"name": "node-2"}, {"name": "node-3"}],
            "pods": [{"name": "g-1", "node": "node-1", "ports": PORT},
                     {"name": "g-2", "node": "node-2", "ports": PORT},
                     {"name": "p-2", "namespace": "private", "node": "node-2", "ports": PORT}],
            "manifests": manifests()}
    with running_lab(spec, "bgp", timeout=90) as lab:
        try:
            ul = lab.state.data["underlay_netns"]
            lab_bgp.start_router(lab.state, "gateway", ul, GATEWAY, ROUTER_AS, [UNDERLAY])
            enable_bgp(lab, ["node-1", "node-2", "node-3"])
            for n in ("node-1", "node-2", "node-3"):
                wait_until(lambda n=n: established(ctl(lab, n), peers=3), f"{n}: 3 sessions Established", 60)
            yield lab
        finally:
            stop_birds(lab)


def stop_birds(lab):
    """The agents first (they would start BIRD again), then the BIRDs they leave running."""
    for n in lab.nodes:
        entry = lab.state.process(f"agent-{n['name']}")
        if entry is not None:
            lab.state.stop_process(entry)
    lab_bgp.stop_node_birds(lab.state)


def ip(lab, pod):
    return lab.pod(pod)["ips"][0]


def test_mesh_routes_are_birds_and_no_vxlan(lab):
    g1, g2 = ip(lab, "g-1"), ip(lab, "g-2")
    addresses = {n["name"]: n["address"] for n in lab.nodes}
    for n in lab.nodes:
        names = sorted(s.name for s in sessions(ctl(lab, n["name"])))
        others = sorted(f"Mesh_{a.replace('.', '_')}" for m, a in addresses.items() if m != n["name"])
        assert names == sorted([*others, f"Global_{GATEWAY.replace('.', '_')}"])
        for pod_ip, owner in ((g1, "node-1"), (g2, "node-2")):
            # Established sessions exchange their routes a moment later: wait for the route
            r = wait_until(lambda n=n, pod_ip=pod_ip, owner=owner: (
                x if (x := route_to(n["netns"], block_of(pod_ip))) and (owner == n["name"] or x.get("protocol") == "bird")
                else None), f"{n['name']}: the route to {pod_ip}'s block")
            if owner == n["name"]:
                assert r["type"] == "blackhole"  # the agent's own blackhole for its block
            else:
                assert r["protocol"] == "bird" and r["gateway"] == addresses[owner], r
        assert not [r for r in routes(n["netns"]) if r.get("protocol") == "88" and r.get("type") != "blackhole"]
        link = subprocess.run(["ip", "-n", n["netns"], "link", "show", "pn-vxlan"], capture_output=True)
        assert link.returncode != 0  # no VXLAN device at all
    # one TCP connection per pair: the lower address opens
    s1 = {s.neighbor: s for s in sessions(ctl(lab, "node-1"))}
    assert s1[addresses["node-2"]].established


def test_pod_to_pod_across_nodes(lab):
    g1, g2 = ip(lab, "g-1"), ip(lab, "g-2")
    (r,) = lab.probe("g-1", [f"tcp:{g2}:8080"], timeout=5)
    assert r["ok"] and r["name"] == "g-2" and r["peer"].startswith(g1), r
    (r,) = lab.probe("g-2", [f"tcp:{g1}:8080"], timeout=5)
    assert r["ok"] and r["name"] == "g-1", r
    (r,) = lab.probe("g-1", [f"tcp:{ip(lab, 'p-2')}:8080"], timeout=5)
    assert r["ok"] and r["name"] == "p-2", r  # disableBGPExport pools still route inside the cluster


def test_external_host_reaches_global_pool_without_nat_not_private_pool(lab):
    ul = lab.state.data["underlay_netns"]
    wait_until(lambda: route_to(ul, block_of(ip(lab, "g-1"))), "the router learnt g-1's block")
    (r,) = lab.probe_external([f"tcp:{ip(lab, 'g-1')}:8080"], timeout=5)
    ext = lab.external_ip
    assert r["ok"] and r["name"] == "g-1" and r["peer"].startswith(ext), r  # the pod saw the external address
    (r,) = lab.probe_external([f"tcp:{ip(lab, 'p-2')}:8080"], timeout=2)
    assert not r["ok"], r
    assert route_to(ul, block_of(ip(lab, "p-2"))) is None  # never announced outside
    svc = wait_until(lambda: route_to(ul, "10.96.0.0/16"), "the Service range at the router")
    via = {h["gateway"] for h in svc.get("nexthops", [])} or {svc.get("gateway")}
    assert via == {n["address"] for n in lab.nodes}  # every node announces it: ECMP


def add_pod(lab, name, node, namespace="default"):
    """A pod the lab did not start with: the object, a sandbox and CNI ADD through the node's agent."""
    store = lab.store()
    uid = str(uuid.uuid4())
    store.apply([Pod(metadata=ObjectMeta(name=name, namespace=namespace, uid=uid),
                     spec=PodSpec(node_name=node))])
    netns = f"pnbgp-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    cid = secrets.token_hex(32)
    conf = RuntimeConf(container_id=cid, netns=f"/run/netns/{netns}", args=k8s_args(namespace, name, cid, uid))
    runtime = node_runtime(lab.state, lab.node(node))
    try:
        return netns, conf, runtime, result_ips(runtime.add(conf))[0]
    except BaseException:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        raise


@contextmanager
def serving_pod(lab, name, node, namespace="default"):
    """A pod added as add_pod() does, answering its name on TCP 8080 once it listens; yields
    (netns, address). Its server, CNI DEL and namespace are undone on the way out."""
    netns, conf, runtime, pod_ip = add_pod(lab, name, node, namespace)
    server = subprocess.Popen(["ip", "netns", "exec", netns, "socat", "TCP-LISTEN:8080,reuseaddr,fork",
                               f"SYSTEM:echo {name}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", netns, "ss", "-ltn", "sport = :8080"],
                                          capture_output=True, text=True).stdout.count("8080"), f"{name} listens")
        yield netns, pod_ip
    finally:
        server.kill()
        server.wait(10)
        runtime.delete(conf)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def answer_from(netns, target, bind=None):
    """What the server at target (an address, port 8080) answers to a connection from netns."""
    dst = f"TCP:{target}:8080" + (f",bind={bind}" if bind else "")
    return subprocess.run(["ip", "netns", "exec", netns, "socat", "-T", "3", "-", dst], input="",
                          capture_output=True, text=True).stdout.strip()


def test_new_block_is_routable_from_every_node_and_outside(lab):
    since = {n["name"]: {s.name: s.since for s in sessions(ctl(lab, n["name"]))} for n in lab.nodes}
    with serving_pod(lab, "late-3", "node-3") as (_, pod_ip):  # node-3's first pod: a new block
        block = block_of(pod_ip)
        for n in lab.nodes:
            if n["name"] != "node-3":
                wait_until(lambda n=n: (route_to(n["netns"], block) or {}).get("protocol") == "bird",
                           f"{n['name']}: route to node-3's new block {block}")
        ul = lab.state.data["underlay_netns"]
        wait_until(lambda: route_to(ul, block), "the router: route to the new block")
        for pod in ("g-1", "g-2"):
            out = lab.exec(pod, ["socat", "-T", "3", "-", f"TCP:{pod_ip}:8080"], input="")
            assert out.stdout.strip() == "late-3", out
        assert answer_from(ul, pod_ip, bind=lab.external_ip) == "late-3"
        # node-3 reloaded BIRD with the new block (and its import filters changed): no session was reset
        assert {n["name"]: {s.name: s.since for s in sessions(ctl(lab, n["name"]))} for n in lab.nodes} == since


def test_a_borrowed_address_is_announced_as_a_32_and_reached_at_its_node(lab):
    """A pool of one block: node-1 claims it with its first pod, node-2's pod borrows from it.
    Node-1 holds a blackhole for the whole block, so only node-2's /32 (from BIRD; the agent
    routes no borrowed address on a BGP node) brings the packets to node-2."""
    suffix = secrets.token_hex(3)
    ns, pool = f"tiny-{suffix}", f"tiny-{suffix}"
    store = lab.store()
    rev, _ = store.apply([Namespace.model_validate({"metadata": {"name": ns, "labels": {"pool": pool}}}),
                 IPPool.model_validate({"metadata": {"name": pool},
                                        "spec": {"cidr": "10.243.0.0/26", "blockSize": 26, "encapsulation": "None",
                                                 "namespaceSelector": {"matchLabels": {"pool": pool}}}})])
    wait_programmed(lab.state, rev, 60)  # every agent has the pool before a pod asks for an address
    nodes = {n["name"]: n for n in lab.nodes}
    ul = lab.state.data["underlay_netns"]
    try:
        with serving_pod(lab, "owner-1", "node-1", ns) as (_, owner_ip), \
                serving_pod(lab, "borrower-2", "node-2", ns) as (_, borrowed):
            assert block_of(owner_ip) == block_of(borrowed) == "10.243.0.0/26"  # one block: node-2 borrowed
            for name in ("node-1", "node-3"):
                r = wait_until(lambda name=name: (x if (x := route_to(nodes[name]["netns"], f"{borrowed}/32"))
                                                  and x.get("protocol") == "bird" else None),
                               f"{name}: the /32 of node-2's borrowed address")
                assert r["gateway"] == nodes["node-2"]["address"], r
            r = wait_until(lambda: route_to(nodes["node-3"]["netns"], "10.243.0.0/26"), "node-3: node-1's block")
            assert r["gateway"] == nodes["node-1"]["address"], r
            wait_until(lambda: route_to(ul, f"{borrowed}/32"), "the router: the borrowed /32")
            out = lab.exec("g-1", ["socat", "-T", "3", "-", f"TCP:{borrowed}:8080"], input="")
            assert out.stdout.strip() == "borrower-2", out  # from the block's owner
            assert answer_from(nodes["node-3"]["netns"], borrowed) == "borrower-2"
            assert answer_from(nodes["node-3"]["netns"], owner_ip) == "owner-1"
            assert answer_from(ul, borrowed, bind=lab.external_ip) == "borrower-2"
        # the borrower gone: its /32 is withdrawn everywhere
        for name in ("node-1", "node-3"):
            wait_until(lambda name=name: route_to(nodes[name]["netns"], f"{borrowed}/32") is None,
                       f"{name}: the borrowed /32 withdrawn")
        wait_until(lambda: route_to(ul, f"{borrowed}/32") is None, "the router: the borrowed /32 withdrawn")
    finally:
        store.delete_all([IPPool.model_validate({"metadata": {"name": pool}, "spec": {"cidr": "10.243.0.0/26"}}),
                          Namespace.model_validate({"metadata": {"name": ns}})])


def test_kill_bird_and_restart_agent_keep_a_tcp_connection(lab):
    g1, g2 = ip(lab, "g-1"), ip(lab, "g-2")
    bird2 = lab_bgp.node_bird(lab.node("node-2"))
    offsets = log_offsets(lab)
    with echo_connection(lab.pod("g-2")["netns"], 7007, lab.pod("g-1")["netns"], f"{g2}:7007") as roundtrip:
        assert roundtrip("before") == "before"
        pid = bird2.pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: bird2.pid() != pid and bird2.pid() is not None, "node-2's agent started BIRD again", 30)
        assert roundtrip("while-bird-restarts") == "while-bird-restarts"
        # the peers kept node-2's routes while it restarted (graceful restart), and it kept theirs
        assert route_to(lab.node("node-1")["netns"], block_of(g2))["protocol"] == "bird"
        assert route_to(lab.node("node-2")["netns"], block_of(g1))["protocol"] == "bird"
        wait_until(lambda: established(bird2.ctl, peers=3), "node-2's sessions back", 60)
        assert "BIRD (pid" in log_since(lab, "node-2", offsets)  # the agent saw it go

        since = {s.name: s.since for s in sessions(bird2.ctl)}
        restart_agent(lab.state, "node-2", kill=True, while_down=lambda: roundtrip("agent-down"))
        assert roundtrip("after") == "after"
        assert {s.name: s.since for s in sessions(bird2.ctl)} == since  # BIRD adopted: no session reset
    assert route_to(lab.node("node-1")["netns"], block_of(g2))["protocol"] == "bird"


def test_a_peer_that_never_answers(lab):
    store = lab.store()
    n3 = lab.node("node-3")
    store.apply([BGPPeer.model_validate({"metadata": {"name": "nobody"},
                                         "spec": {"peerIP": "10.97.10.250", "asNumber": 65099, "node": "node-3"}})])
    try:
        wait_until(lambda: len(sessions(ctl(lab, "node-3"))) == 4, "node-3 got the new peer")
        found = {s.neighbor: s for s in sessions(ctl(lab, "node-3"))}
        assert not found["10.97.10.250"].established
        assert all(s.established for a, s in found.items() if a != "10.97.10.250")
        err = wait_until(lambda: agent_status(lab.state, lab.node("node-3")), "node-3 reported unhealthy")
        assert "BGP not established with 10.97.10.250" in str(err.msg)
        assert agent_status(lab.state, lab.node("node-1")) is None
        status, body = readyz(lab, "node-3")
        assert status == 503 and "BGP not established with 10.97.10.250" in body, body
        assert readyz(lab, "node-1")[0] == 200
        # the agent's metrics, read from its BIRD when scraped
        samples, _ = scrape(n3["netns"], n3["address"], AGENT_METRICS_PORT)
        assert value(samples, "podnet_bgp_bird_up") == 1
        assert value(samples, "podnet_bgp_sessions", state="established") == 3
        assert value(samples, "podnet_bgp_sessions", state="other") == 1
        assert value(samples, "podnet_bgp_session_established", peer="10.97.10.250",
                     protocol="Node_10_97_10_250") == 0
        n1 = lab.node("node-1")["address"]
        mesh = f"Mesh_{n1.replace('.', '_')}"
        assert value(samples, "podnet_bgp_session_established", peer=n1, protocol=mesh) == 1
        assert value(samples, "podnet_bgp_routes", peer=n1, protocol=mesh, direction="imported") >= 1  # g-1's block
        assert value(samples, "podnet_bgp_routes", peer=GATEWAY, protocol=f"Global_{GATEWAY.replace('.', '_')}",
                     direction="exported") >= 1  # at least the Service range
        (r,) = lab.probe("g-1", [f"tcp:{ip(lab, 'g-2')}:8080"], timeout=5)
        assert r["ok"]
        proc = subprocess.run([sys.executable, "-m", "podnet.cli.main", "bgp", "status", "--lab", lab.name],
                              capture_output=True, text=True,
                              env={**os.environ, "PODNET_LAB_ROOT": str(lab.state.dir.parent)})
        assert proc.returncode == 3, proc.stderr  # a session is not Established
        down = [line.split() for line in proc.stdout.splitlines() if "10.97.10.250" in line]
        assert len(down) == 1 and down[0][0] == "node-3" and "Established" not in down[0], proc.stdout
    finally:
        store.delete_all([store.get(BGPPeer, "nobody")])
    wait_until(lambda: agent_status(lab.state, lab.node("node-3")) is None, "node-3 healthy again")
    wait_until(lambda: readyz(lab, "node-3")[0] == 200, "node-3's /readyz 200 again")


def readyz(lab, node):
    """The status and body of a node's agent's /readyz."""
    n = lab.node(node)
    return get(n["netns"], "/readyz", n["address"], AGENT_METRICS_PORT)
