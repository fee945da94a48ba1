"""kube-proxy's iptables layout, behind the same applier interface: the fallback
for kernels without nftables and the baseline podnet is measured against.

    nat KUBE-SERVICES   -d VIP -p tcp --dport 80 -> KUBE-SVC-<hash> | KUBE-EXT-<hash> | KUBE-FW-<hash>
                        (last) addrtype LOCAL -> KUBE-NODEPORTS -p tcp --dport NP -> ...
    nat KUBE-SVC-<hash> [affinity: -m recent --rcheck -> KUBE-SEP-*]
                        -m statistic --mode random --probability 1/(n-i) -> KUBE-SEP-<hash>
    nat KUBE-SEP-<hash> -s EP -> KUBE-MARK-MASQ (hairpin); DNAT --to-destination EP:PORT
    nat KUBE-EXT-<hash> -> KUBE-MARK-MASQ, KUBE-SVC-<hash>     (externalTrafficPolicy Cluster)
    nat KUBE-FW-<hash>  -s RANGE -> KUBE-EXT/SVC; else KUBE-MARK-DROP
    nat KUBE-SERVICES   (externalTrafficPolicy Local) from pods (-i pn+) or the node -> KUBE-SVC of every endpoint
    filter KUBE-SERVICES  no endpoints -> REJECT (DROP under a Local policy); another port of a ClusterIP ->
                        REJECT; unused service CIDR -> DROP

Frontends of a Service port with the same endpoints share one KUBE-SVC chain, hence its
`recent` affinity lists: a client keeps its endpoint across ClusterIP, NodePort and
external addresses, as with kube-proxy.

podnet.io/scheduler wrr: the endpoints' `--probability` follow their weights (weight 0: no
rule, so no new flows; a client held by affinity keeps its endpoint). sh and lc are not
possible here and the Service port balances at random (scheduler_problem says why).

Every sync with a change rewrites all chains with one `iptables-restore
--noflush` (kube-proxy's full sync): matching is linear in the number of
Services and every change costs the whole table. That is the point of having it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from podnet.services.applier import SyncResult
from podnet.services.conntrack import Cleaner, delete_stale_flows
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState, stale_udp_flows
from podnet.services.weights import slot_counts

log = logging.getLogger("podnet.services")

DROP_MARK = 0x8000
# this node's pods (podnet.dataplane.pods.HOST_PREFIX) and the node itself
SHORT_CIRCUIT_SOURCES = ("-i pn+", "-m addrtype --src-type LOCAL")
OWN_PREFIXES = ("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-")
FIXED_NAT = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-MARK-DROP")
FIXED_FILTER = ("KUBE-SERVICES", "KUBE-FIREWALL")
JUMPS = (
    ("nat", "PREROUTING", ["-j", "KUBE-SERVICES"]),
    ("nat", "OUTPUT", ["-j", "KUBE-SERVICES"]),
    ("nat", "POSTROUTING", ["-j", "KUBE-POSTROUTING"]),
    ("filter", "INPUT", ["-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES"]),
    ("filter", "FORWARD", ["-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES"]),
    ("filter", "OUTPUT", ["-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES"]),
    ("filter", "INPUT", ["-j", "KUBE-FIREWALL"]),
    ("filter", "FORWARD", ["-j", "KUBE-FIREWALL"]),
    ("filter", "OUTPUT", ["-j", "KUBE-FIREWALL"]),
)



def podnet_jumps(binary: str = "iptables") -> list[tuple[str, str, list[str]]]:
    """podnet's jumps from the built-in chains to its Service chains that exist in this
    namespace (exactly as it writes them: kube-proxy's own carry a comment, so `-C` never
    matches those); [] without the binary."""
    if shutil.which(binary) is None:
        return []
    return [(table, chain, spec) for table, chain, spec in JUMPS
            if subprocess.run([binary, "-w", "-t", table, "-C", chain, *spec], capture_output=True).returncode == 0]


def retire_left_behind(binary: str = "iptables") -> list[str]:
    """This node ran `--service-proxy iptables` before and runs nftables or eBPF now: the
    old chains would go on DNAT-ing Service traffic to the endpoints of their last sync
    (and reject what has none), so they go before the first sync. What was removed."""
    if not podnet_jumps(binary):
        return []
    IptablesServiceApplier(binary=binary, conntrack=None).remove()
    log.warning("the iptables Service proxy this node ran before is removed (its KUBE-* chains and jumps)")
    return [f"{binary} Service chains"]

def chain_name(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def scheduler_problem(rule: FrontendRule) -> str:
    """Why this backend balances the frontend at random despite its podnet.io/scheduler
    ("" when it follows it)."""
    if rule.scheduler in ("", "wrr"):
        return ""
    why = {"sh": "iptables has no source-hash choice but xt_HMARK, which overwrites the packet mark that "
                 "carries the masquerade bit",
           "lc": "iptables keeps no count of the connections each endpoint holds"}.get(rule.scheduler, "")
    return (f"podnet.io/scheduler {rule.scheduler} is not available on the iptables backend"
            + (f" ({why})" if why else "") + "; balanced at random (--service-proxy ebpf has it)")


def _choices(rule: FrontendRule, backends: tuple[Backend, ...]) -> list[int]:
    """Each endpoint's share of new flows: its weight under wrr, else 1."""
    if rule.scheduler == "wrr":
        return slot_counts(backends, rule.weights)
    return [1] * len(backends)


