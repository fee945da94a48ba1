"""Keeping the eBPF policy maps and attachments equal to the compiled state.

BPF maps have no transactions, so a change is written in an order where every
intermediate state admits no more than the old or the new state would:

    1. new peer and named-port elements
    2. the rule lists of new groups and of groups whose rules changed, under a new
       generation (the program still reads the old one)
    3. the groups' headers (count, generation): one update flips a group to its new rules
    4. pods' entries (a pod moving to another group is one update)
    5. what nothing refers to any more: pods gone, then group headers, rule lists of
       old generations, peer and named-port elements
    6. the epoch, which retires the program's cached verdicts

The diff is always taken against what the kernel holds: the maps as last written, or
read back when that is unknown (a start, a refused write, drift found by verify()).
So a restart adopts the maps as they are (an identical state writes nothing), and
drift is repaired by writing exactly what differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from podnet.ebpf.bpffs import PinDir
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.compiler import EMPTY_STATE, LivePolicyCompiler, PolicyState
from podnet.policy.ebpf import maps as m
from podnet.policy.ebpf.kernel import (
    EbpfPolicyError,
    MapOp,
    PolicyMaps,
    attach_policy,
    attachment_problems,
    pod_interfaces,
)
from podnet.policy.model import InputCache, LiveInputs

log = logging.getLogger(__name__)

WRITE_ORDER = ("podnet_pol_peers", "podnet_pol_ports", "podnet_pol_rules", "podnet_pol_groups", "podnet_pol_pods")
DELETE_ORDER = ("podnet_pol_pods", "podnet_pol_groups", "podnet_pol_rules", "podnet_pol_peers", "podnet_pol_ports")
COMPARED = WRITE_ORDER  # the flow table is the program's own


@dataclass
class EbpfChanges:
    """What one apply did (the counterpart of the nftables applier's PolicyChanges)."""

    full: bool = False  # the maps were read back from the kernel first
    written: int = 0
    deleted: int = 0
    attached: int = 0
    loaded: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.written or self.deleted or self.attached or self.loaded)

    def summary(self) -> str:
        what = "read back and repaired" if self.full else "updated"
        return (f"maps {what}: {self.written} entries written, {self.deleted} deleted"
                + (", programs loaded" if self.loaded else "")
                + (f", attached to {self.attached} interfaces" if self.attached else ""))


Contents = dict[str, dict[bytes, bytes]]  # map name -> key -> value


def group_contents(gid: int, packed: tuple[bytes, ...], have_groups: dict[bytes, bytes],
                   have_rules: dict[bytes, bytes], known: dict[int, tuple] | None,
                   names: dict[int, str]) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """One group's header key, header and rule entries. It keeps the generation the kernel
    has it under when its rules there are the same; otherwise it gets the next one."""
    if len(packed) > m.MAX_RULES:
        raise EbpfPolicyError(f"group {names.get(gid, gid)}: {len(packed)} rules, "
                              f"the program walks at most {m.MAX_RULES}")
    key = m.GROUP_KEY.pack(gid)
    head = have_groups.get(key)
    last = known.get(gid) if known is not None else None
    if last is not None and last[0] is packed and head == last[2]:
        gen, header, entries = last[1], last[2], last[3]  # written last time, still there
    else:
        gen = 1
        if head is not None:
            count, kgen = m.GROUP_VALUE.unpack(head)
            same = count == len(packed) and all(have_rules.get(m.rule_key(gid, kgen, i)) == v
                                                for i, v in enumerate(packed))
            gen = kgen if same else (kgen + 1) & 0xFFFFFFFF
        header = m.group_value(len(packed), gen)
        entries = {m.rule_key(gid, gen, i): v for i, v in enumerate(packed)}
    if known is not None:
        known[gid] = (packed, gen, header, entries)
    return key, header, entries


def desired_contents(want: m.Desired, kernel: Contents,
                     known: dict[int, tuple] | None = None) -> Contents:
    """The maps' contents for `want` (each group as group_contents gives it). `known`:
    group -> (rules, generation, header, rule entries) as last written to `kernel`,
    filled in here (a group whose rules are the very same object is not built again)."""
    out: Contents = {"podnet_pol_pods": want.pods, "podnet_pol_peers": want.peers, "podnet_pol_ports": want.ports,
                     "podnet_pol_groups": {}, "podnet_pol_rules": {}}
    have_groups, have_rules = kernel.get("podnet_pol_groups", {}), kernel.get("podnet_pol_rules", {})
    for gid, packed in want.groups.items():
        key, header, entries = group_contents(gid, packed, have_groups, have_rules, known, want.names)
        out["podnet_pol_groups"][key] = header
        out["podnet_pol_rules"].update(entries)
    return out


