"""`podnet node cleanup` on lab nodes with pods: node-1 with podnet's nftables Service
proxy, node-2 with the iptables one. After the node's agent and DNS process are
stopped, nothing of podnet's is left in the node's namespace (read back with `nft -j`,
`ip -j` and `iptables-save`): tables, routes of protocols 88 and 89, the VXLAN device,
the pods' veths, the DNS addresses on lo, the Service chains and the agent's files.
Until then it refuses, naming what still runs.

Before that, node-2 is switched to the nftables proxy and back: each start removes what
the other proxy left (it would go on DNAT-ing with its last endpoints)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from podnet.lab.cluster import node_dns_key, restart_agent, wait_programmed
from podnet.lab.connectivity import Lab
from podnet.model.objects import Service
from tests.kernel.labs import log_offsets, log_since, reaches, running_lab, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
    pytest.mark.skipif(shutil.which("iptables-save") is None, reason="needs iptables"),
]

PODNET = [sys.executable, "-m", "podnet.cli.main"]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"},
            "nodes": [{"name": "node-1"}, {"name": "node-2", "serviceProxy": "iptables"}],
            "pods": [{"name": "a", "node": "node-1", "labels": {"app": "web"}, "ports": [{"containerPort": 8080}]},
                     {"name": "b", "node": "node-2", "labels": {"app": "web"}, "ports": [{"containerPort": 8080}]}],
            "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}]}
    with running_lab(spec, "clean") as lab:
        yield lab


def run(lab: Lab, node: str, *argv: str) -> str:
    proc = lab.exec_node(node, list(argv), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def podnet_state(lab: Lab, node: str) -> dict:
    tables = [t["table"]["name"] for t in json.loads(run(lab, node, "nft", "-j", "list", "tables"))["nftables"]
              if "table" in t]
    links = [link["ifname"] for link in json.loads(run(lab, node, "ip", "-j", "link", "show"))]
    lo = [a["local"] for a in json.loads(run(lab, node, "ip", "-j", "-4", "addr", "show", "dev", "lo"))[0]["addr_info"]]
    routes = [r["dst"] for proto in ("88", "89")
              for r in json.loads(run(lab, node, "ip", "-j", "route", "show", "proto", proto) or "[]")]
    chains = [line.split()[0][1:] for line in run(lab, node, "iptables-save").splitlines() if line.startswith(":")]
    return {"tables": sorted(t for t in tables if t.startswith("podnet-")),
            "links": sorted(name for name in links if name.startswith("pn")),
            "lo": sorted(a for a in lo if a != "127.0.0.1"), "routes": sorted(routes),
            "kube_chains": sorted(c for c in chains if c.startswith("KUBE-"))}


def cleanup(lab: Lab, node: str, *args: str):
    sock = lab.node(node)["socket"]
    return lab.exec_node(node, [*PODNET, "node", "cleanup", "--socket", sock, *args], timeout=120)


def test_a_node_switched_between_service_proxies_keeps_only_the_one_it_runs(lab):
    svc = lab.store().get(Service, "web", "default")
    target = f"tcp:{svc.spec.cluster_ip}:80"
    wait_for(lambda: reaches(lab, "b", target), "the Service from node-2", within=30)

    def switch(proxy: str) -> str:
        since = log_offsets(lab)
        restart_agent(lab.state, "node-2", options={"--service-proxy": proxy})
        wait_programmed(lab.state, lab.store().kv.revision(), 30)
        return log_since(lab, "node-2", since)

    log = switch("nftables")
    assert "the iptables Service proxy this node ran before is removed" in log, log
    state = podnet_state(lab, "node-2")
    assert state["kube_chains"] == [] and "podnet-svc" in state["tables"], state
    wait_for(lambda: reaches(lab, "b", target), "the Service from node-2", within=30)

    log = switch("iptables")  # and back: the state the cleanup test below expects
    assert "the nftables Service proxy this node ran before is removed" in log, log
    state = podnet_state(lab, "node-2")
    assert "podnet-svc" not in state["tables"] and "KUBE-SERVICES" in state["kube_chains"], state
    wait_for(lambda: reaches(lab, "b", target), "the Service from node-2", within=30)


@pytest.mark.parametrize("node", ["node-1", "node-2"])
def test_cleanup_leaves_nothing_of_podnet_on_the_node(lab, node):
    st = lab.state
    before = podnet_state(lab, node)
    assert "podnet-dns" in before["tables"] and "podnet-policy" in before["tables"]
    assert "pn-vxlan" in before["links"] and len(before["links"]) == 2  # the VXLAN device and the pod's veth
    assert "169.254.20.10" in before["lo"] and len(before["lo"]) == 2  # and the kube-dns ClusterIP
    assert len(before["routes"]) >= 3  # the other node's block, this node's blackhole, the pod's /32
    if node == "node-2":
        assert "podnet-svc" not in before["tables"] and "KUBE-SERVICES" in before["kube_chains"]
    else:
        assert "podnet-svc" in before["tables"] and before["kube_chains"] == []

    agent, dns = st.process(f"agent-{node}"), st.process(node_dns_key(node))
    refused = cleanup(lab, node)
    assert refused.returncode == 1
    assert f"a podnet agent (pid {st.process_pid(agent)}) runs on this node" in refused.stderr
    assert "a DNS server listens on 169.254.20.10:53" in refused.stderr
    assert st.stop_process(agent)
    refused = cleanup(lab, node)
    assert refused.returncode == 1 and "a podnet agent" not in refused.stderr
    assert "a DNS server listens on 169.254.20.10:53, 10.96.0.10:53 (the node's `podnet dns serve`?)" \
        in refused.stderr
    assert podnet_state(lab, node) == before  # stopped, nothing removed
    assert st.stop_process(dns)

    done = cleanup(lab, node)
    assert done.returncode == 0, done.stderr
    assert "removed link pn-vxlan (VXLAN)" in done.stdout
    assert "removed route blackhole" in done.stdout
    if node == "node-2":
        assert "removed iptables Service chains" in done.stdout
    after = podnet_state(lab, node)
    assert after == {"tables": [], "links": [], "lo": [], "routes": [], "kube_chains": []}, done.stdout
    sock = lab.node(node)["socket"]
    assert not [p for p in Path(sock).parent.iterdir() if p.name.startswith(Path(sock).name)]

    again = cleanup(lab, node)
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do: podnet has nothing on this node"
