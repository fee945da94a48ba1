"""Rendering the Service state into nftables elements and transactions; the applier's
bookkeeping with a fake `nft` (the kernel side is in tests/kernel/test_services_*)."""

from __future__ import annotations

import json
import re

import pytest

from podnet.dataplane.nft import NftError
from podnet.services import nftables as nt
from podnet.services.applier import NftServiceApplier
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState, StaleFlow, stale_udp_flows


def rule(ip, port, *backends, proto="tcp", **kw) -> FrontendRule:
    return FrontendRule(Frontend(ip, proto, port), kw.pop("service", "default/web:"), kw.pop("kind", "ClusterIP"),
                        tuple(Backend(b, 8080) for b in backends), **kw)


def state(*rules, **kw) -> ServiceState:
    return ServiceState(rules=tuple(rules), **kw)


def test_elements_of_a_clusterip_and_a_nodeport():
    st = state(rule("10.96.0.10", 80, "10.1.0.1", "10.1.0.2", affinity_timeout=30),
               rule(None, 30080, "10.1.0.1", kind="NodePort", masquerade=True),
               rule("10.96.0.11", 53, proto="udp"),
               rule("203.0.113.7", 80, kind="LoadBalancer", no_endpoints="drop", source_ranges=("10.0.0.0/8",
                                                                                                  "192.0.2.1/32")),
               service_cidrs=("10.96.0.0/16",), node_ips=("192.168.1.10",))
    els = nt.elements(st)
    assert els["service_ips"] == {"10.96.0.10 . tcp . 80": "goto svc_2"}
    assert els["backends"] == {"10.96.0.10 . tcp . 80 . 0": "10.1.0.1 . 8080",
                               "10.96.0.10 . tcp . 80 . 1": "10.1.0.2 . 8080"}
    assert els["service_nodeports"] == {"tcp . 30080": "goto np_1"}
    assert els["nodeport_backends"] == {"tcp . 30080 . 0": "10.1.0.1 . 8080"}
    assert els["masq_nodeports"] == {"tcp . 30080": None} and els["masq_ips"] == {}
    assert els["affinity_ips"] == {"10.96.0.10 . tcp . 80": "jump aff_t30"}
    assert els["no_endpoint_ips"] == {"10.96.0.11 . udp . 53": "goto reject_chain",
                                      "203.0.113.7 . tcp . 80": "drop"}
    assert els["firewall_ips"] == {"203.0.113.7 . tcp . 80": None}
    assert set(els["lb_source_ranges"]) == {"203.0.113.7 . tcp . 80 . 10.0.0.0/8", "203.0.113.7 . tcp . 80 . 192.0.2.1"}
    assert els["hairpin"] == {"10.1.0.1 . 10.1.0.1": None, "10.1.0.2 . 10.1.0.2": None}
    assert els["service_cidrs"] == {"10.96.0.0/16": None} and els["node_ips"] == {"192.168.1.10": None}
    assert nt.dynamic_chains(els) == {"svc_2", "np_1", "aff_t30"}


def test_chains_do_not_grow_with_services():
    many = state(*(rule(f"10.96.{i // 250}.{i % 250 + 1}", 80, "10.1.0.1", "10.1.0.2", "10.1.0.3")
                   for i in range(2000)))
    assert nt.dynamic_chains(nt.elements(many)) == {"svc_3"}
    script = nt.full_script(nt.Layout(0x4000), nt.elements(many))
    # the fixed chains plus one block of tier chains, whatever the number of Services
    assert len(re.findall(r"^\s*chain ", script, re.M)) == len(nt.Layout(0x4000).chain_rule_counts()) + 2 * 64
    assert script.count(". 80 . 2 : ") == 2000


