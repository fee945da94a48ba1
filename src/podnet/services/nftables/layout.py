"""The podnet-svc table's definition: a fixed set of chains, everything else set elements.

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
        ip daddr . meta l4proto . th dport vmap @large_ips          -> goto svc_large<N> (N > 256)
        fib daddr local, meta l4proto . th dport vmap @large_nodeports -> goto np_large<N>
      svc_t...: a binary tree of chains that finds the endpoint count N of the frontend,
        one bit per level (@svc_bit<i> holds the frontends whose N-1 has bit i set)
      svc_<N>: @sh_ips: dnat to (ip daddr . l4proto . dport . jhash ip saddr mod N) @backends_<N>
               dnat to (ip daddr . l4proto . dport . numgen random mod N) @backends_<N>
      np_<N>:  the same with (l4proto . dport) keys, @sh_nodeports, @nodeport_backends_<N>
      svc_large<N>, np_large<N> (one per endpoint count above the tree's, while in use):
               dnat to (... . numgen random mod N) @backends_large / @nodeport_backends_large
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

A Service port with N <= 256 endpoints is one @service_ips element, one @svc_bit<i>
element per bit set in N-1, and N @backends_<N> slot elements. The tree is fixed: it
has 2^TIER_BITS leaves, whatever the Services. podnet.io/scheduler sh is one more
element (@sh_ips: the leaf hashes the client address instead of drawing at random), wrr
more slots (an endpoint's repeated by its weight); see schedulers.py.

A frontend with more endpoints (a *large* one) is one @large_ips element `goto
svc_large<N>` and N slot elements in the one @backends_large map, keyed by its slot.
Its chain exists while some frontend has N endpoints: it is added (as netlink, in the
transaction of the elements that first need it) and deleted (in the transaction after
which none does) with its one rule. A large frontend keeps the slots of the endpoints
that stay (the compiler keeps their order): a changed endpoint is one slot element, an
added one a slot and the @large_ips element pointing to the chain of N+1. Nothing is
rebuilt for a large Service, and its cost is its endpoints' (the loop check of the
goto elements walks the few verdict elements there are). Short-circuit endpoint lists
of more than 256 go the same way (svc_large_sc<M>, @backends_large_sc).

aff_t<T> exists once per distinct affinity timeout. Nothing grows with the number of
Services except elements.

The table's structure is a transaction of the typed nftables layer
(podnet.dataplane.nftables), sent as `nft -f` text and rendered here (the layout once
per layout, then the dynamic chains and the text-only sets of a state).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache

from podnet.dataplane.nftables import Chain, Chains, Map, Set, Table, Transaction
from podnet.dataplane.nftables import Elements as NftElements
from podnet.dataplane.nftables import Rule as NftRule
from podnet.services.model import LARGE_ABOVE, ServiceState

TABLE = "podnet-svc"
FAMILY = "ip"
PROTOS = ("tcp", "udp", "sctp")
AFFINITY_MAX = 1048576  # entries in the dynamic affinity map
TIER_BITS = 8  # the tier tree covers 1..256 endpoints per frontend
TIER_MAX = 1 << TIER_BITS  # more endpoints than this: a large frontend (see the module's doc)
assert TIER_MAX == LARGE_ABOVE  # the compiler keeps the slots of the same frontends
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
# (nodeport?, short-circuit?) -> the slot map of large frontends, and the verdict map that
# sends a large frontend to its chain. Their value is a typeof of `th dport`, as the slot
# maps': `nft` 1.0 cannot add a rule that uses such a map to a table it did not create in
# the same transaction (the large chains are added as netlink, see dataplane.nfnetlink).
LARGE_SLOT_MAPS = {(False, False): "backends_large", (False, True): "backends_large_sc",
                   (True, False): "nodeport_backends_large", (True, True): "nodeport_backends_large_sc"}
LARGE_SLOT_MAP_OF = {name: key for key, name in LARGE_SLOT_MAPS.items()}
LARGE_MAPS = {False: "large_ips", True: "large_nodeports"}
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
    *(Set(f"svc_bit{i}", type=K3) for i in range(TIER_BITS)),
    *(Set(f"np_bit{i}", type=K2) for i in range(TIER_BITS)),
    Set("sh_ips", type=K3),
    Set("sh_nodeports", type=K2),
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
    Map("large_ips", type=f"{K3} : verdict"),
    Map("large_nodeports", type=f"{K2} : verdict"),
    *(Map(name, typeof=SLOT_TYPEOF[nodeport]) for (nodeport, _), name in LARGE_SLOT_MAPS.items()),
    Set("digest", type="mark . mark"),
)}
VERDICT_MAPS = {name for name, obj in SETS.items() if obj.kind == "map" and (obj.type or "").endswith("verdict")}
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

# The source hash's seed (sh): fixed, so that a client keeps its endpoint when the table
# is rebuilt (without one the kernel draws a seed per rule).
SH_SEED = 0x706F646E

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
            "ip daddr . meta l4proto . th dport vmap @large_ips",
            f"{LOCAL_NODEPORT} meta l4proto . th dport vmap @large_nodeports",
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


KEYS = {False: "ip daddr . meta l4proto . th dport", True: "meta l4proto . th dport"}  # nodeport? -> frontend key


@lru_cache(maxsize=1)
def _tree_chains() -> dict[str, list[str]]:
    """The tier tree and its leaves, for frontends (svc) and node ports (np).

    Node `<kind>_t<prefix>` tests bit (TIER_BITS-1-len(prefix)) of N-1, most significant
    first; the leaf for N-1 = v is `<kind>_<v+1>`, which picks one of N slots."""
    bits = TIER_BITS
    out: dict[str, list[str]] = {}
    for kind, nodeport in (("svc", False), ("np", True)):
        key = KEYS[nodeport]
        # level by level, each level's prefixes in ascending order (the order of the
        # table's chains, and so of the layout's text, which its marker is a hash of)
        for depth in range(bits):
            test = f"{key} @{kind}_bit{bits - 1 - depth} goto {kind}_"
            prefixes = [format(v, f"0{depth}b") for v in range(1 << depth)] if depth else [""]
            if depth + 1 < bits:
                for p in prefixes:
                    out[f"{kind}_t{p}"] = [f"{test}t{p}1", f"goto {kind}_t{p}0"]
            else:  # children are leaves: prefix v + bit b is N-1 = 2v+b, the leaf of N = 2v+b+1
                for v, p in enumerate(prefixes):
                    out[f"{kind}_t{p}"] = [f"{test}{2 * v + 2}", f"goto {kind}_{2 * v + 1}"]
        pick = f"dnat ip to {key} . "
        sh = f"{key} @{'sh_nodeports' if nodeport else 'sh_ips'} {pick}jhash ip saddr mod "
        seed = f" seed {SH_SEED:#x} map @{SLOT_MAPS[nodeport]}_"
        for n in range(1, 2 ** bits + 1):  # slot_map(nodeport, n) is SLOT_MAPS[nodeport]_n
            out[f"{kind}_{n}"] = [f"{sh}{n}{seed}{n}", f"{pick}numgen random mod {n} map @{SLOT_MAPS[nodeport]}_{n}"]
    return out


@dataclass(frozen=True)
class Layout:
    """The fixed part of the table for one masquerade mark and capacity."""

    mark: int
    capacity: int = MIN_CAPACITY  # elements of each SIZED set

    def fit(self, frontends: int) -> Layout:
        """This layout if it holds `frontends` elements in each SIZED set; otherwise a
        larger one (the table must be rebuilt). Endpoint counts never change the layout."""
        if frontends <= self.capacity:
            return self
        return Layout(self.mark, max(MIN_CAPACITY, 1 << (2 * frontends - 1).bit_length()))

    @classmethod
    def for_state(cls, state: ServiceState) -> Layout:
        return cls(state.masquerade_mark).fit(max(state_sizes(state).values()))

    def sets(self) -> dict[str, Set]:
        """Every set and map of the table (name -> definition), the slot maps included."""
        out: dict[str, Set] = {}
        for name, obj in SETS.items():
            out[name] = Set(name, type=obj.type, size=self.capacity) if name in SIZED else obj
        for nodeport in (False, True):
            for m in _slot_maps(nodeport):
                out[m.name] = m
        return out

    def chains(self) -> dict[str, list[str]]:
        return {**_fixed_chains(self.mark), **_tree_chains()}

    def transaction(self) -> Transaction:
        """The layout's sets, maps and chains, every chain created before any rule so that
        jumps resolve in any order."""
        tx = Transaction(SVC_TABLE)
        tx.add_all(self.sets().values())
        tx.add(AFFINITY_MAP)
        chains = self.chains()
        base = [(Chain(name, type=typ, hook=hook, priority=prio, policy="accept"), rules)
                for name, (typ, hook, prio, rules) in _base_chains().items()]
        tx.add(Chains([*zip(Chain.regular(chains), chains.values(), strict=True), *base]))
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


@lru_cache(maxsize=2)
def _slot_maps(nodeport: bool) -> list[Map]:
    return Map.named([slot_map(nodeport, n) for n in range(1, TIER_MAX + 1)], typeof=SLOT_TYPEOF[nodeport])


@lru_cache(maxsize=1024)
def slot_map_object(nodeport: bool, n: int) -> Map:
    return Map(slot_map(nodeport, n), typeof=SLOT_TYPEOF[nodeport])


def set_object(name: str) -> Set:
    """The definition of a set or map of the table, by name."""
    slots = slot_map_of(name)
    return slot_map_object(*slots) if slots and slots[1] else SETS[name]


def slot_map_of(name: str) -> tuple[bool, int] | None:
    """(nodeport?, endpoint count) of a slot map's name (count 0: a large frontends' map);
    None for other sets."""
    large = LARGE_SLOT_MAP_OF.get(name)
    if large is not None:
        return large[0], 0
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


def large_chain(nodeport: bool, short: bool, n: int) -> str:
    """The chain that picks one of n > TIER_MAX slots of a large frontend (short: of its
    short-circuit endpoints)."""
    return f"{'np' if nodeport else 'svc'}_large{'_sc' if short else ''}{n}"


def large_chain_of(name: str) -> tuple[bool, bool, int] | None:
    """(nodeport?, short-circuit?, endpoint count) of a large chain's name; None for others."""
    kind, sep, rest = name.partition("_large")
    if not sep or kind not in ("svc", "np"):
        return None
    short = rest.startswith("_sc")
    digits = rest[3:] if short else rest
    if not digits.isdigit() or digits[0] == "0" or int(digits) <= TIER_MAX:
        return None
    return kind == "np", short, int(digits)


