"""podnet's nftables layout for Services: a fixed set of chains, everything else set elements.

    table ip podnet-svc
      nat prerouting/output -> services:
        ip daddr . meta l4proto . th dport @masq_ips               -> mark for masquerade
        fib daddr local, meta l4proto . th dport @masq_nodeports   -> mark for masquerade
        ct mark set @affinity_key_ips / _nodeports (the Service port's affinity key),
        dnat to (ip saddr . ct mark) @affinity                      (ClientIP affinity hits)
        from pods (iifname pn*) or the node: @short_circuit_ips / _nodeports -> goto svc_<M> / np_<M>
                                                                    (externalTrafficPolicy Local)
        ip daddr . meta l4proto . th dport @service_ips            -> goto svc_t (tier tree)
        fib daddr local, meta l4proto . th dport @service_nodeports -> goto np_t
      svc_t...: a binary tree of chains that finds the endpoint count N of the frontend,
        one bit per level (@svc_bit<i> holds the frontends whose N-1 has bit i set)
      svc_<N>: dnat to (ip daddr . l4proto . dport . numgen random mod N) @backends_<N>
      np_<N>:  dnat to (l4proto . dport . numgen random mod N) @nodeport_backends_<N>
      nat postrouting: record affinity (@affinity_ips/@affinity_nodeports -> jump aff_t<T>,
        which updates @affinity with the chosen backend), masquerade marked traffic
      filter forward: a DNATed packet that leaves by the interface it came in (a pod
        reaching itself through its Service: hairpin) is marked for masquerade
      filter prerouting/output (before DNAT): LoadBalancer source ranges
        (@firewall_ips, @lb_source_ranges)
      filter input/forward/output (after DNAT): no endpoints -> reject or drop
        (@reject_*, @drop_*), other ports of a ClusterIP (@cluster_ips) -> reject,
        unused service CIDR addresses -> drop

Why a tree and not a verdict map `frontend : goto svc_<N>`: the kernel validates the
whole table for loops whenever a jump/goto element is added, walking every element
of every verdict map (12-40 ms per change at 50 000 Services). Plain set elements
are not validated: a change costs the same at any size. The tree costs a fixed
number of set lookups per new connection (TIER_BITS), whatever the number of Services.

A Service port with N endpoints is one @service_ips element, one @svc_bit<i> element
per bit set in N-1, and N @backends_<N> slot elements. The tree has 2^bits leaves
(bits = TIER_BITS, more if a Service has more endpoints: the table is rebuilt once
for it). aff_t<T> exists once per distinct affinity timeout. Nothing grows with
the number of Services except elements.

The table's structure is a transaction of the typed nftables layer
(podnet.dataplane.nftables), sent as `nft -f` text; elements travel as netlink batches
(podnet.dataplane.nfnetlink) encoded here on a short path from the rules (`encode_item`,
byte for byte what the layer's own encoder makes of the same element text, as the
unit tests check); `delta_transaction` gives a delta as the layer's elements, for logs
and tests.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nftables import Chain, Map, Set, Table, Transaction
from podnet.dataplane.nftables import Elements as NftElements
from podnet.dataplane.nftables import Rule as NftRule
from podnet.dataplane.nftables import decode_intervals as decode_intervals
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState, StaleFlow

TABLE = "podnet-svc"
FAMILY = "ip"
PROTOS = ("tcp", "udp", "sctp")
AFFINITY_MAX = 1048576  # entries in the dynamic affinity map
TIER_BITS = 8  # the tier tree covers 1..256 endpoints per frontend unless a Service needs more
MAX_TIER_BITS = 16
# One slot map per endpoint count: the kernel checks every element of a map against
# every rule bound to it (on insert, and for every element when a rule binds), so a
# single slot map used by all leaf chains would cost 256 checks per element.
# @service_ips and @cluster_ips get a fixed capacity: the kernel then uses a fixed-size
# hash, which loads about 3x faster than the resizable one (for @cluster_ips, 4-byte
# keys: 3 ms instead of 10-14 ms for 10 000 addresses). The capacity is a hard
# limit; the table is rebuilt with twice the need when it is reached (and never shrinks).
SIZED = ("service_ips", "cluster_ips")
SLOT_MAPS = {False: "backends", True: "nodeport_backends"}  # nodeport? -> slot map name prefix
SLOT_TYPEOF = {
    False: "ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport",
    True: "meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport",
}
MIN_CAPACITY = 16384

K3 = "ipv4_addr . inet_proto . inet_service"
K2 = "inet_proto . inet_service"
SVC_TABLE = Table(TABLE, FAMILY)
# every set and map but the slot maps; the text-only sets are written with the table's
# structure (a change rebuilds)
SETS: dict[str, Set] = {s.name: s for s in (
    Set("service_cidrs", type="ipv4_addr", flags=("interval",)),
    Set("node_ips", type="ipv4_addr"),
    Set("cluster_ips", type="ipv4_addr"),
    Set("service_ips", type=K3),
    Set("service_nodeports", type=K2),
    *(Set(f"svc_bit{i}", type=K3) for i in range(MAX_TIER_BITS)),
    *(Set(f"np_bit{i}", type=K2) for i in range(MAX_TIER_BITS)),
    Set("masq_ips", type=K3),
    Set("masq_nodeports", type=K2),
    Set("reject_ips", type=K3),
    Set("reject_nodeports", type=K2),
    Set("drop_ips", type=K3),
    Set("drop_nodeports", type=K2),
    Set("firewall_ips", type=K3),
    Set("lb_source_ranges", type=f"{K3} . ipv4_addr", flags=("interval",)),
    Map("affinity_ips", type=f"{K3} : verdict"),
    Map("affinity_nodeports", type=f"{K2} : verdict"),
    Map("affinity_key_ips", type=f"{K3} : mark"),
    Map("affinity_key_nodeports", type=f"{K2} : mark"),
    Map("short_circuit_ips", type=f"{K3} : verdict"),
    Map("short_circuit_nodeports", type=f"{K2} : verdict"),
    Set("digest", type="mark . mark"),
)}
VERDICT_MAPS = {name for name, obj in SETS.items() if obj.kind == "map" and obj.type.endswith("verdict")}
KEY_MAPS = ("affinity_key_ips", "affinity_key_nodeports")  # frontend -> affinity key (a conntrack mark)
ADDRESS_SETS = ("node_ips", "cluster_ips")  # elements are plain addresses
TEXT_ONLY = ("service_cidrs", "node_ips")
DYNAMIC = "affinity"  # filled by the kernel, never by the applier
# client . affinity key (the frontend's key, carried in the conntrack mark) -> endpoint
AFFINITY_MAP = Map(DYNAMIC, typeof="ip saddr . ct mark : ip daddr . th dport",
                   flags=("dynamic", "timeout"), size=AFFINITY_MAX, timeout="3h")
# One element: a 64-bit XOR over frontends of a hash of each frontend's elements (the
# text-only sets aside), updated in the same transaction as each change. After an agent restart an
# equal digest of the desired state means the elements are right without reading them
# back (a read-back costs ~10 s at 50 000 Services; the digest ~1 s).
DIGEST = "digest"
NOT_ELEMENTS = (DYNAMIC, DIGEST)  # sets whose contents are not Service elements

Elements = dict[str, dict[str, str | None]]  # set/map name -> element key -> value (None for sets)

LOCAL_NODEPORT = "fib daddr type local ip daddr != 127.0.0.0/8"
# This node's pods: their host-side interfaces (podnet.dataplane.pods.HOST_PREFIX).
POD_INTERFACES = "iifname pn*"
# Traffic the short-circuit applies to: from this node's pods, and from the node itself.
SHORT_CIRCUIT_SOURCES = (POD_INTERFACES, "fib saddr type local")


def _fixed_chains(mark: int) -> dict[str, list[str]]:
    m = f"{mark:#x}"
    rec = []
    for p in PROTOS:
        rec.append(f"meta l4proto {p} ct original ip daddr . meta l4proto . ct original proto-dst vmap @affinity_ips")
        rec.append(f"meta l4proto {p} ct original ip daddr @node_ips meta l4proto . ct original proto-dst "
                   "vmap @affinity_nodeports")
    return {
        "reject_chain": ["meta l4proto tcp reject with tcp reset", "reject"],
        "endpoints_check": [
            "ip daddr . meta l4proto . th dport @reject_ips goto reject_chain",
            "ip daddr . meta l4proto . th dport @drop_ips drop",
            f"{LOCAL_NODEPORT} meta l4proto . th dport @reject_nodeports goto reject_chain",
            f"{LOCAL_NODEPORT} meta l4proto . th dport @drop_nodeports drop",
            "ip daddr @cluster_ips goto reject_chain",
            "ip daddr @service_cidrs drop",
        ],
        "firewall_check": [
            "ip daddr . meta l4proto . th dport @firewall_ips "
            "ip daddr . meta l4proto . th dport . ip saddr != @lb_source_ranges drop",
        ],
        "services": [
            f"ip daddr . meta l4proto . th dport @masq_ips meta mark set meta mark | {m}",
            f"{LOCAL_NODEPORT} meta l4proto . th dport @masq_nodeports meta mark set meta mark | {m}",
            # (the protocol match lets nft accept a DNAT to an address and port)
            "meta l4proto { tcp, udp, sctp } ct mark set ip daddr . meta l4proto . th dport map @affinity_key_ips "
            "dnat ip to ip saddr . ct mark map @affinity",
            f"{LOCAL_NODEPORT} meta l4proto {{ tcp, udp, sctp }} ct mark set meta l4proto . th dport map "
            "@affinity_key_nodeports dnat ip to ip saddr . ct mark map @affinity",
            *(f"{src} ip daddr . meta l4proto . th dport vmap @short_circuit_ips" for src in SHORT_CIRCUIT_SOURCES),
            *(f"{src} {LOCAL_NODEPORT} meta l4proto . th dport vmap @short_circuit_nodeports"
              for src in SHORT_CIRCUIT_SOURCES),
            "ip daddr . meta l4proto . th dport @service_ips goto svc_t",
            f"{LOCAL_NODEPORT} meta l4proto . th dport @service_nodeports goto np_t",
        ],
        "affinity_record": rec,
        "hairpin": [f"ct status dnat fib daddr . iif oif exists meta mark set meta mark | {m}"],
        "masquerading": [f"meta mark & {m} == {m} meta mark set meta mark ^ {m} masquerade fully-random"],
    }


# base chain -> (type, hook, priority, rules)
def _base_chains() -> dict[str, tuple[str, str, str, list[str]]]:
    return {
        "filter_prerouting": ("filter", "prerouting", "-110", ["ct state new jump firewall_check"]),
        "filter_output_pre": ("filter", "output", "-110", ["ct state new jump firewall_check"]),
        "filter_input": ("filter", "input", "0", ["ct state new jump endpoints_check"]),
        "filter_forward": ("filter", "forward", "0", ["ct state new jump endpoints_check",
                                                      "ct state new jump hairpin"]),
        "filter_output": ("filter", "output", "0", ["ct state new jump endpoints_check"]),
        "nat_prerouting": ("nat", "prerouting", "-100", ["jump services"]),
        "nat_output": ("nat", "output", "-100", ["jump services"]),
        "nat_postrouting": ("nat", "postrouting", "100",
                            ["ct status dnat jump affinity_record", "jump masquerading"]),
    }


@lru_cache(maxsize=4)
def _tree_chains(bits: int) -> dict[str, list[str]]:
    """The tier tree and its leaves, for frontends (svc) and node ports (np).

    Node `<kind>_t<prefix>` tests bit (bits-1-len(prefix)) of N-1, most significant
    first; the leaf for N-1 = v is `<kind>_<v+1>`, which picks one of N slots."""
    out: dict[str, list[str]] = {}
    for kind, key, nodeport in (("svc", "ip daddr . meta l4proto . th dport", False),
                                ("np", "meta l4proto . th dport", True)):
        def node(prefix: str, kind: str = kind) -> str:
            if len(prefix) == bits:
                return f"{kind}_{int(prefix, 2) + 1}"
            return f"{kind}_t{prefix}"

        frontier = [""]
        while frontier:
            nxt = []
            for prefix in frontier:
                bit = bits - 1 - len(prefix)
                out[node(prefix)] = [f"{key} @{kind}_bit{bit} goto {node(prefix + '1')}", f"goto {node(prefix + '0')}"]
                if len(prefix) + 1 < bits:
                    nxt += [prefix + "0", prefix + "1"]
            frontier = nxt
        for v in range(2 ** bits):
            out[f"{kind}_{v + 1}"] = [f"dnat ip to {key} . numgen random mod {v + 1} map @{slot_map(nodeport, v + 1)}"]
    return out


@dataclass(frozen=True)
class Layout:
    """The fixed part of the table for one masquerade mark and tier tree depth."""

    mark: int
    bits: int = TIER_BITS
    capacity: int = MIN_CAPACITY  # elements of each SIZED set

    def fit(self, most_backends: int, frontends: int) -> Layout:
        """This layout if it holds a frontend with `most_backends` endpoints and `frontends`
        elements in each SIZED set; otherwise a larger one (the table must be rebuilt)."""
        bits = max(self.bits, (most_backends - 1).bit_length())
        capacity = self.capacity
        if frontends > capacity:
            capacity = max(MIN_CAPACITY, 1 << (2 * frontends - 1).bit_length())
        return self if (bits, capacity) == (self.bits, self.capacity) else Layout(self.mark, bits, capacity)

    @classmethod
    def for_state(cls, state: ServiceState) -> Layout:
        return cls(state.masquerade_mark).fit(*state_size(state))

    def sets(self) -> dict[str, Set]:
        """Every set and map of the table (name -> definition), the slot maps included."""
        out: dict[str, Set] = {}
        for name, obj in SETS.items():
            out[name] = Set(name, type=obj.type, size=self.capacity) if name in SIZED else obj
        for nodeport in (False, True):
            for m in _slot_maps(nodeport, self.bits):
                out[m.name] = m
        return out

    def chains(self) -> dict[str, list[str]]:
        return {**_fixed_chains(self.mark), **_tree_chains(self.bits)}

    def transaction(self) -> Transaction:
        """The layout's sets, maps and chains, every chain created before any rule so that
        jumps resolve in any order."""
        tx = Transaction(SVC_TABLE)
        tx.add_all(self.sets().values())
        tx.add(AFFINITY_MAP)
        chains = self.chains()
        tx.add_all(Chain.regular(chains))
        for name, (typ, hook, prio, _) in _base_chains().items():
            tx.add(Chain(name, type=typ, hook=hook, priority=prio, policy="accept"))
        tx.add_all(NftRule.bulk([(name, r) for name, rules in chains.items() for r in rules]
                                + [(name, r) for name, spec in _base_chains().items() for r in spec[3]]))
        return tx

    @property
    def body(self) -> str:
        """The layout as nft commands (what the marker's hash is taken of; rendered once
        per layout, and only the text is kept)."""
        return _layout_body(self)

    @cached_property
    def marker(self) -> str:
        """An empty chain whose name stamps the layout version (cheap to check: `nft list chains`)."""
        return "layout_" + hashlib.sha256(self.body.encode()).hexdigest()[:12]

    def chain_rule_counts(self) -> dict[str, int]:
        counts = {name: len(rules) for name, rules in self.chains().items()}
        counts.update({name: len(spec[3]) for name, spec in _base_chains().items()})
        counts[self.marker] = 0
        return counts


@lru_cache(maxsize=4)
def _layout_body(layout: Layout) -> str:
    return layout.transaction().script()


def slot_map(nodeport: bool, n: int) -> str:
    """The map holding the slots of frontends with n endpoints."""
    return f"{SLOT_MAPS[nodeport]}_{n}"


@lru_cache(maxsize=8)
def _slot_maps(nodeport: bool, bits: int) -> list[Map]:
    return Map.named([slot_map(nodeport, n) for n in range(1, 2 ** bits + 1)], typeof=SLOT_TYPEOF[nodeport])


@lru_cache(maxsize=1024)
def slot_map_object(nodeport: bool, n: int) -> Map:
    return Map(slot_map(nodeport, n), typeof=SLOT_TYPEOF[nodeport])


def set_object(name: str) -> Set:
    """The definition of a set or map of the table, by name."""
    slots = slot_map_of(name)
    return slot_map_object(*slots) if slots else SETS[name]


def slot_map_of(name: str) -> tuple[bool, int] | None:
    """(nodeport?, endpoint count) of a slot map's name; None for other sets."""
    prefix, _, n = name.rpartition("_")
    if not n.isdigit():
        return None
    for nodeport, p in SLOT_MAPS.items():
        if prefix == p:
            return nodeport, int(n)
    return None