def test_dynamic_chain_rules():
    assert nt.dynamic_chain_rules("svc_5") == [
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 5 map @backends"]
    assert "numgen random mod 2 map @nodeport_backends" in nt.dynamic_chain_rules("np_2")[0]
    assert len(nt.dynamic_chain_rules("aff_t60")) == 3 and "timeout 60s" in nt.dynamic_chain_rules("aff_t60")[0]
    assert not nt.is_dynamic_chain("services") and not nt.is_dynamic_chain("svc_x")


TIERS = {f"{k}_{n}" for k in ("svc", "np") for n in range(1, 65)}


def test_delta_is_empty_without_changes_and_only_the_new_service_otherwise():
    base = state(*(rule(f"10.96.0.{i}", 80, "10.1.0.1", "10.1.0.2") for i in range(1, 50)))
    els = nt.elements(base)
    assert nt.delta_script(els, els, TIERS) == ("", 0, 0)
    more = state(*base.rules, rule("10.96.1.1", 443, "10.1.0.7", "10.1.0.8", "10.1.0.9", affinity_timeout=5))
    script, added, removed = nt.delta_script(els, nt.elements(more), TIERS)
    assert (added, removed) == (1 + 3 + 3 + 1, 0)  # service_ips, three slots, three hairpin pairs, affinity
    assert "add chain ip podnet-svc aff_t5" in script  # affinity chains come with their first user
    assert "10.96.0." not in script  # nothing about the other Services


def test_tiers_come_in_blocks_and_a_missing_tier_asks_for_a_rebuild():
    big = state(rule("10.96.0.1", 80, *(f"10.1.{i // 200}.{i % 200 + 1}" for i in range(70))))
    els = nt.elements(big)
    assert nt.tier_limit(els) == 128 and nt.tier_limit({}) == 64
    with pytest.raises(nt.TierMissing):
        nt.delta_script({}, els, TIERS)


def test_delta_replaces_changed_values_delete_first():
    a = nt.elements(state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.2")))
    b = nt.elements(state(rule("10.96.0.1", 80, "10.1.0.1")))
    script, added, removed = nt.delta_script(a, b, TIERS)
    lines = script.splitlines()
    dele = lines.index("delete element ip podnet-svc service_ips { 10.96.0.1 . tcp . 80 }")
    add = lines.index("add element ip podnet-svc service_ips { 10.96.0.1 . tcp . 80 : goto svc_1 }")
    assert dele < add
    assert "delete element ip podnet-svc backends { 10.96.0.1 . tcp . 80 . 1 }" in lines
    assert (added, removed) == (1, 3)  # the service_ips verdict changed; a slot and a hairpin pair went


def test_parse_table_reads_back_what_we_render():
    st = state(rule("10.96.0.10", 80, "10.1.0.1"), rule("203.0.113.7", 80, "10.1.0.1", source_ranges=("10.0.0.0/8",)))
    listing = {"nftables": [
        {"metainfo": {}},
        {"table": {"family": "ip", "name": "podnet-svc"}},
        {"map": {"name": "service_ips", "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc_1"}}],
                                                 [{"concat": ["203.0.113.7", "tcp", 80]}, {"goto": {"target": "svc_1"}}]]}},
        {"map": {"name": "backends", "elem": [[{"concat": ["10.96.0.10", "tcp", 80, 0]}, {"concat": ["10.1.0.1", 8080]}],
                                              [{"concat": ["203.0.113.7", "tcp", 80, 0]},
                                               {"concat": ["10.1.0.1", 8080]}]]}},
        {"set": {"name": "hairpin", "elem": [{"concat": ["10.1.0.1", "10.1.0.1"]}]}},
        {"set": {"name": "firewall_ips", "elem": [{"concat": ["203.0.113.7", "tcp", 80]}]}},
        {"set": {"name": "lb_source_ranges", "elem": [
            {"concat": ["203.0.113.7", "tcp", 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]}]}},
        {"map": {"name": "affinity", "elem": [[{"concat": ["1.1.1.1", "10.96.0.10", "tcp", 80]},
                                               {"concat": ["10.1.0.1", 8080]}]]}},
        {"chain": {"name": "svc_1"}},
        {"rule": {"chain": "svc_1"}},
    ]}
    table = nt.parse_table(json.dumps(listing))
    want = {k: v for k, v in nt.elements(st).items() if v}
    assert {k: v for k, v in table.elements.items() if v} == want
    assert "affinity" not in table.elements and "affinity" in table.sets
    assert table.chains == {"svc_1": 1}
    assert nt.check_layout(nt.Layout(0x4000), table) == "set/map service_cidrs is missing"


def test_stale_udp_flows():
    old = state(rule("10.96.0.10", 53, "10.1.0.1", "10.1.0.2", proto="udp"), rule("10.96.0.11", 53, proto="udp"),
                rule("10.96.0.12", 80, "10.1.0.1"))
    new = state(rule("10.96.0.10", 53, "10.1.0.2", proto="udp"), rule("10.96.0.11", 53, "10.1.0.3", proto="udp"))
    assert stale_udp_flows(old, new) == [
        StaleFlow(Frontend("10.96.0.10", "udp", 53), Backend("10.1.0.1", 8080)),
        StaleFlow(Frontend("10.96.0.11", "udp", 53), None),
    ]
    assert stale_udp_flows(None, new) == []
    # the same from an element delta (what the nftables applier uses, also after a restart)
    gone, come = nt.diff(nt.elements(old), nt.elements(new))
    assert nt.stale_udp_flows(gone, come, new) == stale_udp_flows(old, new)