def _ep(fe_proto: str, rule_key: str, b: Backend) -> str:
    return chain_name("KUBE-SEP-", rule_key, fe_proto, str(b))


@dataclass
class Rendered:
    text: str
    nat_chains: set[str]
    rules: int


def rule_counts(text: str) -> Counter[tuple[str, str]]:
    """(table, chain) -> its `-A` lines, in iptables-save or iptables-restore text."""
    counts: Counter[tuple[str, str]] = Counter()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            counts[(table, line.split(None, 2)[1])] += 1
    return counts


def jump_counts(text: str) -> Counter[tuple[str, str, str]]:
    """(table, built-in chain, target) -> podnet's jumps to its fixed chains in iptables-save
    text (kube-proxy's own carry a comment and are not counted)."""
    own = set(FIXED_NAT) | set(FIXED_FILTER)
    counts: Counter[tuple[str, str, str]] = Counter()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and "--comment" not in line:
            words = line.split()
            if len(words) >= 4 and words[-2] == "-j" and words[-1] in own:
                counts[(table, words[1], words[-1])] += 1
    return counts


def render(state: ServiceState, stale: set[str] = frozenset()) -> Rendered:  # type: ignore[assignment]
    """The whole iptables-restore input for a state; `stale` chains are deleted."""
    mark = f"{state.masquerade_mark:#x}/{state.masquerade_mark:#x}"
    nat: dict[str, list[str]] = {c: [] for c in FIXED_NAT}
    flt: dict[str, list[str]] = {c: [] for c in FIXED_FILTER}
    nat["KUBE-POSTROUTING"] += [f"-m mark ! --mark {mark} -j RETURN",
                                f"-j MARK --xor-mark {state.masquerade_mark:#x}",
                                "-j MASQUERADE --random-fully"]
    nat["KUBE-MARK-MASQ"].append(f"-j MARK --or-mark {state.masquerade_mark:#x}")
    nat["KUBE-MARK-DROP"].append(f"-j MARK --or-mark {DROP_MARK:#x}")
    flt["KUBE-FIREWALL"].append(f"-m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP")
    groups: dict[tuple, str] = {}

    def svc_chain(rule: FrontendRule) -> str:
        shares = _choices(rule, rule.backends)
        key = (rule.service, rule.frontend.proto, rule.backends, rule.affinity_timeout, tuple(shares))
        name = groups.get(key)
        if name is not None:
            return name
        name = chain_name("KUBE-SVC-", rule.service, rule.frontend.proto, *map(str, rule.backends),
                          str(rule.affinity_timeout), *([] if rule.scheduler != "wrr" else map(str, shares)))
        groups[key] = name
        rules = nat.setdefault(name, [])
        eps = [_ep(rule.frontend.proto, name, b) for b in rule.backends]
        if rule.affinity_timeout:
            for ep in eps:
                rules.append(f"-m recent --name {ep} --mask 255.255.255.255 --rsource --rcheck "
                             f"--seconds {rule.affinity_timeout} --reap -j {ep}")
        left = sum(shares)  # each endpoint takes its share of what the ones before it left
        last = max((i for i, w in enumerate(shares) if w), default=-1)
        for i, (b, ep, share) in enumerate(zip(rule.backends, eps, shares, strict=True)):
            if i < last and share:
                rules.append(f"-m statistic --mode random --probability {share / left:.10f} -j {ep}")
            elif i == last:
                rules.append(f"-j {ep}")
            left -= share
            sep = nat.setdefault(ep, [])
            sep.append(f"-s {b.ip}/32 -j KUBE-MARK-MASQ")
            if rule.affinity_timeout:
                sep.append(f"-m recent --name {ep} --mask 255.255.255.255 --rsource --set")
            sep.append(f"-p {rule.frontend.proto} -m {rule.frontend.proto} -j DNAT --to-destination {b.ip}:{b.port}")
        return name

    nodeports: list[str] = []
    cluster_ips: list[str] = []  # a ClusterIP on a port its Service does not have: rejected
    for rule in state.rules:
        fe = rule.frontend
        match = f"-p {fe.proto} -m {fe.proto} --dport {fe.port}"
        if fe.ip is not None:
            match = f"-d {fe.ip}/32 " + match
        comment = f'-m comment --comment "{rule.service} {rule.kind}"'
        if rule.short_circuit:  # this node's pods and the node itself: every endpoint (kube-proxy's short-circuit)
            every = svc_chain(rule._replace(backends=rule.short_circuit))
            for source in SHORT_CIRCUIT_SOURCES:
                (nodeports if fe.ip is None else nat["KUBE-SERVICES"]).append(f"{comment} {match} {source} -j {every}")
        if rule.owns_cluster_ip:
            cluster_ips.append(f"-d {fe.ip}/32 -j REJECT")
        if not rule.backends or not any(_choices(rule, rule.backends)):  # (wrr: every weight 0)
            verdict = "REJECT" if rule.no_endpoints == "reject" else "DROP"
            local = "-m addrtype --dst-type LOCAL " if fe.ip is None else ""
            flt["KUBE-SERVICES"].append(f"{comment} {local}{match} -j {verdict}")
            continue
        target = svc_chain(rule)
        if rule.masquerade:
            ext = chain_name("KUBE-EXT-", target)
            if ext not in nat:
                nat[ext] = ["-j KUBE-MARK-MASQ", f"-j {target}"]
            target = ext
        if rule.source_ranges and fe.ip is not None:
            fw = chain_name("KUBE-FW-", target, str(fe))
            nat[fw] = [f"-s {cidr} -j {target}" for cidr in rule.source_ranges] + ["-j KUBE-MARK-DROP"]
            target = fw
        line = f"{comment} {match} -j {target}"
        (nodeports if fe.ip is None else nat["KUBE-SERVICES"]).append(line)
    nat["KUBE-NODEPORTS"] = nodeports
    nat["KUBE-SERVICES"].append("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    flt["KUBE-SERVICES"] += cluster_ips
    for cidr in state.service_cidrs:
        flt["KUBE-SERVICES"].append(f"-d {cidr} -j DROP")

    out = ["*filter"]
    out += [f":{c} - [0:0]" for c in flt]
    out += [f"-A {c} {r}" for c, rules in flt.items() for r in rules]
    out += ["COMMIT", "*nat"]
    out += [f":{c} - [0:0]" for c in nat]
    out += [f"-A {c} {r}" for c, rules in nat.items() for r in rules]
    gone = sorted(stale - set(nat))
    out += [f":{c} - [0:0]" for c in gone] + [f"-X {c}" for c in gone]
    out.append("COMMIT")
    count = sum(map(len, flt.values())) + sum(map(len, nat.values()))
    return Rendered("\n".join(out) + "\n", set(nat), count)


class IptablesServiceApplier:
    """kube-proxy-style iptables Service dataplane (full rewrite per change)."""

    def __init__(
        self,
        *,
        binary: str = "iptables",  # or iptables-legacy / iptables-nft
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
        conntrack: Cleaner | None = delete_stale_flows,
        metrics: ServiceMetrics | None = None,
    ):
        self.binary = binary
        self.run = run
        self.conntrack = conntrack
        self.metrics = metrics
        self.applied_state: ServiceState | None = None
        self.chains: set[str] | None = None  # our nat chains in the kernel
        self.rules: Counter[tuple[str, str]] = Counter()  # (table, chain) -> rules, as last written
        self.last_script = ""

    def _restore_bin(self) -> str:
        return self.binary + "-restore" if not self.binary.endswith("-restore") else self.binary

    def _existing_chains(self) -> set[str]:
        proc = self.run([self.binary + "-save", "-t", "nat"], capture_output=True, text=True)
        return {line[1:].split()[0] for line in proc.stdout.splitlines()
                if line.startswith(":") and line[1:].startswith(OWN_PREFIXES)}

    def _ensure_jumps(self) -> None:
        """The built-in chains jump to ours (after our chains exist)."""
        for table, chain, spec in JUMPS:
            check = self.run([self.binary, "-w", "-t", table, "-C", chain, *spec], capture_output=True, text=True)
            if check.returncode != 0:
                self.run([self.binary, "-w", "-t", table, "-I", chain, "1", *spec], capture_output=True,
                         text=True, check=True)

    def verify(self) -> str | None:
        """Why the next apply should rewrite the chains, or None: a chain of ours missing, one
        whose number of rules is not what was written (flushed, a rule deleted or added), or
        a jump from a built-in chain missing. One iptables-save, as every check needs."""
        if self.chains is None:
            return "never applied"
        saved = self.run([self.binary + "-save"], capture_output=True, text=True).stdout
        chains = {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}
        missing = sorted(set(FIXED_NAT) - chains)
        if missing:
            return f"chain {missing[0]} is missing"
        have = rule_counts(saved)
        for (table, chain), n in sorted(self.rules.items()):
            if have[(table, chain)] != n:
                return f"chain {chain} ({table}) has {have[(table, chain)]} rules, {n} expected"
        jumps = jump_counts(saved)
        for table, chain, spec in JUMPS:
            if not jumps[(table, chain, spec[-1])]:
                return f"the jump from {chain} ({table}) to {spec[-1]} is missing"
        return None

    def slot_orders(self) -> dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]:
        """Nothing to keep: every sync rewrites the chains whole."""
        return {}

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        if state == self.applied_state and not resync:
            return result
        first = self.chains is None or resync
        if first:
            self.chains = self._existing_chains()
            result.full, result.reason = True, "first sync"
        rendered = render(state, self.chains)
        self.last_script = rendered.text
        proc = self.run([self._restore_bin(), "--noflush", "-w"], input=rendered.text, capture_output=True,
                        text=True)
        if proc.returncode != 0:
            self.chains = None
            if self.metrics:
                self.metrics.record_sync(time.monotonic() - started, ok=False)
            raise RuntimeError(f"{self._restore_bin()} failed: {proc.stderr.strip()[:500]}")
        if first:
            self._ensure_jumps()
        result.sent, result.added, result.lines = True, rendered.rules, rendered.text.count("\n")
        old = self.applied_state
        self.chains, self.applied_state = rendered.nat_chains, state
        self.rules = rule_counts(rendered.text)
        if self.conntrack is not None and old is not None:
            flows = stale_udp_flows(old, state)
            if flows:
                result.stale_flows = self.conntrack(flows)
        result.seconds = time.monotonic() - started
        if self.metrics:
            self.metrics.record_sync(result.seconds, ok=True, changed=rendered.rules)
        return result

    def remove(self) -> None:
        for table, chain, spec in JUMPS:
            self.run([self.binary, "-w", "-t", table, "-D", chain, *spec], capture_output=True, text=True)
        chains = self._existing_chains() | set(FIXED_NAT)
        script = ["*nat", *(f":{c} - [0:0]" for c in sorted(chains)), *(f"-X {c}" for c in sorted(chains)),
                  "COMMIT", "*filter", *(f":{c} - [0:0]" for c in FIXED_FILTER),
                  *(f"-X {c}" for c in FIXED_FILTER), "COMMIT"]
        self.run([self._restore_bin(), "--noflush", "-w"], input="\n".join(script) + "\n", capture_output=True,
                 text=True)
        self.applied_state, self.chains = None, None
        self.rules = Counter()