def delta_ops(want: m.Desired, have: Contents, known: dict[int, tuple]) -> list[MapOp]:
    """What turns `have` (the maps holding the build before `want`) into `want`, looking
    only at what `want` says changed since: the sets and groups it names, and the pods'
    entries (one per local pod). The same order as diff_ops."""
    writes: Contents = {name: {} for name in WRITE_ORDER}
    deletes: dict[str, set[bytes]] = {name: set() for name in DELETE_ORDER}
    pods = have["podnet_pol_pods"]
    writes["podnet_pol_pods"] = dict(want.pods.items() - pods.items())
    deletes["podnet_pol_pods"] = pods.keys() - want.pods.keys()
    for before, now in want.changed_sets.values():
        new = now[1] if now else {}
        if now:
            held = have[now[0]]
            writes[now[0]].update((k, v) for k, v in new.items() if held.get(k) != v)
        if before:
            deletes[before[0]].update(k for k in before[1] if k not in new or (now and now[0] != before[0]))
    have_groups, have_rules = have["podnet_pol_groups"], have["podnet_pol_rules"]
    for gid in want.changed_groups:
        key = m.GROUP_KEY.pack(gid)
        head = have_groups.get(key)
        old = set()
        if head is not None:  # the rules the kernel reads now
            count, gen = m.GROUP_VALUE.unpack(head)
            old = {m.rule_key(gid, gen, i) for i in range(count)}
        packed = want.groups.get(gid)
        if packed is None:
            known.pop(gid, None)
            if head is not None:
                deletes["podnet_pol_groups"].add(key)
            deletes["podnet_pol_rules"].update(old)
            continue
        key, header, entries = group_contents(gid, packed, have_groups, have_rules, known, want.names)
        if head != header:
            writes["podnet_pol_groups"][key] = header
        writes["podnet_pol_rules"].update((k, v) for k, v in entries.items() if have_rules.get(k) != v)
        deletes["podnet_pol_rules"].update(old - entries.keys())
    ops = []
    for name in WRITE_ORDER:
        ops.extend(MapOp(name, k, v) for k, v in sorted(writes[name].items()))
    for name in DELETE_ORDER:
        ops.extend(MapOp(name, k, None) for k in sorted(deletes[name]))
    return ops


def diff_ops(have: Contents, want: Contents) -> list[MapOp]:
    """What turns `have` into `want`, in the write order (set operations on the items:
    the comparison of tens of thousands of entries stays in C)."""
    ops = []
    for name in WRITE_ORDER:
        ops.extend(MapOp(name, k, v) for k, v in sorted(want[name].items() - have.get(name, {}).items()))
    for name in DELETE_ORDER:
        ops.extend(MapOp(name, k, None) for k in sorted(have.get(name, {}).keys() - want[name].keys()))
    return ops