def large_chain_rule(nodeport: bool, short: bool, n: int) -> str:
    return f"dnat ip to {KEYS[nodeport]} . numgen random mod {n} map @{LARGE_SLOT_MAPS[nodeport, short]}"


def dynamic_chain_rules(name: str) -> list[str]:
    """Rules of a chain that exists only while elements point to it (affinity and large
    chains), from its name; ValueError for any other name."""
    large = large_chain_of(name)
    if large is not None:
        return [large_chain_rule(*large)]
    return affinity_chain_rules(name)


def is_dynamic_chain(name: str) -> bool:
    return large_chain_of(name) is not None or is_affinity_chain(name)


def state_sizes(state: ServiceState) -> dict[str, int]:
    """The elements of each SIZED set of a state: O(frontends)."""
    frontends = owners = 0
    for r in state.rules:
        n = len(r.backends)
        if n and n <= TIER_MAX and r.frontend.ip is not None:
            frontends += 1
        if r.owns_cluster_ip:
            owners += 1
    return {"service_ips": frontends, "cluster_ips": owners}


def _addr(cidr: str) -> str:
    """An interval element as nft prints it back: a /32 is a plain address."""
    return cidr[:-3] if cidr.endswith("/32") else cidr


def state_chains(state: ServiceState) -> set[str]:
    """The dynamic chains (affinity and large) a state's frontends jump to."""
    out = set()
    for r in state.rules:
        if r.affinity_timeout and r.backends:
            out.add(affinity_chain(r.affinity_timeout))
        np = r.frontend.ip is None
        if len(r.backends) > TIER_MAX:
            out.add(large_chain(np, False, len(r.backends)))
        if len(r.short_circuit) > TIER_MAX:
            out.add(large_chain(np, True, len(r.short_circuit)))
    return out


