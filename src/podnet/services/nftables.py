"""podnet's nftables layout for Services: a fixed set of chains, everything else map elements.

    table ip podnet-svc
      nat prerouting/output -> services:
        ip daddr . meta l4proto . th dport @masq_ips               -> mark for masquerade
        fib daddr local, meta l4proto . th dport @masq_nodeports   -> mark for masquerade
        dnat to (ip saddr . ip daddr . l4proto . dport) @affinity   (ClientIP affinity hits)
        ip daddr . meta l4proto . th dport vmap @service_ips       -> goto svc_<N>
        fib daddr local, meta l4proto . th dport vmap @service_nodeports -> goto np_<N>
      svc_<N>: dnat to (ip daddr . l4proto . dport . numgen random mod N) @backends
      np_<N>:  dnat to (l4proto . dport . numgen random mod N) @nodeport_backends
      nat postrouting: record affinity (@affinity_ips/@affinity_nodeports -> jump aff_t<T>,
        which updates @affinity with the chosen backend), masquerade marked traffic and
        hairpin traffic (ip saddr . ip daddr @hairpin, i.e. a pod reaching itself)
      filter prerouting/output (before DNAT): LoadBalancer source ranges
        (@firewall_ips, @lb_source_ranges)
      filter input/forward/output (after DNAT): no endpoints -> reject or drop
        (@no_endpoint_ips, @no_endpoint_nodeports), unused service CIDR addresses -> drop

A Service port with N endpoints is one @service_ips element plus N @backends slot
elements. The tier chains svc_1..svc_T and np_1..np_T are created with the table
(T = 64, or the largest endpoint count in use rounded up to 64; nft 1.0.6 cannot
add a rule that looks up @backends to an existing table, so a Service growing past
T endpoints rebuilds the table once). aff_t<T> exists once per distinct affinity
timeout. Nothing grows with the number of Services except elements.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState, StaleFlow

TABLE = "podnet-svc"
FAMILY = "ip"
PROTOS = ("tcp", "udp", "sctp")
AFFINITY_MAX = 1048576  # entries in the dynamic affinity map
TIER_STEP = 64  # tier chains are created in blocks of this many endpoint counts

# name -> (type declaration, is map)
SETS: dict[str, str] = {
    "service_cidrs": "type ipv4_addr; flags interval;",
    "node_ips": "type ipv4_addr;",
    "service_ips": "type ipv4_addr . inet_proto . inet_service : verdict;",
    "service_nodeports": "type inet_proto . inet_service : verdict;",
    "backends": "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport;",
    "nodeport_backends": "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport;",
    "masq_ips": "type ipv4_addr . inet_proto . inet_service;",
    "masq_nodeports": "type inet_proto . inet_service;",
    "no_endpoint_ips": "type ipv4_addr . inet_proto . inet_service : verdict;",
    "no_endpoint_nodeports": "type inet_proto . inet_service : verdict;",
    "firewall_ips": "type ipv4_addr . inet_proto . inet_service;",
    "lb_source_ranges": "type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval;",
    "affinity_ips": "type ipv4_addr . inet_proto . inet_service : verdict;",
    "affinity_nodeports": "type inet_proto . inet_service : verdict;",
    "hairpin": "type ipv4_addr . ipv4_addr;",
}
MAPS = {name for name, decl in SETS.items() if " : " in decl}
DYNAMIC = "affinity"  # filled by the kernel, never by the applier

Elements = dict[str, dict[str, str | None]]  # set/map name -> element key -> value (None for sets)


def _fixed_chains(mark: int) -> dict[str, list[str]]:
    m = f"{mark:#x}"
    local_np = "fib daddr type local ip daddr != 127.0.0.0/8"
    rec = []
    for p in PROTOS:
        rec.append(f"meta l4proto {p} ct original ip daddr . meta l4proto . ct original proto-dst vmap @affinity_ips")
        rec.append(f"meta l4proto {p} ct original ip daddr @node_ips meta l4proto . ct original proto-dst "
                   "vmap @affinity_nodeports")
    return {
        "reject_chain": ["meta l4proto tcp reject with tcp reset", "reject"],
        "endpoints_check": [
            "ip daddr . meta l4proto . th dport vmap @no_endpoint_ips",
            f"{local_np} meta l4proto . th dport vmap @no_endpoint_nodeports",
            "ip daddr @service_cidrs drop",
        ],
        "firewall_check": [
            "ip daddr . meta l4proto . th dport @firewall_ips "
            "ip daddr . meta l4proto . th dport . ip saddr != @lb_source_ranges drop",
        ],
        "services": [
            f"ip daddr . meta l4proto . th dport @masq_ips meta mark set meta mark | {m}",
            f"{local_np} meta l4proto . th dport @masq_nodeports meta mark set meta mark | {m}",
            "dnat ip to ip saddr . ip daddr . meta l4proto . th dport map @affinity",
            "ip daddr . meta l4proto . th dport vmap @service_ips",
            f"{local_np} meta l4proto . th dport vmap @service_nodeports",
        ],
        "affinity_record": rec,
        "masquerading": [
            f"meta mark & {m} == {m} meta mark set meta mark ^ {m} masquerade fully-random",
            "ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random",
        ],
    }


# base chain -> (type, hook, priority, rules)
def _base_chains() -> dict[str, tuple[str, str, str, list[str]]]:
    return {
        "filter_prerouting": ("filter", "prerouting", "-110", ["ct state new jump firewall_check"]),
        "filter_output_pre": ("filter", "output", "-110", ["ct state new jump firewall_check"]),
        "filter_input": ("filter", "input", "0", ["ct state new jump endpoints_check"]),
        "filter_forward": ("filter", "forward", "0", ["ct state new jump endpoints_check"]),
        "filter_output": ("filter", "output", "0", ["ct state new jump endpoints_check"]),
        "nat_prerouting": ("nat", "prerouting", "-100", ["jump services"]),
        "nat_output": ("nat", "output", "-100", ["jump services"]),
        "nat_postrouting": ("nat", "postrouting", "100",
                            ["ct status dnat jump affinity_record", "jump masquerading"]),
    }


@dataclass(frozen=True)
class Layout:
    """The fixed part of the table for one masquerade mark."""

    mark: int

    @property
    def body(self) -> str:
        lines = []
        for name, decl in SETS.items():
            lines.append(f"  {'map' if name in MAPS else 'set'} {name} {{ {decl} }}")
        lines.append(f"  map {DYNAMIC} {{ typeof ip saddr . ip daddr . meta l4proto . th dport : ip daddr . th dport; "
                     f"size {AFFINITY_MAX}; flags dynamic,timeout; timeout 3h; }}")
        for name, rules in _fixed_chains(self.mark).items():
            lines.append(f"  chain {name} {{")
            lines += [f"    {r}" for r in rules]
            lines.append("  }")
        for name, (typ, hook, prio, rules) in _base_chains().items():
            lines.append(f"  chain {name} {{")
            lines.append(f"    type {typ} hook {hook} priority {prio}; policy accept;")
            lines += [f"    {r}" for r in rules]
            lines.append("  }")
        return "\n".join(lines)

    @property
    def marker(self) -> str:
        """An empty chain whose name stamps the layout version (cheap to check: `nft list chains`)."""
        return "layout_" + hashlib.sha256(self.body.encode()).hexdigest()[:12]

    def chain_rule_counts(self) -> dict[str, int]:
        counts = {name: len(rules) for name, rules in _fixed_chains(self.mark).items()}
        counts.update({name: len(spec[3]) for name, spec in _base_chains().items()})
        counts[self.marker] = 0
        return counts


def tier_chain(n: int) -> str:
    return f"svc_{n}"


def nodeport_tier_chain(n: int) -> str:
    return f"np_{n}"


def affinity_chain(timeout: int) -> str:
    return f"aff_t{timeout}"


def dynamic_chain_rules(name: str) -> list[str]:
    """Rules of a tier or affinity chain, from its name."""
    kind, _, arg = name.partition("_")
    if kind == "svc":
        return [f"dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {int(arg)} map @backends"]
    if kind == "np":
        return [f"dnat ip to meta l4proto . th dport . numgen random mod {int(arg)} map @nodeport_backends"]
    if kind == "aff" and arg.startswith("t"):
        t = int(arg[1:])
        return [f"meta l4proto {p} update @{DYNAMIC} {{ ct original ip saddr . ct original ip daddr . meta l4proto "
                f". ct original proto-dst timeout {t}s : ip daddr . th dport }}" for p in PROTOS]
    raise ValueError(f"not a podnet-svc dynamic chain: {name}")


def tier_limit(els: Elements) -> int:
    """How many tier chains of each kind the table needs for these elements."""
    most = 0
    for chain in dynamic_chains(els):
        kind, _, n = chain.partition("_")
        if kind in ("svc", "np"):
            most = max(most, int(n))
    return max(1, -(-most // TIER_STEP)) * TIER_STEP


class TierMissing(Exception):
    """An incremental sync needs a tier chain the table lacks: rebuild it."""


def is_dynamic_chain(name: str) -> bool:
    try:
        dynamic_chain_rules(name)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- elements


def _addr(cidr: str) -> str:
    """An interval element as nft prints it back: a /32 is a plain address."""
    return cidr[:-3] if cidr.endswith("/32") else cidr


def fe_key(fe: Frontend) -> str:
    return f"{fe.proto} . {fe.port}" if fe.ip is None else f"{fe.ip} . {fe.proto} . {fe.port}"


def elements(state: ServiceState) -> Elements:
    """Every set/map element of the desired state, as nft text (what the applier diffs)."""
    out: Elements = {name: {} for name in SETS}
    hairpin = out["hairpin"]
    for rule in state.rules:
        _rule_elements(rule, out)
        for b in rule.backends:
            hairpin[f"{b.ip} . {b.ip}"] = None
    for c in state.service_cidrs:
        out["service_cidrs"][_addr(c)] = None
    for ip in state.node_ips:
        out["node_ips"][ip] = None
    return out


def rule_elements(rule: FrontendRule) -> Elements:
    """The elements one frontend owns (hairpin pairs aside: endpoints share them)."""
    out: Elements = {}
    _rule_elements(rule, out)
    return out


def _rule_elements(rule: FrontendRule, out: Elements) -> None:
    fe = rule.frontend
    key = fe_key(fe)
    np = fe.ip is None

    def put(name: str, k: str, v: str | None) -> None:
        m = out.get(name)
        if m is None:
            m = out[name] = {}
        m[k] = v

    n = len(rule.backends)
    if n:
        put("service_nodeports" if np else "service_ips", key, f"goto {(nodeport_tier_chain if np else tier_chain)(n)}")
        slots = "nodeport_backends" if np else "backends"
        for i, b in enumerate(rule.backends):
            put(slots, f"{key} . {i}", f"{b.ip} . {b.port}")
        if rule.masquerade:
            put("masq_nodeports" if np else "masq_ips", key, None)
        if rule.affinity_timeout:
            put("affinity_nodeports" if np else "affinity_ips", key, f"jump {affinity_chain(rule.affinity_timeout)}")
    else:
        verdict = "goto reject_chain" if rule.no_endpoints == "reject" else "drop"
        put("no_endpoint_nodeports" if np else "no_endpoint_ips", key, verdict)
    if rule.source_ranges and not np:
        put("firewall_ips", key, None)
        for cidr in rule.source_ranges:
            put("lb_source_ranges", f"{key} . {_addr(cidr)}", None)


def hairpin_refs(state: ServiceState) -> Counter[str]:
    """How many backends use each endpoint address (its hairpin pair lives while > 0)."""
    refs: Counter[str] = Counter()
    for rule in state.rules:
        refs.update(b.ip for b in rule.backends)
    return refs


def diff(applied: Elements, desired: Elements) -> tuple[Elements, Elements]:
    """(elements to delete, elements to add) between two full element sets."""
    gone: Elements = {}
    come: Elements = {}
    for name in SETS:
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


def state_delta(old: ServiceState, new: ServiceState, refs: Counter[str]) -> tuple[Elements, Elements]:
    """(gone, come) from the frontends that differ between two states: work in
    proportion to the change (unchanged frontends cost an identity check).
    `refs` (hairpin_refs of `old`) is updated to those of `new`."""
    gone: Elements = {}
    come: Elements = {}
    delta: Counter[str] = Counter()
    before, after = old.frontends, new.frontends
    hint = new.changed_since(old)
    candidates = before.keys() if hint is None else [fe for fe in hint if fe in before]
    for fe in candidates:
        rule = before[fe]
        other = after.get(fe)
        if other is rule or other == rule:
            continue
        for name, kv in rule_elements(rule).items():
            gone.setdefault(name, {}).update(kv)
        delta.subtract(b.ip for b in rule.backends)
    candidates = after.keys() if hint is None else [fe for fe in hint if fe in after]
    for fe in candidates:
        rule = after[fe]
        other = before.get(fe)
        if other is rule or other == rule:
            continue
        for name, kv in rule_elements(rule).items():
            come.setdefault(name, {}).update(kv)
        delta.update(b.ip for b in rule.backends)
    for ip, d in delta.items():
        if not d:
            continue
        was = refs[ip]
        now = was + d
        if was > 0 and now <= 0:
            gone.setdefault("hairpin", {})[f"{ip} . {ip}"] = None
        elif was <= 0 and now > 0:
            come.setdefault("hairpin", {})[f"{ip} . {ip}"] = None
        if now > 0:
            refs[ip] = now
        else:
            del refs[ip]
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


def apply_delta(applied: Elements, gone: Elements, come: Elements) -> None:
    """Bring `applied` (in place) to what the kernel holds after the delta."""
    for name, kv in gone.items():
        m = applied.setdefault(name, {})
        for k in kv:
            m.pop(k, None)
    for name, kv in come.items():
        applied.setdefault(name, {}).update(kv)


def dynamic_chains(els: Elements) -> set[str]:
    """The tier and affinity chains the elements point to."""
    out = set()
    for name in ("service_ips", "service_nodeports", "affinity_ips", "affinity_nodeports"):
        for v in els.get(name, {}).values():
            if v:
                out.add(v.split()[-1])
    return out


def _frontend(text: str, nodeport: bool) -> Frontend:
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
    for name, np in (("backends", False), ("nodeport_backends", True)):
        for key, value in gone.get(name, {}).items():
            if " udp . " not in f" {key} " or value is None:
                continue
            fe = _frontend(key.rpartition(" . ")[0], np)
            ip, _, port = value.partition(" . ")
            backend = Backend(ip, int(port))
            rule = new.rule(fe)
            if rule is None or backend not in rule.backends:
                out.add(StaleFlow(fe, backend))
    for name, np in (("service_ips", False), ("service_nodeports", True)):
        for key in come.get(name, {}):
            if key not in gone.get(name, {}) and " udp . " in f" {key} ":
                out.add(StaleFlow(_frontend(key, np), None))
    return sorted(out, key=lambda f: (f.frontend.ip or "", f.frontend.port, f.backend or Backend("", 0)))


# ---------------------------------------------------------------- scripts


def element_block(verb: str, name: str, items: Iterable[tuple[str, str | None]], keys_only: bool = False) -> list[str]:
    body = [k if (keys_only or v is None) else f"{k} : {v}" for k, v in items]
    if not body:
        return []
    if len(body) == 1:
        return [f"{verb} element {FAMILY} {TABLE} {name} {{ {body[0]} }}"]
    return [f"{verb} element {FAMILY} {TABLE} {name} {{", *(f"  {b}," for b in body[:-1]), f"  {body[-1]}", "}"]


def _chain_block(name: str) -> list[str]:
    return [f"  chain {name} {{", *(f"    {r}" for r in dynamic_chain_rules(name)), "  }"]


def full_script(layout: Layout, els: Elements) -> str:
    """Create (or replace) the whole table in one transaction."""
    lines = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{",
             layout.body, f"  chain {layout.marker} {{", "  }"]
    tiers = tier_limit(els)
    chains = {tier_chain(n) for n in range(1, tiers + 1)} | {nodeport_tier_chain(n) for n in range(1, tiers + 1)}
    for chain in sorted(chains | dynamic_chains(els)):
        lines += _chain_block(chain)
    lines.append("}")
    for name in SETS:
        lines += element_block("add", name, sorted(els.get(name, {}).items()))
    return "\n".join(lines) + "\n"


def render_delta(gone: Elements, come: Elements, existing_chains: set[str]) -> tuple[str, int, int]:
    """The transaction for a delta: affinity chains first, then deletions, then additions.

    Returns (script, elements added, elements removed); the script is empty when
    nothing changed. A key whose value changed is deleted and re-added. Raises
    TierMissing when a tier chain is needed that the table does not have.
    """
    lines: list[str] = []
    for chain in sorted(dynamic_chains(come) - existing_chains):
        if not chain.startswith("aff_"):
            raise TierMissing(chain)
        lines.append(f"add chain {FAMILY} {TABLE} {chain}")
        lines += [f"add rule {FAMILY} {TABLE} {chain} {r}" for r in dynamic_chain_rules(chain)]
    adds: list[str] = []
    added = removed = 0
    for name in SETS:
        g, c = gone.get(name), come.get(name)
        if g:
            lines += element_block("delete", name, sorted((k, None) for k in g), keys_only=True)
            removed += len(g)
        if c:
            adds += element_block("add", name, sorted(c.items()))
            added += len(c)
    lines += adds
    return ("\n".join(lines) + "\n" if lines else ""), added, removed


def delta_script(applied: Elements, desired: Elements, existing_chains: set[str]) -> tuple[str, int, int]:
    """Only the element changes between two full element sets (see render_delta)."""
    return render_delta(*diff(applied, desired), existing_chains)


# ---------------------------------------------------------------- reading the kernel


def _text(expr: object) -> str:
    """nft JSON expression -> the text form used in Elements."""
    if isinstance(expr, dict):
        if "concat" in expr:
            return " . ".join(_text(x) for x in expr["concat"])
        if "prefix" in expr:
            p = expr["prefix"]
            return _addr(f"{_text(p['addr'])}/{p['len']}")
        if "range" in expr:
            a, b = expr["range"]
            return f"{_text(a)}-{_text(b)}"
        if "elem" in expr:
            return _text(expr["elem"]["val"])
        if "goto" in expr:
            return f"goto {expr['goto']['target']}"
        if "jump" in expr:
            return f"jump {expr['jump']['target']}"
        if len(expr) == 1:
            (verdict,) = expr
            return verdict  # drop, accept, return ...
    return str(expr)


@dataclass
class KernelTable:
    chains: dict[str, int]  # chain -> number of rules
    sets: set[str]
    elements: Elements


def parse_table(listing: str) -> KernelTable:
    """`nft -j list table ip podnet-svc` -> chains with rule counts, set names, elements."""
    data = json.loads(listing)["nftables"]
    chains: dict[str, int] = {}
    sets: set[str] = set()
    els: Elements = {}
    for item in data:
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            chains[item["rule"]["chain"]] = chains.get(item["rule"]["chain"], 0) + 1
        elif "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            sets.add(s["name"])
            if s["name"] == DYNAMIC:
                continue
            out = els.setdefault(s["name"], {})
            for e in s.get("elem", []):
                if isinstance(e, list):
                    out[_text(e[0])] = _text(e[1])
                else:
                    out[_text(e)] = None
    return KernelTable(chains, sets, els)


def check_layout(layout: Layout, table: KernelTable) -> str | None:
    """Why the kernel table is not ours as expected (None: it is)."""
    for name in (*SETS, DYNAMIC):
        if name not in table.sets:
            return f"set/map {name} is missing"
    for name, count in layout.chain_rule_counts().items():
        if name not in table.chains:
            return f"chain {name} is missing"
        if table.chains[name] != count:
            return f"chain {name} has {table.chains[name]} rules, expected {count}"
    for name, count in table.chains.items():
        if name.startswith("layout_") and name != layout.marker:
            return f"layout marker {name} is from another version"
        if is_dynamic_chain(name) and count != len(dynamic_chain_rules(name)):
            return f"chain {name} has {count} rules, expected {len(dynamic_chain_rules(name))}"
    return None


def affinity_entries(listing: str) -> list[tuple[str, str]]:
    """`nft -j list map ip podnet-svc affinity` -> (key, value) text pairs."""
    out = []
    for item in json.loads(listing)["nftables"]:
        m = item.get("map")
        if m and m.get("name") == DYNAMIC:
            for e in m.get("elem", []):
                out.append((_text(e[0]), _text(e[1])))
    return out
