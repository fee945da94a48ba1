"""NetworkPolicy -> desired nftables state, as a value.

Layout of table `ip podnet-policy` (hook forward: the node routes every pod
packet, and Service DNAT has already happened there, so policy sees the real
pod endpoint):

    chain egress   (priority filter - 1): ct established,related accept;
                                          ip saddr vmap @egress_dispatch
    chain ingress  (priority filter):     ct established,related accept;
                                          ip daddr vmap @ingress_dispatch

A local pod isolated in a direction has one element in that direction's
dispatch map, pointing at a *group chain*: the chain of the exact set of
policies selecting it (pods selected by the same policies share one). A group
chain jumps to each policy's chain and drops what none accepted. A policy chain
holds one rule per (peer, port) of its rules and accepts on a match. `accept`
ends only the current base chain, so a connection must pass both the source's
egress and the destination's ingress; `drop` is final (a timeout, not a reset).

Peers are named sets: pod selectors become sets of pod addresses (one set per
distinct selector, shared by every rule using it), ipBlocks interval sets of
cidr-minus-except, named ports sets of `address . port` per (name, protocol)
resolved on every pod. So a pod joining a selector is one element, a label
change a few elements, and the number of chains is bounded by policies plus
distinct policy combinations, never pods x peers. Names are hashes of content
or identity: no user text reaches nft syntax.

`PolicyCompiler` is incremental (it keeps indexes and recomputes only what the
changed objects touch) but its output is a pure function of its last input:
`compile_policy(inputs)` runs a fresh one, and tests check both agree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

from podnet.dataplane.nftables import Chain, Elements, Map, Set, Table, Transaction
from podnet.dataplane.nftables import Rule as NftRule
from podnet.model.onemany import add_one, discard_one
from podnet.policy.model import (
    CidrPeer,
    Delta,
    Inputs,
    LiveInputs,
    PeerSelector,
    PodInfo,
    PolicyInfo,
    PortSpec,
    selector_matches,
    short_hash,
)

TABLE = "podnet-policy"
INGRESS, EGRESS = "ingress", "egress"
DIRECTIONS = (INGRESS, EGRESS)
DISPATCH = {INGRESS: "ingress_dispatch", EGRESS: "egress_dispatch"}
BASE_PRIORITY = {INGRESS: "filter", EGRESS: "filter - 1"}


# ------------------------------------------------------------------ state value


@dataclass(frozen=True)
class SetDef:
    name: str
    kind: str  # "addr" (ipv4_addr), "cidr" (ipv4_addr, interval), "addrport" (ipv4_addr . inet_service)
    elements: frozenset[str]
    describe: str = field(default="", compare=False)


@dataclass(frozen=True)
class PortMatch:
    protocol: str  # TCP, UDP or SCTP
    lo: int | None = None  # None with named_set None: every port of the protocol
    hi: int | None = None
    named_set: str | None = None  # set of "address . port" for a named port


@dataclass(frozen=True)
class Rule:
    peer_set: str | None  # None: any peer
    port: PortMatch | None  # None: any port, any protocol
    rule_index: int
    peer_desc: str = field(default="any peer", compare=False)
    port_desc: str = field(default="any port", compare=False)


@dataclass(frozen=True)
class PolicyChain:
    name: str
    policy: str  # "ns/name"
    direction: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class GroupChain:
    name: str
    direction: str
    policy_chains: tuple[str, ...]


@dataclass(frozen=True)
class PolicyState:
    sets: dict[str, SetDef]
    policy_chains: dict[str, PolicyChain]
    groups: dict[str, GroupChain]
    dispatch: dict[str, dict[str, str]]  # direction -> pod address -> group chain

    def element_count(self) -> int:
        return sum(len(s.elements) for s in self.sets.values()) + sum(len(d) for d in self.dispatch.values())

    def chain_count(self) -> int:
        return 2 + len(self.policy_chains) + len(self.groups)

    def rule_count(self) -> int:
        return 4 + sum(len(c.rules) for c in self.policy_chains.values()) + sum(
            len(g.policy_chains) + 1 for g in self.groups.values()
        )


EMPTY_STATE = PolicyState({}, {}, {}, {INGRESS: {}, EGRESS: {}})


# ------------------------------------------------------------------ naming


@lru_cache(maxsize=1 << 16)
def selector_set_name(sel: PeerSelector) -> str:
    return "s_" + short_hash("sel", sel.namespace, sel.ns_selector, sel.pod_selector)


@lru_cache(maxsize=4096)
def cidr_ranges(peer: CidrPeer) -> tuple[str, ...]:
    return peer.ranges()


def cidr_set_name(peer: CidrPeer) -> str:
    return "c_" + short_hash("cidr", cidr_ranges(peer))


@lru_cache(maxsize=1 << 16)
def named_set_name(name: str, protocol: str, local: bool = False) -> str:
    """The set of `address . port` of pods with a named port. Ingress rules match it on
    the destination, always a pod of this node: their set (`local`) holds only this
    node's pods, so a pod started anywhere else never changes it. Egress rules match
    the peer's port, anywhere: theirs holds every pod with the name."""
    return ("l_" if local else "n_") + short_hash("port", name, protocol)


