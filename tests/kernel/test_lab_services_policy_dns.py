"""The whole node agent in a lab: a Service balanced across nodes, a NetworkPolicy
judged on the real endpoint after DNAT, and the node's DNS server answering the
glibc resolver inside pods with the Kubernetes search path."""

import os
from collections import Counter

import pytest

from podnet.lab.connectivity import Lab
from podnet.model.objects import Service
from tests.kernel.labs import running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

MANIFESTS = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "shop"}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "web-from-clients", "namespace": "shop"},
     "spec": {"podSelector": {"matchLabels": {"app": "web"}},
              "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}],
                           "ports": [{"port": "http"}]}]}},
]


@pytest.fixture(scope="module")
def lab():
    web_port = [{"name": "http", "containerPort": 8080}]
    spec = {"underlay": {"cidr": "10.99.0.0/24"}, "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": [{"name": "web-1", "namespace": "shop", "node": "node-1", "labels": {"app": "web"},
                      "ports": web_port},
                     {"name": "web-2", "namespace": "shop", "node": "node-2", "labels": {"app": "web"},
                      "ports": web_port},
                     {"name": "client", "node": "node-1", "labels": {"app": "client"},
                      "ports": [{"containerPort": 9000}]},
                     {"name": "intruder", "node": "node-2", "labels": {"app": "intruder"},
                      "ports": [{"containerPort": 9000}]}],
            "manifests": MANIFESTS}
    with running_lab(spec, "sp") as lab:
        yield lab


def cluster_ip(lab: Lab) -> str:
    svc = lab.store().get(Service, "web", "shop")
    assert svc is not None and svc.spec.cluster_ip
    return svc.spec.cluster_ip


def answers(lab: Lab, pod: str, target: str, n: int) -> Counter:
    return Counter(r.get("name") if r.get("ok") else "timeout" for r in lab.probe(pod, [target] * n, timeout=3))


def test_service_balances_over_endpoints_on_both_nodes(lab):
    got = answers(lab, "client", f"tcp:{cluster_ip(lab)}:80", 40)
    assert set(got) == {"web-1", "web-2"}, got
    assert min(got.values()) >= 6, got  # random, but not lopsided


def test_policy_applies_to_the_endpoint_behind_the_service(lab):
    web2 = lab.pod("shop/web-2")["ips"][0]
    assert answers(lab, "client", f"tcp:{web2}:8080", 1) == Counter({"web-2": 1})
    assert answers(lab, "intruder", f"tcp:{web2}:8080", 1) == Counter({"timeout": 1})  # dropped, not refused
    assert answers(lab, "intruder", f"tcp:{cluster_ip(lab)}:80", 4) == Counter({"timeout": 4})


def test_pods_resolve_services_through_the_node_dns_with_search_paths(lab):
    ip = cluster_ip(lab)
    full = lab.exec("client", ["getent", "hosts", "web.shop.svc.cluster.local"])
    assert full.returncode == 0 and full.stdout.split()[0] == ip, full
    short = lab.exec("client", ["getent", "hosts", "web.shop"])  # ndots:5: the search path does the rest
    assert short.returncode == 0 and short.stdout.split()[0] == ip, short
    same_ns = lab.exec("shop/web-1", ["getent", "hosts", "web"])
    assert same_ns.returncode == 0 and same_ns.stdout.split()[0] == ip, same_ns
    missing = lab.exec("client", ["getent", "hosts", "nothing.shop.svc.cluster.local"])
    assert missing.returncode == 2, missing  # not found


def test_the_kube_dns_cluster_ip_is_answered_on_every_node(lab):
    from podnet.dns.resolvconf import NODE_DNS_ADDRESS

    dns = lab.store().get(Service, "kube-dns", "kube-system")
    assert dns is not None and dns.spec.cluster_ip
    for pod in ("client", "intruder"):  # one on each node
        for server in (dns.spec.cluster_ip, NODE_DNS_ADDRESS):
            out = lab.exec(pod, ["dig", "+short", "+time=2", "+tries=1", f"@{server}", "web.shop.svc.cluster.local"])
            assert out.stdout.split() == [cluster_ip(lab)], (pod, server, out)