class EbpfPolicyProgrammer:
    """The eBPF counterpart of policy.applier.PolicyProgrammer, with the same calls:
    `sync(pods, namespaces, policies, local_pod_ips)` / `sync_live(live)` after a change,
    `verify()` now and then, `resync()` to rewrite. The compiled state is the same value
    (`state`), so `podnet policy explain` and the nftables backend read the same thing."""

    def __init__(self, pins: PinDir, interfaces=pod_interfaces, object_file: str | Path | None = None,
                 service_cidrs: tuple[str, ...] = ()):
        self.maps = PolicyMaps(pins, object_file)
        self.interfaces = interfaces  # () -> the pod veths to attach to, name -> index
        self.inputs = InputCache()
        self.compiler = LivePolicyCompiler()
        self.state: PolicyState = EMPTY_STATE
        self.contents = m.MapContents({"podnet:service-cidrs": ("podnet_pol_peers",
                                                               m.service_cidr_entries(service_cidrs))})
        self._gens: dict[int, tuple] = {}  # group -> what desired_contents wrote for it last
        self.desired: m.Desired = m.EMPTY
        self.local: frozenset[str] = frozenset()
        self.applied: Contents | None = None  # what the maps hold; None: read them back first
        self.attached_to: dict[str, int] = {}  # pod veth -> the ifindex its filters were checked on
        self._in_doubt_lock = threading.Lock()
        self._in_doubt: frozenset[int] | None = frozenset()  # ifindexes to check again (None: all)

    # ---- the PolicyProgrammer calls

    def sync(self, pods: Iterable[Pod], namespaces: Iterable[Namespace], policies: Iterable[NetworkPolicy],
             local_pod_ips: Iterable[str]) -> EbpfChanges:
        inputs = self.inputs.inputs(pods, namespaces, policies, local_pod_ips)
        self.state = self.compiler.compile(inputs)
        self.local = frozenset(inputs.local_ips)
        return self._apply()

    def sync_live(self, live: LiveInputs) -> EbpfChanges:
        self.state, inputs = self.compiler.compile_live(live)
        self.local = frozenset(inputs.local_ips)
        return self._apply()

    def apply(self, state: PolicyState, local_pod_ips: Iterable[str]) -> EbpfChanges:
        """Program a state compiled elsewhere (a benchmark timing compile and maps apart)."""
        self.state, self.local = state, frozenset(local_pod_ips)
        return self._apply()

    def verify(self) -> list[str]:
        """Differences between the kernel and what was applied: maps (pins gone, entries
        changed), programs detached. Any makes the next sync read everything back."""
        if self.applied is None:
            return ["nothing applied yet"]
        diffs = [f"map {n} missing" for n in self.maps.missing()]
        if not diffs:
            try:
                kernel = self._read()
            except EbpfPolicyError as e:
                kernel, diffs = {}, [f"maps unreadable: {e}"]
            for name in COMPARED if not diffs else ():
                have, want = kernel[name], self.applied[name]
                extra = sum(1 for k in have if k not in want)
                wrong = sum(1 for k, v in want.items() if have.get(k) != v)
                if extra or wrong:
                    diffs.append(f"map {name}: {wrong} entries missing or changed, {extra} not podnet's")
        loaded = self.maps.loaded
        with IPRoute() as ipr:
            for ifname, ifindex in sorted(self.interfaces().items()):
                diffs.extend(attachment_problems(ipr, ifname, ifindex, loaded) if loaded
                             else [f"{ifname}: programs not loaded"])
        if diffs:
            self.applied = None
            self.attached_to = {}
        return diffs

    def resync(self) -> EbpfChanges:
        self.applied = None
        self.attached_to = {}
        return self._apply()

    # ---- between resyncs: the attachments netlink tells about (watch.py)

    def attached_indexes(self) -> frozenset[int]:
        return frozenset(self.attached_to.values())

    def in_doubt(self, ifindexes: frozenset[int] | None) -> None:
        """These interfaces' filters may have changed (None: any): the next sync checks
        them and re-attaches. Called from the watch's thread."""
        with self._in_doubt_lock:
            self._in_doubt = None if ifindexes is None or self._in_doubt is None else self._in_doubt | ifindexes

    def _take_in_doubt(self) -> frozenset[int] | None:
        with self._in_doubt_lock:
            doubt, self._in_doubt = self._in_doubt, frozenset()
        return doubt

    # ---- applying

    def _read(self) -> Contents:
        return {name: self.maps.dump(name) for name in COMPARED}

    def _apply(self) -> EbpfChanges:
        start = time.perf_counter()
        ch = EbpfChanges()
        try:
            # the build says what changed since the build before, which the maps hold
            # when `applied` is known: then only that is looked at (O(change), not
            # O(entries)); else the maps are read back and compared whole
            self.desired = self.contents.build(self.state, self.local)
            ch.loaded = self.maps.load()
            if ch.loaded or self.applied is None:
                ch.full = True
                have = self._read()
                self._gens = {}
                want = desired_contents(self.desired, have, self._gens)
                ops = diff_ops(have, want)
            else:
                want = self.applied
                ops = delta_ops(self.desired, want, self._gens)
            self.maps.apply(ops)
        except Exception:
            self.applied = None  # some of it may have landed, or the build ran ahead: read back next time
            raise
        if want is self.applied:  # keep what the maps hold (verify() compares with it)
            for op in ops:
                if op.value is None:
                    want[op.map].pop(op.key, None)
                else:
                    want[op.map][op.key] = op.value
        ch.written = sum(1 for op in ops if op.value is not None)
        ch.deleted = len(ops) - ch.written
        if ops:
            self.maps.bump_epoch()  # verdicts cached from the old state are not used again
        self.applied = want
        # attach after the maps hold the state: a pod's program never sees its pod missing
        doubt = self._take_in_doubt()
        ifaces = self.interfaces()
        loaded = self.maps.loaded
        assert loaded is not None
        todo = sorted((n, i) for n, i in ifaces.items()
                      if ch.loaded or self.attached_to.get(n) != i or doubt is None or i in doubt)
        if todo:
            with IPRoute() as ipr:
                for ifname, ifindex in todo:
                    # a restart finds them attached: nothing is replaced then
                    if ch.loaded or attachment_problems(ipr, ifname, ifindex, loaded):
                        attach_policy(ipr, ifindex, loaded)
                        ch.attached += 1
        self.attached_to = dict(ifaces)
        ch.seconds = time.perf_counter() - start
        return ch