def test_state_delta_equals_the_full_diff_and_tracks_hairpin_sharing():
    a = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.2"), rule("10.96.0.2", 80, "10.1.0.2"),
              rule(None, 30080, "10.1.0.3", kind="NodePort", masquerade=True), service_cidrs=("10.96.0.0/16",))
    b = state(a.rules[0], rule("10.96.0.2", 80, "10.1.0.4", affinity_timeout=9),
              rule("10.96.0.3", 53, proto="udp"), service_cidrs=("10.96.0.0/12",))
    refs = nt.hairpin_refs(a)
    assert nt.state_delta(a, b, refs) == nt.diff(nt.elements(a), nt.elements(b))
    assert refs == nt.hairpin_refs(b)  # 10.1.0.2 is still used by the first frontend: its pair stays
    applied = nt.elements(a)
    nt.apply_delta(applied, *nt.state_delta(a, b, nt.hairpin_refs(a)))
    assert {k: v for k, v in applied.items() if v} == {k: v for k, v in nt.elements(b).items() if v}
    assert nt.state_delta(b, b, nt.hairpin_refs(b)) == ({}, {})


class FakeKernel:
    """Records transactions; the table 'exists' once a full script was applied."""

    def __init__(self):
        self.scripts: list[str] = []
        self.fail_next = False
        self.listing: str | None = None

    def nft(self, script: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise NftError("boom")
        self.scripts.append(script)

    def read(self, *args: str) -> str | None:
        return None if args[0] == "list" and args[1] == "table" else self.listing


def test_applier_builds_once_then_sends_only_changes_and_nothing_when_unchanged():
    k = FakeKernel()
    calls = []
    a = NftServiceApplier(nft=k.nft, nft_read=k.read, conntrack=lambda cmd: calls.append(cmd) or _Proc())
    st = state(rule("10.96.0.10", 80, "10.1.0.1", "10.1.0.2"))
    r = a.apply(st)
    assert r.full and r.sent and r.reason == "table missing" and "delete table ip podnet-svc" in k.scripts[-1]
    r = a.apply(st)
    assert not r.sent and len(k.scripts) == 1
    st2 = state(rule("10.96.0.10", 80, "10.1.0.1"), rule("10.96.0.20", 53, "10.1.0.5", proto="udp"))
    r = a.apply(st2)
    assert r.sent and not r.full and "delete table" not in k.scripts[-1]
    assert calls == [["conntrack", "-D", "-p", "udp", "--orig-dst", "10.96.0.20", "--orig-port-dst", "53"]]
    st3 = state(rule("10.96.0.10", 80, "10.1.0.1"), rule("10.96.0.20", 53, proto="udp"))
    a.apply(st3)
    assert calls[-1][-4:] == ["--reply-src", "10.1.0.5", "--reply-port-src", "8080"]


def test_applier_rebuilds_when_an_incremental_transaction_fails():
    k = FakeKernel()
    a = NftServiceApplier(nft=k.nft, nft_read=k.read, conntrack=None)
    a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    k.fail_next = True
    r = a.apply(state(rule("10.96.0.10", 80, "10.1.0.2")))
    assert r.full and r.reason.startswith("incremental transaction failed") and r.errors == ["boom"]


def test_applier_raises_when_the_rebuild_fails_and_retries_next_time():
    k = FakeKernel()
    a = NftServiceApplier(nft=k.nft, nft_read=k.read, conntrack=None)
    k.fail_next = True
    with pytest.raises(NftError):
        a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    assert a.apply(state(rule("10.96.0.10", 80, "10.1.0.1"))).full


class _Proc:
    returncode = 1
    stderr = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."


def test_applier_rebuilds_for_a_new_tier_and_verify_checks_chain_names():
    k = FakeKernel()
    a = NftServiceApplier(nft=k.nft, nft_read=k.read, conntrack=None)
    assert a.verify() == "never applied"
    a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    big = state(rule("10.96.0.10", 80, *(f"10.1.{i // 200}.{i % 200 + 1}" for i in range(70))))
    r = a.apply(big)
    assert r.full and r.reason == "new endpoint-count tier svc_70"
    assert "chain svc_128 {" in k.scripts[-1] and "svc_129" not in k.scripts[-1]
    names = [{"chain": {"table": nt.TABLE, "name": n}} for n in (*a.layout.chain_rule_counts(), *a.chains)]
    k.listing = json.dumps({"nftables": names})
    assert a.verify() is None
    k.listing = json.dumps({"nftables": names[1:]})
    assert a.verify() == f"chain {names[0]['chain']['name']} is missing"
    k.listing = json.dumps({"nftables": []})
    assert a.verify() == "table missing"
