"""The elements of a Service state, as text (what the applier diffs, logs and tests
read): which element of which set or map each frontend owns (`rule_items`, the one
definition of what goes where), the whole state's elements, the difference between two
states in proportion to what changed, and the UDP flows a delta makes stale.
"""

from __future__ import annotations

from collections.abc import Iterator

from podnet.dataplane.nftables import Elements as NftElements
from podnet.dataplane.nftables import Transaction
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState, StaleFlow
from podnet.services.nftables.layout import (
    LARGE_MAPS,
    LARGE_SLOT_MAPS,
    SETS,
    SVC_TABLE,
    TIER_MAX,
    Elements,
    _addr,
    affinity_chain,
    large_chain,
    set_object,
    slot_map,
    slot_map_of,
)
from podnet.services.nftables.schedulers import frontend_slots, short_circuit_slots, source_hashed


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


def rule_items(rule: FrontendRule, large_slots: bool = True) -> Iterator[Item]:
    """The elements one frontend owns: the one definition of what goes where.
    large_slots False: without the slots of a large frontend (see large_slot_changes)."""
    fe = rule.frontend
    np = fe.ip is None
    backends, short = rule.backends, rule.short_circuit
    if rule.scheduler:  # wrr fills more slots; sh marks the frontend for the leaf's hash
        backends, short = frontend_slots(rule), short_circuit_slots(rule)
        if (backends or short) and source_hashed(rule):
            yield ("sh_nodeports" if np else "sh_ips"), fe, None, None
    n = len(backends)
    if n:
        if n > TIER_MAX:
            yield LARGE_MAPS[np], fe, None, f"goto {large_chain(np, False, n)}"
            slots = LARGE_SLOT_MAPS[np, False] if large_slots else ""
        else:
            yield ("service_nodeports" if np else "service_ips"), fe, None, None
            bit_set = "np_bit" if np else "svc_bit"
            v, i = n - 1, 0
            while v:
                if v & 1:
                    yield f"{bit_set}{i}", fe, None, None
                v >>= 1
                i += 1
            slots = slot_map(np, n)
        if slots:
            for i, b in enumerate(backends):
                yield slots, fe, i, b
        if rule.masquerade:
            yield ("masq_nodeports" if np else "masq_ips"), fe, None, None
        if rule.affinity_timeout:
            yield ("affinity_nodeports" if np else "affinity_ips"), fe, None, f"jump {affinity_chain(rule.affinity_timeout)}"
            yield ("affinity_key_nodeports" if np else "affinity_key_ips"), fe, None, rule.affinity_key
    else:
        verdict = "reject" if rule.no_endpoints == "reject" else "drop"
        yield (f"{verdict}_nodeports" if np else f"{verdict}_ips"), fe, None, None
    if short:
        # never n (the compiler's rule; weighted, short_circuit_slots drops a list equal to the
        # frontend's): the slots cannot clash with the frontend's own
        m = len(short)
        if m > TIER_MAX:
            chain, slots = large_chain(np, True, m), LARGE_SLOT_MAPS[np, True] if large_slots else ""
        else:
            chain, slots = f"{'np' if np else 'svc'}_{m}", slot_map(np, m)
        yield ("short_circuit_nodeports" if np else "short_circuit_ips"), fe, None, f"goto {chain}"
        if slots:
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


def is_large(rule: FrontendRule) -> bool:
    """Whether the rule has slots in the large frontends' maps."""
    return len(rule.backends) > TIER_MAX or len(rule.short_circuit) > TIER_MAX


_RUN = 256  # slots compared at once by large_slot_changes


def large_slot_changes(before: FrontendRule | None, after: FrontendRule | None,
                       ) -> Iterator[tuple[Item | None, Item | None]]:
    """(slot before, slot after) of each large-frontend slot that differs between two rules
    of one frontend (None: no such slot), compared slot by slot: an endpoint that kept its
    slot costs an identity check, whatever the frontend's size."""
    rule = after if after is not None else before
    if rule is None:
        return
    fe = rule.frontend
    np = fe.ip is None
    for short in (False, True):
        name = LARGE_SLOT_MAPS[np, short]
        lists = []
        for r in (before, after):
            b = () if r is None else (r.short_circuit if short else r.backends)
            lists.append(b if len(b) > TIER_MAX else ())
        old, new = lists
        if old is new or old == new:
            continue
        lo, ln = len(old), len(new)
        both = min(lo, ln)
        for start in range(0, max(lo, ln), _RUN):
            end = start + _RUN
            if end <= both and old[start:end] == new[start:end]:
                continue  # (compared in C; the same objects mostly)
            for i in range(start, min(end, max(lo, ln))):
                x = old[i] if i < lo else None
                y = new[i] if i < ln else None
                if x is y or x == y:
                    continue
                yield (None if x is None else (name, fe, i, x)), (None if y is None else (name, fe, i, y))


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
                for item in rule_items(rule, large_slots=False):
                    key, value = item_text(item)
                    into.setdefault(item[0], {})[key] = value
        if (b is not None and is_large(b)) or (a is not None and is_large(a)):
            for x, y in large_slot_changes(b, a):
                for item, into in ((x, gone), (y, come)):
                    if item is not None:
                        key, value = item_text(item)
                        into.setdefault(item[0], {})[key] = value
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
    kept: dict[Frontend, set[Backend]] = {}  # a frontend's endpoints in `new` (made once per frontend)
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
            endpoints = kept.get(fe)
            if endpoints is None:
                rule = new.rule(fe)
                endpoints = kept[fe] = set() if rule is None else {*rule.backends, *rule.short_circuit}
            if backend not in endpoints:
                out.add(StaleFlow(fe, backend))
    for names, np in ((("service_ips", LARGE_MAPS[False]), False), (("service_nodeports", LARGE_MAPS[True]), True)):
        for name in names:
            for key in come.get(name, {}):
                if " udp . " in f" {key} " and not any(key in gone.get(n, {}) for n in names):
                    out.add(StaleFlow(frontend_of(key, np), None))
    return sorted(out, key=lambda f: (f.frontend.ip or "", f.frontend.port, f.backend or Backend("", 0)))


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