def affinity_chain(timeout: int) -> str:
    return f"aff_t{timeout}"


def affinity_chain_rules(name: str) -> list[str]:
    """Rules of an affinity chain, from its name."""
    kind, _, arg = name.partition("_")
    if kind == "aff" and arg.startswith("t") and arg[1:].isdigit():
        t = int(arg[1:])
        return [f"update @{DYNAMIC} {{ ct original ip saddr . ct mark timeout {t}s : ip daddr . th dport }}"]
    raise ValueError(f"not a podnet-svc affinity chain: {name}")


def is_affinity_chain(name: str) -> bool:
    try:
        affinity_chain_rules(name)
        return True
    except ValueError:
        return False


def most_backends(els: Elements) -> int:
    """The largest endpoint count among these elements' frontends (from their slot maps)."""
    return max((s[1] for name, kv in els.items() if kv and (s := slot_map_of(name))), default=0)


def state_size(state: ServiceState) -> tuple[int, int]:
    """(largest endpoint count of a frontend, elements of the fullest SIZED set) of a state."""
    most, counts = state_sizes(state)
    return most, max(counts.values())


def state_sizes(state: ServiceState) -> tuple[int, dict[str, int]]:
    """(largest endpoint count of a frontend, elements of each SIZED set) of a state: O(frontends)."""
    most = frontends = owners = 0
    for r in state.rules:
        n = len(r.backends)
        most = max(most, n, len(r.short_circuit))
        if n and r.frontend.ip is not None:
            frontends += 1
        if r.owns_cluster_ip:
            owners += 1
    return most, {"service_ips": frontends, "cluster_ips": owners}


