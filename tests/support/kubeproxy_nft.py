"""kube-proxy's nftables layout (pkg/proxy/nftables), for the benchmark only.

One chain per Service port (`service-<hash>`: numgen random mod N vmap to the
endpoint chains) and one per endpoint (`endpoint-<hash>`: hairpin mark, DNAT),
dispatched from the same kind of verdict maps podnet uses. Syncs follow upstream
since 1.31: the first sync writes the whole table; later ones ("partial syncs")
list the table (`nft -j -t list table`, as upstream's ListAll) and rewrite only
the chains and elements of Services that changed. Session affinity and
LoadBalancer source ranges are left out: the benchmark does not use them.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from podnet.dataplane.nft import nft_apply
from podnet.services.applier import SyncResult
from podnet.services.model import FrontendRule, ServiceState

TABLE = "kube-proxy"


def _hash(*parts: str) -> str:
    return base64.b32encode(hashlib.sha256("|".join(parts).encode()).digest()).decode()[:8]


@dataclass
class Unit:
    """Everything one Service port owns: its chains and its map elements."""

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


MAPS = {
    "service-ips": "type ipv4_addr . inet_proto . inet_service : verdict",
    "service-nodeports": "type inet_proto . inet_service : verdict",
    "no-endpoint-services": "type ipv4_addr . inet_proto . inet_service : verdict",
    "no-endpoint-nodeports": "type inet_proto . inet_service : verdict",
}


def _base(mark: int) -> str:
    m = f"{mark:#x}"
    return f"""table ip {TABLE} {{
  map service-ips {{ {MAPS['service-ips']}; }}
  map service-nodeports {{ {MAPS['service-nodeports']}; }}
  map no-endpoint-services {{ {MAPS['no-endpoint-services']}; }}
  map no-endpoint-nodeports {{ {MAPS['no-endpoint-nodeports']}; }}
  chain reject-chain {{ reject; }}
  chain endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
  }}
  chain mark-for-masquerade {{ meta mark set meta mark | {m}; }}
  chain masquerading {{
    meta mark & {m} == 0 return
    meta mark set meta mark ^ {m}
    masquerade fully-random
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
  }}
  chain filter-input {{ type filter hook input priority -110; policy accept; ct state new jump endpoints-check; }}
  chain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump endpoints-check; }}
  chain filter-output {{ type filter hook output priority -110; policy accept; ct state new jump endpoints-check; }}
  chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}
  chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
  chain nat-postrouting {{ type nat hook postrouting priority 100; policy accept; jump masquerading; }}
}}
"""


def full_script(state: ServiceState) -> str:
    lines = [f"add table ip {TABLE}", f"delete table ip {TABLE}", _base(state.masquerade_mark)]
    elements: dict[str, list[str]] = {}
    for unit in units(state).values():
        for chain, rules in unit.chains.items():
            lines.append(f"add chain ip {TABLE} {chain}")
            lines += [f"add rule ip {TABLE} {chain} {r}" for r in rules]
        for m, els in unit.elements.items():
            elements.setdefault(m, []).extend(f"{k} : {v}" for k, v in els.items())
    for m, els in elements.items():
        lines.append(f"add element ip {TABLE} {m} {{ " + ", ".join(els) + " }")
    return "\n".join(lines) + "\n"


def partial_script(old: dict[str, Unit], new: dict[str, Unit]) -> tuple[str, int]:
    """Rewrite the chains and elements of the Service ports that changed; returns (script, changed units)."""
    lines: list[str] = []
    deletes: list[str] = []
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
            gone = [k for k, v in els.items() if a_els.get(m, {}).get(k) != v]
            if gone:
                lines.append(f"delete element ip {TABLE} {m} {{ " + ", ".join(gone) + " }")
        for chain, rules in a_chains.items():
            lines += [f"add chain ip {TABLE} {chain}", f"flush chain ip {TABLE} {chain}"]
            lines += [f"add rule ip {TABLE} {chain} {r}" for r in rules]
        for m, els in a_els.items():
            come = [f"{k} : {v}" for k, v in els.items() if b_els.get(m, {}).get(k) != v]
            if come:
                lines.append(f"add element ip {TABLE} {m} {{ " + ", ".join(come) + " }")
        for chain in b_chains:
            if chain not in a_chains:
                lines.append(f"flush chain ip {TABLE} {chain}")
                deletes.append(f"delete chain ip {TABLE} {chain}")
    lines += deletes
    return ("\n".join(lines) + "\n" if lines else ""), changed


class KubeProxyNftApplier:
    """The per-Service/per-endpoint chain layout, synced as kube-proxy does (benchmark only)."""

    def __init__(self, *, nft: Callable[[str], None] = nft_apply, list_each_sync: bool = True):
        self.nft = nft
        self.list_each_sync = list_each_sync  # upstream lists the table on every sync (ListAll)
        self.applied: dict[str, Unit] | None = None
        self.applied_state: ServiceState | None = None
        self.last_script = ""
        self.last_list_seconds = 0.0

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        if state == self.applied_state and not resync:
            return result
        new = self._units(state)
        if self.applied is None or resync:
            script = full_script(state)
            result.full = True
        else:
            if self.list_each_sync:
                t0 = time.monotonic()
                subprocess.run(["nft", "-j", "-t", "list", "table", "ip", TABLE], capture_output=True, text=True)
                self.last_list_seconds = time.monotonic() - t0
            script, result.added = partial_script(self.applied, new)
        if script:
            self.last_script = script
            self.nft(script)
            result.sent, result.lines = True, script.count("\n")
        self.applied, self.applied_state = new, state
        result.seconds = time.monotonic() - started
        return result

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
        self.nft(f"add table ip {TABLE}\ndelete table ip {TABLE}\n")
        self.applied = self.applied_state = None
