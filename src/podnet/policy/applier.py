"""Programming a `PolicyState` into the kernel, incrementally and atomically.

Every change is ONE transaction: either the whole diff lands or none of it
does. A diff of elements only (a pod's labels or address, the common case) goes
as a netlink batch; anything that adds, rewrites or removes sets or chains as
`nft -f -`. The first apply, and any apply after the kernel refused a diff
(state missing or changed behind our back), replaces the whole table in one
transaction (`delete table` + the full table), so there is never a moment when
an isolated pod is open. If even that fails, the old ruleset stays in the
kernel, the error is raised, and the next sync retries from scratch: policy
fails closed to the last ruleset that applied.

Order inside a diff: new sets and elements, new chains, rewritten policy
chains, dispatch elements, then the removal of what nothing refers to any
more (group chains, policy chains, sets), so every reference is valid at
every command.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError, nft_apply, nft_list
from podnet.errors import PodnetError
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.compiler import (
    DIRECTIONS,
    DISPATCH,
    EMPTY_STATE,
    TABLE,
    PolicyCompiler,
    PolicyState,
    chain_rules,
    chunks,
    dispatch_elements,
    render_full,
    render_set_decl,
)
from podnet.policy.model import InputCache, interval_of

log = logging.getLogger(__name__)
T = f"ip {TABLE}"


class PolicyApplyError(PodnetError):
    pass


@dataclass
class PolicyChanges:
    full: bool = False  # the whole table was (re)written
    elements_added: int = 0
    elements_removed: int = 0
    sets_added: int = 0
    sets_removed: int = 0
    chains_added: int = 0
    chains_rewritten: int = 0
    chains_removed: int = 0
    dispatch_changed: int = 0
    commands: int = 0
    netlink: bool = False  # an element-only diff, sent as a netlink batch
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.commands == 0


@dataclass
class ElementChange:
    """Elements of one existing set or dispatch map to remove and to add."""

    name: str
    kind: str  # a set kind ("addr", "cidr", "addrport") or "dispatch"
    remove: list[str]  # keys
    add: list[str]  # elements as nft text ("ip" or "ip : jump chain")


def element_changes(old: PolicyState, new: PolicyState) -> list[ElementChange]:
    """The element part of a diff: sets present in both states, then the dispatch maps."""
    out = []
    for name, s in new.sets.items():
        o = old.sets.get(name)
        if o is None or o is s or o.kind != s.kind:
            continue
        add, rem = s.elements - o.elements, o.elements - s.elements
        if add or rem:
            out.append(ElementChange(name, s.kind, sorted(rem), sorted(add)))
    for d in DIRECTIONS:
        o, n = old.dispatch[d], new.dispatch[d]
        gone = sorted(ip for ip, g in o.items() if n.get(ip) != g)
        came = {ip: g for ip, g in n.items() if o.get(ip) != g}
        if gone or came:
            out.append(ElementChange(DISPATCH[d], "dispatch", gone, dispatch_elements(came)))
    return out


def structure_changes(old: PolicyState, new: PolicyState) -> bool:
    """Does the diff add, rewrite or remove sets or chains (not only elements)?"""
    if any(n not in old.sets or old.sets[n].kind != s.kind for n, s in new.sets.items()):
        return True
    if any(n not in new.sets for n in old.sets) or old.groups.keys() != new.groups.keys():
        return True
    if old.policy_chains.keys() != new.policy_chains.keys():
        return True
    return any(c is not old.policy_chains[n] and c.rules != old.policy_chains[n].rules
               for n, c in new.policy_chains.items())


def render_diff(old: PolicyState, new: PolicyState, ch: PolicyChanges | None = None,
                changes: list[ElementChange] | None = None) -> str:
    """Commands turning `old` into `new` ("" if they are the same); `changes`: their
    element_changes, if already known."""
    ch = ch if ch is not None else PolicyChanges()
    lines: list[str] = []
    changed = {c.name: c for c in (element_changes(old, new) if changes is None else changes)}
    # 1. sets and their elements
    for name, s in new.sets.items():
        o = old.sets.get(name)
        if o is s:
            continue
        if o is None or o.kind != s.kind:
            if o is not None:  # same name, other type: cannot happen with hashed names, but be safe
                raise PolicyApplyError(f"set {name} changed type")
            lines.append(f"add set {T} {name} {{ {render_set_decl(s)} }}")
            ch.sets_added += 1
            add, rem = sorted(s.elements), []
        else:
            c = changed.get(name)
            add, rem = (c.add, c.remove) if c else ([], [])
        for batch in chunks(rem):
            lines.append(f"delete element {T} {name} {{ {', '.join(batch)} }}")
        for batch in chunks(add):
            lines.append(f"add element {T} {name} {{ {', '.join(batch)} }}")
        ch.elements_added += len(add)
        ch.elements_removed += len(rem)
    # 2. chains: create new ones empty, so jumps between them resolve in any order
    new_chains = [n for n in (*new.policy_chains, *new.groups) if n not in old.policy_chains and n not in old.groups]
    for name in new_chains:
        lines.append(f"add chain {T} {name}")
    ch.chains_added += len(new_chains)
    for name in new_chains:
        for rule in chain_rules(new, name):
            lines.append(f"add rule {T} {name} {rule}")
    # 3. policy chains whose rules changed (group chains are named by their content)
    for name, c in new.policy_chains.items():
        o = old.policy_chains.get(name)
        if o is not None and o is not c and o.rules != c.rules:
            lines.append(f"flush chain {T} {name}")
            for rule in chain_rules(new, name):
                lines.append(f"add rule {T} {name} {rule}")
            ch.chains_rewritten += 1
    # 4. dispatch: a changed pod is deleted and added again (one transaction: never open)
    for d in DIRECTIONS:
        c = changed.get(DISPATCH[d])
        if c is None:
            continue
        for batch in chunks(c.remove):
            lines.append(f"delete element {T} {DISPATCH[d]} {{ {', '.join(batch)} }}")
        for batch in chunks(c.add):
            lines.append(f"add element {T} {DISPATCH[d]} {{ {', '.join(batch)} }}")
        ch.dispatch_changed += len(set(c.remove) | {e.split(" : ")[0] for e in c.add})
    # 5. what nothing refers to any more: group chains, then policy chains, then sets
    for group in (g for g in old.groups if g not in new.groups):
        lines += [f"flush chain {T} {group}", f"delete chain {T} {group}"]
        ch.chains_removed += 1
    for pc in (c for c in old.policy_chains if c not in new.policy_chains):
        lines += [f"flush chain {T} {pc}", f"delete chain {T} {pc}"]
        ch.chains_removed += 1
    for name in (s for s in old.sets if s not in new.sets):
        lines.append(f"delete set {T} {name}")
        ch.sets_removed += 1
    ch.commands = len(lines)
    return "\n".join(lines) + "\n" if lines else ""


def element_batch(changes: list[ElementChange]) -> nl.Batch | None:
    """The element-only diff as one netlink transaction (deletions, then additions);
    None when an interval set changes (its elements are ranges: left to nft)."""
    if any(c.kind == "cidr" for c in changes):
        return None
    batch = nl.Batch()
    for c in changes:
        if c.remove:
            batch.delete_elements(TABLE, c.name, [nl.element(_key(c.kind, k)) for k in c.remove])
    for c in changes:
        if c.add:
            if c.kind == "dispatch":
                items = [e.split(" : ", 1) for e in c.add]
                batch.add_elements(TABLE, c.name, [nl.element(_key("addr", ip), nl.verdict(v)) for ip, v in items])
            else:
                batch.add_elements(TABLE, c.name, [nl.element(_key(c.kind, e)) for e in c.add])
    return batch


def _key(kind: str, text: str) -> bytes:
    """`ip` or `ip . port` -> the kernel's key bytes (a port is padded to 32 bits)."""
    if kind == "addrport":
        ip, _, port = text.partition(" . ")
        return socket.inet_aton(ip) + struct.pack("!H2x", int(port))
    return socket.inet_aton(text.partition(" : ")[0])