def kernel_layout(mark: int, table: KernelTable) -> Layout:
    """The tree depth and capacity of a table read back (to adopt them when they fit)."""
    leaves = sum(1 for name in table.chains if name.startswith("svc_") and name[4:].isdigit())
    bits = max(leaves.bit_length() - 1, 1)
    return Layout(mark, bits, table.sizes.get("service_ips", MIN_CAPACITY))


# ---------------------------------------------------------------- elements


def _addr(cidr: str) -> str:
    """An interval element as nft prints it back: a /32 is a plain address."""
    return cidr[:-3] if cidr.endswith("/32") else cidr


def fe_key(fe: Frontend) -> str:
    return f"{fe.proto} . {fe.port}" if fe.ip is None else f"{fe.ip} . {fe.proto} . {fe.port}"


def elements(state: ServiceState) -> Elements:
    """Every set/map element of the desired state, as nft text (what the applier diffs)."""
    out: Elements = {name: {} for name in SETS}
    for rule in state.rules:
        _rule_elements(rule, out)
    for c in state.service_cidrs:
        out["service_cidrs"][_addr(c)] = None
    for ip in state.node_ips:
        out["node_ips"][ip] = None
    return out


def rule_elements(rule: FrontendRule) -> Elements:
    """The elements one frontend owns."""
    out: Elements = {}
    _rule_elements(rule, out)
    return out


