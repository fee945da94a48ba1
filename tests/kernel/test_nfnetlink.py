"""nf_tables batches over netlink against the kernel: all or nothing, errors that name the set."""

from __future__ import annotations

import json

from tests.kernel.nsutil import in_ns, namespaces, py_in

TABLE = """
table ip nlt {
  set plain { type ipv4_addr . inet_proto . inet_service; }
  map slots { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; }
}
"""

SCRIPT = r"""
import json, sys
from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError
from podnet.services import nftables as nt

good = nt.encode_element("backends_1", "10.96.0.1 . tcp . 80 . 0", "10.1.0.5 . 8080")
plain = nt.encode_element("service_ips", "10.96.0.1 . udp . 53", None)
link = nl.Netlink()
b = nl.Batch()
b.add_elements("nlt", "slots", [good])
b.add_elements("nlt", "plain", [plain])
link.commit(b)
bad = nl.Batch()
bad.delete_elements("nlt", "plain", [plain])
bad.add_elements("nlt", "nosuch", [plain])
try:
    link.commit(bad)
    print(json.dumps({"error": None}))
except NftError as e:
    print(json.dumps({"error": str(e)}))
"""


def elements(ns: str, kind: str, name: str) -> list:
    out = json.loads(in_ns(ns, "nft", "-j", "list", kind, "ip", "nlt", name).stdout)
    return next(x[kind] for x in out["nftables"] if kind in x).get("elem", [])


def test_a_batch_lands_whole_and_a_refused_one_changes_nothing():
    with namespaces() as nsm:
        ns = nsm.new("nl")
        in_ns(ns, "nft", "-f", "-", input=TABLE)
        out = json.loads(py_in(ns, SCRIPT).stdout)
        # nft reads back what was encoded by hand: the kernel layout is nft's own
        assert elements(ns, "map", "slots") == [[{"concat": ["10.96.0.1", "tcp", 80, 0]}, {"concat": ["10.1.0.5", 8080]}]]
        assert out["error"] and "adding to set nlt nosuch" in out["error"] and "nothing applied" in out["error"]
        # the deletion in the refused batch did not happen either
        assert elements(ns, "set", "plain") == [{"concat": ["10.96.0.1", "udp", 53]}]
