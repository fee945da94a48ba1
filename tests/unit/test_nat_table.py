"""The natOutgoing table, as the ruleset a change produces."""

from __future__ import annotations

from tests.support.nftables import FakeNft

from podnet.dataplane.nat import NAT_TABLE, NatConfig, NatProgrammer


def test_pools_become_interval_sets_and_one_masquerade_rule():
    fake = FakeNft()
    p = NatProgrammer(fake, read=lambda: None)
    assert p.apply(NatConfig(("10.244.0.0/16",), ("10.244.0.0/16", "10.250.0.0/16")))
    assert fake.ruleset(NAT_TABLE).dump() == """\
table ip podnet-nat
chain ip podnet-nat postrouting { type nat hook postrouting priority 110; policy accept; }
set ip podnet-nat all_pools { type ipv4_addr; flags interval; }
set ip podnet-nat nat_pools { type ipv4_addr; flags interval; }
rule ip podnet-nat postrouting ip saddr @nat_pools ip daddr != @all_pools masquerade fully-random
element ip podnet-nat all_pools 10.244.0.0/16
element ip podnet-nat all_pools 10.250.0.0/16
element ip podnet-nat nat_pools 10.244.0.0/16
"""
    assert not p.apply(NatConfig(("10.244.0.0/16",), ("10.244.0.0/16", "10.250.0.0/16")))
    assert len(fake.transactions) == 1
    # no pool masquerades any more: the table is rewritten whole, with empty sets
    assert p.apply(NatConfig((), ("10.244.0.0/16",)))
    dump = fake.ruleset(NAT_TABLE).dump()
    assert "element ip podnet-nat nat_pools" not in dump and "10.250.0.0/16" not in dump


def test_after_a_restart_a_table_that_is_right_is_kept():
    fake = FakeNft()
    cfg = NatConfig(("10.244.0.0/16",), ("10.244.0.0/16",))
    p = NatProgrammer(fake, read=lambda: cfg)
    assert not p.apply(cfg) and not fake.transactions