# An element as the layout sees it: (set, frontend, key extra, value). The key is the
# frontend's, plus a slot number (slot maps) or a CIDR (source ranges), or ("") the
# frontend's address alone (cluster_ips); the value is a backend (slot maps), a verdict
# (affinity and short-circuit maps), an affinity key (int, key maps) or None (sets). Text and netlink
# encodings are both made from these.
Item = tuple[str, Frontend, int | str | None, Backend | str | int | None]


def rule_items(rule: FrontendRule) -> Iterator[Item]:
    """The elements one frontend owns: the one definition of what goes where."""
    fe = rule.frontend
    np = fe.ip is None
    n = len(rule.backends)
    if n:
        yield ("service_nodeports" if np else "service_ips"), fe, None, None
        bit_set = "np_bit" if np else "svc_bit"
        v, i = n - 1, 0
        while v:
            if v & 1:
                yield f"{bit_set}{i}", fe, None, None
            v >>= 1
            i += 1
        slots = slot_map(np, n)
        for i, b in enumerate(rule.backends):
            yield slots, fe, i, b
        if rule.masquerade:
            yield ("masq_nodeports" if np else "masq_ips"), fe, None, None
        if rule.affinity_timeout:
            yield ("affinity_nodeports" if np else "affinity_ips"), fe, None, f"jump {affinity_chain(rule.affinity_timeout)}"
            yield ("affinity_key_nodeports" if np else "affinity_key_ips"), fe, None, rule.affinity_key
    else:
        verdict = "reject" if rule.no_endpoints == "reject" else "drop"
        yield (f"{verdict}_nodeports" if np else f"{verdict}_ips"), fe, None, None
    short = rule.short_circuit
    if short:
        m = len(short)  # never n (the compiler's rule): the slots cannot clash with the frontend's own
        yield ("short_circuit_nodeports" if np else "short_circuit_ips"), fe, None, \
            f"goto {'np' if np else 'svc'}_{m}"
        slots = slot_map(np, m)
        for i, b in enumerate(short):
            yield slots, fe, i, b
        if rule.affinity_timeout and not n:  # the frontend's own affinity elements are above otherwise
            yield ("affinity_nodeports" if np else "affinity_ips"), fe, None, f"jump {affinity_chain(rule.affinity_timeout)}"
            yield ("affinity_key_nodeports" if np else "affinity_key_ips"), fe, None, rule.affinity_key
    if rule.owns_cluster_ip:
        yield "cluster_ips", fe, "", None
    if rule.source_ranges and not np:
        yield "firewall_ips", fe, None, None
        for cidr in rule.source_ranges:
            yield "lb_source_ranges", fe, _addr(cidr), None


