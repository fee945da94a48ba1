"""Cross-node routes at cluster size against the real kernel: thousands of routes,
neighbours and FDB entries in one batch, a new block as one route, drift found by
the cheap check and repaired by a full reconcile, and a refused request named."""

from __future__ import annotations

import json
import os

import pytest

from tests.kernel.nsutil import in_ns, namespaces, py_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NODES = 1000
SCRIPT = """
import json, subprocess
from podnet.dataplane.routing import BlockOwner, desired_routing
from podnet.dataplane.routes import RouteProgrammer

def node_ip(i): return f"10.200.{i // 250}.{i % 250 + 1}"
def block(i): return f"10.{64 + i // 1024}.{(i % 1024) // 4}.{(i % 4) * 64}/26"
node_ips = {f"n{i}": node_ip(i) for i in range(NODES + 1)}

def desired(n_blocks, direct=()):
    owners = [BlockOwner(block(i), f"n{i}", "VXLAN") for i in range(n_blocks)]
    owners += [BlockOwner(cidr, node, "None") for cidr, node in direct]
    return desired_routing("n0", owners, [], node_ips, True, local_ip=node_ip(0))

def count(*what):
    return len(subprocess.run(["ip", *what], capture_output=True, text=True).stdout.splitlines())

out = {}
rp = RouteProgrammer("n0", node_ip(0))
ch = rp.apply(desired(NODES))
out["first"] = [len(ch.added), ch.errors, count("route", "show", "proto", "88"),
                count("neigh", "show", "dev", "pn-vxlan"), count("-d", "link", "show", "pn-vxlan")]
out["fdb"] = len([x for x in subprocess.run(["bridge", "fdb", "show", "dev", "pn-vxlan"], capture_output=True,
                                            text=True).stdout.splitlines() if " dst " in x])
rp2 = RouteProgrammer("n0", node_ip(0))  # a restarted agent: reads the kernel, changes nothing
out["restart"] = rp2.apply(desired(NODES)).count
ch = rp2.apply(desired(NODES + 1), full=False)
out["one_block"] = ch.added
subprocess.run(["ip", "route", "del", block(5)], check=True)
subprocess.run(["ip", "neigh", "del", node_ip(9), "dev", "pn-vxlan"], check=True)
out["drift"] = rp2.drift()
ch = rp2.apply(desired(NODES + 1), full=True)
out["repaired"] = [sorted(ch.added), rp2.drift()]
# a direct route whose gateway is not on any link: refused, named, and the rest still applied
ch = rp2.apply(desired(NODES + 1, direct=[("10.250.0.0/26", "ghost")]), full=False)
node_ips["ghost"] = "192.0.2.1"
ch = rp2.apply(desired(NODES + 1, direct=[("10.250.0.0/26", "ghost"), ("10.250.0.64/26", "n3")]), full=False)
out["refused"] = [ch.errors, ch.added]
print(json.dumps(out))
"""


def test_a_thousand_nodes_batched_incremental_drift_and_a_refused_request():
    with namespaces() as ns:
        node = ns.new("n0")
        in_ns(node, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        in_ns(node, "ip", "addr", "add", "10.200.0.1/16", "dev", "ul0")
        in_ns(node, "ip", "link", "set", "ul0", "up")
        in_ns(node, "ip", "link", "set", "ul1", "up")
        out = json.loads(py_in(node, SCRIPT.replace("NODES", str(NODES)), timeout=120).stdout)
    added, errors, routes, neighbours, links = out["first"]
    assert errors == [] and routes == NODES  # 999 remote blocks + the own blackhole
    assert added == routes + 2 * (NODES - 1)  # routes, neighbours, FDB entries
    assert neighbours == NODES - 1 and out["fdb"] == NODES - 1 and links >= 1
    assert out["restart"] == 0
    assert len(out["one_block"]) == 3 and out["one_block"][-1].startswith("10.64.250.0/26 via 10.200.4.1")  # neigh, fdb, route
    drift = out["drift"]
    assert any(d.startswith("route 10.64.1.64/26") and d.endswith("missing") for d in drift), drift
    assert any(d.startswith("neighbour 10.200.0.10") for d in drift), drift
    added, left = out["repaired"]
    assert any(a.startswith("10.64.1.64/26") for a in added) and left == []
    errors, added = out["refused"]
    assert len(errors) == 1 and errors[0].startswith("route 10.250.0.0/26"), errors
    assert any(a.startswith("10.250.0.64/26 via 10.200.0.4") for a in added)
