"""The typed nftables layer: rendering, safety checks, the netlink form, and the fake."""

from __future__ import annotations

import pytest
from tests.support.nftables import FakeNft

from podnet.dataplane.nft import NftError
from podnet.dataplane.nftables import (
    Chain,
    Chains,
    Elements,
    Map,
    NftDefinitionError,
    Rule,
    Set,
    Table,
    Transaction,
    priority_value,
)

T = Table("t")
ADDRS = Set("addrs", type="ipv4_addr")
PORTS = Set("ports", type="ipv4_addr . inet_service")
CIDRS = Set("cidrs", type="ipv4_addr", flags=("interval",))
DISPATCH = Map("dispatch", type="ipv4_addr : verdict")
SLOTS = Map("slots", typeof="ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport")
BASE = Chain("input", type="filter", hook="input", priority="filter - 1", policy="accept")


def base_tx() -> Transaction:
    tx = Transaction(T)
    tx.recreate()
    for s in (ADDRS, PORTS, CIDRS, DISPATCH, SLOTS):
        tx.add(s)
    tx.add(Chain("allow"))
    tx.add(BASE)
    tx.add(Rule("allow", "ip saddr @addrs accept"))
    tx.add(Rule("input", "ip daddr vmap @dispatch"))
    return tx


def test_a_transaction_renders_nft_commands_in_order():
    tx = Transaction(T)
    tx.add(T)
    tx.add(BASE)
    tx.add(Set("s", type="ipv4_addr", flags=("interval",), size=16, comment='from "user" text'))
    tx.insert(Rule("input", "ip saddr @s drop"))
    tx.add(Elements(DISPATCH, ["10.0.0.1 : jump x"]))
    tx.delete(Elements(DISPATCH, ["10.0.0.2 : jump y"]))
    tx.flush(Chain("input"))
    assert tx.script().splitlines() == [
        "add table ip t",
        "add chain ip t input { type filter hook input priority filter - 1; policy accept; }",
        "add set ip t s { type ipv4_addr; flags interval; size 16; comment \"from _user_ text\"; }",
        "insert rule ip t input ip saddr @s drop",
        "add element ip t dispatch { 10.0.0.1 : jump x }",
        "delete element ip t dispatch { 10.0.0.2 }",
        "flush chain ip t input",
    ]
    assert Transaction(T).script() == ""


@pytest.mark.parametrize("make", [
    lambda: Chain("bad name"),
    lambda: Chain("x; flush ruleset"),
    lambda: Rule("c", "accept; flush ruleset"),
    lambda: Rule("c", "accept\nflush ruleset"),
    lambda: Rule("c", 'meta comment "x"'),
    lambda: Rule("c", "accept # hidden"),
    lambda: Set("s", type="ipv4_addr; }"),
    lambda: Set("s", type="ipv4_addr", flags=("bogus",)),
    lambda: Map("m", type="ipv4_addr"),
    lambda: Chain("b", hook="input"),
    lambda: Table("t", family="ipx"),
])
def test_unsafe_or_incomplete_definitions_are_refused(make):
    with pytest.raises(NftDefinitionError):
        make()


def test_element_text_cannot_break_out_of_its_statement():
    tx = Transaction(T)
    tx.add(Elements(ADDRS, ["10.0.0.1 }; flush ruleset; add element ip t addrs { 10.0.0.2"]))
    with pytest.raises(NftDefinitionError):
        tx.script()


def test_priorities():
    assert [priority_value(p) for p in ("raw", "filter - 1", "srcnat + 10", "-110", 5)] == [-300, -1, 110, -110, 5]


def test_element_only_transactions_have_a_netlink_form():
    tx = Transaction(T)
    tx.add(Elements(PORTS, ["10.0.0.1 . 80", "10.0.0.2 . 443"]))
    tx.delete(Elements(DISPATCH, ["10.0.0.3 : jump allow"]))
    tx.add(Elements(SLOTS, ["10.96.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080"]))
    batch = tx.batch()
    assert batch is not None and batch.elements == 4 and len(batch) == 3
    intervals = Transaction(T)
    intervals.add(Elements(CIDRS, ["10.0.0.0/8"]))
    assert intervals.batch() is None  # ranges are left to nft
    structure = Transaction(T)
    structure.add(Chain("c"))
    assert structure.batch() is None


