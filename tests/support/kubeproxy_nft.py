"""kube-proxy's nftables layout (pkg/proxy/nftables), for the benchmark only.

One chain per Service port (`service-<hash>`: numgen random mod N vmap to the
endpoint chains) and one per endpoint (`endpoint-<hash>`: hairpin mark, DNAT),
dispatched from the same kind of verdict maps podnet uses. Syncs follow upstream
since 1.31: the first sync writes the whole table; later ones ("partial syncs")
list the table (as upstream's ListAll; here by netlink dumps, the layer's read-back)
and rewrite only the chains and elements of Services that changed. Session affinity
and LoadBalancer source ranges are left out: the benchmark does not use them.

Every sync is a transaction of the typed nftables layer (podnet.dataplane.nftables),
rendered as `nft -f` text and run by an `nft` process, as upstream's knftables does.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import nft_apply
from podnet.dataplane.nftables import Chain, Elements, Map, Rule, Table, Transaction, read_ruleset
from podnet.services.applier import SyncResult
from podnet.services.model import FrontendRule, ServiceState

TABLE = "kube-proxy"
KP_TABLE = Table(TABLE, "ip")


def _hash(*parts: str) -> str:
    return base64.b32encode(hashlib.sha256("|".join(parts).encode()).digest()).decode()[:8]


@dataclass
class Unit:
    """Everything one Service port owns: its chains (name -> rule texts) and its map
    elements (map -> key -> verdict)."""

    chains: dict[str, list[str]] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)


def units(state: ServiceState) -> dict[str, Unit]:
    out: dict[str, Unit] = {}
    for rule in state.rules:
        _add_rule(out.setdefault(rule.service, Unit()), rule)
    return out


def _add_rule(unit: Unit, rule: FrontendRule) -> None:
    fe = rule.frontend
    key = f"{fe.proto} . {fe.port}" if fe.ip is None else f"{fe.ip} . {fe.proto} . {fe.port}"
    np = fe.ip is None
    if not rule.backends:
        verdict = "goto reject-chain" if rule.no_endpoints == "reject" else "drop"
        unit.elements.setdefault("no-endpoint-nodeports" if np else "no-endpoint-services", {})[key] = verdict
        return
    base = f"{rule.service}/{fe.proto}/" + ",".join(map(str, rule.backends))
    svc = f"service-{_hash(base)}-{rule.service.replace(':', '/')}"[:200]
    if svc not in unit.chains:
        eps = []
        for b in rule.backends:
            ep = f"endpoint-{_hash(base, str(b))}-{rule.service.replace(':', '/')}__{b.ip}/{b.port}"[:200]
            unit.chains[ep] = [f"ip saddr {b.ip} jump mark-for-masquerade",
                               f"meta l4proto {fe.proto} dnat to {b.ip}:{b.port}"]
            eps.append(ep)
        vmap = ", ".join(f"{i} : goto {ep}" for i, ep in enumerate(eps))
        unit.chains[svc] = [f"numgen random mod {len(eps)} vmap {{ {vmap} }}"]
    target = svc
    if rule.masquerade:
        ext = "external-" + svc[len("service-"):]
        unit.chains[ext] = ["jump mark-for-masquerade", f"goto {svc}"]
        target = ext
    unit.elements.setdefault("service-nodeports" if np else "service-ips", {})[key] = f"goto {target}"


MAPS = {m.name: m for m in (
    Map("service-ips", type="ipv4_addr . inet_proto . inet_service : verdict"),
    Map("service-nodeports", type="inet_proto . inet_service : verdict"),
    Map("no-endpoint-services", type="ipv4_addr . inet_proto . inet_service : verdict"),
    Map("no-endpoint-nodeports", type="inet_proto . inet_service : verdict"),
)}
LOCAL_NODEPORT = "fib daddr type local ip daddr != 127.0.0.0/8"


def _base_chains(mark: int) -> list[tuple[Chain, list[str]]]:
    """The fixed chains, in upstream's order, with their rules."""
    m = f"{mark:#x}"

    def hooked(name: str, type: str, hook: str, priority: int) -> Chain:
        return Chain(name, type=type, hook=hook, priority=priority, policy="accept")

    return [
        (Chain("reject-chain"), ["reject"]),
        (Chain("endpoints-check"), ["ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
                                    f"{LOCAL_NODEPORT} meta l4proto . th dport vmap @no-endpoint-nodeports"]),
        (Chain("mark-for-masquerade"), [f"meta mark set meta mark | {m}"]),
        (Chain("masquerading"), [f"meta mark & {m} == 0 return", f"meta mark set meta mark ^ {m}",
                                 "masquerade fully-random"]),
        (Chain("services"), ["ip daddr . meta l4proto . th dport vmap @service-ips",
                             f"{LOCAL_NODEPORT} meta l4proto . th dport vmap @service-nodeports"]),
        (hooked("filter-input", "filter", "input", -110), ["ct state new jump endpoints-check"]),
        (hooked("filter-forward", "filter", "forward", -110), ["ct state new jump endpoints-check"]),
        (hooked("filter-output", "filter", "output", -110), ["ct state new jump endpoints-check"]),
        (hooked("nat-prerouting", "nat", "prerouting", -100), ["jump services"]),
        (hooked("nat-output", "nat", "output", -100), ["jump services"]),
        (hooked("nat-postrouting", "nat", "postrouting", 100), ["jump masquerading"]),
    ]