@lru_cache(maxsize=1 << 16)
def policy_chain_name(policy_key: str, direction: str) -> str:
    return ("pi_" if direction == INGRESS else "pe_") + short_hash("policy", policy_key)


def group_chain_name(direction: str, chains: tuple[str, ...]) -> str:
    return ("gi_" if direction == INGRESS else "ge_") + short_hash("group", chains)


# ------------------------------------------------------------------ compiler


def _changed(old: dict, new: dict) -> set:
    out = {k for k, n in new.items() if (o := old.get(k)) is not n and o != n}
    out.update(old.keys() - new.keys())
    return out


def compile_policy(inputs: Inputs) -> PolicyState:
    """The desired state for `inputs`, from scratch."""
    return PolicyCompiler().compile(inputs)


class PolicyCompiler:
    def __init__(self) -> None:
        self.inp = Inputs()
        self.ns_pods: dict[str, set[str]] = defaultdict(set)  # namespace -> pod keys
        # address -> its pod's key, or a set of keys while several pods hold it (a pod that
        # finished and the pod its address went to): a set per pod was most of this
        # compiler's memory on an agent (216 bytes for each pod of the cluster)
        self.ip_pods: dict[str, str | set[str]] = {}
        self.ns_policies: dict[str, set[str]] = defaultdict(set)  # namespace -> policy keys
        # peer selectors in use: members (pod keys) and how many policy rules use them
        self.members: dict[PeerSelector, set[str]] = {}
        self.refs: dict[PeerSelector, int] = {}
        self.fixed_ns_sels: dict[str, set[PeerSelector]] = defaultdict(set)
        self.ns_sels: set[PeerSelector] = set()
        # named ports: (name, protocol) -> pod key -> number, for the pairs an egress rule
        # names (their sets hold every pod of the cluster with the port); made when a rule
        # first needs it. Ingress sets hold this node's pods only and read the pods' own
        # ports: an index of every pod for them was ~5 MiB on an agent of 150 000 pods.
        self.named: dict[tuple[str, str], dict[str, int]] = {}
        # local pods and the policies selecting them
        self.local: set[str] = set()
        self.pod_policies: dict[str, set[str]] = {}
        # caches of output pieces
        self._set_cache: dict[str, SetDef] = {}
        self._chain_cache: dict[tuple[str, str], PolicyChain] = {}
        self._group_cache: dict[tuple[str, tuple[str, ...]], GroupChain] = {}
        self._combo_cache: dict[frozenset[str], tuple[tuple[str, GroupChain], ...]] = {}
        self._chain_owner: dict[str, tuple[str, str]] = {}  # policy chain name -> (policy, direction)
        # set name -> what it is made of (a PeerSelector, a CidrPeer or a (port name, protocol))
        self._set_sources: dict[str, object] = {}

    # ---- membership

    def _ns_labels(self, ns: str) -> dict[str, str]:
        labels = self.inp.namespaces.get(ns)
        return dict(labels) if labels is not None else {"kubernetes.io/metadata.name": ns}

    def _in_selector(self, sel: PeerSelector, pod: PodInfo, ns_ok: bool | None = None) -> bool:
        if pod.ip is None:
            return False
        if sel.ns_selector is None:
            if pod.namespace != sel.namespace:
                return False
        elif not (ns_ok if ns_ok is not None else selector_matches(sel.ns_selector, self._ns_labels(pod.namespace))):
            return False
        return selector_matches(sel.pod_selector, pod.label_map)

    def _index_ip(self, ip: str, key: str) -> None:
        add_one(self.ip_pods, ip, key)

    def _unindex_ip(self, ip: str, key: str) -> None:
        discard_one(self.ip_pods, ip, key)

    def _pods_at(self, ip: str) -> tuple[str, ...] | set[str]:
        held = self.ip_pods.get(ip)
        return () if held is None else (held,) if isinstance(held, str) else held

    def _compute_members(self, sel: PeerSelector) -> set[str]:
        pods = self.inp.pods
        if sel.ns_selector is None:
            return {k for k in self.ns_pods.get(sel.namespace or "", ()) if self._in_selector(sel, pods[k], True)}
        out: set[str] = set()
        for ns, keys in self.ns_pods.items():
            if keys and selector_matches(sel.ns_selector, self._ns_labels(ns)):
                out.update(k for k in keys if self._in_selector(sel, pods[k], True))
        return out

    def _selectors_of(self, pol: PolicyInfo) -> list[PeerSelector]:
        out = []
        for rules in (pol.ingress, pol.egress):
            for r in rules or ():
                out.extend(p for p in r.peers or () if isinstance(p, PeerSelector))
        return out

    def _ref(self, sel: PeerSelector, delta: int, dirty: set[str]) -> None:
        n = self.refs.get(sel, 0) + delta
        if n > 0:
            self.refs[sel] = n
            if sel not in self.members:
                self.members[sel] = self._compute_members(sel)
                (self.ns_sels.add(sel) if sel.ns_selector is not None
                 else self.fixed_ns_sels[sel.namespace or ""].add(sel))
                dirty.add(selector_set_name(sel))
        else:
            self.refs.pop(sel, None)
            if self.members.pop(sel, None) is not None:
                if sel.ns_selector is not None:
                    self.ns_sels.discard(sel)
                else:
                    self.fixed_ns_sels[sel.namespace or ""].discard(sel)
                dirty.add(selector_set_name(sel))

    def _policy_selects(self, pol: PolicyInfo, pod: PodInfo) -> bool:
        return pod.namespace == pol.namespace and not pod.host_network and selector_matches(
            pol.pod_selector, pod.label_map
        )

    # ---- the update

    def compile(self, new: Inputs, delta: Delta | None = None) -> PolicyState:
        """The state for `new`. `delta`: what changed since the last compile (the previous
        value of each changed key), when the caller keeps `new` current itself (the
        agent, from events): the compile then costs what changed, not what exists.
        Without it the change is found by comparing with the last inputs."""
        old = self.inp
        if delta is None:
            delta = Delta({k: old.pods.get(k) for k in _changed(old.pods, new.pods)},
                          {k: old.namespaces.get(k) for k in _changed(old.namespaces, new.namespaces)},
                          {k: old.policies.get(k) for k in _changed(old.policies, new.policies)})
        dirty: set[str] = set()  # set names whose elements must be rebuilt
        changed_pols = delta.policies
        changed_pods = delta.pods
        changed_ns = delta.namespaces

        # indexes over pods and policies
        for k in changed_pods:
            o, n = changed_pods[k], new.pods.get(k)
            if o is not None and n is not None and (o.namespace, o.ip, o.named_ports) == (
                    n.namespace, n.ip, n.named_ports):
                continue  # only labels changed: the indexes stay
            if o is not None:
                self.ns_pods[o.namespace].discard(k)
                if o.ip:
                    self._unindex_ip(o.ip, k)
                for name, proto, _ in o.named_ports:
                    dirty.add(named_set_name(name, proto, local=True))
                    index = self.named.get((name, proto))
                    if index is not None and index.pop(k, None) is not None:
                        dirty.add(named_set_name(name, proto))
            if n is not None:
                self.ns_pods[n.namespace].add(k)
                if n.ip:
                    self._index_ip(n.ip, k)
                    for name, proto, num in n.named_ports:
                        dirty.add(named_set_name(name, proto, local=True))
                        index = self.named.get((name, proto))
                        if index is not None:
                            index.setdefault(k, num)
                            dirty.add(named_set_name(name, proto))
        for k in changed_pols:
            if (o := changed_pols[k]) is not None:
                self.ns_policies[o.namespace].discard(k)
            if (n := new.policies.get(k)) is not None:
                self.ns_policies[n.namespace].add(k)
        self.inp = new

        # membership of selectors already in use, for changed pods and namespaces
        for k in changed_pods:
            pod = new.pods.get(k)
            gone = changed_pods[k]
            if pod is None and gone is None:
                continue  # came and went between two compiles
            ns = pod.namespace if pod else gone.namespace  # type: ignore[union-attr]
            for sel in (*self.fixed_ns_sels.get(ns, ()), *self.ns_sels):
                was = k in self.members[sel]
                now = pod is not None and self._in_selector(sel, pod)
                if was != now:
                    (self.members[sel].add if now else self.members[sel].discard)(k)
                    dirty.add(selector_set_name(sel))
        for ns in changed_ns:
            for sel in self.ns_sels:
                assert sel.ns_selector is not None
                ns_ok = selector_matches(sel.ns_selector, self._ns_labels(ns))
                for k in self.ns_pods.get(ns, ()):
                    was = k in self.members[sel]
                    now = self._in_selector(sel, new.pods[k], ns_ok)
                    if was != now:
                        (self.members[sel].add if now else self.members[sel].discard)(k)
                        dirty.add(selector_set_name(sel))

        # selectors referenced by changed policies (new ones computed from the indexes)
        for k in changed_pols:
            if (o := changed_pols[k]) is not None:
                for sel in self._selectors_of(o):
                    self._ref(sel, -1, dirty)
            if (n := new.policies.get(k)) is not None:
                for sel in self._selectors_of(n):
                    self._ref(sel, +1, dirty)
            for d in DIRECTIONS:
                self._chain_cache.pop((k, d), None)
        if changed_pols:
            self._combo_cache.clear()

        # local pods and the policies selecting them
        local = {k for ip in new.local_ips for k in self._pods_at(ip)}
        for k in self.local - local:
            self.pod_policies.pop(k, None)
        for k in local:
            if k not in self.local or k in changed_pods:
                pod = new.pods[k]
                self.pod_policies[k] = {
                    p for p in self.ns_policies.get(pod.namespace, ()) if self._policy_selects(new.policies[p], pod)
                }
        for p in changed_pols:
            pol = new.policies.get(p)
            gone_pol = changed_pols[p]
            if pol is None and gone_pol is None:
                continue
            ns = pol.namespace if pol else gone_pol.namespace  # type: ignore[union-attr]
            for k in local:
                pod = new.pods[k]
                if pod.namespace != ns:
                    continue
                if pol is not None and self._policy_selects(pol, pod):
                    self.pod_policies[k].add(p)
                else:
                    self.pod_policies[k].discard(p)
        if local != self.local:  # the local named-port sets follow this node's pods
            dirty.update(n for n, src in self._set_sources.items() if isinstance(src, tuple) and len(src) == 3)
        self.local = local

        for name in dirty:
            self._set_cache.pop(name, None)
        return self._output()

    # ---- output

    def _output(self) -> PolicyState:
        inp = self.inp
        dispatch: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
        groups: dict[str, GroupChain] = {}
        chains: dict[str, PolicyChain] = {}
        for k in sorted(self.local):
            pod = inp.pods[k]
            combo = frozenset(self.pod_policies.get(k, ()))
            per_dir = self._combo_cache.get(combo)
            if per_dir is None:
                per_dir = self._combo_cache[combo] = self._combo(combo)
            for d, g in per_dir:
                for name in g.policy_chains:
                    if name not in chains:
                        chains[name] = self._chain(*self._chain_owner[name])
                groups[g.name] = g
                assert pod.ip is not None
                dispatch[d][pod.ip] = g.name
        if len(self._group_cache) > 4 * len(groups) + 64:
            self._group_cache = {(g.direction, g.policy_chains): g for g in groups.values()}
        if len(self._combo_cache) > 4 * len(self.local) + 64:
            self._combo_cache.clear()
        sets: dict[str, SetDef] = {}
        for c in chains.values():
            for r in c.rules:
                for name in (r.peer_set, r.port.named_set if r.port else None):
                    if name and name not in sets:
                        sets[name] = self._set(name)
        return PolicyState(sets, chains, groups, dispatch)

    def _combo(self, policies: frozenset[str]) -> tuple[tuple[str, GroupChain], ...]:
        """The group chain per direction for a pod selected by exactly `policies`."""
        out = []
        pols = sorted(policies)
        for d in DIRECTIONS:
            names = []
            for p in pols:
                if self.inp.policies[p].rules(d) is not None:
                    name = policy_chain_name(p, d)
                    self._chain_owner[name] = (p, d)
                    names.append(name)
            if not names:
                continue
            key = (d, tuple(names))
            g = self._group_cache.get(key)
            if g is None:
                g = self._group_cache[key] = GroupChain(group_chain_name(d, key[1]), d, key[1])
            out.append((d, g))
        return tuple(out)

    def _chain(self, policy: str, direction: str) -> PolicyChain:
        cached = self._chain_cache.get((policy, direction))
        if cached is not None:
            return cached
        pol = self.inp.policies[policy]
        rules: list[Rule] = []
        seen: set[tuple] = set()
        for ri, r in enumerate(pol.rules(direction) or ()):
            peers: list[tuple[str | None, str]] = []
            if r.peers is None:
                peers.append((None, "any peer"))
            for peer in r.peers or ():
                if isinstance(peer, PeerSelector):
                    name = selector_set_name(peer)
                    self._set_sources[name] = peer
                else:
                    name = cidr_set_name(peer)
                    self._set_sources[name] = peer
                peers.append((name, peer.describe()))
            ports: list[tuple[PortMatch | None, str]] = []
            if r.ports is None:
                ports.append((None, "any port"))
            for port in r.ports or ():
                ports.append((self._port(port, direction), port.describe()))
            for peer_set, pdesc in peers:
                for pm, portdesc in ports:
                    if (peer_set, pm) in seen:
                        continue
                    seen.add((peer_set, pm))
                    rules.append(Rule(peer_set, pm, ri, pdesc, portdesc))
        chain = PolicyChain(policy_chain_name(policy, direction), policy, direction, tuple(rules))
        self._chain_cache[(policy, direction)] = chain
        return chain

    def _port(self, p: PortSpec, direction: str) -> PortMatch:
        if p.port is None:
            return PortMatch(p.protocol)
        if isinstance(p.port, str):
            if direction == INGRESS:
                name = named_set_name(p.port, p.protocol, local=True)
                self._set_sources[name] = (p.port, p.protocol, "local")
            else:
                name = named_set_name(p.port, p.protocol)
                self._set_sources[name] = (p.port, p.protocol)
            return PortMatch(p.protocol, named_set=name)
        return PortMatch(p.protocol, p.port, p.end_port if p.end_port is not None else p.port)

    def _named_index(self, name: str, protocol: str) -> dict[str, int]:
        """Pod key -> number of the named port, for every addressable pod that has it (the
        first of its containers' ports with the name and protocol); made from the inputs
        the first time, kept current by compile() after."""
        index = self.named.get((name, protocol))
        if index is None:
            index = self.named[(name, protocol)] = {
                k: num for k, pod in self.inp.pods.items()
                if pod.ip and pod.named_ports and (num := pod.named_port(name, protocol)) is not None}
        return index

    def _set(self, name: str) -> SetDef:
        cached = self._set_cache.get(name)
        if cached is not None:
            return cached
        src = self._set_sources[name]
        pods = self.inp.pods
        if isinstance(src, PeerSelector):
            elements = frozenset(ip for k in self.members.get(src, ()) if (ip := pods[k].ip))
            s = SetDef(name, "addr", elements, src.describe())
        elif isinstance(src, CidrPeer):
            s = SetDef(name, "cidr", frozenset(cidr_ranges(src)), src.describe())
        elif len(src) == 3:  # type: ignore[arg-type]
            pname, proto, _ = src  # type: ignore[misc]
            elements = frozenset(f"{pods[k].ip} . {num}" for k in self.local
                                 if pods[k].ip and (num := pods[k].named_port(pname, proto)) is not None)
            s = SetDef(name, "addrport", elements, f"port {pname}/{proto} of this node's pods")
        else:
            pname, proto = src  # type: ignore[misc]
            elements = frozenset(f"{pods[k].ip} . {num}" for k, num in self._named_index(pname, proto).items())
            s = SetDef(name, "addrport", elements, f"port {pname}/{proto}")
        self._set_cache[name] = s
        return s