def item_text(item: Item) -> tuple[str, str | None]:
    """An item's text form: (key, value) as nft prints them."""
    _, fe, extra, value = item
    key = fe_key(fe) if extra is None else f"{fe_key(fe)} . {extra}" if extra != "" else str(fe.ip)
    if value is None or isinstance(value, str):
        return key, value
    if type(value) is int:
        return key, f"0x{value:08x}"  # a mark, as nft prints it
    return key, f"{value.ip} . {value.port}"  # type: ignore[union-attr]


def _rule_elements(rule: FrontendRule, out: Elements) -> None:
    for item in rule_items(rule):
        m = out.get(item[0])
        if m is None:
            m = out[item[0]] = {}
        key, value = item_text(item)
        m[key] = value


def diff(applied: Elements, desired: Elements) -> tuple[Elements, Elements]:
    """(elements to delete, elements to add) between two full element sets."""
    gone: Elements = {}
    come: Elements = {}
    for name in {**applied, **desired}:
        old, new = applied.get(name, {}), desired.get(name, {})
        if old == new:
            continue
        g = {k: v for k, v in old.items() if new.get(k, ...) != v}
        c = {k: v for k, v in new.items() if old.get(k, ...) != v}
        if g:
            gone[name] = g
        if c:
            come[name] = c
    return gone, come


def changed_rules(old: ServiceState, new: ServiceState) -> Iterator[tuple[FrontendRule | None, FrontendRule | None]]:
    """(rule before, rule after) of every frontend that differs between two states (None:
    absent), from the frontends the compiler says it touched: work in proportion to the
    change (an unchanged frontend costs an identity check)."""
    before, after = old.frontends, new.frontends
    hint = new.changed_since(old)
    for fe in (before.keys() | after.keys()) if hint is None else hint:
        b, a = before.get(fe), after.get(fe)
        if a is not b and a != b:
            yield b, a


def state_delta(old: ServiceState, new: ServiceState) -> tuple[Elements, Elements]:
    """(gone, come): the elements of the frontends that differ between two states."""
    gone: Elements = {}
    come: Elements = {}
    for b, a in changed_rules(old, new):
        for rule, into in ((b, gone), (a, come)):
            if rule is not None:
                for name, kv in rule_elements(rule).items():
                    into.setdefault(name, {}).update(kv)
    for name, a, b in (("service_cidrs", old.service_cidrs, new.service_cidrs),
                       ("node_ips", old.node_ips, new.node_ips)):
        if a != b:
            gone[name] = {_addr(x): None for x in set(a) - set(b)}
            come[name] = {_addr(x): None for x in set(b) - set(a)}
    # a key removed and re-added with the same value is no change at all
    for name in list(come):
        g = gone.get(name)
        if not g:
            continue
        for k in [k for k, v in come[name].items() if k in g and g[k] == v]:
            del come[name][k]
            del g[k]
    return ({k: v for k, v in gone.items() if v}, {k: v for k, v in come.items() if v})


def state_affinity_chains(state: ServiceState) -> set[str]:
    """The affinity chains a state's frontends jump to."""
    return {affinity_chain(r.affinity_timeout) for r in state.rules if r.affinity_timeout and r.backends}


def affinity_chains(els: Elements) -> set[str]:
    """The affinity chains the elements point to."""
    out = set()
    for name in ("affinity_ips", "affinity_nodeports"):
        for v in els.get(name, {}).values():
            if v:
                out.add(v.split()[-1])
    return out


def frontend_of(text: str, nodeport: bool) -> Frontend:
    parts = text.split(" . ")
    if nodeport:
        return Frontend(None, parts[0], int(parts[1]))  # type: ignore[arg-type]
    return Frontend(parts[0], parts[1], int(parts[2]))  # type: ignore[arg-type]


def stale_udp_flows(gone: Elements, come: Elements, new: ServiceState) -> list[StaleFlow]:
    """UDP conntrack entries to delete after a delta: flows to endpoints a frontend no
    longer has, and every flow to a frontend that starts balancing (it had no
    endpoints, or did not exist: such flows were never NATed). Works the same for
    a delta against elements read back from the kernel (after an agent restart)."""
    out: set[StaleFlow] = set()
    for name, kv in gone.items():
        which = slot_map_of(name)
        if which is None:
            continue
        np = which[0]
        for key, value in kv.items():
            if " udp . " not in f" {key} " or value is None:
                continue
            fe = frontend_of(key.rpartition(" . ")[0], np)
            ip, _, port = value.partition(" . ")
            backend = Backend(ip, int(port))
            rule = new.rule(fe)
            if rule is None or (backend not in rule.backends and backend not in rule.short_circuit):
                out.add(StaleFlow(fe, backend))
    for name, np in (("service_ips", False), ("service_nodeports", True)):
        for key in come.get(name, {}):
            if key not in gone.get(name, {}) and " udp . " in f" {key} ":
                out.add(StaleFlow(frontend_of(key, np), None))
    return sorted(out, key=lambda f: (f.frontend.ip or "", f.frontend.port, f.backend or Backend("", 0)))


