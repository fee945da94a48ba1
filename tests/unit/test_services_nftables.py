"""Rendering the Service state into nftables elements and transactions; the applier's
bookkeeping with a fake `nft` (the kernel side is in tests/kernel/test_services_*)."""

from __future__ import annotations

import re

import pytest

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError
from podnet.dataplane.ruledigest import ChainDigest, chain_digests
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
    assert els["service_ips"] == {"10.96.0.10 . tcp . 80": None}
    assert els["svc_bit0"] == {"10.96.0.10 . tcp . 80": None}  # 2 endpoints: N-1 = 0b1
    assert els["backends_2"] == {"10.96.0.10 . tcp . 80 . 0": "10.1.0.1 . 8080",
                                 "10.96.0.10 . tcp . 80 . 1": "10.1.0.2 . 8080"}
    assert els["service_nodeports"] == {"tcp . 30080": None} and not any(els[f"np_bit{i}"] for i in range(8))
    assert els["nodeport_backends_1"] == {"tcp . 30080 . 0": "10.1.0.1 . 8080"}
    assert els["masq_nodeports"] == {"tcp . 30080": None} and els["masq_ips"] == {}
    assert els["affinity_ips"] == {"10.96.0.10 . tcp . 80": "jump aff_t30"}
    assert els["reject_ips"] == {"10.96.0.11 . udp . 53": None}
    assert els["drop_ips"] == {"203.0.113.7 . tcp . 80": None}
    assert els["firewall_ips"] == {"203.0.113.7 . tcp . 80": None}
    assert set(els["lb_source_ranges"]) == {"203.0.113.7 . tcp . 80 . 10.0.0.0/8", "203.0.113.7 . tcp . 80 . 192.0.2.1"}
    assert els["service_cidrs"] == {"10.96.0.0/16": None} and els["node_ips"] == {"192.168.1.10": None}
    assert nt.element_chains(els) == {"aff_t30"}


def walk_tree(layout: nt.Layout, els: nt.Elements, kind: str, key: str) -> str:
    """Follow the tier tree's rules for one frontend: the leaf chain it ends in."""
    chains = layout.chains()
    chain = f"{kind}_t"
    while chain in chains and not re.fullmatch(rf"{kind}_\d+", chain):
        first, second = chains[chain]
        bit_set = re.search(r"@(\w+)", first).group(1)
        chain = (first if key in els.get(bit_set, {}) else second).split()[-1]
    return chain


@pytest.mark.parametrize("kind,ip", [("svc", "10.96.0.1"), ("np", None)])
def test_the_tier_tree_leads_every_endpoint_count_to_its_own_chain(kind, ip):
    layout = nt.Layout(0x4000)
    for n in (1, 2, 3, 5, 64, 100, 255, 256):
        r = rule(ip, 80, *(f"10.1.{i // 200}.{i % 200 + 1}" for i in range(n)))
        leaf = walk_tree(layout, nt.elements(state(r)), kind, nt.fe_key(r.frontend))
        assert leaf == f"{kind}_{n}"
        key = f"{'ip daddr . ' if ip else ''}meta l4proto . th dport"
        slots = f"map @{'backends' if ip else 'nodeport_backends'}_{n}"
        assert layout.chains()[leaf] == [
            f"{key} @{'sh_ips' if ip else 'sh_nodeports'} dnat ip to {key} . jhash ip saddr mod {n} seed 0x706f646e "
            f"{slots}",
            f"dnat ip to {key} . numgen random mod {n} {slots}"]


def many_backends(n: int) -> list[str]:
    return [f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(n)]


