"""Pod interfaces and cross-node routes against the real kernel.

Two nodes share an underlay bridge that lives in its own namespace; each node
has a pod. The dataplane code runs inside the node namespaces, as the agent does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.kernel.nsutil import in_ns, namespaces, py_in, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NODE_IPS = {"n1": "10.99.0.11", "n2": "10.99.0.12"}
POD_IPS = {"n1": "10.244.0.5", "n2": "10.244.0.70"}
BLOCKS = {"n1": "10.244.0.0/26", "n2": "10.244.0.64/26"}


def add_pod(node_ns: str, pod_ns: str, cid: str, address: str) -> dict:
    out = py_in(node_ns, f"""
import json, dataclasses
from podnet.dataplane.pods import PodDataplane
r = PodDataplane(1450).add({cid!r}, "eth0", "/run/netns/{pod_ns}", {address!r})
print(json.dumps(dataclasses.asdict(r)))
""")
    return json.loads(out.stdout)


def apply_routes(node_ns: str, node: str, encap: str) -> dict:
    blocks = [(BLOCKS[n], n) for n in NODE_IPS]
    out = py_in(node_ns, f"""
import json
from podnet.dataplane.routing import BlockOwner, desired_routing
from podnet.dataplane.routes import RouteProgrammer
blocks = [BlockOwner(c, n, {encap!r}) for c, n in {blocks!r}]
d = desired_routing({node!r}, blocks, [], {NODE_IPS!r}, vxlan_in_use={encap == 'VXLAN'})
ch = RouteProgrammer({node!r}, {NODE_IPS[node]!r}).apply(d)
print(json.dumps({{"added": ch.added, "removed": ch.removed, "errors": ch.errors}}))
""")
    return json.loads(out.stdout)


@pytest.fixture
def cluster():
    with namespaces() as ns:
        ul = ns.new("ul")
        in_ns(ul, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(ul, "ip", "link", "set", "br0", "up")
        nodes, pods = {}, {}
        for i, name in enumerate(NODE_IPS, start=1):
            node = ns.new(name)
            in_ns(ul, "ip", "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", node)
            in_ns(ul, "ip", "link", "set", f"v{i}", "master", "br0", "up")
            in_ns(node, "ip", "addr", "add", f"{NODE_IPS[name]}/24", "dev", "eth0")
            in_ns(node, "ip", "link", "set", "eth0", "up")
            in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            nodes[name] = node
            pods[name] = ns.new(f"p{i}")
        yield nodes, pods


def ping(src_ns: str, dst: str) -> bool:
    return in_ns(src_ns, "ping", "-c", "1", "-W", "2", dst, check=False).returncode == 0


@pytest.mark.parametrize("encap", ["VXLAN", "None"])
def test_pods_on_two_nodes_reach_each_other(cluster, encap):
    nodes, pods = cluster
    for n in NODE_IPS:
        result = add_pod(nodes[n], pods[n], f"c-{n}", POD_IPS[n])
        assert result["address"] == POD_IPS[n] and result["gateway"] == "169.254.1.1"
    assert not ping(pods["n1"], POD_IPS["n2"]), "no cross-node route yet, yet traffic passed"
    for n in NODE_IPS:
        assert not apply_routes(nodes[n], n, encap)["errors"]
    assert ping(pods["n1"], POD_IPS["n2"])
    assert ping(pods["n2"], POD_IPS["n1"])
    routes = in_ns(nodes["n1"], "ip", "route", "show", "proto", "88").stdout
    assert "blackhole 10.244.0.0/26" in routes
    if encap == "VXLAN":
        assert "10.244.0.64/26 via 10.99.0.12 dev pn-vxlan" in routes
        # the pod's packets really cross the underlay encapsulated: the VXLAN device counts them
        stats = json.loads(in_ns(nodes["n1"], "ip", "-j", "-s", "link", "show", "pn-vxlan").stdout)[0]
        assert stats["stats64"]["tx"]["packets"] > 0
    else:
        assert "10.244.0.64/26 via 10.99.0.12 dev eth0" in routes
        assert "pn-vxlan" not in in_ns(nodes["n1"], "ip", "link").stdout


def test_reapplying_changes_nothing_and_stale_routes_go(cluster):
    nodes, _ = cluster
    first = apply_routes(nodes["n1"], "n1", "VXLAN")
    assert len(first["added"]) >= 2
    again = apply_routes(nodes["n1"], "n1", "VXLAN")
    assert again == {"added": [], "removed": [], "errors": []}
    # a route podnet owns but no longer wants is removed; foreign routes are left alone
    in_ns(nodes["n1"], "ip", "route", "add", "10.250.0.0/24", "via", "10.99.0.12", "proto", "88")
    in_ns(nodes["n1"], "ip", "route", "add", "10.251.0.0/24", "via", "10.99.0.12")
    out = apply_routes(nodes["n1"], "n1", "VXLAN")
    assert out["removed"] == ["10.250.0.0/24 via 10.99.0.12"]
    assert "10.251.0.0/24" in in_ns(nodes["n1"], "ip", "route").stdout
    # switching the pool to direct routing removes the VXLAN device and its routes
    out = apply_routes(nodes["n1"], "n1", "None")
    assert "link pn-vxlan" in out["removed"]
    assert "10.244.0.64/26 via 10.99.0.12 src 10.99.0.11" in out["added"]


@pytest.mark.parametrize("encap", ["VXLAN", "None"])
def test_routes_without_the_node_source_are_replaced_in_place(cluster, encap):
    """Routes towards other nodes carry src <node address>; one written without it (by an
    agent of before) or with another source is replaced, not deleted and re-added."""
    nodes, _ = cluster
    n1 = nodes["n1"]
    dev = ["dev", "pn-vxlan", "onlink"] if encap == "VXLAN" else []
    assert not apply_routes(n1, "n1", encap)["errors"]
    assert "src 10.99.0.11" in in_ns(n1, "ip", "route", "get", POD_IPS["n2"]).stdout
    in_ns(n1, "ip", "addr", "add", "169.254.20.10/32", "dev", "lo")  # as the node's DNS address was
    # VXLAN: a route without a source, as before (pn-vxlan has no address: lo's is taken);
    # direct: one with another source (eth0's address would be taken without one)
    src = [] if encap == "VXLAN" else ["src", "169.254.20.10"]
    in_ns(n1, "ip", "route", "replace", BLOCKS["n2"], "via", NODE_IPS["n2"], *dev, "proto", "88", *src)
    assert "src 169.254.20.10" in in_ns(n1, "ip", "route", "get", POD_IPS["n2"]).stdout
    monitor = subprocess.Popen(["ip", "netns", "exec", n1, "ip", "-o", "monitor", "route"],
                               stdout=subprocess.PIPE, text=True)
    try:
        out = apply_routes(n1, "n1", encap)
        in_ns(n1, "ip", "route", "add", "10.252.0.0/24", "via", NODE_IPS["n2"])  # a marker: events so far seen
        seen = []
        assert monitor.stdout is not None
        for line in monitor.stdout:
            if line.startswith("10.252.0.0/24"):
                break
            seen.append(line)
    finally:
        monitor.kill()
        monitor.wait(timeout=10)
    via = f"{BLOCKS['n2']} via {NODE_IPS['n2']}" + (" dev pn-vxlan onlink" if encap == "VXLAN" else "")
    before = via if encap == "VXLAN" else f"{via} src 169.254.20.10"
    assert out == {"added": [f"{via} src 10.99.0.11"], "removed": [before], "errors": []}
    assert not any(line.startswith("Deleted") for line in seen), seen
    assert "src 10.99.0.11" in in_ns(n1, "ip", "route", "get", POD_IPS["n2"]).stdout
    assert apply_routes(n1, "n1", encap) == {"added": [], "removed": [], "errors": []}


def test_pod_interface_add_is_idempotent_check_and_delete(cluster):
    nodes, pods = cluster
    a = add_pod(nodes["n1"], pods["n1"], "c1", POD_IPS["n1"])
    b = add_pod(nodes["n1"], pods["n1"], "c1", POD_IPS["n1"])
    assert a == b  # same interface, same MACs: nothing recreated
    assert a["host_mac"] == "ee:ee:ee:ee:ee:ee" and a["mtu"] == 1450
    check = f"""