class LivePolicyCompiler:
    """The compiler both policy dataplanes hold: `compile(inputs)` from every input,
    `compile_live(live)` (the agent's way) from what changed. A compile that fails half-way
    leaves the incremental compiler's indexes half-updated, so the next one starts over from
    every input."""

    def __init__(self) -> None:
        self._compiler = PolicyCompiler()
        self._restart = False

    def compile(self, inputs: Inputs) -> PolicyState:
        return self._compiler.compile(inputs)

    def snapshot(self) -> PolicyCompiler | None:
        """The incremental compiler (its indexes and last state) for the agent's restart
        snapshot; None if the next compile starts over anyway."""
        return None if self._restart else self._compiler

    def restore(self, compiler: PolicyCompiler) -> None:
        self._compiler, self._restart = compiler, False

    def compile_live(self, live: LiveInputs) -> tuple[PolicyState, Inputs]:
        inputs, delta = live.take()
        if self._restart:
            self._compiler, delta = PolicyCompiler(), None
        try:
            state = self._compiler.compile(inputs, delta)
        except BaseException:
            self._restart = True
            raise
        self._restart = False
        return state, inputs


# ------------------------------------------------------------------ rendering (the typed nftables layer)

POLICY_TABLE = Table(TABLE)
SET_TYPES = {
    "addr": {"type": "ipv4_addr"},
    "cidr": {"type": "ipv4_addr", "flags": ("interval",)},
    "addrport": {"type": "ipv4_addr . inet_service"},
}
DISPATCH_MAPS = {d: Map(DISPATCH[d], type="ipv4_addr : verdict") for d in DIRECTIONS}


