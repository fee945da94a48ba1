"""The applier's transactions, without a kernel: the ruleset each change produces (on the
fake of tests/support/nftables.py, which refuses what the kernel refuses), and failing
closed."""

from __future__ import annotations

import pytest
from tests.support.nftables import FakeNft
from tests.support.policy_cases import NAMESPACES, PODS, make_namespace, make_pod, pod_ip

from podnet.dataplane.nftables import Elements, Rule, Transaction
from podnet.model.objects import NetworkPolicy
from podnet.policy.applier import (
    PolicyApplier,
    PolicyApplyError,
    PolicyProgrammer,
    diff_transaction,
    element_batch,
    element_changes,
    render_diff,
    structure_changes,
)
from podnet.policy.compiler import DISPATCH_MAPS, EMPTY_STATE, POLICY_TABLE, TABLE, compile_policy, set_object
from podnet.policy.model import InputCache


def pol(name, spec, ns="x"):
    return NetworkPolicy.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


PODS_ = [make_pod(p) for p in PODS]
NSS = [make_namespace(n) for n in NAMESPACES]
LOCAL = [pod_ip(p) for p in PODS]
DENY_X = pol("deny", {"podSelector": {}})
FROM_Y = pol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})
CIDR = pol("cidr", {"podSelector": {}, "ingress": [{"from": [
    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}], "ports": [{"port": "serve-80-tcp"}]}]})


def state(*pols):
    return compile_policy(InputCache().inputs(PODS_, NSS, list(pols), LOCAL))


def written_whole(st) -> str:
    """The dump of a table written from scratch for `st`."""
    fake = FakeNft()
    PolicyApplier(nft=fake).apply(st)
    return fake.dump()


def test_first_apply_replaces_the_table_in_one_transaction_then_diffs():
    fake = FakeNft()
    a = PolicyApplier(nft=fake)
    ch = a.apply(state(DENY_X))
    assert ch.full and len(fake.transactions) == 1
    assert [v for v, _ in fake.transactions[0].ops[:3]] == ["add", "delete", "add"]  # the table, replaced
    assert fake.dump() == written_whole(state(DENY_X))
    ch = a.apply(state(DENY_X, FROM_Y))
    assert not ch.full and len(fake.transactions) == 2
    assert fake.dump() == written_whole(state(DENY_X, FROM_Y))
    ch = a.apply(state(DENY_X, FROM_Y))
    assert ch.empty and len(fake.transactions) == 2  # nothing to do: nothing sent


def test_the_whole_table_as_a_ruleset():
    dump = written_whole(state(FROM_Y))
    assert "chain ip podnet-policy ingress { type filter hook forward priority 0; policy accept; }" in dump
    assert "chain ip podnet-policy egress { type filter hook forward priority -1; policy accept; }" in dump
    assert "rule ip podnet-policy ingress ip daddr vmap @ingress_dispatch" in dump
    groups = [ln.split()[3] for ln in dump.splitlines() if ln.startswith("chain ip podnet-policy gi_")]
    assert len(groups) == 1
    assert f"rule ip podnet-policy {groups[0]} drop" in dump
    assert f"element ip podnet-policy ingress_dispatch {pod_ip('x/a')} : jump {groups[0]}" in dump


def test_a_refused_diff_falls_back_to_a_full_rewrite():
    fake = FakeNft()
    a = PolicyApplier(nft=fake)
    a.apply(state(DENY_X))
    fake.fail_next = [True, False]
    ch = a.apply(state(FROM_Y))
    assert ch.full and ch.errors and len(fake.transactions) == 3
    assert a.applied == state(FROM_Y) and fake.dump() == written_whole(state(FROM_Y))


def test_when_everything_fails_the_error_is_raised_and_the_next_apply_is_full():
    fake = FakeNft()
    a = PolicyApplier(nft=fake)
    a.apply(state(DENY_X))
    fake.fail_next = [True, True]
    with pytest.raises(PolicyApplyError, match="previous ruleset stays"):
        a.apply(state(FROM_Y))
    assert a.applied is None and fake.dump() == written_whole(state(DENY_X))  # the old ruleset stays
    ch = a.apply(state(FROM_Y))
    assert ch.full


@pytest.mark.parametrize("before,after", [
    ((DENY_X, FROM_Y), (DENY_X,)), ((DENY_X,), (DENY_X, FROM_Y)), ((FROM_Y,), (CIDR,)), ((CIDR, DENY_X), ()),
    ((), (CIDR, FROM_Y)),
])
def test_a_diff_applies_in_an_order_the_kernel_accepts_and_ends_where_a_rewrite_does(before, after):
    # the fake refuses a rule naming a missing set or chain, and deleting a set or chain in use
    fake = FakeNft()
    a = PolicyApplier(nft=fake)
    a.apply(state(*before))
    ch = a.apply(state(*after))
    assert not ch.full and not ch.errors
    assert fake.dump() == written_whole(state(*after))
    assert render_diff(EMPTY_STATE, EMPTY_STATE) == ""


def test_a_changed_policy_rewrites_only_its_chain():
    changed = pol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    tx = diff_transaction(state(DENY_X, FROM_Y), state(DENY_X, changed))
    assert sum(verb == "flush" for verb, _ in tx.ops) == 1
    assert not any(isinstance(o, Elements) and o.of in DISPATCH_MAPS.values() for _, o in tx.ops)


