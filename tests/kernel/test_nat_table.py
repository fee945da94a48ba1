"""The natOutgoing table in the kernel: written whole, read back by netlink dumps, and
adopted unchanged after a restart."""

from __future__ import annotations

import json
import os

import pytest

from tests.kernel.nsutil import in_ns, namespaces, py_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

CODE = """
import json
from podnet.dataplane.nat import NatConfig, NatProgrammer, read_nat
cfg = NatConfig(("10.244.0.0/16", "10.248.1.0/24"), ("10.244.0.0/16", "10.248.1.0/24", "10.250.0.0/16"))
first = NatProgrammer().apply(cfg)
again = NatProgrammer().apply(cfg)  # a restarted agent: the table is right, nothing is written
read = read_nat()
changed = NatProgrammer().apply(NatConfig((), ("10.244.0.0/16",)))
print(json.dumps([first, again, read == cfg, changed, read_nat() == NatConfig((), ("10.244.0.0/16",))]))
"""


def test_nat_table_round_trip():
    with namespaces() as ns:
        n = ns.new("nat")
        assert json.loads(py_in(n, CODE).stdout) == [True, False, True, True, True]
        listing = in_ns(n, "nft", "list", "table", "ip", "podnet-nat").stdout
        assert "masquerade fully-random" in listing and "10.248.1.0/24" not in listing
        in_ns(n, "nft", "flush", "chain", "ip", "podnet-nat", "postrouting")
        assert py_in(n, "from podnet.dataplane.nat import read_nat; print(read_nat())").stdout.strip() == "None"


REPLACED = """
import json, subprocess
from podnet.dataplane.nat import NatConfig, NatProgrammer
cfg = NatConfig(("10.244.0.0/16",), ("10.244.0.0/16",))
p = NatProgrammer()
p.apply(cfg)
before = p.drift()
listing = json.loads(subprocess.run(["nft", "-j", "-a", "list", "chain", "ip", "podnet-nat", "postrouting"],
                                    capture_output=True, text=True, check=True).stdout)
handle = next(i["rule"]["handle"] for i in listing["nftables"] if "rule" in i)
subprocess.run(["nft", "replace", "rule", "ip", "podnet-nat", "postrouting", "handle", str(handle),
                "ip", "saddr", "@nat_pools", "accept"], check=True)
found = p.drift()
p.applied = None  # what the agent's verify does on drift
print(json.dumps([before, found, p.apply(cfg), p.drift()]))
"""


def test_a_masquerade_rule_replaced_in_place_is_found_and_rewritten():
    with namespaces() as ns:
        n = ns.new("natr")
        before, found, rewritten, after = json.loads(py_in(n, REPLACED).stdout)
        assert before == [] and found == ["chain postrouting: a rule differs from what podnet wrote"]
        assert rewritten and after == []
        assert "masquerade fully-random" in in_ns(n, "nft", "list", "table", "ip", "podnet-nat").stdout