def test_chains_do_not_grow_with_services_and_a_large_service_adds_one_chain():
    many = state(*(rule(f"10.96.{i // 250}.{i % 250 + 1}", 80, "10.1.0.1", "10.1.0.2", "10.1.0.3")
                   for i in range(2000)))
    assert nt.Layout.for_state(many) == nt.Layout(0x4000, nt.MIN_CAPACITY) and nt.TIER_BITS == 8
    script = nt.structure_script(nt.Layout(0x4000), many)
    assert len(re.findall(r"^add chain ", script, re.M)) == len(nt.Layout(0x4000).chain_rule_counts())
    assert "10.96.0.1" not in script  # elements travel by netlink
    # more endpoints than the tree's leaves: the same layout, one chain for the count, slots in one map
    big = state(rule("10.96.0.1", 80, *many_backends(300)), rule(None, 30000, *many_backends(5000), kind="NodePort"))
    assert nt.Layout.for_state(big) == nt.Layout(0x4000)
    els = nt.elements(big)
    assert els["large_ips"] == {"10.96.0.1 . tcp . 80": "goto svc_large300"} and not els["service_ips"]
    assert els["large_nodeports"] == {"tcp . 30000": "goto np_large5000"} and not els["service_nodeports"]
    assert len(els["backends_large"]) == 300 and els["backends_large"]["10.96.0.1 . tcp . 80 . 299"] == \
        "10.1.1.43 . 8080"
    assert len(els["nodeport_backends_large"]) == 5000 and not any(els[f"svc_bit{i}"] for i in range(8))
    script = nt.structure_script(nt.Layout(0x4000), big)
    assert ("add rule ip podnet-svc svc_large300 dnat ip to ip daddr . meta l4proto . th dport . "
            "numgen random mod 300 map @backends_large\n") in script
    assert "add rule ip podnet-svc np_large5000 dnat ip to meta l4proto . th dport . numgen random mod 5000 " \
        "map @nodeport_backends_large\n" in script
    assert nt.state_chains(big) == {"svc_large300", "np_large5000"}
    assert nt.large_chain_of("svc_large300") == (False, False, 300) and nt.large_chain_of("np_large_sc301") == \
        (True, True, 301)
    assert nt.large_chain_of("svc_large256") is None and nt.large_chain_of("svc_large0300") is None


def test_the_big_sets_have_a_capacity_that_grows_with_need_and_never_shrinks():
    small = nt.Layout(0x4000)
    assert (f"add set ip podnet-svc service_ips {{ type ipv4_addr . inet_proto . inet_service; "
            f"size {nt.MIN_CAPACITY}; }}") in small.body
    assert ("add map ip podnet-svc backends_256 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 "
            ": ip daddr . th dport; }") in small.body and "backends_257" not in small.body
    assert small.fit(nt.MIN_CAPACITY) is small
    grown = small.fit(nt.MIN_CAPACITY + 1)
    assert grown.capacity == 4 * nt.MIN_CAPACITY and grown.marker != small.marker
    assert grown.fit(10) is grown  # fewer elements later: the same table


def test_affinity_chain_rules():
    assert len(nt.affinity_chain_rules("aff_t60")) == 1 and "timeout 60s" in nt.affinity_chain_rules("aff_t60")[0]
    assert not nt.is_affinity_chain("services") and not nt.is_affinity_chain("aff_tx")


def test_elements_encode_in_the_kernel_layout():
    # what `nft --debug=netlink` shows for the same elements (32-bit words, fields padded to 4 bytes)
    backend = nt.encode_element("backends_3", "10.96.0.1 . tcp . 80 . 2", "10.1.0.5 . 8080")
    key = bytes.fromhex("0a600001" "06000000" "00500000") + (2).to_bytes(4, "little")
    assert backend == nl.element(key, nl.value(bytes.fromhex("0a010005" "1f900000")))  # the short path = generic
    assert key in backend and bytes.fromhex("0a010005" "1f900000") in backend
    ranges = nt.encode_element("lb_source_ranges", "10.96.0.1 . tcp . 80 . 192.168.0.0/16", None)
    head = bytes.fromhex("0a600001" "06000000" "00500000")
    assert head + bytes.fromhex("c0a80000") in ranges and head + bytes.fromhex("c0a8ffff") in ranges
    assert nt.encode_element("service_nodeports", "udp . 53", None).endswith(bytes.fromhex("11000000" "00350000"))
    with pytest.raises(ValueError, match="set backends_1: element 'x . tcp . 80 . 0'"):
        nt.element_batch({}, {"backends_1": {"x . tcp . 80 . 0": "10.1.0.1 . 80"}})