from podnet.dataplane.pods import PodDataplane
print(PodDataplane(1450).check("c1", "eth0", "/run/netns/{pods['n1']}", "{POD_IPS['n1']}"))
"""
    assert py_in(nodes["n1"], check).stdout.strip() == "[]"
    in_ns(pods["n1"], "ip", "route", "del", "default")
    assert "no default route" in py_in(nodes["n1"], check).stdout
    listed = py_in(nodes["n1"], "from podnet.dataplane.pods import PodDataplane; print(PodDataplane().attachments())")
    assert "('c1', 'eth0')" in listed.stdout
    delete = f"""
from podnet.dataplane.pods import PodDataplane
d = PodDataplane(1450)
d.delete("c1", "eth0", "/run/netns/{pods['n1']}")
d.delete("c1", "eth0", "/run/netns/{pods['n1']}")   # again: still fine
d.delete("c1", "eth0", "/run/netns/gone-away")      # netns gone: still fine
print(d.attachments())
"""
    assert py_in(nodes["n1"], delete).stdout.strip() == "[]"
    assert "eth0" not in in_ns(pods["n1"], "ip", "-o", "link").stdout
    assert POD_IPS["n1"] not in in_ns(nodes["n1"], "ip", "route").stdout


def test_add_into_missing_netns_is_a_clear_error(cluster):
    nodes, _ = cluster
    out = py_in(nodes["n1"], """
