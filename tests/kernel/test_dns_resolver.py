"""glibc's resolver in a pod namespace against podnet's DNS server on its node.

Two namespaces joined by a veth: the pod (10.244.1.5) and the node (10.244.1.1),
where the server listens and an unbound upstream serves an external test zone
on loopback. `ip netns exec` bind-mounts /etc/netns/<pod>/resolv.conf over
/etc/resolv.conf, so `getent` in the pod uses the rendered pod resolv.conf.
Queries on the wire are counted by the server itself (its counters on exit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from podnet.dns.resolvconf import render
from tests.kernel.nsutil import in_ns, namespaces
from tests.support.dns import Unbound

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("unbound") is None or shutil.which("getent") is None,
                       reason="needs unbound and getent"),
]

POD_IP, NODE_IP = "10.244.1.5", "10.244.1.1"
UPSTREAM_RECORDS = [
    "example.test. 3600 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60",
    "www.example.test. 300 IN A 192.0.2.10",
    "corp.test. 3600 IN SOA ns.corp.test. admin.corp.test. 1 3600 600 86400 60",
    "intranet.corp.test. 300 IN A 192.0.2.30",
]
OBJECTS = {"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
     "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
     "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}},
]}


@pytest.fixture
def node_and_pod():
    etc_dirs = []
    with namespaces() as ns, tempfile.TemporaryDirectory(prefix="podnet-dns-") as tmp:
        node, pod = ns.new("node"), ns.new("pod")
        in_ns(node, "ip", "link", "add", "veth-p", "type", "veth", "peer", "name", "eth0", "netns", pod)
        in_ns(node, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "veth-p")
        in_ns(node, "ip", "link", "set", "veth-p", "up")
        in_ns(pod, "ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        in_ns(pod, "ip", "link", "set", "eth0", "up")
        etc = f"/etc/netns/{pod}"
        os.makedirs(etc, exist_ok=True)
        etc_dirs.append(etc)
        with open(f"{etc}/resolv.conf", "w") as f:
            f.write(render("default", NODE_IP, host_search=["corp.test"]))
        with open(f"{tmp}/objects.json", "w") as f:
            json.dump(OBJECTS, f)
        upstream = Unbound(records=UPSTREAM_RECORDS, zones=["example.test.", "corp.test."], host="127.0.0.9",
                           port=5353, netns=node)
        try:
            upstream.start()
            yield node, pod, tmp, upstream
        finally:
            upstream.cleanup()
            for d in etc_dirs:
                shutil.rmtree(d, ignore_errors=True)


class Server:
    """podnet's DNS server as a process in the node namespace, stopped by PID."""

    def __init__(self, node: str, tmp: str, *extra: str):
        self.stats_file = f"{tmp}/stats-{time.monotonic_ns()}.json"
        ready = f"{tmp}/ready-{time.monotonic_ns()}.json"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", node, sys.executable, "-m", "podnet.dns.server", "--listen", f"{NODE_IP}:53",
             "--upstream", "127.0.0.9:5353", "--manifests", f"{tmp}/objects.json", "--search", "corp.test",
             "--local-pod", f"{POD_IP}=default", "--stats-file", self.stats_file, "--ready-file", ready, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"DNS server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.05)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        if not os.path.exists(self.stats_file):
            return {}
        with open(self.stats_file) as f:
            return json.load(f)


def getent(pod: str, *args: str) -> list[list[str]]:
    out = in_ns(pod, "getent", *args, check=False, timeout=30)
    assert out.returncode == 0, f"getent {' '.join(args)} failed ({out.returncode}): {out.stderr}"
    return [line.split() for line in out.stdout.splitlines()]


def test_external_name_in_one_query_with_autopath(node_and_pod):
    node, pod, tmp, upstream = node_and_pod
    server = Server(node, tmp)
    try:
        rows = getent(pod, "ahostsv4", "www.example.test")
    finally:
        stats = server.stop()
    assert rows[0][0] == "192.0.2.10"
    # ndots:5 makes glibc try www.example.test.default.svc.cluster.local first: the server
    # walked the search path itself and answered in that one round trip
    assert stats["udp"] + stats["tcp"] == 1, stats
    assert stats["autopath"] == 1


def test_without_autopath_the_search_path_costs_a_query_per_element(node_and_pod):
    node, pod, tmp, upstream = node_and_pod
    server = Server(node, tmp, "--no-autopath")
    try:
        rows = getent(pod, "ahostsv4", "www.example.test")
    finally:
        stats = server.stop()
    assert rows[0][0] == "192.0.2.10"
    # default.svc.cluster.local, svc.cluster.local, cluster.local, corp.test, then the name itself
    assert stats["udp"] + stats["tcp"] == 5, stats


def test_both_families_and_host_search_domains(node_and_pod):
    node, pod, tmp, upstream = node_and_pod
    server = Server(node, tmp)
    try:
        hosts = getent(pod, "hosts", "www.example.test")
        intranet = getent(pod, "ahostsv4", "intranet")  # found through the host's search domain
    finally:
        stats = server.stop()
    assert hosts[0][0] == "192.0.2.10"
    assert intranet[0][0] == "192.0.2.30"
    # getent hosts asks AAAA (NODATA through the CNAME) then A: one query per family; then one for intranet
    assert stats["udp"] + stats["tcp"] <= 3, stats
    assert stats["autopath"] >= 2


def test_cluster_names_from_the_pod(node_and_pod):
    node, pod, tmp, upstream = node_and_pod
    server = Server(node, tmp)
    try:
        assert getent(pod, "ahostsv4", "web")[0][0] == "10.96.0.10"  # own namespace, first element
        assert getent(pod, "ahostsv4", "api.shop")[0][0] == "10.96.0.20"  # other namespace, via autopath
        assert getent(pod, "ahostsv4", "web.default.svc.cluster.local")[0][0] == "10.96.0.10"
        missing = in_ns(pod, "getent", "ahostsv4", "nosuch", check=False, timeout=30)
        assert missing.returncode == 2  # not found
        ptr = getent(pod, "hosts", "10.96.0.10")
        assert ptr[0][1] == "web.default.svc.cluster.local"
    finally:
        stats = server.stop()
    assert stats["errors"] == 0


def test_glibc_falls_back_to_tcp_for_a_truncated_answer(node_and_pod):
    node, pod, tmp, upstream = node_and_pod
    big = {"apiVersion": "v1", "kind": "List", "items": [
        *OBJECTS["items"],
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "big", "namespace": "default"},
         "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "big-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "big"}},
         "addressType": "IPv4", "endpoints": [{"addresses": [f"10.245.0.{n}"]} for n in range(1, 101)]},
    ]}
    with open(f"{tmp}/objects.json", "w") as f:
        json.dump(big, f)
    server = Server(node, tmp)
    try:
        rows = getent(pod, "ahostsv4", "big.default.svc.cluster.local")
    finally:
        stats = server.stop()
    assert {r[0] for r in rows} == {f"10.245.0.{n}" for n in range(1, 101)}
    assert stats["truncated"] >= 1 and stats["tcp"] >= 1
