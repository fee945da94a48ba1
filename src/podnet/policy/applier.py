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

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError, nft_apply
from podnet.dataplane.nftables import (
    Chain,
    Elements,
    NftRunner,
    Ruleset,
    Transaction,
    canonical_element,
    declared_types,
    read_ruleset,
)
from podnet.dataplane.ruledigest import ChainDigest, differing, read_table_digests
from podnet.errors import PodnetError
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.compiler import (
    DIRECTIONS,
    DISPATCH,
    DISPATCH_MAPS,
    EMPTY_STATE,
    POLICY_TABLE,
    TABLE,
    LivePolicyCompiler,
    PolicyState,
    chain_rule_objects,
    chain_rules,
    dispatch_elements,
    full_transaction,
    set_for,
    set_object,
)
from podnet.policy.model import InputCache, LiveInputs

log = logging.getLogger(__name__)


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

    def summary(self) -> str:
        return (f"table {'rebuilt' if self.full else 'updated'}: +{self.elements_added} -{self.elements_removed} "
                f"elements, {self.chains_added + self.chains_rewritten + self.chains_removed} chains changed")


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


def diff_transaction(old: PolicyState, new: PolicyState, ch: PolicyChanges | None = None,
                     changes: list[ElementChange] | None = None) -> Transaction:
    """One transaction turning `old` into `new` (empty if they are the same); `changes`:
    their element_changes, if already known."""
    ch = ch if ch is not None else PolicyChanges()
    tx = Transaction(POLICY_TABLE)
    changed = {c.name: c for c in (element_changes(old, new) if changes is None else changes)}
    # 1. sets and their elements
    for name, s in new.sets.items():
        o = old.sets.get(name)
        if o is s:
            continue
        obj = set_object(s)
        if o is None or o.kind != s.kind:
            if o is not None:  # same name, other type: cannot happen with hashed names, but be safe
                raise PolicyApplyError(f"set {name} changed type")
            tx.add(obj)
            ch.sets_added += 1
            add, rem = sorted(s.elements), []
        else:
            c = changed.get(name)
            add, rem = (c.add, c.remove) if c else ([], [])
        tx.delete(Elements(obj, rem))
        tx.add(Elements(obj, add))
        ch.elements_added += len(add)
        ch.elements_removed += len(rem)
    # 2. chains: create new ones empty, so jumps between them resolve in any order
    new_chains = [n for n in (*new.policy_chains, *new.groups) if n not in old.policy_chains and n not in old.groups]
    for name in new_chains:
        tx.add(Chain(name))
    ch.chains_added += len(new_chains)
    for name in new_chains:
        for rule in chain_rule_objects(new, name):
            tx.add(rule)
    # 3. policy chains whose rules changed (group chains are named by their content)
    for name, c in new.policy_chains.items():
        o = old.policy_chains.get(name)
        if o is not None and o is not c and o.rules != c.rules:
            tx.flush(Chain(name))
            for rule in chain_rule_objects(new, name):
                tx.add(rule)
            ch.chains_rewritten += 1
    # 4. dispatch: a changed pod is deleted and added again (one transaction: never open)
    for d in DIRECTIONS:
        c = changed.get(DISPATCH[d])
        if c is None:
            continue
        tx.delete(Elements(DISPATCH_MAPS[d], c.remove))
        tx.add(Elements(DISPATCH_MAPS[d], c.add))
        ch.dispatch_changed += len(set(c.remove) | {e.split(" : ")[0] for e in c.add})
    # 5. what nothing refers to any more: group chains, then policy chains, then sets
    for name in (*(g for g in old.groups if g not in new.groups),
                 *(c for c in old.policy_chains if c not in new.policy_chains)):
        tx.flush(Chain(name))
        tx.delete(Chain(name))
        ch.chains_removed += 1
    for name in (s for s in old.sets if s not in new.sets):
        tx.delete(set_object(old.sets[name]))
        ch.sets_removed += 1
    ch.commands = len(tx)
    return tx


def render_diff(old: PolicyState, new: PolicyState, ch: PolicyChanges | None = None,
                changes: list[ElementChange] | None = None) -> str:
    """diff_transaction as nft text ("" if the states are the same)."""
    return diff_transaction(old, new, ch, changes).script()


