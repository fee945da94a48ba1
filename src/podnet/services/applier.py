"""Keeping the kernel's Service dataplane equal to a desired ServiceState.

    applier = NftServiceApplier()
    result = applier.apply(state)          # only the element changes, one `nft -f -`
    result = applier.apply(state, resync=True)   # re-read the kernel first (periodic healing)

The applier remembers what it applied. On first use (or with resync=True) it
reads the table back from the kernel: if the layout is ours and intact, only the
difference is sent (an agent restart changes nothing that is right); if the table
is missing or garbled, it is rebuilt whole, in one transaction. A sync where
nothing changed sends nothing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from podnet.dataplane.nft import NftError, nft_apply
from podnet.services import nftables as nt
from podnet.services.conntrack import Runner, delete_stale_flows, run_command
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
    lines: int = 0  # lines of the transaction
    seconds: float = 0.0
    stale_flows: int = 0  # UDP conntrack entries deleted
    affinity_cleared: int = 0  # affinity entries pointing at removed endpoints, deleted
    errors: list[str] = field(default_factory=list)


class ServiceApplier(Protocol):
    """What every Service dataplane backend offers the agent."""

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult: ...

    def remove(self) -> None: ...


def nft_json(*args: str) -> str | None:
    """`nft -j ARGS`; None when the object does not exist."""
    proc = subprocess.run(["nft", "-j", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(f"nft -j {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class NftServiceApplier:
    """podnet's map-based nftables Service dataplane (table `ip podnet-svc`)."""

    def __init__(
        self,
        *,
        nft: Callable[[str], None] = nft_apply,
        nft_read: Callable[..., str | None] = nft_json,
        conntrack: Runner | None = run_command,
        metrics: ServiceMetrics | None = None,
    ):
        self.nft = nft
        self.nft_read = nft_read
        self.conntrack = conntrack  # None: leave conntrack alone
        self.metrics = metrics
        self.applied: nt.Elements | None = None
        self.applied_state: ServiceState | None = None
        self.chains: set[str] = set()  # tier/affinity chains in the kernel
        self.refs: Counter[str] = Counter()  # endpoint address -> backends using its hairpin pair
        self.layout: nt.Layout | None = None
        self.last_script = ""

    # -- reading the kernel

    def read_kernel(self, layout: nt.Layout) -> tuple[nt.KernelTable | None, str]:
        listing = self.nft_read("list", "table", nt.FAMILY, nt.TABLE)
        if listing is None:
            return None, "table missing"
        table = nt.parse_table(listing)
        problem = nt.check_layout(layout, table)
        return (None, problem) if problem else (table, "")

    def verify(self) -> str | None:
        """Cheap check (chain names only, no elements): why the table needs a rebuild, or None."""
        if self.layout is None:
            return "never applied"
        listing = self.nft_read("list", "chains", nt.FAMILY)
        if listing is None:
            return "table missing"
        names = {c["chain"]["name"] for c in json.loads(listing)["nftables"]
                 if "chain" in c and c["chain"].get("table") == nt.TABLE}
        if not names:
            return "table missing"
        for name in [*self.layout.chain_rule_counts(), *self.chains]:
            if name not in names:
                return f"chain {name} is missing"
        return None

    # -- applying

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        layout = nt.Layout(state.masquerade_mark)
        affinity_check = False
        flows: list = []
        try:
            delta: tuple[nt.Elements, nt.Elements] | None = None
            if self.applied is None or resync or layout != self.layout:
                table, reason = self.read_kernel(layout)
                self.layout = layout
                if table is None:
                    self.applied, result.reason = None, reason
                else:
                    self.applied = {name: table.elements.get(name, {}) for name in nt.SETS}
                    self.chains = {c for c in table.chains if nt.is_dynamic_chain(c)}
                    affinity_check = True  # entries from before we knew the kernel may be stale
                    delta = nt.diff(self.applied, nt.elements(state))
                    self.refs = nt.hairpin_refs(state)
            elif state is not self.applied_state:
                assert self.applied_state is not None
                delta = nt.state_delta(self.applied_state, state, self.refs)  # empty: nothing is sent
            if self.applied is not None and delta is not None:
                gone, come = delta
                try:
                    script, result.added, result.removed = nt.render_delta(gone, come, self.chains)
                except nt.TierMissing as e:
                    script, self.applied, result.reason = "", None, f"new endpoint-count tier {e}"
                if self.applied is not None:
                    affinity_check = affinity_check or _affinity_touched(gone, self.applied)
                    if script:
                        try:
                            self._send(script, result)
                        except NftError as e:
                            log.warning("incremental Service sync failed (%s); rebuilding the table", e)
                            result.errors.append(str(e))
                            self.applied, result.reason = None, f"incremental transaction failed: {e}"
                if self.applied is not None:
                    nt.apply_delta(self.applied, gone, come)
                    self.chains |= nt.dynamic_chains(come)
                flows = nt.stale_udp_flows(gone, come, state)
            if self.applied is None:
                desired = nt.elements(state)
                if self.applied_state is not None and not flows:
                    flows = nt.stale_udp_flows(*nt.diff(nt.elements(self.applied_state), desired), state)
                result.full = True
                result.added = sum(len(v) for v in desired.values())
                self._send(nt.full_script(layout, desired), result)
                self.applied = desired
                self.refs = nt.hairpin_refs(state)
                tiers = nt.tier_limit(desired)
                self.chains = nt.dynamic_chains(desired) | {f"{kind}_{n}" for kind in ("svc", "np")
                                                             for n in range(1, tiers + 1)}
                affinity_check = False  # a new table starts with an empty affinity map
        except NftError:
            self.applied = None
            if self.metrics:
                self.metrics.record_sync(time.monotonic() - started, ok=False)
            raise
        self.applied_state = state
        if affinity_check:
            result.affinity_cleared = self._clear_stale_affinity(state, result)
        if self.conntrack is not None and flows:
            result.stale_flows = delete_stale_flows(flows, self.conntrack)
        result.seconds = time.monotonic() - started
        if self.metrics:
            self.metrics.record_sync(result.seconds, ok=True, changed=result.added + result.removed)
        if result.sent:
            log.info("services: %s +%d -%d elements in %.1f ms%s", "rebuilt" if result.full else "synced",
                     result.added, result.removed, result.seconds * 1000,
                     f" ({result.reason})" if result.reason else "")
        return result

    def _send(self, script: str, result: SyncResult) -> None:
        self.last_script = script
        self.nft(script)
        result.sent = True
        result.lines = script.count("\n")

    # -- session affinity entries that point at endpoints no longer there

    def _clear_stale_affinity(self, state: ServiceState, result: SyncResult) -> int:
        cleared = 0
        for _ in range(3):  # an entry may time out between listing and deleting: list again
            listing = self.nft_read("list", "map", nt.FAMILY, nt.TABLE, nt.DYNAMIC)
            if listing is None:
                return cleared
            stale = [k for k, v in nt.affinity_entries(listing) if not _affinity_valid(state, k, v)]
            if not stale:
                return cleared
            lines = nt.element_block("delete", nt.DYNAMIC, [(k, None) for k in stale], keys_only=True)
            try:
                self.nft("\n".join(lines) + "\n")
                return cleared + len(stale)
            except NftError as e:
                result.errors.append(f"clearing affinity entries: {e}")
        return cleared

    def remove(self) -> None:
        """Delete the whole table (podnet uninstall; never done on agent stop)."""
        self.nft(f"table {nt.FAMILY} {nt.TABLE}\ndelete table {nt.FAMILY} {nt.TABLE}\n")
        self.applied = self.applied_state = self.layout = None
        self.chains = set()


def _affinity_touched(gone: nt.Elements, applied: nt.Elements) -> bool:
    """Did a frontend with affinity lose a backend or its affinity? (`applied`: before the delta)"""
    if gone.get("affinity_ips") or gone.get("affinity_nodeports"):
        return True
    for kind, slots in (("affinity_ips", "backends"), ("affinity_nodeports", "nodeport_backends")):
        sticky = applied.get(kind)
        if sticky and any(k.rsplit(" . ", 1)[0] in sticky for k in gone.get(slots, {})):
            return True
    return False


def _affinity_valid(state: ServiceState, key: str, value: str) -> bool:
    parts = key.split(" . ")
    if len(parts) != 4:
        return False
    _, daddr, proto, port = parts
    bip, _, bport = value.partition(" . ")
    try:
        backend = Backend(bip, int(bport))
        rule = state.rule(Frontend(daddr, proto, int(port)))  # type: ignore[arg-type]
        if rule is None and daddr in state.node_ips:
            rule = state.rule(Frontend(None, proto, int(port)))  # type: ignore[arg-type]
    except ValueError:
        return False
    return rule is not None and rule.affinity_timeout is not None and backend in rule.backends