class PolicyApplier:
    """Keeps the kernel's table equal to the last state applied."""

    def __init__(self, run: Callable[[str], None] = nft_apply, commit: Callable[[nl.Batch], None] | None = None):
        self.run = run
        # element-only diffs go by netlink, without an nft process; a substituted `run`
        # (tests, dry runs) gets every diff as text unless `commit` is given too
        self.commit = commit or (self._netlink_commit if run is nft_apply else None)
        self._netlink: nl.Netlink | None = None
        self.applied: PolicyState | None = None  # None: unknown, the next apply rewrites the table

    def _netlink_commit(self, batch: nl.Batch) -> None:
        if self._netlink is None:
            self._netlink = nl.Netlink()  # in the network namespace of the first use
        self._netlink.commit(batch)

    def apply(self, desired: PolicyState) -> PolicyChanges:
        start = time.perf_counter()
        ch = PolicyChanges()
        if self.applied is not None:
            changes = element_changes(self.applied, desired)
            script = render_diff(self.applied, desired, ch, changes)
            if not script:
                self.applied = desired
                return ch
            try:
                batch = None if self.commit is None or structure_changes(self.applied, desired) else \
                    element_batch(changes)
                if batch is not None and self.commit is not None:
                    self.commit(batch)
                    ch.netlink = True
                else:
                    self.run(script)
                self.applied = desired
                ch.seconds = time.perf_counter() - start
                return ch
            except NftError as e:
                # the kernel's table is not what we applied: rewrite it whole
                log.warning("policy diff refused, rewriting the table: %s", e)
                ch = PolicyChanges(errors=[str(e)])
        script = render_full(desired)
        ch.full = True
        ch.commands = script.count("\n")
        ch.sets_added = len(desired.sets)
        ch.elements_added = desired.element_count()
        ch.chains_added = len(desired.policy_chains) + len(desired.groups)
        try:
            self.run(script)
        except NftError as e:
            self.applied = None
            raise PolicyApplyError(f"policy table not updated, the previous ruleset stays: {e}") from None
        self.applied = desired
        ch.seconds = time.perf_counter() - start
        return ch


