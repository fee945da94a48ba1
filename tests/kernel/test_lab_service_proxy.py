"""The Service dataplane is selectable per node: a node whose agent runs kube-proxy's
iptables layout, or the eBPF programs, serves the same Service, side by side with a
node on podnet's nftables maps."""

import os
from collections import Counter

import pytest

from podnet.model.objects import Service
from tests.kernel.labs import running_lab, services_fast_path
from tests.kernel.nsutil import in_ns

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]


@pytest.mark.parametrize("proxy", ["iptables", "ebpf"])
def test_a_node_on_another_service_proxy_serves_the_same_service(proxy):
    web = [{"name": "http", "containerPort": 8080}]
    spec = {"underlay": {"cidr": "10.98.0.0/24"},
            "nodes": [{"name": "node-1"}, {"name": "node-2", "serviceProxy": proxy}],
            "pods": [{"name": "web-1", "node": "node-1", "labels": {"app": "web"}, "ports": web},
                     {"name": "web-2", "node": "node-2", "labels": {"app": "web"}, "ports": web},
                     {"name": "c1", "node": "node-1", "ports": [{"containerPort": 9000}]},
                     {"name": "c2", "node": "node-2", "ports": [{"containerPort": 9000}]}],
            "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                           "spec": {"selector": {"app": "web"},
                                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}]}
    with running_lab(spec, "px") as lab:
        svc = lab.store().get(Service, "web", "default")
        assert svc is not None and svc.spec.cluster_ip
        if proxy == "ebpf":  # nftables policy on this node: the fast path would skip it
            assert not services_fast_path(lab, "node-2")
        for client in ("c1", "c2"):
            got = Counter(r.get("name") if r.get("ok") else "timeout"
                          for r in lab.probe(client, [f"tcp:{svc.spec.cluster_ip}:80"] * 30, timeout=3))
            assert set(got) == {"web-1", "web-2"}, (client, got)
        for node in ("node-1", "node-2"):  # the nodes' own processes (eBPF: the socket programs of its agent)
            got = Counter(r.get("name") if r.get("ok") else "timeout"
                          for r in lab.probe_node(node, [f"tcp:{svc.spec.cluster_ip}:80"] * 30, timeout=3))
            assert set(got) == {"web-1", "web-2"}, (node, got)
        ns = {n["name"]: n["netns"] for n in lab.state.data["nodes"]}
        # each node programs its own layout, and only that one
        if proxy == "iptables":
            assert "KUBE-SERVICES" in in_ns(ns["node-2"], "iptables-save", "-t", "nat").stdout
        else:  # the Service program on the host side of node-2's pods' interfaces
            veths = [line.split(":")[1].strip().split("@")[0] for line in
                     in_ns(ns["node-2"], "ip", "-o", "link", "show", "type", "veth").stdout.splitlines()]
            pods = [v for v in veths if v.startswith("pn")]
            assert len(pods) == 2, veths
            for v in pods:
                assert "podnet_svc_from_pod" in in_ns(ns["node-2"], "tc", "filter", "show", "dev", v, "ingress").stdout
        assert in_ns(ns["node-2"], "nft", "list", "table", "ip", "podnet-svc", check=False).returncode != 0
        assert in_ns(ns["node-1"], "nft", "list", "chain", "ip", "podnet-svc", "services").returncode == 0
        assert "KUBE-SERVICES" not in in_ns(ns["node-1"], "iptables-save", "-t", "nat").stdout
