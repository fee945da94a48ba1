"""The fake of tests/support/nftables.py and the kernel agree: the same transactions,
applied to both, read back (the kernel by netlink dumps) as the same dump."""

from __future__ import annotations

import json
import os

import pytest

from tests.kernel.nsutil import namespaces, py_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SCRIPT = r"""
import json
from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nftables import Chain, Elements, Map, NftRunner, Rule, Set, Table, Transaction, read_ruleset
from tests.support.nftables import FakeNft

T = Table("podnet-layer")
ADDRS = Set("addrs", type="ipv4_addr")
PORTS = Set("ports", type="ipv4_addr . inet_service")
CIDRS = Set("cidrs", type="ipv4_addr", flags=("interval",))
DISPATCH = Map("dispatch", type="ipv4_addr : verdict")
SLOTS = Map("slots", typeof="ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport")
MARKS = Set("marks", type="mark . mark")
RANGES = Set("ranges", type="ipv4_addr . inet_proto . inet_service . ipv4_addr", flags=("interval",))
SIZED = Set("sized", type="ipv4_addr . inet_proto . inet_service", size=1024)
AFFINITY = Map("affinity", typeof="ip saddr . ip daddr . meta l4proto . th dport : ip daddr . th dport",
               flags=("dynamic", "timeout"), size=4096, timeout="3h")

steps = []
tx = Transaction(T)
tx.recreate()
for s in (ADDRS, PORTS, CIDRS, DISPATCH, SLOTS, MARKS, SIZED, AFFINITY, RANGES):
    tx.add(s)
tx.add(Chain("allow"))
tx.add(Chain("other"))
tx.add(Chain("input", type="filter", hook="input", priority="filter - 1", policy="accept"))
tx.add(Chain("pre", type="filter", hook="prerouting", priority="raw", policy="accept"))
tx.add(Chain("post", type="nat", hook="postrouting", priority="srcnat + 10"))
tx.add(Rule("allow", "ip saddr @addrs accept"))
tx.add(Rule("allow", "ip saddr . tcp dport @ports accept"))
tx.add(Rule("input", "ct state established,related accept"))
tx.add(Rule("input", "ip daddr vmap @dispatch"))
tx.add(Rule("pre", "ip daddr @cidrs meta l4proto { udp, tcp } th dport 53 notrack"))
tx.add(Rule("post", "ip saddr @cidrs masquerade fully-random"))
tx.add(Elements(ADDRS, ["10.0.0.1", "10.0.0.2"]))
tx.add(Elements(CIDRS, ["10.0.0.0/8", "192.168.0.0-192.168.0.2", "172.16.0.1"]))
tx.add(Elements(DISPATCH, ["10.1.0.1 : jump allow", "10.1.0.2 : drop"]))
tx.add(Elements(RANGES, ["203.0.113.7 . tcp . 80 . 10.0.0.0/8", "203.0.113.7 . tcp . 80 . 192.0.2.1"]))
steps.append(tx)

tx = Transaction(T)  # elements only: a netlink batch
tx.add(Elements(PORTS, ["10.0.0.1 . 80", "10.0.0.2 . 443"]))
tx.add(Elements(SLOTS, ["10.96.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080", "10.96.0.1 . tcp . 80 . 1 : 10.1.0.2 . 8080"]))
tx.add(Elements(MARKS, ["0x1 . 0xdeadbeef"]))
tx.add(Elements(SIZED, ["10.96.0.1 . udp . 53"]))
tx.delete(Elements(ADDRS, ["10.0.0.2"]))
tx.delete(Elements(DISPATCH, ["10.1.0.1"]))
tx.add(Elements(DISPATCH, ["10.1.0.1 : jump other"]))
steps.append(tx)

tx = Transaction(T)  # structure: rewrite a chain, remove another
tx.flush(Chain("allow"))
tx.add(Rule("allow", "tcp dport 80 accept"))
tx.insert(Rule("allow", "udp dport 53 accept"))
tx.delete(Elements(DISPATCH, ["10.1.0.2"]))
tx.delete(Elements(CIDRS, ["172.16.0.1"]))
tx.add(Elements(CIDRS, ["172.16.1.0/24"]))
tx.flush(Chain("pre"))
tx.flush(Chain("post"))
tx.delete(Elements(SLOTS, ["10.96.0.1 . tcp . 80 . 1"]))
steps.append(tx)

fake, kernel, link = FakeNft(), NftRunner(), nl.Netlink()
out = []
for tx in steps:
    how = kernel.apply(tx)
    fake.apply(tx)
    out.append({"how": how, "fake": fake.ruleset("podnet-layer").dump(rules=False),
                "kernel": read_ruleset(link, "podnet-layer").dump(rules=False)})
print(json.dumps(out))
"""


def test_the_fake_and_the_kernel_dump_the_same_table_after_the_same_transactions():
    with namespaces() as ns:
        n = ns.new("layer")
        steps = json.loads(py_in(n, SCRIPT, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                 timeout=60).stdout)
    assert [s["how"] for s in steps] == ["nft", "netlink", "nft"]
    for s in steps:
        assert s["fake"] == s["kernel"]
    assert "element ip podnet-layer dispatch 10.1.0.1 : jump other" in steps[-1]["kernel"]
    assert "rules ip podnet-layer allow 2" in steps[-1]["kernel"]
    assert "element ip podnet-layer ranges 203.0.113.7 . tcp . 80 . 10.0.0.0/8" in steps[0]["kernel"]