# ---------------------------------------------------------------- text scripts (structure)


def _structure_parts(layout: Layout, state: ServiceState) -> tuple[Transaction, Transaction]:
    """What goes before the layout (the old table removed) and after it (the layout marker,
    the state's affinity chains, the text-only sets' elements)."""
    head = Transaction(SVC_TABLE)
    head.recreate()
    tail = Transaction(SVC_TABLE)
    tail.add(Chain(layout.marker))
    for chain in sorted(state_affinity_chains(state)):
        tail.add(Chain(chain))
        tail.add_all(NftRule.many(chain, affinity_chain_rules(chain)))
    tail.add(NftElements(SETS["service_cidrs"], sorted(_addr(c) for c in state.service_cidrs)))
    tail.add(NftElements(SETS["node_ips"], sorted(state.node_ips)))
    return head, tail


def structure_transaction(layout: Layout, state: ServiceState) -> Transaction:
    """Create (or replace) the table with its chains and the text-only sets; every other
    element follows as one netlink batch (`state_batch`)."""
    head, tail = _structure_parts(layout, state)
    head.ops += layout.transaction().ops + tail.ops
    return head


def structure_script(layout: Layout, state: ServiceState) -> str:
    """structure_transaction as text (the layout's part rendered once per layout)."""
    head, tail = _structure_parts(layout, state)
    return head.script() + layout.body + tail.script()


def delta_transaction(gone: Elements, come: Elements) -> Transaction:
    """A delta as a transaction of elements (it is sent as netlink by element_batch, which
    encodes on a shorter path; this form is for logs and tests)."""
    tx = Transaction(SVC_TABLE)
    for verb, part in (("delete", gone), ("add", come)):
        for name, kv in part.items():
            items = [k if v is None else f"{k} : {v}" for k, v in sorted(kv.items())]
            (tx.delete if verb == "delete" else tx.add)(NftElements(set_object(name), items))
    return tx


def describe_delta(gone: Elements, come: Elements) -> str:
    """A delta as the nft commands that would make it (for logs and tests; it is sent as netlink)."""
    return delta_transaction(gone, come).script()


def affinity_chain_script(come: Elements, existing: set[str]) -> str:
    """Affinity chains the new elements need and the table lacks ("" if none)."""
    tx = Transaction(SVC_TABLE)
    for chain in sorted(affinity_chains(come) - existing):
        tx.add(Chain(chain))
        tx.add_all(NftRule.many(chain, affinity_chain_rules(chain)))
    return tx.script()


def remove_script() -> str:
    """Delete the whole table (no error if there is none)."""
    tx = Transaction(SVC_TABLE)
    tx.add(SVC_TABLE)
    tx.delete(SVC_TABLE)
    return tx.script()


# ---------------------------------------------------------------- binary elements (netlink)

_PROTO = {"tcp": bytes((6, 0, 0, 0)), "udp": bytes((17, 0, 0, 0)), "sctp": bytes((132, 0, 0, 0))}
_PORT = struct.Struct("!H2x")  # inet_service, padded to a 32-bit register
_SLOT = struct.Struct("=I")  # numgen's result: host byte order


@lru_cache(maxsize=1 << 16)
def _frontend_bytes(fe: Frontend) -> bytes:
    """A frontend's key bytes (cached: its slots and sets share them)."""
    port = _PORT.pack(fe.port)
    return _PROTO[fe.proto] + port if fe.ip is None else socket.inet_aton(fe.ip) + _PROTO[fe.proto] + port


_SLOT_VALUE = nl.attr(nl.DATA_VALUE, bytes(8))[:4]  # the header of an 8-byte value: address, port


_SLOT_HEADS = {width: nl.element_heads(width + 4, 12) for width in (8, 12)}  # slot element: key, value attr
# A slot element in one pack: headers, frontend key, slot (host order), the value's headers,
# address, port (network order: htons'ed into a native "H").
_SLOT_ELEMENT = {width: (struct.Struct(f"={len(k)}s{width}sI{len(d) + len(_SLOT_VALUE)}s4sH2x"), k,
                         d + _SLOT_VALUE) for width, (k, d) in _SLOT_HEADS.items()}
_ADDRESS_HEAD = nl.element_heads(4, -1)[0]  # an element whose key is one address (cluster_ips)


def encode_item(item: Item, with_value: bool = True) -> bytes:
    """One element's netlink encoding (with_value False: the key alone, as a deletion needs)."""
    return _encode(item, _frontend_bytes(item[1]), with_value)


