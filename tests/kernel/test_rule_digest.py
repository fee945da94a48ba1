"""Per-chain rule digests against the real kernel: packets moving counters and quotas
change nothing, a rule replaced in place (same count) changes its chain's digest."""

import json
import os

import pytest

from tests.kernel.nsutil import in_ns, namespaces, py_in

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

TABLE = """
table ip digest_t {
  chain out { type filter hook output priority 0; policy accept;
    counter
    ip daddr 127.0.0.2 counter accept
    quota over 100 bytes counter
    limit rate 10/second counter
    ip daddr { 192.0.2.1, 192.0.2.2 } drop
  }
  chain other { ip daddr 192.0.2.9 counter drop; }
}
"""

READ = """
import json
from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.ruledigest import read_digests
link = nl.Netlink()
print(json.dumps({"all": {c: [d.rules, d.digest.hex()] for c, d in read_digests(link, "digest_t").items()},
                  "out": {c: [d.rules, d.digest.hex()] for c, d in read_digests(link, "digest_t", ["out"]).items()}}))
"""


def digests(ns: str) -> dict:
    return json.loads(py_in(ns, READ).stdout)


def test_traffic_leaves_digests_alone_and_a_replaced_rule_changes_its_chains_only():
    with namespaces() as ns:
        n = ns.new("dg")
        in_ns(n, "nft", "-f", "-", input=TABLE)
        before = digests(n)
        assert before["all"]["out"][0] == 5 and before["out"] == {"out": before["all"]["out"]}
        # packets through every counter, past the quota (it turns depleted) and the limit
        in_ns(n, "ping", "-c", "5", "-i", "0.01", "-s", "200", "-q", "127.0.0.2")
        in_ns(n, "ping", "-c", "5", "-i", "0.01", "-s", "200", "-q", "127.0.0.3")
        listing = in_ns(n, "nft", "list", "table", "ip", "digest_t").stdout
        assert "packets 0 " not in listing.split("quota")[0]  # the counters did move
        assert digests(n) == before
        handles = json.loads(in_ns(n, "nft", "-j", "-a", "list", "chain", "ip", "digest_t", "out").stdout)
        accept = next(i["rule"]["handle"] for i in handles["nftables"]
                      if "rule" in i and any("accept" in e for e in i["rule"]["expr"]))
        in_ns(n, "nft", "replace", "rule", "ip", "digest_t", "out", "handle", str(accept),
              "ip", "daddr", "127.0.0.2", "counter", "drop")
        after = digests(n)
        assert after["all"]["out"][0] == 5 and after["all"]["out"] != before["all"]["out"]
        assert after["all"]["other"] == before["all"]["other"]