def test_the_fake_applies_a_table_and_dumps_it():
    fake = FakeNft()
    tx = base_tx()
    tx.add(Elements(ADDRS, ["10.0.0.2", "10.0.0.1"]))
    tx.add(Elements(CIDRS, ["10.0.0.0/8", "192.168.0.0-192.168.0.2", "172.16.0.1/32"]))
    tx.add(Elements(DISPATCH, ["10.1.0.1 : jump allow"]))
    tx.add(Elements(SLOTS, ["10.96.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080"]))
    assert fake.apply(tx) == "nft"
    assert fake.dump() == """\
table ip t
chain ip t allow
chain ip t input { type filter hook input priority -1; policy accept; }
set ip t addrs { type ipv4_addr; }
set ip t cidrs { type ipv4_addr; flags interval; }
map ip t dispatch { type ipv4_addr : verdict; }
set ip t ports { type ipv4_addr . inet_service; }
map ip t slots { type ipv4_addr . inet_proto . inet_service . integer : ipv4_addr . inet_service; }
rule ip t allow ip saddr @addrs accept
rule ip t input ip daddr vmap @dispatch
element ip t addrs 10.0.0.1
element ip t addrs 10.0.0.2
element ip t cidrs 10.0.0.0/8
element ip t cidrs 172.16.0.1
element ip t cidrs 192.168.0.0/31
element ip t cidrs 192.168.0.2
element ip t dispatch 10.1.0.1 : jump allow
element ip t slots 10.96.0.1 . tcp . 80 . 0 : 10.1.0.1 . 8080
"""
    assert "rules ip t allow 1" in fake.dump(rules=False)


def test_the_fake_is_all_or_nothing_and_checks_references_like_the_kernel():
    fake = FakeNft()
    fake.apply(base_tx())
    before = fake.dump()
    refused = []
    for ops in (
        lambda tx: tx.add(Rule("allow", "ip saddr @nope accept")),  # no such set
        lambda tx: tx.add(Rule("allow", "jump nowhere")),  # no such chain
        lambda tx: tx.delete(Chain("allow")),  # not empty
        lambda tx: tx.delete(ADDRS),  # used by a rule
        lambda tx: tx.delete(Elements(ADDRS, ["10.9.9.9"])),  # not there
        lambda tx: tx.add(Elements(DISPATCH, ["10.0.0.1 : jump nowhere"])),
        lambda tx: tx.create(Chain("allow")),
    ):
        tx = Transaction(T)
        tx.add(Elements(ADDRS, ["10.0.0.7"]))  # would succeed alone
        ops(tx)
        with pytest.raises(NftError):
            fake.apply(tx)
        refused.append(fake.dump() == before)
    assert all(refused)


def test_a_map_element_changes_its_value_only_by_delete_and_add():
    fake = FakeNft()
    tx = base_tx()
    tx.add(Chain("other"))
    tx.add(Elements(DISPATCH, ["10.1.0.1 : jump allow"]))
    fake.apply(tx)
    change = Transaction(T)
    change.add(Elements(DISPATCH, ["10.1.0.1 : jump other"]))
    with pytest.raises(NftError):
        fake.apply(change)
    change = Transaction(T)
    change.delete(Elements(DISPATCH, ["10.1.0.1"]))
    change.add(Elements(DISPATCH, ["10.1.0.1 : jump other"]))
    assert fake.apply(change) == "netlink"
    assert "element ip t dispatch 10.1.0.1 : jump other" in fake.dump()
    # a chain a verdict element points at cannot go
    gone = Transaction(T)
    gone.delete(Chain("other"))
    with pytest.raises(NftError):
        fake.apply(gone)


def test_flush_and_delete_in_the_order_references_allow():
    fake = FakeNft()
    fake.apply(base_tx())
    tx = Transaction(T)
    tx.flush(Chain("allow"))
    tx.flush(Chain("input"))
    tx.delete(Chain("allow"))
    tx.delete(ADDRS)
    tx.delete(DISPATCH)
    fake.apply(tx)
    dump = fake.dump()
    assert "allow" not in dump and "addrs" not in dump and "dispatch" not in dump
    assert "chain ip t input" in dump


def test_remove_deletes_the_table_and_is_no_error_without_one():
    fake = FakeNft()
    fake.apply(base_tx())
    for _ in range(2):  # the second time there is no table
        tx = Transaction(T)
        tx.remove()
        fake.apply(tx)
        assert fake.ruleset("t") is None
    assert tx.script() == "add table ip t\ndelete table ip t\n"


def test_chains_with_their_rules_add_every_chain_before_any_rule():
    tx = Transaction(T)
    tx.add(T)
    tx.add(ADDRS)
    tx.add(Chains([(Chain("first"), ["jump second"]), (Chain("second"), ["ip saddr @addrs accept", "drop"]),
                      (BASE, ["jump first"])]))
    assert tx.script().splitlines()[2:] == [
        "add chain ip t first",
        "add chain ip t second",
        "add chain ip t input { type filter hook input priority filter - 1; policy accept; }",
        "add rule ip t first jump second",  # a jump to a chain listed after it
        "add rule ip t second ip saddr @addrs accept",
        "add rule ip t second drop",
        "add rule ip t input jump first",
    ]
    fake = FakeNft()
    fake.apply(tx)
    assert fake.ruleset("t").chains["second"].rules == ["ip saddr @addrs accept", "drop"]
    with pytest.raises(NftDefinitionError, match="chain bad"):
        Chains([(Chain("ok"), ["accept"]), (Chain("bad"), ["accept; flush ruleset"])])
    with pytest.raises(NftDefinitionError):
        Transaction(T).delete(Chains([(Chain("first"), [])]))