def element_batch(changes: list[ElementChange]) -> nl.Batch | None:
    """The element-only diff as one netlink transaction (deletions, then additions);
    None when an interval set changes (its elements are ranges: left to nft)."""
    tx = Transaction(POLICY_TABLE)
    for c in changes:
        tx.delete(Elements(_element_set(c), c.remove))
    for c in changes:
        tx.add(Elements(_element_set(c), c.add))
    return tx.batch()


def _element_set(c: ElementChange):
    if c.kind == "dispatch":
        return next(m for m in DISPATCH_MAPS.values() if m.name == c.name)
    return set_for(c.name, c.kind)


class PolicyApplier:
    """Keeps the kernel's table equal to the last state applied. `nft` runs transactions
    (an NftRunner, or the fake of the tests); `run`/`commit` build an NftRunner."""

    def __init__(self, run: Callable[[str], None] = nft_apply, commit: Callable[[nl.Batch], None] | None = None,
                 nft=None):
        self.nft = nft if nft is not None else NftRunner(run, commit)
        self.applied: PolicyState | None = None  # None: unknown, the next apply rewrites the table

    @property
    def run(self) -> Callable[[str], None]:
        return self.nft.run_script

    @run.setter
    def run(self, run: Callable[[str], None]) -> None:
        self.nft.run_script = run

    def apply(self, desired: PolicyState) -> PolicyChanges:
        start = time.perf_counter()
        ch = PolicyChanges()
        if self.applied is not None:
            changes = element_changes(self.applied, desired)
            tx = diff_transaction(self.applied, desired, ch, changes)
            if not tx:
                self.applied = desired
                return ch
            try:
                ch.netlink = self.nft.apply(tx) == "netlink"
                self.applied = desired
                ch.seconds = time.perf_counter() - start
                return ch
            except NftError as e:
                # the kernel's table is not what we applied: rewrite it whole
                log.warning("policy diff refused, rewriting the table: %s", e)
                ch = PolicyChanges(errors=[str(e)])
        tx = full_transaction(desired)
        ch.full = True
        ch.commands = len(tx)
        ch.sets_added = len(desired.sets)
        ch.elements_added = desired.element_count()
        ch.chains_added = len(desired.policy_chains) + len(desired.groups)
        try:
            self.nft.apply(tx)
        except NftError as e:
            self.applied = None
            raise PolicyApplyError(f"policy table not updated, the previous ruleset stays: {e}") from None
        self.applied = desired
        ch.seconds = time.perf_counter() - start
        return ch


# ------------------------------------------------------------------ kernel read-back


def read_policy_table() -> Ruleset | None:
    """The policy table of the current network namespace, by netlink dumps (its rules are
    dumped once, by read_policy_digests: they give the counts too)."""
    link = nl.Netlink()
    try:
        return read_ruleset(link, TABLE, rules=False)
    finally:
        link.close()


def read_policy_digests(chains: Iterable[str] | None = None) -> dict[str, ChainDigest] | None:
    """The policy table's rules (or these chains'), digested per chain (see dataplane.ruledigest)."""
    return read_table_digests(TABLE, chains)


def written_chains(old: PolicyState, new: PolicyState) -> tuple[list[str], list[str]]:
    """The chains a diff from `old` to `new` writes (added or rewritten), and those it deletes."""
    had = {*old.policy_chains, *old.groups}
    has = {*new.policy_chains, *new.groups}
    written = [n for n in (*new.policy_chains, *new.groups) if n not in had]
    written += [n for n, c in new.policy_chains.items()
                if n in old.policy_chains and c is not old.policy_chains[n] and c.rules != old.policy_chains[n].rules]
    return written, [n for n in had if n not in has]


def kernel_view(table: Ruleset | None, rules: dict[str, ChainDigest] | None = None) -> dict:
    """A table read back: set elements, chain rule counts (from `rules`, its digests, when
    given), dispatch (pod address -> chain)."""
    sets: dict[str, frozenset[str]] = {}
    dispatch: dict[str, dict[str, str]] = {d: {} for d in DIRECTIONS}
    by_map = {DISPATCH[d]: d for d in DIRECTIONS}
    if table is None:
        return {"sets": sets, "chains": {}, "dispatch": dispatch}
    for name, s in table.sets.items():
        if name in by_map:
            for e in s.elements:
                ip, _, verdict = e.partition(" : ")
                word, _, target = verdict.partition(" ")
                dispatch[by_map[name]][ip] = target if word == "jump" and target else "?"
        else:
            sets[name] = frozenset(s.elements)
    counts = table.rule_counts() if rules is None else \
        {name: rules[name].rules if name in rules else 0 for name in table.chains}
    return {"sets": sets, "chains": counts, "dispatch": dispatch}


