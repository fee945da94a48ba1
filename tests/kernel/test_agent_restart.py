"""Restarting a node agent changes nothing that is right: an established TCP
connection across nodes keeps flowing, and routes and pod links stay as they were."""

import os
import subprocess
from pathlib import Path

import pytest

from podnet.lab.cluster import restart_agent
from podnet.lab.connectivity import Lab
from tests.kernel.labs import running_lab

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
    server = subprocess.Popen(["ip", "netns", "exec", b["netns"], "socat", f"TCP-LISTEN:{ECHO_PORT},reuseaddr",
                               "EXEC:cat"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = None
    try:
        for _ in range(50):  # wait for the listener
            probe = subprocess.run(["ip", "netns", "exec", b["netns"], "ss", "-ltn", f"sport = :{ECHO_PORT}"],
                                   capture_output=True, text=True)
            if str(ECHO_PORT) in probe.stdout:
                break
        client = subprocess.Popen(["ip", "netns", "exec", a["netns"], "socat", "-",
                                   f"TCP:{b['ips'][0]}:{ECHO_PORT}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

        def roundtrip(word: str) -> str:
            client.stdin.write(word + "\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        assert roundtrip("before") == "before"
        before = {n: node_state(lab, n) for n in ("node-1", "node-2")}
        logs = {n["name"]: Path(n["log"]) for n in lab.nodes}
        sizes = {n: p.stat().st_size for n, p in logs.items()}

        for node in ("node-1", "node-2"):
            restart_agent(lab.state, node)

        assert roundtrip("after") == "after"  # the same TCP connection, still flowing
        assert {n: node_state(lab, n) for n in ("node-1", "node-2")} == before
        for node, path in logs.items():
            fresh = path.read_bytes()[sizes[node]:].decode(errors="replace")
            assert "serving CNI" in fresh, f"agent {node} did not start again:\n{fresh}"
            assert "routing entries" not in fresh, f"agent {node} changed routing on restart:\n{fresh}"
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()  # by the handle we started it with
                proc.wait(timeout=10)
