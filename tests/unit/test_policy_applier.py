"""The applier's transactions, without a kernel: what is sent when, and failing closed."""

from __future__ import annotations

import json

import pytest
from tests.support.policy_cases import NAMESPACES, PODS, make_namespace, make_pod, pod_ip

from podnet.dataplane.nft import NftError
from podnet.model.objects import NetworkPolicy
from podnet.policy.applier import (
    PolicyApplier,
    PolicyApplyError,
    PolicyProgrammer,
    compare_with_kernel,
    kernel_view,
    render_diff,
)
from podnet.policy.compiler import EMPTY_STATE, compile_policy
from podnet.policy.model import InputCache


def pol(name, spec, ns="x"):
    return NetworkPolicy.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


PODS_ = [make_pod(p) for p in PODS]
NSS = [make_namespace(n) for n in NAMESPACES]
LOCAL = [pod_ip(p) for p in PODS]
DENY_X = pol("deny", {"podSelector": {}})
FROM_Y = pol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})


def state(*pols):
    return compile_policy(InputCache().inputs(PODS_, NSS, list(pols), LOCAL))


class FakeNft:
    def __init__(self):
        self.scripts: list[str] = []
        self.fail: list[bool] = []

    def __call__(self, script: str) -> None:
        self.scripts.append(script)
        if self.fail and self.fail.pop(0):
            raise NftError("nft rejected the ruleset: Error: No such file or directory")


def test_first_apply_replaces_the_table_in_one_transaction_then_diffs():
    nft = FakeNft()
    a = PolicyApplier(nft)
    ch = a.apply(state(DENY_X))
    assert ch.full and len(nft.scripts) == 1
    assert nft.scripts[0].startswith("table ip podnet-policy\ndelete table ip podnet-policy\n")
    ch = a.apply(state(DENY_X, FROM_Y))
    assert not ch.full and len(nft.scripts) == 2 and "delete table" not in nft.scripts[1]
    ch = a.apply(state(DENY_X, FROM_Y))
    assert ch.empty and len(nft.scripts) == 2  # nothing to do: nothing sent


def test_a_refused_diff_falls_back_to_a_full_rewrite():
    nft = FakeNft()
    a = PolicyApplier(nft)
    a.apply(state(DENY_X))
    nft.fail = [True, False]
    ch = a.apply(state(FROM_Y))
    assert ch.full and ch.errors and len(nft.scripts) == 3
    assert a.applied == state(FROM_Y)


def test_when_everything_fails_the_error_is_raised_and_the_next_apply_is_full():
    nft = FakeNft()
    a = PolicyApplier(nft)
    a.apply(state(DENY_X))
    nft.fail = [True, True]
    with pytest.raises(PolicyApplyError, match="previous ruleset stays"):
        a.apply(state(FROM_Y))
    assert a.applied is None
    ch = a.apply(state(FROM_Y))
    assert ch.full


def test_diff_order_keeps_every_reference_valid():
    old, new = state(DENY_X, FROM_Y), state(DENY_X)
    lines = render_diff(old, new).splitlines()
    first_chain_delete = min(i for i, ln in enumerate(lines) if ln.startswith("delete chain"))
    first_set_delete = min(i for i, ln in enumerate(lines) if ln.startswith("delete set"))
    last_dispatch = max(i for i, ln in enumerate(lines) if "_dispatch" in ln)
    assert last_dispatch < first_chain_delete < first_set_delete
    # the other way round: sets and chains exist before anything points at them
    lines = render_diff(new, old).splitlines()
    add_set = min(i for i, ln in enumerate(lines) if ln.startswith("add set"))
    add_rule = min(i for i, ln in enumerate(lines) if ln.startswith("add rule"))
    first_dispatch = min(i for i, ln in enumerate(lines) if "_dispatch" in ln)
    assert add_set < add_rule < first_dispatch
    assert render_diff(EMPTY_STATE, EMPTY_STATE) == ""