RICH = state(rule("10.96.0.10", 80, "10.1.0.1", "10.1.0.2", "10.1.0.3", affinity_timeout=30, masquerade=True,
                  owns_cluster_ip=True, affinity_key=0x0000a002),
             rule("203.0.113.8", 80, kind="LoadBalancer", no_endpoints="drop", affinity_timeout=30, affinity_key=3,
                  short_circuit=(Backend("10.1.0.4", 8080), Backend("10.1.0.5", 8080))),
             rule(None, 30090, "10.1.0.4", kind="NodePort", short_circuit=(Backend("10.1.0.4", 8080),
                                                                           Backend("10.1.0.5", 8080))),
             rule(None, 30080, "10.1.0.1", kind="NodePort", masquerade=True, affinity_timeout=30),
             rule("10.96.0.11", 53, proto="udp"), rule(None, 30053, proto="udp", kind="NodePort", no_endpoints="drop"),
             rule("203.0.113.7", 80, "10.1.0.9", kind="LoadBalancer", source_ranges=("10.0.0.0/8", "192.0.2.1/32")),
             service_cidrs=("10.96.0.0/16",), node_ips=("192.168.1.10",))


def test_the_text_form_encodes_to_the_same_bytes_as_the_rules():
    for r in RICH.rules:
        for item in nt.rule_items(r):
            key, value = nt.item_text(item)
            if item[0] != "cluster_ips":  # (its text is the address alone)
                assert nt.item_of(item[0], key, value) == item
            assert nt.encode_element(item[0], key, value) == nt.encode_item(item)
    # a full load made from the rules carries exactly the elements of the text form
    full, digest = nt.state_batch(RICH)
    text = {k: v for k, v in nt.elements(RICH).items() if k not in nt.TEXT_ONLY}
    from_text = nt.element_batch({}, text, digest=(None, digest))
    assert sorted(m[2] for m in full.messages) == sorted(m[2] for m in from_text.messages)
    assert full.elements == sum(len(v) for v in text.values()) + 1  # and the digest


def test_the_digest_follows_deltas_and_sees_any_difference():
    a = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.2"), rule(None, 30080, "10.1.0.3", kind="NodePort"))
    b = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.9"), rule("10.96.0.2", 53, proto="udp"))
    da, db = nt.state_digest(a), nt.state_digest(b)
    assert da == nt.state_batch(a)[1] and da != db
    assert nt.digest_delta(da, a, b) == db  # incremental = recomputed
    assert nt.digest_delta(db, b, a) == da
    # one slot's value differs: another digest
    c = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.8"), rule("10.96.0.2", 53, proto="udp"))
    assert nt.state_digest(c) != db
    # the same key bytes in another set (reject -> drop) count as a difference too
    assert nt.state_digest(state(rule("10.96.0.2", 53, proto="udp"))) != \
        nt.state_digest(state(rule("10.96.0.2", 53, proto="udp", no_endpoints="drop")))
    batch = nt.element_batch(*nt.state_delta(b, c), digest=(db, nt.state_digest(c)))
    assert [m[3] for m in batch.messages][:2] == ["deleting from set podnet-svc digest", "adding to set podnet-svc digest"]


def test_delta_is_empty_without_changes_and_only_the_new_service_otherwise():
    base = state(*(rule(f"10.96.0.{i}", 80, "10.1.0.1", "10.1.0.2") for i in range(1, 50)))
    assert nt.state_delta(base, base) == ({}, {})
    more = state(*base.rules, rule("10.96.1.1", 443, "10.1.0.7", "10.1.0.8", "10.1.0.9", affinity_timeout=5))
    gone, come = nt.state_delta(base, more)
    # service, bit 1, 3 slots, affinity, affinity key
    assert gone == {} and sum(len(v) for v in come.values()) == 1 + 1 + 3 + 1 + 1
    assert nt.affinity_chain_script(come, set()).startswith("add chain ip podnet-svc aff_t5\n")
    assert nt.affinity_chain_script(come, {"aff_t5"}) == ""
    assert "10.96.0." not in nt.describe_delta(gone, come)  # nothing about the other Services