def _add_chain(tx: Transaction, chain: str, rules: list[str], flush: bool = False) -> None:
    tx.add(Chain(chain))
    if flush:
        tx.flush(Chain(chain))
    tx.add_all(Rule.many(chain, rules))


def full_transaction(state: ServiceState) -> Transaction:
    """The whole table, replacing whatever is there."""
    tx = Transaction(KP_TABLE)
    tx.recreate()
    tx.add_all(list(MAPS.values()))
    for chain, rules in _base_chains(state.masquerade_mark):
        tx.add(chain)
        tx.add_all(Rule.many(chain.name, rules))
    elements: dict[str, list[str]] = {}
    for unit in units(state).values():
        for chain, rules in unit.chains.items():
            _add_chain(tx, chain, rules)
        for m, els in unit.elements.items():
            elements.setdefault(m, []).extend(f"{k} : {v}" for k, v in els.items())
    for m, els in elements.items():
        tx.add(Elements(MAPS[m], els))
    return tx


def partial_transaction(old: dict[str, Unit], new: dict[str, Unit]) -> tuple[Transaction, int]:
    """Rewrite the chains and elements of the Service ports that changed; returns
    (transaction, changed units)."""
    tx = Transaction(KP_TABLE)
    deletes: list[Chain] = []
    changed = 0
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        changed += 1
        b_chains = before.chains if before else {}
        a_chains = after.chains if after else {}
        b_els = before.elements if before else {}
        a_els = after.elements if after else {}
        for m, els in b_els.items():
            tx.delete(Elements(MAPS[m], [k for k, v in els.items() if a_els.get(m, {}).get(k) != v]))
        for chain, rules in a_chains.items():
            _add_chain(tx, chain, rules, flush=True)
        for m, els in a_els.items():
            tx.add(Elements(MAPS[m], [f"{k} : {v}" for k, v in els.items() if b_els.get(m, {}).get(k) != v]))
        for chain in b_chains:
            if chain not in a_chains:
                tx.flush(Chain(chain))
                deletes.append(Chain(chain))
    for chain in deletes:  # once nothing jumps to them any more
        tx.delete(chain)
    return tx, changed


class KubeProxyNftApplier:
    """The per-Service/per-endpoint chain layout, synced as kube-proxy does (benchmark only)."""

    def __init__(self, *, nft: Callable[[str], None] = nft_apply, list_each_sync: bool = True):
        self.nft = nft  # every transaction as text, through an `nft` process (as knftables)
        self.list_each_sync = list_each_sync  # upstream lists the table on every sync (ListAll)
        self.applied: dict[str, Unit] | None = None
        self.applied_state: ServiceState | None = None
        self.last_script = ""
        self.last_list_seconds = 0.0
        self._netlink: nl.Netlink | None = None

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        if state == self.applied_state and not resync:
            return result
        new = self._units(state)
        if self.applied is None or resync:
            tx = full_transaction(state)
            result.full = True
        else:
            if self.list_each_sync:
                t0 = time.monotonic()
                self._list()
                self.last_list_seconds = time.monotonic() - t0
            tx, result.added = partial_transaction(self.applied, new)
        script = tx.script()
        if script:
            self.last_script = script
            self.nft(script)
            result.sent, result.lines = True, script.count("\n")
        self.applied, self.applied_state = new, state
        result.seconds = time.monotonic() - started
        return result

    def _list(self) -> None:
        """The table's chains and maps without their elements (upstream lists with `nft -j`)."""
        if self._netlink is None:
            self._netlink = nl.Netlink()  # in the network namespace of the first sync
        read_ruleset(self._netlink, TABLE, elements=False)

    def _units(self, state: ServiceState) -> dict[str, Unit]:
        """units(state), recomputing only the Service ports whose rules changed (Go would be
        fast here; the benchmark should measure the kernel side, not this rendering)."""
        old = self.applied_state
        if old is None or self.applied is None:
            return units(state)
        changed = {r.service for fe, r in state.frontends.items() if old.rule(fe) is not r and old.rule(fe) != r}
        changed |= {r.service for fe, r in old.frontends.items() if state.rule(fe) is None}
        out = dict(self.applied)
        for name in changed:
            out.pop(name, None)
        for r in state.rules:
            if r.service in changed:
                _add_rule(out.setdefault(r.service, Unit()), r)
        return out

    def remove(self) -> None:
        tx = Transaction(KP_TABLE)
        tx.remove()
        self.nft(tx.script())
        self.applied = self.applied_state = None
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