def _encode(item: Item, key: bytes, with_value: bool = True) -> bytes:
    """encode_item with the frontend's key bytes given (one frontend's items share them)."""
    _, fe, extra, value = item
    if extra is not None:
        if type(extra) is int:
            if with_value and type(value) is Backend:  # a slot with its backend: most of a full load
                packer, head_key, head_data = _SLOT_ELEMENT[len(key)]
                return packer.pack(head_key, key, extra, head_data, socket.inet_aton(value.ip),
                                   socket.htons(value.port))
            key += _SLOT.pack(extra)
        elif not extra:  # the frontend's address alone (cluster_ips)
            return _ADDRESS_HEAD + socket.inet_aton(fe.ip)  # type: ignore[arg-type]
        else:  # a source range: the interval of a concatenation is a key and a key end
            net, _, plen = extra.partition("/")
            first = int.from_bytes(socket.inet_aton(net), "big")
            last = first | ((1 << (32 - int(plen or 32))) - 1)
            return nl.element(key + first.to_bytes(4, "big"), key_end=key + last.to_bytes(4, "big"))
    if value is None or not with_value:
        return nl.element(key)
    if isinstance(value, str):
        return nl.element(key, nl.verdict(value))
    if type(value) is int:
        return nl.element(key, nl.value(_SLOT.pack(value)))  # a mark: host byte order
    return nl.element(key, _SLOT_VALUE + socket.inet_aton(value.ip) + _PORT.pack(value.port))


def item_of(name: str, key: str, value: str | None) -> Item:
    """An element's text form (as in Elements) -> the item it encodes."""
    if name == "cluster_ips":
        return name, Frontend(key, "tcp", 0), "", None
    parts = key.split(" . ")
    nodeport = name.endswith("_nodeports") or name.startswith(("np_bit", SLOT_MAPS[True]))
    width = 2 if nodeport else 3
    fe = frontend_of(" . ".join(parts[:width]), nodeport)
    extra: int | str | None = None
    if len(parts) > width:
        extra = int(parts[width]) if slot_map_of(name) else parts[width]
    backend: Backend | str | int | None = value
    if value is not None and slot_map_of(name):
        ip, _, port = value.partition(" . ")
        backend = Backend(ip, int(port))
    elif value is not None and name in KEY_MAPS:
        backend = int(value, 0)
    return name, fe, extra, backend


def encode_element(name: str, key: str, value: str | None) -> bytes:
    """One element in the text form of `elements()` -> its netlink encoding (value None:
    the key alone, as a deletion needs)."""
    return encode_item(item_of(name, key, value))


def _checked(item: Item, with_value: bool) -> bytes:
    try:
        return encode_item(item, with_value)
    except (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error) as e:
        key, value = item_text(item)
        raise ValueError(f"set {item[0]}: element {key!r} ({value!r}) cannot be encoded: {e}") from e


def _rule_encoded(rule: FrontendRule) -> list[tuple[str, bytes]]:
    try:
        key = _frontend_bytes(rule.frontend)  # every item of a rule is its frontend's
        return [(item[0], _encode(item, key)) for item in rule_items(rule)]
    except (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error):
        for item in rule_items(rule):
            _checked(item, True)  # raises, naming the element
        raise


def rule_hash(encoded: list[tuple[str, bytes]]) -> int:
    """A frontend's share of the digest: one hash over its elements (sets and encodings)."""
    h = hashlib.blake2b("\0".join([name for name, _ in encoded]).encode(), digest_size=8)
    for _, e in encoded:
        h.update(e)
    return int.from_bytes(h.digest(), "little")


def digest_element(digest: int) -> bytes:
    return nl.element(digest.to_bytes(8, "little"))


def state_batch(state: ServiceState) -> tuple[nl.Batch, int]:
    """Every element of a state (the text-only sets aside) as one netlink batch, made
    from the rules directly (what a full load sends), and the state's digest."""
    batch = nl.Batch()
    per_set: defaultdict[str, list[bytes]] = defaultdict(list)
    digest = 0
    for rule in state.rules:
        encoded = _rule_encoded(rule)
        digest ^= rule_hash(encoded)
        for name, e in encoded:
            per_set[name].append(e)
    for name, elements in per_set.items():
        batch.add_elements(TABLE, name, elements)
    batch.add_elements(TABLE, DIGEST, [digest_element(digest)])
    return batch, digest


def state_digest(state: ServiceState) -> int:
    digest = 0
    for rule in state.rules:
        digest ^= rule_hash(_rule_encoded(rule))
    return digest


def digest_delta(digest: int, old: ServiceState, new: ServiceState) -> int:
    """The digest after going from `old` to `new`: the changed frontends' old shares leave,
    their new ones come."""
    for b, a in changed_rules(old, new):
        for rule in (b, a):
            if rule is not None:
                digest ^= rule_hash(_rule_encoded(rule))
    return digest


def _parsed(name: str, key: str, value: str | None) -> Item:
    try:
        return item_of(name, key, value)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"set {name}: element {key!r} ({value!r}) cannot be encoded: {e}") from e


def element_batch(gone: Elements, come: Elements, digest: tuple[int | None, int] | None = None) -> nl.Batch:
    """The delta as one netlink transaction: deletions, then additions (a changed
    value is a deletion and an addition), and the digest replaced (old, new) if
    given. The text-only sets are not included."""
    batch = nl.Batch()
    if digest is not None and digest[0] != digest[1]:
        if digest[0] is not None:
            batch.delete_elements(TABLE, DIGEST, [digest_element(digest[0])])
        batch.add_elements(TABLE, DIGEST, [digest_element(digest[1])])
    for verb, part in (("delete", gone), ("add", come)):
        for name in part:
            kv = part[name]
            if not kv or name in TEXT_ONLY:
                continue
            encoded = (_checked(_parsed(name, k, v), verb == "add") for k, v in kv.items())
            if verb == "delete":
                batch.delete_elements(TABLE, name, encoded)
            else:
                batch.add_elements(TABLE, name, encoded)
    return batch


