"""Stale UDP flows are deleted through netlink, and only they: 10 000 UDP conntrack entries
made by real packets in a namespace (through a DNAT rule spreading a Service's flows over
four endpoints, to a Service without endpoints, to a NodePort on two addresses, to other
Services and ports), then the Service cleanup for a removed endpoint, a frontend that had
no endpoints and a NodePort: exactly the 5 000 entries of those flows are gone, read back
with the project's dump and with `conntrack -L`, every other entry (TCP to the same
address and port too) is still there."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

from podnet.dataplane.ctnetlink import Conntrack  # noqa: E402
from podnet.dataplane.netns import in_netns  # noqa: E402
from podnet.services.conntrack import delete_stale_flows  # noqa: E402
from podnet.services.model import Backend, Frontend, StaleFlow  # noqa: E402
from tests.kernel.nsutil import in_ns, namespaces, py_in  # noqa: E402

DNAT = """
table ip svc {
  chain out {
    type nat hook output priority -100;
    ip daddr 10.96.0.10 udp dport 53 dnat to numgen inc mod 4 map { 0 : 10.1.0.1, 1 : 10.1.0.2, 2 : 10.1.0.3, 3 : 10.1.0.4 } : 5353
  }
}
"""
# (client address, first source port, destination, port, flows): one UDP packet per flow,
# each from its own source port, so each is a conntrack entry of its own
TRAFFIC = [
    ("10.2.0.1", 10000, "10.96.0.10", 53, 4000),  # DNATed, 1000 to each endpoint
    ("10.2.0.2", 10000, "10.96.0.11", 53, 2000),  # a Service that had no endpoints
    ("10.2.0.3", 10000, "10.96.5.5", 30053, 1000),  # a NodePort, on two of the node's addresses
    ("10.2.0.3", 20000, "10.96.5.6", 30053, 1000),
    ("10.2.0.4", 10000, "10.96.0.12", 53, 1000),  # another Service: stays
    ("10.2.0.5", 10000, "10.96.0.10", 54, 1000),  # the same address, another port: stays
]
SENDER = """
import socket, sys
for line in sys.stdin:
    src, sport, dst, dport, n = line.split()
    for i in range(int(n)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, int(sport) + i))
        s.sendto(b"q", (dst, int(dport)))
        s.close()
for i in range(20):  # TCP to the DNATed address and port: never a UDP flow's
    s = socket.socket()
    s.setblocking(False)
    s.bind(("10.2.0.6", 10000 + i))
    s.connect_ex(("10.96.0.10", 53))
    s.close()
"""
STALE = [
    StaleFlow(Frontend("10.96.0.10", "udp", 53), Backend("10.1.0.2", 5353)),  # the endpoint removed
    StaleFlow(Frontend("10.96.0.11", "udp", 53), None),  # it had no endpoints and now has some
    StaleFlow(Frontend(None, "udp", 30053), None),
]


def is_stale(orig, reply) -> bool:
    """The same rule, written out plainly: which entries the cleanup must delete."""
    dst, dport, rsrc = socket.inet_ntoa(orig.dst), orig.dport, socket.inet_ntoa(reply.src)
    if orig.proto != socket.IPPROTO_UDP:
        return False
    return ((dst, dport, rsrc, reply.sport) == ("10.96.0.10", 53, "10.1.0.2", 5353)
            or (dst, dport) == ("10.96.0.11", 53) or dport == 30053)


def entries(ns: str) -> set:
    ct = in_netns(f"/run/netns/{ns}", Conntrack)
    try:
        return {(e.orig, e.reply) for e in ct.dump(socket.AF_INET)}
    finally:
        ct.close()


def conntrack_l(ns: str, *args: str) -> int:
    """How many entries `conntrack -L` lists (the reference tool's own reading)."""
    proc = in_ns(ns, "conntrack", "-L", *args, check=False)
    return sum(1 for line in proc.stdout.splitlines() if line.strip())


@pytest.fixture
def node():
    with namespaces() as ns:
        n = ns.new("ct")
        # the packets leave by a veth whose other end (in the same namespace) has nothing on it
        in_ns(n, "ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1")
        in_ns(n, "ip", "addr", "add", "10.1.0.254/16", "dev", "out0")
        for i in range(1, 7):
            in_ns(n, "ip", "addr", "add", f"10.2.0.{i}/32", "dev", "out0")
        for dev in ("out0", "out1"):
            in_ns(n, "ip", "link", "set", dev, "up")
        in_ns(n, "ip", "route", "add", "10.96.0.0/16", "dev", "out0")
        # unanswered UDP entries live 30 s by default: long enough to look at them
        in_ns(n, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        in_ns(n, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=600")
        in_ns(n, "nft", "-f", "-", input=DNAT)
        lines = "".join(f"{src} {sport} {dst} {dport} {n_}\n" for src, sport, dst, dport, n_ in TRAFFIC)
        py_in(n, SENDER, input=lines, timeout=120)
        yield n


def test_ten_thousand_udp_entries_only_the_stale_flows_are_deleted(node):
    before = entries(node)
    udp = [e for e in before if e[0].proto == socket.IPPROTO_UDP]
    assert len(udp) == 10_000, len(udp)
    assert sum(1 for _, reply in udp if reply.src == socket.inet_aton("10.1.0.2")) == 1000  # DNAT spread them
    assert conntrack_l(node, "-p", "tcp") == 20
    expected_gone = {e for e in before if is_stale(*e)}
    assert len(expected_gone) == 5000

    ct = in_netns(f"/run/netns/{node}", Conntrack)
    try:
        assert delete_stale_flows(STALE, ct) == 5000
        assert delete_stale_flows(STALE, ct) == 0  # nothing left to delete
    finally:
        ct.close()

    after = entries(node)
    assert after == before - expected_gone
    assert conntrack_l(node, "-p", "udp") == 5000
    assert conntrack_l(node, "-p", "udp", "--reply-src", "10.1.0.2") == 0
    assert conntrack_l(node, "-p", "udp", "--orig-dst", "10.96.0.10", "--orig-port-dst", "53") == 3000
    assert conntrack_l(node, "-p", "udp", "--orig-port-dst", "30053") == 0
    assert conntrack_l(node, "-p", "tcp", "--orig-dst", "10.96.0.10") == 20


def test_one_frontends_endpoint_uses_the_kernel_filter(node):
    before = entries(node)
    flow = StaleFlow(Frontend("10.96.0.10", "udp", 53), Backend("10.1.0.3", 5353))
    ct = in_netns(f"/run/netns/{node}", Conntrack)
    try:
        dumped = list(ct.dump(socket.AF_INET, proto=socket.IPPROTO_UDP, dst=socket.inet_aton("10.96.0.10"),
                              dport=53))
        assert len(dumped) == 4000  # the kernel sent only this frontend's entries
        assert delete_stale_flows([flow], ct) == 1000
    finally:
        ct.close()
    gone = before - entries(node)
    assert len(gone) == 1000
    assert all(reply.src == socket.inet_aton("10.1.0.3") and reply.sport == 5353 for _, reply in gone)


def test_cleanup_in_a_namespace_without_entries_is_quiet(node):
    subprocess.run(["ip", "netns", "exec", node, "conntrack", "-F"], capture_output=True)
    ct = in_netns(f"/run/netns/{node}", Conntrack)
    try:
        assert delete_stale_flows(STALE, ct) == 0
    finally:
        ct.close()
