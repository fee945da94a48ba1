"""Restarting a node agent changes nothing that is right: an established TCP
connection across nodes keeps flowing, and routes and pod links stay as they were."""

import os

import pytest

from podnet.lab.cluster import restart_agent
from podnet.lab.connectivity import Lab
from tests.kernel.labs import echo_connection, log_offsets, log_since, running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

ECHO_PORT = 7000


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"},
            "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": [{"name": "a", "node": "node-1", "ports": [{"containerPort": 8080}]},
                     {"name": "b", "node": "node-2", "ports": [{"containerPort": 8080}]}]}
    with running_lab(spec, "ar") as lab:
        yield lab


def node_state(lab: Lab, node: str) -> tuple[str, str, str]:
    def run(*argv: str) -> str:
        out = lab.exec_node(node, list(argv))
        assert out.returncode == 0, out.stderr
        return out.stdout

    return (run("ip", "route", "show"), run("ip", "-o", "link", "show"), run("ip", "neigh", "show", "nud", "permanent"))


def test_established_connection_survives_agent_restart(lab):
    a, b = lab.pod("a"), lab.pod("b")
    with echo_connection(b["netns"], ECHO_PORT, a["netns"], f"{b['ips'][0]}:{ECHO_PORT}") as roundtrip:
        assert roundtrip("before") == "before"
        before = {n: node_state(lab, n) for n in ("node-1", "node-2")}
        offsets = log_offsets(lab)

        for node in ("node-1", "node-2"):
            restart_agent(lab.state, node)

        assert roundtrip("after") == "after"  # the same TCP connection, still flowing
        assert {n: node_state(lab, n) for n in ("node-1", "node-2")} == before
        for node in offsets:
            fresh = log_since(lab, node, offsets)
            assert "serving CNI" in fresh, f"agent {node} did not start again:\n{fresh}"
            assert "routing entries" not in fresh, f"agent {node} changed routing on restart:\n{fresh}"