@lru_cache(maxsize=1 << 14)
def set_for(name: str, kind: str) -> Set:
    return Set(name, **SET_TYPES[kind])  # type: ignore[arg-type]


def set_object(s: SetDef) -> Set:
    """The nftables set of a peer or named-port set."""
    return set_for(s.name, s.kind)


def render_set_decl(s: SetDef) -> str:
    return set_object(s).decl()


def render_rule(direction: str, r: Rule) -> str:
    parts = []
    if r.peer_set is not None:
        parts.append(f"ip {'saddr' if direction == INGRESS else 'daddr'} @{r.peer_set}")
    if r.port is not None:
        proto = r.port.protocol.lower()
        if r.port.named_set is not None:
            parts.append(f"meta l4proto {proto} ip daddr . {proto} dport @{r.port.named_set}")
        elif r.port.lo is None:
            parts.append(f"meta l4proto {proto}")
        elif r.port.lo == r.port.hi:
            parts.append(f"{proto} dport {r.port.lo}")
        else:
            parts.append(f"{proto} dport {r.port.lo}-{r.port.hi}")
    parts.append("accept")
    return " ".join(parts)


def chain_rules(state: PolicyState, name: str) -> list[str]:
    """The rules of a policy or group chain, as nft text."""
    if name in state.policy_chains:
        c = state.policy_chains[name]
        return [render_rule(c.direction, r) for r in c.rules]
    g = state.groups[name]
    return [f"jump {c}" for c in g.policy_chains] + ["drop"]


