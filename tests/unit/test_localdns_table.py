"""The node DNS NOTRACK table, as the ruleset it produces."""

from __future__ import annotations

import pytest
from tests.support.nftables import FakeNft

from podnet.dataplane.localdns import DNS_TABLE, notrack_transaction


def test_the_notrack_table_replaces_itself_whole():
    fake = FakeNft()
    fake.apply(notrack_transaction(["169.254.20.10"]))
    fake.apply(notrack_transaction(["169.254.20.10", "10.96.0.10"]))
    assert fake.ruleset(DNS_TABLE).dump() == """\
table ip podnet-dns
chain ip podnet-dns output { type filter hook output priority -300; policy accept; }
chain ip podnet-dns prerouting { type filter hook prerouting priority -300; policy accept; }
rule ip podnet-dns output ip saddr { 169.254.20.10, 10.96.0.10 } meta l4proto { udp, tcp } th sport 53 notrack
rule ip podnet-dns output ip daddr { 169.254.20.10, 10.96.0.10 } meta l4proto { udp, tcp } th dport 53 notrack
rule ip podnet-dns prerouting ip daddr { 169.254.20.10, 10.96.0.10 } meta l4proto { udp, tcp } th dport 53 notrack
"""


def test_addresses_must_be_addresses():
    with pytest.raises(ValueError):
        notrack_transaction(["169.254.20.10 } accept; flush ruleset; {"])