def _norm(s, elements: Iterable[str]) -> frozenset:
    """Elements as the kernel shows them (an interval as its prefixes)."""
    types = declared_types(set_object(s))
    return frozenset(c for e in elements for c in canonical_element(types, e))


def compare_with_kernel(state: PolicyState, view: dict) -> list[str]:
    """Differences between what was applied and what the kernel holds."""
    out = []
    for name, s in state.sets.items():
        got = view["sets"].get(name)
        if got is None:
            out.append(f"set {name} missing")
        elif _norm(s, got) != _norm(s, s.elements):
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
    `verify()` now and then to catch a table changed behind podnet's back. `reader`
    returns the table as the kernel holds it, `digests(chains=None)` its rules (or these
    chains') digested per chain (default: netlink dumps in this namespace)."""

    def __init__(self, run: Callable[[str], None] = nft_apply, nft=None,
                 reader: Callable[[], Ruleset | None] = read_policy_table,
                 digests: Callable[..., dict[str, ChainDigest] | None] = read_policy_digests):
        self.inputs = InputCache()
        self.compiler = LivePolicyCompiler()
        self.applier = PolicyApplier(run, nft=nft)
        self.reader = reader
        self.digests = digests
        # the rules as the kernel encoded them right after podnet's last write of chains (None:
        # not known): a rule replaced behind podnet's back keeps every count but not its digest
        self.rules: dict[str, ChainDigest] | None = None
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
        return self._apply()

    def sync_live(self, live: LiveInputs) -> PolicyChanges:
        """The agent's way: inputs kept current from events, compiled from what changed.
        If a compile fails half-way, the next one starts over from every input."""
        self.state, _ = self.compiler.compile_live(live)
        return self._apply()

    def verify(self) -> list[str]:
        """Compare the kernel with the last applied state; on any difference the next
        sync rewrites the table whole."""
        if self.applier.applied is None:
            return ["nothing applied yet"]
        diffs = self._kernel_differs(self.applier.applied)
        if diffs:
            self.applier.applied = None
        return diffs

    def _kernel_differs(self, state: PolicyState) -> list[str]:
        """Sets, dispatch and rule counts against `state`; then, when known, every chain's
        rules against what the kernel held after podnet's last write (a replaced rule)."""
        try:
            table = self.reader()
            rules = self.digests() if table is not None else None
            if table is None or rules is None:
                return ["table missing"]
            diffs = compare_with_kernel(state, kernel_view(table, rules))
            if not diffs and self.rules is not None:
                diffs = differing(self.rules, rules)
        except (NftError, OSError) as e:
            return [f"table unreadable: {e}"]
        return diffs

    def _apply(self) -> PolicyChanges:
        """Apply self.state. With nothing known applied (a start, after drift), a kernel table
        that already is the state is adopted instead of rewritten: an agent restart changes
        nothing in the kernel (what its rules say cannot be checked then: nothing was written
        yet; they become the reference)."""
        if self.applier.applied is None and not self._kernel_differs(self.state):
            self.applier.applied = self.state
            if self.rules is None:
                self.rules = self.digests()
        old = self.applier.applied
        return self._noted(self.applier.apply(self.state), old)

    def _noted(self, ch: PolicyChanges, old: PolicyState | None = None) -> PolicyChanges:
        """After a write of chains or rules (not of elements only, which leave every rule
        as it was), the rules as the kernel now holds them become the reference: of the
        whole table after a rewrite, of the chains written after a diff (a dump per chain:
        a policy change rewrites one or two of thousands)."""
        if ch.empty or (ch.netlink and not ch.full):
            return ch
        if ch.full or old is None or self.rules is None:
            self.rules = self.digests()
            return ch
        written, deleted = written_chains(old, self.state)
        rules = {n: d for n, d in self.rules.items() if n not in deleted and n not in written}
        rules.update(self.digests(written) or {})  # (a chain without rules has no digest)
        self.rules = rules
        return ch

    def resync(self) -> PolicyChanges:
        """Rewrite the whole table from the last computed state."""
        self.applier.applied = None
        return self._noted(self.applier.apply(self.state))