from podnet.dataplane.pods import PodDataplane
try:
    PodDataplane().add("c9", "eth0", "/run/netns/does-not-exist", "10.244.0.9")
except Exception as e:
    print(type(e).__name__, e)
""")
    assert "NotANetns network namespace /run/netns/does-not-exist does not exist" in out.stdout
    assert not re.search(r": pn[0-9a-f]{11}[@:]", sh("ip", "-n", nodes["n1"], "-o", "link").stdout)


def test_node_dns_addresses_on_lo_have_scope_host_and_are_never_a_source(cluster):
    """The node-local DNS addresses on lo are /32s of scope host (an address of scope
    global there, as written before, is re-added so): the kernel then never takes them
    as the source of a packet leaving the node, on a route without a source or when
    masquerading out of a device without an address of its own."""
    nodes, _ = cluster
    n1 = nodes["n1"]
    in_ns(n1, "ip", "addr", "add", "169.254.20.10/32", "dev", "lo")
    in_ns(n1, "ip", "link", "add", "pv0", "type", "veth", "peer", "name", "pv1")  # a device with no address
    in_ns(n1, "ip", "link", "set", "pv0", "up")
    in_ns(n1, "ip", "route", "add", "10.250.0.0/24", "dev", "pv0")
    assert "src 169.254.20.10" in in_ns(n1, "ip", "route", "get", "10.250.0.1").stdout
    code = """
import json
from podnet.dataplane.localdns import DnsAddresses
d = DnsAddresses(["169.254.20.10", "10.96.0.10"])
before = d.drift()
d.ensure()
print(json.dumps([before, d.drift()]))
"""
    before, after = json.loads(py_in(n1, code).stdout)
    assert before == ["address 10.96.0.10 missing from lo", "address 169.254.20.10 on lo is not a /32 of scope host"]
    assert after == []
    addrs = in_ns(n1, "ip", "-4", "-o", "addr", "show", "dev", "lo").stdout
    assert re.search(r"169\.254\.20\.10/32 scope host", addrs) and re.search(r"10\.96\.0\.10/32 scope host", addrs)
    assert "src 10.99.0.11" in in_ns(n1, "ip", "route", "get", "10.250.0.1").stdout
    # still an address of the node: the other node reaches it
    in_ns(nodes["n2"], "ip", "route", "add", "169.254.20.10/32", "via", NODE_IPS["n1"])
    assert ping(nodes["n2"], "169.254.20.10")