def test_a_changed_policy_rewrites_only_its_chain():
    changed = pol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    lines = render_diff(state(DENY_X, FROM_Y), state(DENY_X, changed)).splitlines()
    assert sum(ln.startswith("flush chain") for ln in lines) == 1
    assert not any("_dispatch" in ln for ln in lines)  # same pods selected: dispatch untouched


def test_programmer_sync_and_kernel_comparison():
    nft = FakeNft()
    listing = {"nftables": []}
    pp = PolicyProgrammer(run=nft, lister=lambda what: json.dumps(listing))
    ch = pp.sync(PODS_, NSS, [DENY_X], LOCAL)
    assert ch.full
    diffs = pp.verify()  # the fake kernel shows an empty table
    assert diffs and pp.applier.applied is None
    assert pp.sync(PODS_, NSS, [DENY_X], LOCAL).full


def test_kernel_view_reads_nft_json():
    st = state(DENY_X, pol("cidr", {"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}], "ports": [{"port": "serve-80-tcp"}]}]}))
    doc = {"nftables": [{"metainfo": {}}]}
    for s in st.sets.values():
        elems = []
        for e in s.elements:
            if s.kind == "addrport":
                a, p = e.split(" . ")
                elems.append({"concat": [a, int(p)]})
            elif "-" in e:
                elems.append({"range": e.split("-")})
            elif "/" in e:
                a, ln = e.split("/")
                elems.append({"prefix": {"addr": a, "len": int(ln)}})
            else:
                elems.append(e)
        doc["nftables"].append({"set": {"name": s.name, "elem": elems}})
    for d, m in (("ingress", "ingress_dispatch"), ("egress", "egress_dispatch")):
        doc["nftables"].append({"map": {"name": m, "elem": [[ip, {"jump": {"target": g}}]
                                                             for ip, g in st.dispatch[d].items()]}})
    from podnet.policy.compiler import chain_rules
    for name in (*st.policy_chains, *st.groups, "ingress", "egress"):
        doc["nftables"].append({"chain": {"name": name}})
        n = 2 if name in ("ingress", "egress") else len(chain_rules(st, name))
        doc["nftables"] += [{"rule": {"chain": name}}] * n
    assert compare_with_kernel(st, kernel_view(json.dumps(doc))) == []
    doc["nftables"].pop()
    assert compare_with_kernel(st, kernel_view(json.dumps(doc)))


def test_a_label_change_is_an_element_only_diff_sent_as_one_batch():
    from podnet.policy.applier import element_batch, element_changes, structure_changes

    before = state(FROM_Y)
    relabelled = [p.with_meta(labels={**p.labels, "pod": "a"}) if p.status.pod_ip == LOCAL[1] else p for p in PODS_]
    after = compile_policy(InputCache().inputs(relabelled, NSS, [FROM_Y], LOCAL))
    assert not structure_changes(before, after)
    changes = element_changes(before, after)
    assert changes and all(c.kind in ("addr", "addrport", "dispatch") for c in changes)
    batches: list = []
    nft = FakeNft()
    a = PolicyApplier(nft, commit=batches.append)
    a.apply(before)
    ch = a.apply(after)
    assert ch.netlink and not ch.full and len(nft.scripts) == 1 and len(batches) == 1
    assert batches[0].elements == sum(len(c.add) + len(c.remove) for c in changes)
    # the dispatch verdicts travel as verdict data: jump to the pod's group chain
    dispatch = [c for c in changes if c.kind == "dispatch"]
    assert dispatch and all(" : jump " in e for c in dispatch for e in c.add)
    assert element_batch([*changes, type(changes[0])("cidrs", "cidr", [], ["10.0.0.0/8"])]) is None
    assert structure_changes(before, state(FROM_Y, DENY_X))  # a new policy is structure: text through nft
    assert not a.apply(state(FROM_Y, DENY_X)).netlink and len(nft.scripts) == 2