# ------------------------------------------------------------------ kernel read-back


def _elem_text(e) -> str:
    if isinstance(e, dict):
        if "elem" in e:
            return _elem_text(e["elem"]["val"])
        if "prefix" in e:
            p = e["prefix"]
            return f"{p['addr']}/{p['len']}"
        if "range" in e:
            a, b = e["range"]
            return f"{a}-{b}"
        if "concat" in e:
            return " . ".join(str(_elem_text(x)) for x in e["concat"])
    return str(e)


def kernel_view(listing: str) -> dict:
    """What `nft -j list table ip podnet-policy` shows: set elements, chain rule counts, dispatch."""
    doc = json.loads(listing)
    sets: dict[str, frozenset[str]] = {}
    chains: dict[str, int] = {}
    dispatch: dict[str, dict[str, str]] = {d: {} for d in DIRECTIONS}
    by_map = {DISPATCH[d]: d for d in DIRECTIONS}
    for item in doc.get("nftables", []):
        if "set" in item:
            s = item["set"]
            sets[s["name"]] = frozenset(_elem_text(e) for e in s.get("elem", []))
        elif "map" in item:
            m = item["map"]
            if m["name"] in by_map:
                for key, verdict in m.get("elem", []):
                    target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) else None
                    dispatch[by_map[m["name"]]][_elem_text(key)] = target or "?"
        elif "chain" in item:
            chains.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            name = item["rule"]["chain"]
            chains[name] = chains.get(name, 0) + 1
    return {"sets": sets, "chains": chains, "dispatch": dispatch}


def _norm(kind: str, elements: Iterable[str]) -> frozenset:
    if kind == "cidr":
        return frozenset(interval_of(e) for e in elements)
    return frozenset(elements)


def compare_with_kernel(state: PolicyState, view: dict) -> list[str]:
    """Differences between what was applied and what the kernel holds."""
    out = []
    for name, s in state.sets.items():
        got = view["sets"].get(name)
        if got is None:
            out.append(f"set {name} missing")
        elif _norm(s.kind, got) != _norm(s.kind, s.elements):
            out.append(f"set {name}: {len(got)} elements in the kernel, {len(s.elements)} expected")
    for name in view["sets"]:
        if name not in state.sets:
            out.append(f"set {name} not expected")
    want = {n: len(chain_rules(state, n)) for n in (*state.policy_chains, *state.groups)}
    want.update({d: 2 for d in DIRECTIONS})
    for name, n in want.items():
        if view["chains"].get(name) != n:
            out.append(f"chain {name}: {view['chains'].get(name)} rules in the kernel, {n} expected")
    for name in view["chains"]:
        if name not in want:
            out.append(f"chain {name} not expected")
    for d in DIRECTIONS:
        if view["dispatch"][d] != state.dispatch[d]:
            out.append(f"{DISPATCH[d]} differs")
    return out


# ------------------------------------------------------------------ the agent's entry point


class PolicyProgrammer:
    """`sync(pods, namespaces, policies, local_pod_ips)` after any change (or on a timer);
    `verify()` now and then to catch a table changed behind podnet's back."""

    def __init__(self, run: Callable[[str], None] = nft_apply, lister: Callable[[str], str] = nft_list):
        self.inputs = InputCache()
        self.compiler = PolicyCompiler()
        self.applier = PolicyApplier(run)
        self.lister = lister
        self.state: PolicyState = EMPTY_STATE

    def sync(
        self,
        pods: Iterable[Pod],
        namespaces: Iterable[Namespace],
        policies: Iterable[NetworkPolicy],
        local_pod_ips: Iterable[str],
    ) -> PolicyChanges:
        inputs = self.inputs.inputs(pods, namespaces, policies, local_pod_ips)
        self.state = self.compiler.compile(inputs)
        return self.applier.apply(self.state)

    def verify(self) -> list[str]:
        """Compare the kernel with the last applied state; on any difference the next
        sync rewrites the table whole."""
        if self.applier.applied is None:
            return ["nothing applied yet"]
        try:
            view = kernel_view(self.lister(f"-j list table {T}"))
        except (NftError, ValueError) as e:
            diffs = [f"table unreadable: {e}"]
        else:
            diffs = compare_with_kernel(self.applier.applied, view)
        if diffs:
            self.applier.applied = None
        return diffs

    def resync(self) -> PolicyChanges:
        """Rewrite the whole table from the last computed state."""
        self.applier.applied = None
        return self.applier.apply(self.state)
