"""Keeping the kernel's Service dataplane equal to a desired ServiceState.

    applier = NftServiceApplier()
    result = applier.apply(state)          # only the element changes, one netlink transaction
    result = applier.apply(state, resync=True)   # re-read the kernel first (periodic healing)

The applier remembers the state it applied. On first use (or with resync=True) it
reads the table back from the kernel: if the layout is ours and intact, only the
difference is sent (an agent restart changes nothing that is right); if the table
is missing or garbled, it is rebuilt: its structure by `nft -f`, then every element
in one netlink batch. A sync where nothing changed sends nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError, list_tables, nft_apply
from podnet.dataplane.ruledigest import ChainDigest, differing, read_digests
from podnet.services import nftables as nt
from podnet.services.conntrack import Cleaner, delete_stale_flows
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import Backend, Frontend, ServiceState

log = logging.getLogger("podnet.services")


@dataclass
class SyncResult:
    sent: bool = False  # a transaction went to the kernel
    full: bool = False  # the whole table was (re)built
    reason: str = ""  # why it was rebuilt
    added: int = 0  # elements (or, for iptables, rules) added
    removed: int = 0
    lines: int = 0  # lines of nft text sent (structure, affinity chains)
    messages: int = 0  # netlink messages sent (elements)
    seconds: float = 0.0
    stale_flows: int = 0  # UDP conntrack entries deleted
    affinity_cleared: int = 0  # affinity entries pointing at removed endpoints, deleted
    read_back: bool = False  # the kernel's elements were read (not vouched for by the digest)
    errors: list[str] = field(default_factory=list)


class ServiceApplier(Protocol):
    """What every Service dataplane backend offers the agent."""

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult: ...

    def verify(self) -> str | None: ...

    def slot_orders(self) -> dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]: ...

    def remove(self) -> None: ...


class NetlinkKernel:
    """The applier's view of the kernel: one netlink socket, opened in the network
    namespace of its first use. Reads use dumps of single objects: `nft list` would
    load every element of the table first (seconds at tens of thousands of Services)."""

    def __init__(self) -> None:
        self._link: nl.Netlink | None = None

    def link(self) -> nl.Netlink:
        if self._link is None:
            self._link = nl.Netlink()
        return self._link

    def commit(self, batch: nl.Batch) -> None:
        self.link().commit(batch)

    def table(self, elements: bool = True) -> nt.KernelTable | None:
        return nt.read_table(self.link(), elements)

    def chains(self) -> list[str]:
        try:
            return self.link().chains(nt.TABLE)
        except OSError:
            return []

    def counts(self, names: Iterable[str]) -> dict[str, int]:
        return nt.read_counts(self.link(), names)

    def rule_digests(self, chains: Iterable[str] | None = None) -> dict[str, ChainDigest]:
        """chain -> its rules' count and digest (chains without rules left out): one dump of
        the table's rules, or of only these chains'."""
        try:
            return read_digests(self.link(), nt.TABLE, chains)
        except OSError:
            return {}

    def generation(self) -> int | None:
        try:
            return self.link().generation()
        except (OSError, NftError):
            return None

    def slot_orders(self) -> dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]:
        try:
            return nt.read_slot_orders(self.link())
        except OSError:
            return {}

    def affinity(self) -> list[tuple[str, str]]:
        try:
            return nt.read_affinity(self.link())
        except OSError:
            return []


class NftServiceApplier:
    """podnet's map-based nftables Service dataplane (table `ip podnet-svc`)."""

    def __init__(
        self,
        *,
        nft: Callable[[str], None] = nft_apply,
        kernel: NetlinkKernel | None = None,
        conntrack: Cleaner | None = delete_stale_flows,
        metrics: ServiceMetrics | None = None,
    ):
        self.nft = nft
        self.kernel = kernel or NetlinkKernel()
        self.conntrack = conntrack  # None: leave conntrack alone
        self.metrics = metrics
        self.commit = self.kernel.commit  # element batches (an attribute: benchmarks time it)
        self.applied_state: ServiceState | None = None
        self.chains: set[str] = set()  # dynamic chains in the kernel (affinity and large chains)
        self.refs: dict[str, int] = {}  # large chain -> elements in the kernel that point to it
        self.layout: nt.Layout | None = None
        self.frontends = 0  # elements of the fullest SIZED set in the kernel (the layout's capacity bounds them)
        self.sized: dict[str, int] = {}  # SIZED set -> its elements in the kernel (counted from deltas)
        # set -> how many elements the kernel holds as far as podnet knows (what it sent);
        # verify() compares it with the kernel's own count
        self.counts: dict[str, int] = {}
        # the nf_tables generation when verify() last found the table right (None: unknown),
        # and the transactions podnet committed since: each adds one to the generation
        self.generation: int | None = None
        self.transactions = 0
        self.digest: int | None = None  # the digest element in the kernel (see nftables.DIGEST)
        # (digest, element count per set) of the state the first apply will be given, when
        # known without hashing it (an agent restarted from its snapshot)
        self.expected: tuple[int, dict[str, int]] | None = None
        # chain -> its rules as the kernel encoded them right after podnet wrote them ({}: not
        # known); a rule replaced behind podnet's back keeps the counts but not the digest
        self.rules: dict[str, ChainDigest] = {}
        self.last_script = ""  # the last nft text sent (structure, affinity chains)
        self.last_delta: tuple[nt.Elements, nt.Elements] = ({}, {})  # the last incremental element delta

    # -- reading the kernel

    def read_kernel(self, state: ServiceState, trust_digest: bool, counts: dict[str, int] | None = None,
                    ) -> tuple[nt.Layout, nt.KernelTable | None, str]:
        """The layout for `state` (the kernel's own capacity when it suffices), and the
        kernel's table if it is that layout, intact (else None and why). The elements are
        read only if the kernel's digest differs from the state's (or trust_digest is
        False); table.elements None means they are exactly the state's (and `counts`, if
        given, holds the state's element count per set)."""
        expected, self.expected = self.expected, None  # (for this first state only)
        self._set_sized(nt.state_sizes(state))
        table = self.kernel.table(elements=False)
        if table is None:
            return nt.Layout(state.masquerade_mark).fit(self.frontends), None, "table missing"
        layout = nt.kernel_layout(state.masquerade_mark, table).fit(self.frontends)
        problem = nt.check_layout(layout, table) or self._rules_differ()
        if problem:
            return layout, None, problem
        if expected is not None and counts is not None:
            counts.update(expected[1])
        digest = expected[0] if expected is not None else None
        if not (trust_digest and table.digest is not None and table.digest == (
                digest if digest is not None else nt.state_digest(state, counts))):
            table = self.kernel.table(elements=True)
            if table is None:
                return layout, None, "table missing"
        return layout, table, ""

    def _rules_differ(self) -> str | None:
        """Why the kernel's rules are not those podnet wrote (None: they are). With nothing
        written yet (an agent start adopting the table) what the kernel holds becomes the
        reference: there is nothing to compare it with."""
        found = self.kernel.rule_digests()
        if not self.rules:
            self.rules = found
            return None
        drift = differing(self.rules, found)
        return drift[0] if drift else None

    def verify(self) -> str | None:
        """A cheap check: why the kernel's table differs from what was applied, or None. The
        chain names, each chain's rules (their number and a digest of what they say: a rule
        replaced in place), and the number of elements of every set (counted in a dump, not
        decoded): a flushed chain, a replaced rule or an element deleted behind podnet's
        back shows here, and the next resync reads the table back and repairs it. When nothing but podnet's own transactions were committed to nf_tables since
        the last check (the namespace's generation grew by their number), nothing else can
        have changed and nothing is read."""
        if self.layout is None:
            return "never applied"
        generation = self.kernel.generation()
        if generation is not None and self.generation is not None and \
                generation == self.generation + self.transactions:
            self.generation, self.transactions = generation, 0
            return None
        names = set(self.kernel.chains())
        if not names:
            return "table missing"
        for name in [*self.layout.chain_rule_counts(), *self.chains]:
            if name not in names:
                return f"chain {name} is missing"
        # A flushed chain, a deleted or a replaced rule leaves every name and element count
        # as it was: the rules too (one dump of rules, none of elements).
        rules = self.kernel.rule_digests()
        expected = {**self.layout.chain_rule_counts(),
                    **{name: len(nt.dynamic_chain_rules(name)) for name in self.chains}}
        for name, count in expected.items():
            found = rules[name].rules if name in rules else 0
            if found != count:
                return f"chain {name} has {found} rules, {count} expected"
        drift = differing(self.rules, rules, expected)
        if drift:
            return drift[0]
        # (an empty slot map is left out: an element there is reached by no frontend, and the
        # hourly read-back finds it; 512 dumps fewer)
        names = [name for name, n in self.counts.items() if n or not nt.slot_map_of(name)]
        found = self.kernel.counts(names)
        for name in names:
            if found.get(name) != self.counts[name]:
                return f"set {name} holds {found.get(name)} elements, {self.counts[name]} expected"
        self.generation, self.transactions = generation, 0  # the table as of this generation is right
        return None

    def slot_orders(self) -> dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]:
        """The large frontends' endpoints in the kernel's slot order (for the compiler to keep
        after an agent restart); only before anything was applied."""
        if self.applied_state is not None:
            return {}
        return self.kernel.slot_orders()

    # -- applying

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        affinity_check = False
        flows: list = []
        rebuild = ""
        try:
            delta: tuple[nt.Elements, nt.Elements] | None = None
            old = self.applied_state
            layout = self.layout
            target: int | None = None  # the digest after this sync
            counts: dict[str, int] | None = None  # the kernel's element counts before the delta, if read whole
            refs: dict[str, int] | None = None  # the large chains' references after this sync, if known whole
            if old is None or layout is None or resync or state.masquerade_mark != layout.mark:
                # a first apply (agent start) trusts the digest; an explicit resync reads everything
                counts = {}
                layout, table, reason = self.read_kernel(state, trust_digest=old is None, counts=counts)
                if table is None:
                    rebuild = reason
                else:
                    self.chains = {c for c in table.chains if nt.is_dynamic_chain(c)}
                    self.digest = table.digest
                    refs = nt.large_chain_refs(state)
                    affinity_check = True  # entries from before we knew the kernel may be stale
                    if table.elements is None:  # the digest says: exactly the desired elements
                        delta, target = ({}, {}), table.digest
                    else:
                        result.read_back = True
                        delta, target = nt.diff(table.elements, nt.elements(state)), nt.state_digest(state)
                        counts = {name: len(kv) for name, kv in table.elements.items()}
            elif state is not old:
                delta = nt.state_delta(old, state)  # empty: nothing is sent
                affinity_check = _affinity_touched(delta[0], old)
                gone, come = delta
                for name in nt.SIZED:
                    self.sized[name] += len(come.get(name, ())) - len(gone.get(name, ()))
                self.frontends = max(self.sized.values())
                layout = layout.fit(self.frontends)
                if layout != self.layout:
                    rebuild = f"the table grows to {layout.capacity} frontends"
            self.layout = layout
            if delta is not None and not rebuild:
                gone, come = delta
                if any(name in gone or name in come for name in nt.TEXT_ONLY):
                    rebuild = "service CIDRs or node addresses changed"
                else:
                    try:
                        # chains the new elements point to (only verdicts do: most deltas have none)
                        pointed = nt.element_chains(come) if not come.keys().isdisjoint(nt.VERDICT_MAPS) else set()
                        if pointed - self.chains:
                            chains = nt.affinity_chain_script(come, self.chains)
                            if chains:
                                self._send(chains, result)
                        if target is None:
                            target = nt.digest_delta(self.digest or 0, old, state)
                        if refs is None:
                            refs = _refs_after(self.refs, gone, come)
                        # large chains: the new ones before the elements that point to them, the
                        # ones nothing points to any more after, all in the elements' transaction
                        new_chains = sorted(c for c in pointed - self.chains if nt.large_chain_of(c))
                        unused = sorted(c for c in self.chains if c not in pointed and nt.large_chain_of(c)
                                        and not refs.get(c)) if self.refs or refs else []
                        batch = nt.element_batch(gone, come, digest=(self.digest, target), new_chains=new_chains,
                                                 old_chains=unused)
                        self.last_delta = (gone, come)
                        result.added, result.removed = _count(come), _count(gone)
                        self._commit(batch, result)
                        self.digest = target
                        if pointed or unused:
                            self._chains_written(pointed - self.chains, unused)
                            self.chains = (self.chains | pointed) - set(unused)
                        self.refs = refs
                        self._count_elements(batch, counts)
                    except NftError as e:
                        log.warning("incremental Service sync failed (%s); rebuilding the table", e)
                        result.errors.append(str(e))
                        rebuild = f"incremental transaction failed: {e}"
                    flows = nt.stale_udp_flows(gone, come, state)
            if rebuild:
                result.reason = rebuild
                if delta is not None:  # the layout was fitted to the delta only: fit it to the whole state
                    self._set_sized(nt.state_sizes(state))
                    layout = self.layout = layout.fit(self.frontends)
                if old is not None and not flows:
                    flows = nt.stale_udp_flows(*nt.diff(nt.elements(old), nt.elements(state)), state)
                result.full = True
                # two transactions: the structure (nft), then every element (netlink). Until the
                # second lands, new connections to Service addresses are dropped, not misrouted.
                self._send(nt.structure_script(layout, state), result)
                batch, digest = nt.state_batch(state)
                result.added = batch.elements - 1  # the digest is not a Service element
                self._commit(batch, result)
                self.rules = self.kernel.rule_digests()  # the reference for verify()
                self.digest = digest
                self.chains = nt.state_chains(state)
                self.refs = nt.large_chain_refs(state)
                self._count_elements(batch, {})  # into an empty table
                affinity_check = False  # a new table starts with an empty affinity map
        except NftError:
            self.applied_state = None
            if self.metrics:
                self.metrics.record_sync(time.monotonic() - started, ok=False)
            raise
        self.applied_state = state
        if affinity_check:
            result.affinity_cleared = self._clear_stale_affinity(state, result)
        if self.conntrack is not None and flows:
            result.stale_flows = self.conntrack(flows)
        result.seconds = time.monotonic() - started
        if self.metrics:
            self.metrics.record_sync(result.seconds, ok=True, changed=result.added + result.removed)
        if result.sent:
            log.info("services: %s +%d -%d elements in %.1f ms%s", "rebuilt" if result.full else "synced",
                     result.added, result.removed, result.seconds * 1000,
                     f" ({result.reason})" if result.reason else "")
        return result

    def _count_elements(self, batch: nl.Batch, before: dict[str, int] | None) -> None:
        """The element counts once `batch` landed, from `before` (what the kernel held before
        it; None: the counts so far, updated in proportion to the batch). Every set of the
        layout is counted, an empty one too (an element added behind podnet's back is drift
        as well)."""
        if before is not None:
            self.counts = dict.fromkeys(_counted_sets(self.layout), 0) if self.layout else {}
            for name, n in before.items():
                if name in self.counts:
                    self.counts[name] = n
        counts = self.counts
        for name, n in batch.changes.items():
            if name in counts:
                counts[name] += n

    def _chains_written(self, added: Iterable[str], deleted: Iterable[str]) -> None:
        """The reference after dynamic chains came (a dump of theirs only) or went."""
        added = sorted(added)
        if added:
            self.rules.update(self.kernel.rule_digests(added))
        for name in deleted:
            self.rules.pop(name, None)

    def _set_sized(self, sized: dict[str, int]) -> None:
        """The SIZED sets' element counts, from a whole state (deltas count on from there)."""
        self.sized = sized
        self.frontends = max(sized.values())

    def _send(self, script: str, result: SyncResult) -> None:
        self.last_script = script
        self._transaction(self.nft, script)
        result.sent = True
        result.lines += script.count("\n")

    def _commit(self, batch: nl.Batch, result: SyncResult) -> None:
        if not len(batch):
            return
        self._transaction(self.commit, batch)
        result.sent = True
        result.messages += len(batch)

    def _transaction(self, send: Callable, what: object) -> None:
        """Send one transaction and count it (see verify()); one that failed may or may not
        have been committed: the generation is then unknown."""
        try:
            send(what)
        except BaseException:
            self.generation = None
            raise
        self.transactions += 1

    # -- session affinity entries that point at endpoints no longer there

    def _clear_stale_affinity(self, state: ServiceState, result: SyncResult) -> int:
        cleared = 0
        valid: dict[int, set[Backend]] | None = None
        for _ in range(3):  # an entry may time out between listing and deleting: list again
            entries = self.kernel.affinity()
            if not entries:
                return cleared
            if valid is None:
                valid = _affinity_backends(state)
            stale = [k for k, v in entries if not _affinity_valid(valid, k, v)]
            if not stale:
                return cleared
            try:
                self._transaction(self.commit, nt.affinity_delete_batch(stale))
                return cleared + len(stale)
            except NftError as e:
                result.errors.append(f"clearing affinity entries: {e}")
        return cleared

    def remove(self) -> None:
        """Delete the whole table (podnet uninstall; never done on agent stop)."""
        self.nft(nt.remove_script())
        self.applied_state = self.layout = None
        self.chains = set()
        self.refs = {}
        self.counts = {}
        self.rules = {}