def test_delta_replaces_changed_values_delete_first():
    a = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.2"))
    b = state(rule("10.96.0.1", 80, "10.1.0.3"))
    gone, come = nt.state_delta(a, b)
    # two endpoints -> one: the slots move to the one-endpoint map, the tier bit goes
    assert gone == {"svc_bit0": {"10.96.0.1 . tcp . 80": None},
                    "backends_2": {"10.96.0.1 . tcp . 80 . 0": "10.1.0.1 . 8080",
                                   "10.96.0.1 . tcp . 80 . 1": "10.1.0.2 . 8080"}}
    assert come == {"backends_1": {"10.96.0.1 . tcp . 80 . 0": "10.1.0.3 . 8080"}}
    lines = nt.describe_delta(gone, come).splitlines()
    assert lines.index("add element ip podnet-svc backends_1 { 10.96.0.1 . tcp . 80 . 0 : 10.1.0.3 . 8080 }") > \
        lines.index("delete element ip podnet-svc backends_2 { 10.96.0.1 . tcp . 80 . 0, 10.96.0.1 . tcp . 80 . 1 }")
    batch = nt.element_batch(gone, come)
    assert [m[3] for m in batch.messages] == ["deleting from set podnet-svc svc_bit0",
                                              "deleting from set podnet-svc backends_2",
                                              "adding to set podnet-svc backends_1"]
    # same count, another endpoint: only that slot's value changes
    gone, come = nt.state_delta(b, state(rule("10.96.0.1", 80, "10.1.0.4")))
    assert gone == {"backends_1": {"10.96.0.1 . tcp . 80 . 0": "10.1.0.3 . 8080"}}
    assert come == {"backends_1": {"10.96.0.1 . tcp . 80 . 0": "10.1.0.4 . 8080"}}


def dumped(encoded: bytes) -> nl.DumpedElement:
    """What a dump of the kernel returns for an element we encoded."""
    return nl.decode_element(nl.attrs(encoded)[nl.LIST_ELEM])


def test_elements_read_back_from_the_kernel_decode_to_their_text_form():
    for r in RICH.rules:
        for item in nt.rule_items(r):
            assert nt.decode_element(item[0], dumped(nt.encode_item(item))) == nt.item_text(item)
    assert nt.decode_element("node_ips", dumped(nl.element(bytes([192, 168, 1, 10])))) == ("192.168.1.10", None)
    # an interval set: starts, and ends flagged at the next address (nft adds an end at 0)
    points = [(b"\0\0\0\0", 1), (bytes([10, 96, 0, 0]), 0), (bytes([10, 112, 0, 0]), 1), (bytes([192, 0, 2, 7]), 0),
              (bytes([192, 0, 2, 8]), 1)]
    assert nt.decode_intervals([nl.DumpedElement(k, None, None, f) for k, f in points]) == \
        ["10.96.0.0/12", "192.0.2.7"]
    adjacent = [(bytes([10, 96, 0, 0]), 0), (bytes([10, 96, 0, 10]), 1), (bytes([10, 96, 0, 10]), 0),
                (bytes([10, 96, 0, 11]), 1)]
    assert nt.decode_intervals([nl.DumpedElement(k, None, None, f) for k, f in adjacent]) == \
        ["10.96.0.0/29", "10.96.0.8/31", "10.96.0.10"]


def test_check_layout_names_what_is_wrong():
    layout = nt.Layout(0x4000)
    table = nt.KernelTable(layout.chain_rule_counts(), {*layout.sets(), nt.DYNAMIC}, {}, {"service_ips": 16384})
    assert nt.check_layout(layout, table) is None and nt.kernel_layout(0x4000, table) == layout
    large = nt.KernelTable({**table.chains, "svc_large300": 1, "aff_t5": 1}, table.sets, {}, {})
    assert nt.check_layout(layout, large) is None
    assert nt.check_layout(layout, nt.KernelTable({**table.chains, "svc_large300": 0}, table.sets, {}, {})) == \
        "chain svc_large300 has 0 rules, expected 1"
    assert nt.check_layout(layout, nt.KernelTable({**table.chains, "svc_large200": 1}, table.sets, {}, {})) == \
        "chain svc_large200 is not part of the layout"
    assert nt.check_layout(layout, nt.KernelTable({**table.chains, "svc_1": 0}, table.sets, {}, {})) == \
        "chain svc_1 has 0 rules, expected 2"
    assert nt.check_layout(layout, nt.KernelTable(table.chains, table.sets - {"backends_7"}, {}, {})) == \
        "set/map backends_7 is missing"
    other = nt.Layout(0x8000)
    assert nt.check_layout(layout, nt.KernelTable({**table.chains, other.marker: 0}, table.sets, {}, {})) == \
        f"layout marker {other.marker} is from another version"


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