# ---------------------------------------------------------------- reading the kernel


_PROTO_NAMES = {v[0]: k for k, v in _PROTO.items()}


def _frontend_text(raw: bytes, nodeport: bool) -> tuple[str, int]:
    """Key bytes -> (frontend text, bytes used): the inverse of _frontend_bytes."""
    if nodeport:
        return f"{_PROTO_NAMES[raw[0]]} . {_PORT.unpack_from(raw, 4)[0]}", 8
    return f"{socket.inet_ntoa(raw[:4])} . {_PROTO_NAMES[raw[4]]} . {_PORT.unpack_from(raw, 8)[0]}", 12


def decode_element(name: str, el: nl.DumpedElement) -> tuple[str, str | None]:
    """A dumped element -> its text form (key, value): the inverse of encode_item."""
    if name in ADDRESS_SETS:
        return socket.inet_ntoa(el.key), None
    slots = slot_map_of(name)
    nodeport = slots[0] if slots else (name.endswith("_nodeports") or name.startswith("np_bit"))
    fe, used = _frontend_text(el.key, nodeport)
    if slots:
        value = None
        if isinstance(el.data, bytes):
            value = f"{socket.inet_ntoa(el.data[:4])} . {_PORT.unpack_from(el.data, 4)[0]}"
        return f"{fe} . {_SLOT.unpack_from(el.key, used)[0]}", value
    if name == "lb_source_ranges":
        first = int.from_bytes(el.key[used:used + 4], "big")
        last = int.from_bytes((el.key_end or el.key)[used:used + 4], "big")
        plen = 32 - (last - first + 1).bit_length() + 1
        return f"{fe} . {_addr(f'{socket.inet_ntoa(el.key[used:used + 4])}/{plen}')}", None
    if name in KEY_MAPS and isinstance(el.data, bytes):
        return fe, f"0x{_SLOT.unpack_from(el.data)[0]:08x}"
    return fe, el.data if isinstance(el.data, str) else None


@dataclass
class KernelTable:
    chains: dict[str, int]  # chain -> number of rules
    sets: set[str]
    elements: Elements | None  # None: not read
    sizes: dict[str, int]  # set -> declared capacity (sets that have one)
    digest: int | None = None  # the digest element, if there is one


def read_table(link: nl.Netlink, elements: bool = True) -> KernelTable | None:
    """The table as the kernel holds it (None: there is none), read with netlink dumps: `nft
    list` would load every element of the table into its cache first (26 s at 50 000 Services).
    elements=False: the structure and the digest only."""
    try:
        declared = link.sets(TABLE)
        names = link.chains(TABLE)
    except OSError:
        return None
    if not names and not declared:
        return None
    chains = {name: 0 for name in names}
    chains.update(link.rule_counts(TABLE))
    digest = None
    if DIGEST in declared:
        found = link.elements(TABLE, DIGEST)
        if len(found) == 1 and len(found[0].key) == 8:
            digest = int.from_bytes(found[0].key, "little")
    sizes = {k: v for k, v in declared.items() if v is not None}
    if not elements:
        return KernelTable(chains, set(declared), None, sizes, digest)
    els: Elements = {}
    for name in declared:
        if name in NOT_ELEMENTS or name.startswith("__"):  # "__set<N>": a rule's anonymous set
            continue
        dumped = link.elements(TABLE, name)
        if name == "service_cidrs":
            els[name] = {c: None for c in decode_intervals(dumped)}
        else:
            els[name] = dict(decode_element(name, e) for e in dumped)
    return KernelTable(chains, set(declared), els, sizes, digest)


def check_layout(layout: Layout, table: KernelTable) -> str | None:
    """Why the kernel table is not ours as expected (None: it is)."""
    for name in (*layout.sets(), DYNAMIC):
        if name not in table.sets:
            return f"set/map {name} is missing"
    expected = layout.chain_rule_counts()
    for name, count in expected.items():
        if name not in table.chains:
            return f"chain {name} is missing"
        if table.chains[name] != count:
            return f"chain {name} has {table.chains[name]} rules, expected {count}"
    for name, count in table.chains.items():
        if name in expected:
            continue
        if name.startswith("layout_"):
            return f"layout marker {name} is from another version"
        if not is_affinity_chain(name):
            return f"chain {name} is not part of the layout"
        if count != len(affinity_chain_rules(name)):
            return f"chain {name} has {count} rules, expected {len(affinity_chain_rules(name))}"
    return None


def read_affinity(link: nl.Netlink) -> list[tuple[str, str]]:
    """The dynamic affinity map's entries as (client . affinity key, backend) text pairs."""
    out = []
    for e in link.elements(TABLE, DYNAMIC):
        if isinstance(e.data, bytes) and len(e.key) >= 8:
            backend = f"{socket.inet_ntoa(e.data[:4])} . {_PORT.unpack_from(e.data, 4)[0]}"
            out.append((f"{socket.inet_ntoa(e.key[:4])} . 0x{_SLOT.unpack_from(e.key, 4)[0]:08x}", backend))
    return out


def affinity_delete_batch(keys: Iterable[str]) -> nl.Batch:
    """Deleting affinity entries (keys as read_affinity gives them)."""
    encoded = []
    for key in keys:
        client, _, mark = key.partition(" . ")
        encoded.append(nl.element(socket.inet_aton(client) + _SLOT.pack(int(mark, 0))))
    batch = nl.Batch()
    batch.delete_elements(TABLE, DYNAMIC, encoded)
    return batch