def test_programmer_verifies_against_the_table_read_back():
    fake = FakeNft()
    pp = PolicyProgrammer(nft=fake, reader=lambda: fake.ruleset(TABLE), digests=lambda chains=None: fake.chain_digests(TABLE, chains))
    assert pp.sync(PODS_, NSS, [DENY_X, CIDR], LOCAL).full
    assert pp.verify() == []
    # behind podnet's back: an element of the interval set goes, then a dispatch entry
    cidr_set = next(s for s in pp.state.sets.values() if s.kind == "cidr")
    tamper = Transaction(POLICY_TABLE)
    tamper.delete(Elements(set_object(cidr_set), [sorted(cidr_set.elements)[0]]))
    fake.apply(tamper)
    diffs = pp.verify()
    assert len(diffs) == 1 and diffs[0].startswith(f"set {cidr_set.name}: ") and pp.applier.applied is None
    assert pp.sync(PODS_, NSS, [DENY_X, CIDR], LOCAL).full and pp.verify() == []
    ip = LOCAL[0]
    tamper = Transaction(POLICY_TABLE)
    tamper.delete(Elements(DISPATCH_MAPS["ingress"], [ip]))
    fake.apply(tamper)
    assert pp.verify() == ["ingress_dispatch differs"]
    empty = PolicyProgrammer(nft=FakeNft(), reader=lambda: None, digests=lambda: None)
    empty.sync(PODS_, NSS, [DENY_X], LOCAL)
    assert empty.verify() == ["table missing"]


def replace_first_rule(fake: FakeNft, chains, rule: str) -> str:
    """`nft replace rule ip podnet-policy <chain> handle N <rule>` behind podnet's back, in
    the first of `chains` that has rules; that chain."""
    held = fake.tables[("ip", TABLE)].rules
    chain = next(c for c in chains if held[c])
    tamper = Transaction(POLICY_TABLE)
    tamper.replace(Rule(chain, rule, handle=held[chain][0][0]))
    fake.apply(tamper)
    return chain


def test_a_rule_replaced_in_place_is_found_and_the_table_rewritten_not_adopted():
    fake = FakeNft()
    pp = PolicyProgrammer(nft=fake, reader=lambda: fake.ruleset(TABLE), digests=lambda chains=None: fake.chain_digests(TABLE, chains))
    pp.sync(PODS_, NSS, [DENY_X, CIDR], LOCAL)
    written = fake.dump()
    chain = replace_first_rule(fake, pp.state.policy_chains, "accept")  # every chain's count stays
    assert pp.verify() == [f"chain {chain}: a rule differs from what podnet wrote"]
    ch = pp.sync(PODS_, NSS, [DENY_X, CIDR], LOCAL)  # the counts alone would adopt the table
    assert ch.full and fake.dump() == written and pp.verify() == []


def test_rule_references_follow_podnets_writes_of_chains_not_element_changes():
    fake = FakeNft()
    pp = PolicyProgrammer(nft=fake, reader=lambda: fake.ruleset(TABLE), digests=lambda chains=None: fake.chain_digests(TABLE, chains))
    pp.sync(PODS_, NSS, [DENY_X], LOCAL)
    reference = pp.rules
    assert not pp.sync(PODS_, NSS, [DENY_X, FROM_Y], LOCAL).netlink  # new chains: a new reference
    assert pp.rules != reference and pp.verify() == []
    # after a diff only the chains it wrote are dumped again; the reference is the whole table's
    changed = pol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    for policies in ([DENY_X, changed], [changed, CIDR], [DENY_X, FROM_Y]):
        ch = pp.sync(PODS_, NSS, policies, LOCAL)
        assert not ch.full and ch.commands and pp.rules == fake.chain_digests(TABLE) and pp.verify() == []
    # an agent restart adopts the table as it is, and what it holds becomes the reference
    again = PolicyProgrammer(nft=fake, reader=lambda: fake.ruleset(TABLE), digests=lambda chains=None: fake.chain_digests(TABLE, chains))
    assert again.sync(PODS_, NSS, [DENY_X, FROM_Y], LOCAL).empty and again.rules == pp.rules
    replace_first_rule(fake, again.state.policy_chains, "accept")
    assert again.verify() and again.sync(PODS_, NSS, [DENY_X, FROM_Y], LOCAL).full


def test_a_label_change_is_an_element_only_diff_sent_as_one_batch():
    before = state(FROM_Y)
    relabelled = [p.with_meta(labels={**p.labels, "pod": "a"}) if p.status.pod_ip == LOCAL[1] else p for p in PODS_]
    after = compile_policy(InputCache().inputs(relabelled, NSS, [FROM_Y], LOCAL))
    assert not structure_changes(before, after)
    changes = element_changes(before, after)
    assert changes and all(c.kind in ("addr", "addrport", "dispatch") for c in changes)
    fake = FakeNft()
    a = PolicyApplier(nft=fake)
    a.apply(before)
    ch = a.apply(after)
    assert ch.netlink and not ch.full and len(fake.transactions) == 2
    assert fake.transactions[1].batch().elements == sum(len(c.add) + len(c.remove) for c in changes)
    assert fake.dump() == written_whole(after)
    # the dispatch verdicts travel as verdict data: jump to the pod's group chain
    dispatch = [c for c in changes if c.kind == "dispatch"]
    assert dispatch and all(" : jump " in e for c in dispatch for e in c.add)
    assert element_batch([*changes, type(changes[0])("cidrs", "cidr", [], ["10.0.0.0/8"])]) is None
    assert structure_changes(before, state(FROM_Y, DENY_X))  # a new policy is structure: text through nft
    assert not a.apply(state(FROM_Y, DENY_X)).netlink


def test_a_text_runner_gets_every_transaction_as_nft_text():
    scripts: list[str] = []
    a = PolicyApplier(scripts.append)
    a.apply(state(DENY_X))
    a.apply(state(DENY_X, FROM_Y))
    assert len(scripts) == 2
    assert scripts[0].startswith("add table ip podnet-policy\ndelete table ip podnet-policy\nadd table")
    assert "delete table" not in scripts[1]