def test_state_delta_equals_the_full_diff():
    a = state(rule("10.96.0.1", 80, "10.1.0.1", "10.1.0.2"), rule("10.96.0.2", 80, "10.1.0.2"),
              rule(None, 30080, "10.1.0.3", kind="NodePort", masquerade=True), service_cidrs=("10.96.0.0/16",))
    b = state(a.rules[0], rule("10.96.0.2", 80, "10.1.0.4", affinity_timeout=9),
              rule("10.96.0.3", 53, proto="udp"), service_cidrs=("10.96.0.0/12",))
    assert nt.state_delta(a, b) == nt.diff(nt.elements(a), nt.elements(b))
    assert nt.state_delta(b, b) == ({}, {})


class FakeKernel:
    """Records nft scripts and netlink batches (the real kernel: tests/kernel/test_services_*),
    and counts the elements they leave in each set."""

    def __init__(self):
        self.scripts: list[str] = []
        self.batches: list = []
        self.fail_next = False
        self.chain_names: list[str] = []
        self.written: dict[str, list[bytes]] = {}  # chain -> its rules, as the transactions wrote them
        self.rules: dict[str, list[bytes]] = {}  # chain -> its rules in "the kernel" (as_written: the same)
        self.held: dict[str, int] = {}
        self.gen = 0  # the nf_tables generation: one more per committed transaction
        self.counted = 0

    def nft(self, script: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise NftError("boom")
        self.scripts.append(script)
        self.gen += 1
        if "delete table ip podnet-svc" in script:
            self.held = {}
            self.written = {}
        for line in script.splitlines():
            verb, _, rest = line.partition(f" ip {nt.TABLE} ")
            chain, _, rule = rest.partition(" ")
            if verb == "add chain":
                self.written.setdefault(chain, [])
            elif verb == "add rule":
                self.written[chain].append(rule.encode())
        self.rules = {c: list(r) for c, r in self.written.items()}

    def commit(self, batch) -> None:
        if self.fail_next:
            self.fail_next = False
            raise NftError("boom")
        self.batches.append(batch)
        self.gen += 1
        for name, n in batch.changes.items():
            self.held[name] = self.held.get(name, 0) + n
        for _, _, payload, what in batch.messages:
            chain = what.rpartition(" ")[2]
            if what.startswith("adding chain "):
                self.written[chain] = []
            elif what.startswith("adding a rule to "):
                self.written[chain].append(payload)
            elif what.startswith("deleting chain "):
                del self.written[chain]
        self.rules = {c: list(r) for c, r in self.written.items()}

    def counts(self, names) -> dict[str, int]:
        self.counted += 1
        return {name: self.held.get(name, 0) for name in names}

    def generation(self) -> int:
        return self.gen

    def slot_orders(self) -> dict:
        return {}

    def table(self, elements: bool = True):
        return None

    def chains(self) -> list[str]:
        return self.chain_names

    def rule_digests(self, chains=None) -> dict[str, ChainDigest]:
        return chain_digests((c, r) for c in (self.rules if chains is None else chains) for r in self.rules.get(c, ()))

    def as_written(self, a: NftServiceApplier) -> None:
        """The chains and their rules as the applier wrote them."""
        self.chain_names = [*a.layout.chain_rule_counts(), *a.chains]
        self.rules = {c: list(r) for c, r in self.written.items()}

    def affinity(self) -> list:
        return []

    def applier(self, **kw) -> NftServiceApplier:
        return NftServiceApplier(nft=self.nft, kernel=self, **kw)


def test_applier_builds_once_then_sends_only_changes_and_nothing_when_unchanged():
    k = FakeKernel()
    calls = []
    a = k.applier(conntrack=lambda flows: calls.append(list(flows)) or 0)
    st = state(rule("10.96.0.10", 80, "10.1.0.1", "10.1.0.2"))
    r = a.apply(st)
    assert r.full and r.sent and r.reason == "table missing" and "delete table ip podnet-svc" in k.scripts[-1]
    assert k.batches[-1].elements == 1 + 1 + 2 + 1  # service, tier bit, two slots; the digest
    r = a.apply(st)
    assert not r.sent and len(k.scripts) == 1 and len(k.batches) == 1
    st2 = state(rule("10.96.0.10", 80, "10.1.0.1"), rule("10.96.0.20", 53, "10.1.0.5", proto="udp"))
    r = a.apply(st2)
    assert r.sent and not r.full and len(k.scripts) == 1 and len(k.batches) == 2
    assert calls == [[StaleFlow(Frontend("10.96.0.20", "udp", 53), None)]]  # it had no endpoints
    st3 = state(rule("10.96.0.10", 80, "10.1.0.1"), rule("10.96.0.20", 53, proto="udp"))
    a.apply(st3)
    assert calls[-1] == [StaleFlow(Frontend("10.96.0.20", "udp", 53), Backend("10.1.0.5", 8080))]


def test_applier_rebuilds_when_an_incremental_transaction_fails():
    k = FakeKernel()
    a = k.applier(conntrack=None)
    a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    k.fail_next = True
    r = a.apply(state(rule("10.96.0.10", 80, "10.1.0.2")))
    assert r.full and r.reason.startswith("incremental transaction failed") and r.errors == ["boom"]


def test_applier_raises_when_the_rebuild_fails_and_retries_next_time():
    k = FakeKernel()
    a = k.applier(conntrack=None)
    k.fail_next = True
    with pytest.raises(NftError):
        a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    assert a.apply(state(rule("10.96.0.10", 80, "10.1.0.1"))).full


def test_a_large_service_is_element_changes_and_verify_checks_chains_and_element_counts():
    k = FakeKernel()
    a = k.applier(conntrack=None)
    assert a.verify() == "never applied"
    a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    big = state(rule("10.96.0.10", 80, *many_backends(300)))
    r = a.apply(big)  # no rebuild: its chain comes in the elements' transaction, before them
    assert not r.full and len(k.scripts) == 1 and r.added == 1 + 300 and r.removed == 2  # service_ips, slot
    what = [m[3] for m in k.batches[-1].messages]
    assert what[:2] == ["adding chain podnet-svc svc_large300", "adding a rule to podnet-svc svc_large300"]
    assert what.index("adding to set podnet-svc large_ips") > 1 and a.chains == {"svc_large300"}
    # one endpoint more: a slot and the frontend's chain; the chain of 300 goes in the same transaction
    r = a.apply(state(rule("10.96.0.10", 80, *many_backends(301))))
    what = [m[3] for m in k.batches[-1].messages]
    assert what[:2] == ["adding chain podnet-svc svc_large301", "adding a rule to podnet-svc svc_large301"]
    assert what[-1] == "deleting chain podnet-svc svc_large300" and a.chains == {"svc_large301"}
    assert (r.added, r.removed) == (2, 1)  # slot 300 and the new goto; the old goto
    k.as_written(a)
    assert a.verify() is None and k.held["backends_large"] == 301 and k.counted == 1
    assert a.verify() is None and k.counted == 1  # no transaction since the check: nothing to read
    k.held["backends_large"] -= 1  # an element deleted behind the applier's back ...
    k.gen += 1  # ... in a transaction of its own
    assert a.verify() == "set backends_large holds 300 elements, 301 expected" and k.counted == 2
    k.held["backends_large"] += 1
    k.held["masq_ips"] = 1  # or one added to a set that should be empty
    assert a.verify() == "set masq_ips holds 1 elements, 0 expected"
    del k.held["masq_ips"]
    k.held["backends_7"] = 1  # (but an empty slot map is not counted: no frontend reaches it)
    assert a.verify() is None
    k.gen += 1
    missing = k.chain_names.pop(0)
    assert a.verify() == f"chain {missing} is missing"
    k.chain_names = []
    assert a.verify() == "table missing"
    # a flushed chain or a deleted rule: every name and element count stays as it was
    k.as_written(a)
    k.rules["services"] = []
    assert a.verify() == f"chain services has 0 rules, {a.layout.chain_rule_counts()['services']} expected"
    k.as_written(a)
    k.rules["svc_large301"].pop()
    assert a.verify() == "chain svc_large301 has 0 rules, 1 expected"
    # the table right again; the applier's own transactions do not make verify() read it
    k.as_written(a)
    assert a.verify() is None and a.generation == k.gen
    counted = k.counted
    a.apply(state(rule("10.96.0.10", 80, *many_backends(302))))
    assert a.verify() is None and k.counted == counted
    k.gen += 1  # someone else's
    k.as_written(a)
    assert a.verify() is None and k.counted == counted + 1


def test_a_rule_replaced_in_place_is_found_by_verify_and_the_resync_rebuilds_instead_of_adopting():
    k = FakeKernel()
    a = k.applier(conntrack=None)
    st = state(rule("10.96.0.10", 80, *many_backends(300)))
    a.apply(state(rule("10.96.0.10", 80, "10.1.0.1")))
    a.apply(st)  # its large chain comes in an element batch: its reference from a dump of that chain
    k.as_written(a)
    assert a.verify() is None
    k.gen += 1  # someone else's transaction: the same number of rules in every chain
    k.rules["services"][0] = b"accept"
    assert a.verify() == "chain services: a rule differs from what podnet wrote"
    k.as_written(a)
    k.rules["svc_large300"][0] = b"dnat to 192.0.2.66"
    assert a.verify() == "chain svc_large300: a rule differs from what podnet wrote"
    # a table that passes the layout's checks (names, counts) is adopted by a resync only if its
    # rules are those podnet wrote
    layout = a.layout
    k.table = lambda elements=True: nt.KernelTable(
        {**layout.chain_rule_counts(), "svc_large300": 1}, {*layout.sets(), nt.DYNAMIC},
        nt.elements(st) if elements else None, {"service_ips": layout.capacity}, a.digest)
    r = a.apply(st, resync=True)
    assert r.full and r.reason == "chain svc_large300: a rule differs from what podnet wrote"
    k.chain_names = [*a.layout.chain_rule_counts(), *a.chains]
    assert a.verify() is None and not a.apply(st, resync=True).full  # as written: adopted


def test_cluster_ips_share_the_capacity_and_services_without_endpoints_count():
    assert ("add set ip podnet-svc cluster_ips { type ipv4_addr; "
            f"size {nt.MIN_CAPACITY}; }}") in nt.Layout(0x4000).body
    many = [rule(f"10.96.{i >> 8}.{i & 255}", 80, owns_cluster_ip=True) for i in range(nt.MIN_CAPACITY + 1)]
    st = state(rule("10.97.0.1", 80, "10.1.0.1", owns_cluster_ip=True), *many)
    assert nt.state_sizes(st) == {"service_ips": 1, "cluster_ips": nt.MIN_CAPACITY + 2}
    k = FakeKernel()
    a = k.applier(conntrack=None)
    a.apply(state(rule("10.97.0.1", 80, "10.1.0.1", owns_cluster_ip=True)))
    assert a.sized == {"service_ips": 1, "cluster_ips": 1}
    r = a.apply(st)  # counted from the delta: the reject-only frontends fill @cluster_ips alone
    assert r.full and r.reason == f"the table grows to {4 * nt.MIN_CAPACITY} frontends"
    assert f"cluster_ips {{ type ipv4_addr; size {4 * nt.MIN_CAPACITY}; }}" in k.scripts[-1]
    r = a.apply(state(rule("10.97.0.1", 80, "10.1.0.1", owns_cluster_ip=True)))
    assert not r.full and a.sized == {"service_ips": 1, "cluster_ips": 1}


def test_the_table_and_its_elements_as_a_ruleset():
    from tests.support.nftables import FakeNft

    st = state(rule("10.96.0.10", 80, "10.1.0.1", "10.1.0.2", affinity_timeout=30),
               rule(None, 30080, "10.1.0.1", kind="NodePort", masquerade=True),
               rule("203.0.113.7", 80, "10.1.0.3", kind="LoadBalancer", source_ranges=("10.0.0.0/8",)),
               service_cidrs=("10.96.0.0/16",), node_ips=("192.168.1.10",))
    fake = FakeNft()
    fake.apply(nt.structure_transaction(nt.Layout(0x4000), st))  # the fake checks every @set and jump target
    fake.apply(nt.delta_transaction({}, nt.elements(st)))
    table = fake.ruleset(nt.TABLE)
    assert table.sets["backends_2"].elements == {"10.96.0.10 . tcp . 80 . 0 : 10.1.0.1 . 8080",
                                                 "10.96.0.10 . tcp . 80 . 1 : 10.1.0.2 . 8080"}
    assert table.sets["affinity_ips"].elements == {"10.96.0.10 . tcp . 80 : jump aff_t30"}
    assert table.sets["lb_source_ranges"].elements == {"203.0.113.7 . tcp . 80 . 10.0.0.0/8"}
    assert table.sets["service_cidrs"].elements == {"10.96.0.0/16"}
    assert table.chains["aff_t30"].count == 1 and table.chains["svc_2"].rules[1:] == [
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @backends_2"]
    assert table.chains["nat_prerouting"].spec == "type nat hook prerouting priority -100; policy accept;"
    # the Service goes: only its elements leave
    gone, come = nt.state_delta(st, state(*st.rules[1:], service_cidrs=st.service_cidrs, node_ips=st.node_ips))
    fake.apply(nt.delta_transaction(gone, come))
    table = fake.ruleset(nt.TABLE)
    assert not table.sets["backends_2"].elements and not table.sets["affinity_ips"].elements
    assert table.sets["nodeport_backends_1"].elements == {"tcp . 30080 . 0 : 10.1.0.1 . 8080"}


def test_the_layer_encodes_elements_as_the_services_fast_path_does():
    from podnet.dataplane.nftables import encode_element, set_types

    checked = 0
    st = RICH
    for r in st.rules:
        for item in nt.rule_items(r):
            key, value = nt.item_text(item)
            if item[0] == "lb_source_ranges":  # intervals: the layer leaves them to nft
                continue
            types = set_types(nt.set_object(item[0]))
            assert types is not None
            assert encode_element(types, key if value is None else f"{key} : {value}") == nt.encode_item(item)
            checked += 1
    assert checked >= 8


def test_cluster_ip_short_circuit_and_affinity_key_elements():
    els = nt.elements(RICH)
    assert els["cluster_ips"] == {"10.96.0.10": None}
    assert els["affinity_key_ips"] == {"10.96.0.10 . tcp . 80": "0x0000a002", "203.0.113.8 . tcp . 80": "0x00000003"}
    assert els["short_circuit_ips"] == {"203.0.113.8 . tcp . 80": "goto svc_2"}
    assert els["short_circuit_nodeports"] == {"tcp . 30090": "goto np_2"}
    assert els["backends_2"]["203.0.113.8 . tcp . 80 . 1"] == "10.1.0.5 . 8080"
    assert els["nodeport_backends_1"]["tcp . 30090 . 0"] == "10.1.0.4 . 8080"  # the local endpoint
    assert els["nodeport_backends_2"] == {"tcp . 30090 . 0": "10.1.0.4 . 8080", "tcp . 30090 . 1": "10.1.0.5 . 8080"}
    # the address leaves only with its owner; an owner moving to another port changes no element
    a = state(rule("10.96.0.1", 80, "10.1.0.1", owns_cluster_ip=True), rule("10.96.0.1", 81, "10.1.0.1"))
    b = state(rule("10.96.0.1", 81, "10.1.0.1", owns_cluster_ip=True))
    gone, come = nt.state_delta(a, b)
    assert "cluster_ips" not in gone and "cluster_ips" not in come
    assert nt.state_delta(b, state())[0]["cluster_ips"] == {"10.96.0.1": None}
    assert nt.digest_delta(nt.state_digest(a), a, b) == nt.state_digest(b)