@lru_cache(maxsize=4)
def _counted_sets(layout: nt.Layout) -> tuple[str, ...]:
    """The sets whose elements verify() counts (all but the text-only sets and the digest)."""
    return tuple(name for name in layout.sets() if name not in nt.TEXT_ONLY and name not in nt.NOT_ELEMENTS)


def _refs_after(refs: dict[str, int], gone: nt.Elements, come: nt.Elements) -> dict[str, int]:
    """The large chains' references after a delta."""
    if gone.keys().isdisjoint(nt.VERDICT_MAPS) and come.keys().isdisjoint(nt.VERDICT_MAPS):
        return refs
    out = dict(refs)
    for part, step in ((gone, -1), (come, 1)):
        for name in nt.VERDICT_MAPS:
            for v in part.get(name, {}).values():
                chain = v.split()[-1] if v else ""
                if nt.large_chain_of(chain):
                    out[chain] = out.get(chain, 0) + step
    return {c: n for c, n in out.items() if n > 0}


def _count(els: nt.Elements) -> int:
    return sum(len(v) for name, v in els.items() if name not in nt.TEXT_ONLY)


def _affinity_touched(gone: nt.Elements, old: ServiceState) -> bool:
    """Did a frontend with affinity lose a backend or its affinity? (`old`: before the delta)"""
    if gone.get("affinity_ips") or gone.get("affinity_nodeports"):
        return True
    for name, kv in gone.items():
        which = nt.slot_map_of(name)
        for k in kv if which else ():
            rule = old.rule(nt.frontend_of(k.rpartition(" . ")[0], which[0]))
            if rule is not None and rule.affinity_timeout:
                return True
    return False