def large_chain_refs(state: ServiceState) -> dict[str, int]:
    """Large chain -> how many of a state's elements point to it."""
    refs: dict[str, int] = {}
    for r in state.rules:
        np = r.frontend.ip is None
        for short, n in ((False, len(r.backends)), (True, len(r.short_circuit))):
            if n > TIER_MAX:
                name = large_chain(np, short, n)
                refs[name] = refs.get(name, 0) + 1
    return refs


def element_chains(els: Elements) -> set[str]:
    """The dynamic chains (affinity and large) the elements point to."""
    out = set()
    for name in VERDICT_MAPS:
        for v in els.get(name, {}).values():
            if v:
                chain = v.split()[-1]
                if is_dynamic_chain(chain):
                    out.add(chain)
    return out


def _structure_parts(layout: Layout, state: ServiceState) -> tuple[Transaction, Transaction]:
    """What goes before the layout (the old table removed) and after it (the layout marker,
    the state's dynamic chains, the text-only sets' elements)."""
    head = Transaction(SVC_TABLE)
    head.recreate()
    tail = Transaction(SVC_TABLE)
    tail.add(Chain(layout.marker))
    for chain in sorted(state_chains(state)):
        tail.add(Chain(chain))
        tail.add_all(NftRule.many(chain, dynamic_chain_rules(chain)))
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


def affinity_chain_script(come: Elements, existing: set[str]) -> str:
    """Affinity chains the new elements need and the table lacks ("" if none; the large
    chains they need travel as netlink, see encoding.large_chain_batch)."""
    tx = Transaction(SVC_TABLE)
    for chain in sorted(c for c in element_chains(come) - existing if is_affinity_chain(c)):
        tx.add(Chain(chain))
        tx.add_all(NftRule.many(chain, affinity_chain_rules(chain)))
    return tx.script()


def remove_script() -> str:
    """Delete the whole table (no error if there is none)."""
    tx = Transaction(SVC_TABLE)
    tx.remove()
    return tx.script()

