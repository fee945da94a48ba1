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