def _affinity_backends(state: ServiceState) -> dict[int, set[Backend]]:
    """Affinity key -> the endpoints its frontends balance over (read only when the
    kernel holds affinity entries, i.e. when Services with affinity are used)."""
    out: dict[int, set[Backend]] = {}
    for rule in state.rules:
        if rule.affinity_timeout and (rule.backends or rule.short_circuit):
            out.setdefault(rule.affinity_key, set()).update(rule.backends, rule.short_circuit)
    return out


def _affinity_valid(valid: dict[int, set[Backend]], key: str, value: str) -> bool:
    _, _, mark = key.partition(" . ")
    bip, _, bport = value.partition(" . ")
    try:
        return Backend(bip, int(bport)) in valid.get(int(mark, 0), ())
    except ValueError:
        return False


def retire_left_behind() -> list[str]:
    """This node ran the nftables Service proxy before and runs iptables now: the old
    table would go on DNAT-ing Service traffic to the endpoints of its last sync, ahead
    of the iptables chains, so it goes before the first sync. What was removed."""
    if (nt.FAMILY, nt.TABLE) not in list_tables(nt.TABLE):
        return []
    nft_apply(nt.remove_script())
    log.warning("the nftables Service proxy this node ran before is removed (table %s %s)", nt.FAMILY, nt.TABLE)
    return [f"nft table {nt.FAMILY} {nt.TABLE}"]
