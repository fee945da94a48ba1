"""Traffic the node itself sends or masquerades, on VXLAN and direct pools: the node
reaches pods on other nodes, and NodePorts (externalTrafficPolicy Cluster) reach
endpoints on every node from another node, from the receiving node itself and from
outside. Backends see the receiving node's address, never the node-local DNS address
that sits on the node's loopback."""

import os

import pytest

from podnet.lab.connectivity import format_table, probe_all
from tests.kernel.labs import running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

NODES = ("node-1", "node-2")
NODE_PORTS = {"web-1": 30101, "web-2": 30102}  # one NodePort Service per pod: its only endpoint


def lab_spec(encapsulation: str) -> dict:
    web = [{"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]
    services = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"np-{pod}", "namespace": "default"},
         "spec": {"type": "NodePort", "selector": {"np": pod},
                  "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": port},
                            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns", "nodePort": port}]}}
        for pod, port in NODE_PORTS.items()]
    services.append(  # Local: only node-2 has an endpoint
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "np-local", "namespace": "default"},
         "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "selector": {"np": "web-2"},
                  "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30103}]}})
    pool = {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
            "spec": {"cidr": "10.244.0.0/16", "encapsulation": encapsulation, "natOutgoing": True}}
    return {"underlay": {"cidr": "10.97.0.0/24"}, "external": {"address": "10.98.0.10/24"},
            "nodes": [{"name": n} for n in NODES],
            "pods": [{"name": f"web-{i}", "node": f"node-{i}", "labels": {"np": f"web-{i}"}, "ports": web}
                     for i in (1, 2)],
            "manifests": [pool, *services]}


@pytest.fixture(scope="module", params=["VXLAN", "None"], ids=["vxlan", "direct"])
def lab(request):
    with running_lab(lab_spec(request.param), "nt") as lab:
        yield lab


def addresses(lab) -> dict[str, str]:
    return {n["name"]: n["address"] for n in lab.nodes}


def test_each_node_reaches_pods_on_the_other_nodes_from_its_own_address(lab):
    node_ip = addresses(lab)
    pods = {p["name"]: p for p in lab.pods}
    for node in NODES:
        remote = [p for p in pods.values() if p["node"] != node]
        targets = [f"{proto}:{p['ips'][0]}:{port}" for p in remote for proto, port in (("tcp", 8080), ("udp", 5353))]
        results = lab.probe_node(node, targets, timeout=3)
        for target, r in zip(targets, results, strict=True):
            assert r["ok"], (node, target, r)
            assert r["peer"] == node_ip[node], (node, target, r)
        route = lab.exec_node(node, ["ip", "route", "get", remote[0]["ips"][0]])
        assert f"src {node_ip[node]}" in route.stdout, route.stdout


def test_node_ports_reach_endpoints_on_every_node_from_every_kind_of_client(lab):
    node_ip = addresses(lab)
    failures = []
    for pod, port in NODE_PORTS.items():
        for receiver in NODES:
            targets = [f"{proto}:{node_ip[receiver]}:{port}" for proto in ("tcp", "udp")]
            clients = {f"node {n}": lambda t, n=n: lab.probe_node(n, t, timeout=3) for n in NODES}
            clients["external"] = lambda t: lab.probe_external(t, timeout=3)
            for client, run in clients.items():
                for target, r in zip(targets, run(targets), strict=True):
                    # Cluster policy: masqueraded to the receiving node's own address.
                    if not (r["ok"] and r["name"] == pod and r["peer"] == node_ip[receiver]):
                        failures.append(f"{client} -> {target} (endpoint {pod}): {r}")
    assert not failures, "\n".join(failures)


def test_the_lab_probe_covers_nodes_and_node_ports(lab):
    rows = probe_all(lab, timeout=3)
    assert all(r.ok for r in rows), format_table(rows)
    node_ip = addresses(lab)
    kind = "vxlan" if "pn-vxlan" in lab.exec_node("node-1", ["ip", "link"]).stdout else "direct"
    by = {(r.src, r.dst, r.kind, r.target): r for r in rows}
    assert (by[("node/node-1", "default/web-2", f"node->pod/{kind}", "tcp/" + lab.pod("web-2")["ips"][0] + ":8080")]
            .expected)

    def path(src: str, receiver: str) -> str:
        return "nodeport/" + ("external" if src == "external" else "same-node" if src == f"node/{receiver}"
                              else "from-node")

    for src in ("node/node-1", "node/node-2", "external"):
        for svc, pod, port in (("np-web-1", "web-1", 30101), ("np-web-2", "web-2", 30102)):
            for receiver in NODES:
                for proto in ("tcp", "udp"):
                    row = by[(src, f"default/{svc}", path(src, receiver), f"{proto}/{node_ip[receiver]}:{port}")]
                    assert row.expected and f"answered by {pod} x12, saw source {node_ip[receiver]}" in row.detail
        # Local: node-1 has no endpoint of np-local: dropped, except for node-1's own traffic, which
        # upstream's short-circuit sends to any endpoint; node-2's endpoint keeps the client's address
        to_node_1 = by[(src, "default/np-local", path(src, "node-1"), f"tcp/{node_ip['node-1']}:30103")]
        assert to_node_1.expected == (src == "node/node-1"), to_node_1
        row = by[(src, "default/np-local", path(src, "node-2"), f"tcp/{node_ip['node-2']}:30103")]
        client = lab.external_ip if src == "external" else node_ip[src.removeprefix("node/")]
        assert row.expected and row.detail.endswith(f"saw source {client}"), row
