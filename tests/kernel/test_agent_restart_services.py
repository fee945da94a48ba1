"""Restarting the node agents while a client talks to a Service: the connection
through the ClusterIP keeps flowing, and the Service table is adopted as it is
(same rule handles, same elements, no rebuild logged)."""

import os
import re
from pathlib import Path

import pytest

from podnet.lab.cluster import restart_agent, wait_programmed
from podnet.lab.connectivity import Lab
from podnet.model.objects import Service
from tests.kernel.labs import echo_connection, log_offsets, log_since, running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

ECHO_PORT = 7000
NODES = ("node-1", "node-2")
MANIFESTS = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
     "spec": {"selector": {"app": "echo"}, "ports": [{"name": "echo", "port": 80, "targetPort": ECHO_PORT}]}},
]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"},
            "nodes": [{"name": n} for n in NODES],
            "pods": [{"name": "client", "node": "node-1", "ports": [{"containerPort": 8080}]},
                     {"name": "echo", "node": "node-2", "labels": {"app": "echo"},
                      "ports": [{"containerPort": 8080}]}],
            "manifests": MANIFESTS}
    with running_lab(spec, "rs") as lab:
        yield lab


def svc_table(lab: Lab, node: str) -> str:
    out = lab.exec_node(node, ["nft", "-a", "list", "table", "ip", "podnet-svc"])
    assert out.returncode == 0, out.stderr
    return out.stdout


def rule_handles(listing: str) -> list[str]:
    return re.findall(r"# handle (\d+)", listing)


def test_connection_through_service_survives_agent_restart(lab):
    svc = lab.store().get(Service, "echo", "default")
    assert svc is not None and svc.spec.cluster_ip
    client_ns, echo_ns = lab.pod("client")["netns"], lab.pod("echo")["netns"]

    def programmed() -> bool:
        # the backend's address, not just the VIP: a VIP without endpoints is there too, to be rejected
        return lab.pod("echo")["ips"][0] in svc_table(lab, "node-1")

    with echo_connection(echo_ns, ECHO_PORT, client_ns, f"{svc.spec.cluster_ip}:80", ready=programmed) as roundtrip:
        assert roundtrip("before") == "before"
        before = {n: svc_table(lab, n) for n in NODES}
        assert all(rule_handles(t) for t in before.values())
        for n in lab.nodes:  # the first start did program the table, and said so
            assert "services: table rebuilt" in Path(n["log"]).read_text(errors="replace"), n["name"]
        offsets = log_offsets(lab)

        for node in NODES:
            restart_agent(lab.state, node)

        assert roundtrip("after") == "after"  # the same TCP connection, through the same DNAT entry
        # Every agent has programmed everything the store holds (its .synced file): a sync that
        # changed the table would have happened by now, and would show in the table and the log.
        wait_programmed(lab.state, lab.store().kv.revision(), 30)
        after = {n: svc_table(lab, n) for n in NODES}
        for node in NODES:
            assert rule_handles(after[node]) == rule_handles(before[node]), f"{node}: table rebuilt"
            assert after[node] == before[node], f"{node}: Service table changed on restart"
            fresh = log_since(lab, node, offsets)
            assert "serving CNI" in fresh, f"agent {node} did not start again:\n{fresh}"
            assert "services: table" not in fresh, f"agent {node} changed the Service table on restart:\n{fresh}"
            assert "services: rebuilt" not in fresh and "services: synced" not in fresh, fresh
        assert roundtrip("again") == "again"
