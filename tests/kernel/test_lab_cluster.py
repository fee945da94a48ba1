"""A whole lab with the reference bridge plugin (no agent): pods, servers, store, CLI, probes."""

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from podnet.cli.main import main
from podnet.lab import topology
from podnet.lab.cluster import down_by_name, node_runtime, pod_runtime_conf, up
from podnet.lab.connectivity import Lab, format_table, probe_all
from podnet.lab.spec import parse_lab
from podnet.model.objects import EndpointSlice, Node, Pod, Service

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs root and the reference CNI plugins in /usr/lib/cni"),
]


def lab_doc(name: str) -> dict:
    return {
        "apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
        "spec": {
            "underlay": {"cidr": "10.99.0.0/24"}, "external": {"address": "10.98.0.10/24"},
            "nodes": [{"name": "node-1", "labels": {"topology.kubernetes.io/zone": "a"}}, {"name": "node-2"}],
            "cni": {"plugin": "bridge", "chain": ["portmap"]},
            "pods": [
                {"name": "web-1", "namespace": "shop", "node": "node-1", "labels": {"app": "web"},
                 "ports": [{"name": "http", "containerPort": 8080},
                           {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]},
                {"name": "web-2", "namespace": "shop", "node": "node-2", "labels": {"app": "web"},
                 "ports": [{"name": "http", "containerPort": 8081}]},
                {"name": "client", "node": "node-1", "ports": [{"containerPort": 9000, "hostPort": 30900}]},
                {"name": "hostnet", "node": "node-2", "hostNetwork": True, "ports": [{"containerPort": 9100}]},
            ],
            "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}],
        },
    }


@pytest.fixture(scope="module")
def lab():
    root = Path(tempfile.mkdtemp(prefix="pnlc-"))
    name = f"br-{secrets.token_hex(3)}"
    spec = parse_lab(yaml.safe_dump(lab_doc(name)), f"{name}.yaml")
    st = up(spec, root=root)
    try:
        yield Lab(st), root
    finally:
        down_by_name(name, root)
        assert topology.netns_list(f"pnl-{st.id}-") == []
        shutil.rmtree(root, ignore_errors=True)


def test_pods_are_running_in_the_store_with_endpoint_slices(lab):
    lab, _ = lab
    store = lab.store()
    pods = {p.name: p for p in store.list(Pod)}
    assert set(pods) == {"web-1", "web-2", "client", "hostnet"}
    assert lab.pod("hostnet")["ips"] == ["10.99.0.12"] and lab.pod("hostnet")["netns"] == lab.node("node-2")["netns"]
    for entry in lab.pods:
        pod = pods[entry["name"]]
        assert pod.status.phase == "Running" and pod.status.pod_ip == entry["ips"][0]
        assert pod.status.host_ip == lab.node(entry["node"])["address"]
        assert pod.metadata.uid
    assert {n.name: n.internal_ip for n in store.list(Node)} == {"node-1": "10.99.0.11", "node-2": "10.99.0.12"}
    (svc,) = store.list(Service, "shop")
    # as in a cluster, the lab adds the DNS Service at the tenth address of its Service CIDR
    (dns,) = store.list(Service, "kube-system")
    assert (dns.name, dns.spec.cluster_ip) == ("kube-dns", "10.96.0.10")
    assert svc.spec.cluster_ip and svc.spec.cluster_ip.startswith("10.96.")
    slices = store.list(EndpointSlice, "shop")
    ports = sorted(s.ports[0].port for s in slices)
    assert ports == [8080, 8081]  # the named port resolves differently per pod
    ep = {e.target_ref.name: e for s in slices for e in s.endpoints}
    assert ep["web-1"].zone == "a" and ep["web-2"].node_name == "node-2"


def test_connectivity_same_node_cross_node_and_external(lab):
    lab, _ = lab
    rows = probe_all(lab, all_ports=True, timeout=5)
    table = format_table(rows)
    assert all(r.ok for r in rows), table
    kinds = {r.kind for r in rows}
    assert {"same-node", "cross-node/direct", "external", "node->pod/direct"} <= kinds, kinds
    # UDP too, and natOutgoing: the external host sees the node's address.
    assert any(r.target.startswith("udp/") and r.ok for r in rows)
    ext = [r for r in rows if r.kind == "external" and r.src == "shop/web-2" and r.target.startswith("tcp/")]
    assert ext and "saw source 10.99.0.12" in ext[0].detail
    # Pod to pod keeps the pod's own source address.
    web1 = lab.pod("shop/web-1")["ips"][0]
    same = [r for r in rows if r.src == "shop/web-1" and r.dst == "default/client"]
    assert same and f"saw source {web1}" in same[0].detail


def test_host_port_through_the_chained_portmap(lab):
    lab, _ = lab
    (answer,) = lab.probe("shop/web-2", ["tcp:10.99.0.11:30900"])
    assert answer["name"] == "client"


def test_cli_status_exec_and_cni_check(lab, capfd, monkeypatch):
    lab, root = lab
    monkeypatch.setenv("PODNET_LAB_ROOT", str(root))
    assert main(["lab", "status"]) == 0  # the only lab: no --name needed
    out = capfd.readouterr().out
    assert re.search(r"node-1 +10\.99\.0\.11", out) and "shop/web-1" in out and lab.pod("shop/web-1")["netns"] in out
    assert main(["lab", "exec", "web-1", "--", "sh", "-c", "exit 7"]) == 7
    assert main(["lab", "exec", "shop/web-1", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0"]) == 0
    assert lab.pod("shop/web-1")["ips"][0] in capfd.readouterr().out
    assert main(["lab", "exec", "--node", "node-2", "--", "ip", "route", "show", "default"]) == 0
    assert "10.99.0.1" in capfd.readouterr().out
    assert main(["lab", "exec", "nope", "--", "true"]) == 1
    assert "has no pod 'nope'" in capfd.readouterr().err
    for entry in lab.pods:
        if not entry["hostNetwork"]:
            node_runtime(lab.state, lab.node(entry["node"])).check(pod_runtime_conf(entry))