def chain_rule_objects(state: PolicyState, name: str) -> list[NftRule]:
    return NftRule.many(name, chain_rules(state, name))


def base_chain(direction: str) -> Chain:
    return Chain(direction, type="filter", hook="forward", priority=BASE_PRIORITY[direction], policy="accept")


def base_chain_rules(direction: str) -> list[NftRule]:
    addr = "daddr" if direction == INGRESS else "saddr"
    return [NftRule(direction, "ct state established,related accept"),
            NftRule(direction, f"ip {addr} vmap @{DISPATCH[direction]}")]


def dispatch_elements(d: dict[str, str]) -> list[str]:
    return [f"{ip} : jump {chain}" for ip, chain in sorted(d.items())]


def full_transaction(state: PolicyState) -> Transaction:
    """One transaction that replaces the whole table."""
    tx = Transaction(POLICY_TABLE)
    tx.recreate()
    for s in state.sets.values():
        obj = set_object(s)
        tx.add(obj)
        tx.add(Elements(obj, sorted(s.elements)))
    for d in DIRECTIONS:
        tx.add(DISPATCH_MAPS[d])
    # chains first (empty), so jumps can point at any of them; then rules; then dispatch
    names = [*state.policy_chains, *state.groups]
    for name in names:
        tx.add(Chain(name))
    for name in names:
        tx.add_all(chain_rule_objects(state, name))
    for d in DIRECTIONS:
        tx.add(Elements(DISPATCH_MAPS[d], dispatch_elements(state.dispatch[d])))
    for d in (EGRESS, INGRESS):
        tx.add(base_chain(d))
        for rule in base_chain_rules(d):
            tx.add(rule)
    return tx


def render_full(state: PolicyState) -> str:
    """A script that replaces the whole table in one transaction."""
    return full_transaction(state).script()
