"""The kube-proxy-style iptables backend (fallback and benchmark baseline) with real
packets, on the same topology and manifests as the nftables tests."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.kernel.nsutil import in_ns, namespaces
from tests.kernel.test_services_dataplane import (
    CLIENT,
    Topology,
    check_affinity_is_shared_by_the_frontends_of_a_port,
    check_external_local_short_circuit,
    check_invalid_clusterip_ports_are_rejected,
    endpoint,
    names,
    service,
    slice_,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not shutil.which("iptables-legacy-restore"), reason="needs iptables-legacy"),
]


@pytest.fixture(scope="module", params=["iptables-legacy", "iptables-nft"])
def topo(request):
    with namespaces() as ns:
        t = Topology(ns, backend=request.param)
        try:
            yield t
        finally:
            t.close()


def test_clusterip_spread_udp_and_reject(topo):
    objs = [service("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 8080},
                                          {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]),
            slice_("web", [endpoint("b1"), endpoint("b2"), endpoint("b3")],
                   ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            service("empty", "10.96.0.13")]
    r = topo.driver.apply(objs)
    assert r["sent"] and r["full"]
    results = names(topo.probe("10.96.0.10", 80, count=150))
    for b in ("b1", "b2", "b3"):
        assert 0.20 * 150 <= results.count(b) <= 0.47 * 150, results
    assert set(names(topo.probe("10.96.0.10", 53, "udp", count=15))) <= {"b1", "b2", "b3"}
    assert topo.probe("10.96.0.13", 80) == ["refused"]
    assert topo.probe("10.96.0.250", 80, timeout=0.7) == ["timeout"]
    assert not topo.driver.apply(objs)["sent"]
    saved = in_ns(topo.node, f"{topo.driver.backend}-save", "-t", "nat").stdout
    # kube-proxy's shape: per Service port a KUBE-SVC chain choosing among KUBE-SEP chains
    assert saved.count("-m statistic --mode random") == 2 * 2  # (n - 1) per port, TCP and UDP
    assert saved.count(":KUBE-SEP-") == 6


def test_nodeport_local_policy_affinity_hairpin_and_source_ranges(topo):
    objs = [service("np", "10.96.0.14", type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}]),
            slice_("np", [endpoint("b1"), endpoint("b2", node="n2")], ports=[{"port": 8080}]),
            service("local", "10.96.0.17", type="NodePort", externalTrafficPolicy="Local",
                    ports=[{"port": 80, "targetPort": 8080, "nodePort": 30082}]),
            slice_("local", [endpoint("b2", node="n2")], ports=[{"port": 8080}]),
            service("sticky", "10.96.0.16", sessionAffinity="ClientIP"),
            slice_("sticky", [endpoint("b1"), endpoint("b2"), endpoint("b3")], ports=[{"port": 8080}]),
            service("self", "10.96.0.19"), slice_("self", [endpoint("b4")], ports=[{"port": 8080}]),
            service("lb", "10.96.0.15", type="LoadBalancer", loadBalancerSourceRanges=["192.0.2.0/24"],
                    ports=[{"port": 80, "targetPort": 8080, "nodePort": 30081}],
                    status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
            slice_("lb", [endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    outside = topo.probe("10.10.0.1", 30080, count=10)
    assert set(names(outside)) <= {"b1", "b2"} and {x.split()[1] for x in outside} == {"10.20.0.1"}
    assert topo.probe("10.10.0.1", 30082, timeout=0.7) == ["timeout"]
    assert len(set(names(topo.probe("10.96.0.16", 80, count=15)))) == 1
    assert topo.probe("10.96.0.19", 80, src=topo.backends["b4"]) == ["b4 10.20.0.1"]
    assert topo.probe("203.0.113.7", 80, timeout=0.7) == ["timeout"]
    objs[-2]["spec"]["loadBalancerSourceRanges"] = [f"{CLIENT}/32"]
    topo.driver.apply(objs)
    assert names(topo.probe("203.0.113.7", 80)) == ["b3"]


def test_kube_proxy_parity_invalid_ports_shared_affinity_and_local_short_circuit(topo):
    check_invalid_clusterip_ports_are_rejected(topo)
    check_affinity_is_shared_by_the_frontends_of_a_port(topo)
    check_external_local_short_circuit(topo)


def test_flushed_chains_and_a_deleted_jump_are_found_by_verify_and_rewritten(topo):
    # chain names stay: only the rules go, which a check of names alone would miss
    objs = [service("kept", "10.96.0.30"), slice_("kept", [endpoint("b1")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    assert names(topo.probe("10.96.0.30", 80)) == ["b1"]
    assert topo.driver.ask(verify=True)["problem"] is None
    ipt = topo.driver.backend
    in_ns(topo.node, ipt, "-w", "-t", "nat", "-F", "KUBE-SERVICES")
    assert topo.probe("10.96.0.30", 80, timeout=0.5) != ["b1"]  # nothing DNATs it any more
    problem = topo.driver.ask(verify=True)["problem"]
    assert problem and problem.startswith("chain KUBE-SERVICES (nat) has 0 rules"), problem
    r = topo.driver.apply(objs, resync=True)
    assert r["sent"] and r["full"], r
    assert names(topo.probe("10.96.0.30", 80)) == ["b1"]
    assert topo.driver.ask(verify=True)["problem"] is None
    in_ns(topo.node, ipt, "-w", "-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES")
    assert topo.probe("10.96.0.30", 80, timeout=0.5) != ["b1"]
    assert topo.driver.ask(verify=True)["problem"] == "the jump from PREROUTING (nat) to KUBE-SERVICES is missing"
    topo.driver.apply(objs, resync=True)
    assert names(topo.probe("10.96.0.30", 80)) == ["b1"]
    assert topo.driver.ask(verify=True)["problem"] is None
