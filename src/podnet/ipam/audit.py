"""Checking IPAM records against the cluster, and releasing leaked addresses safely.

check() reports:
  leaked-allocation          an address whose pod (namespace/pod attributes) no longer
                             exists, or now runs on another node than the one it was
                             allocated for
  allocation-without-handle  a block allocation whose handle record is missing
  handle-without-address     a handle record that holds no address in any block
                             (`podnet ipam free --handle H` deletes it)
  pod-without-address        a scheduled Pod (not hostNetwork) with no allocation
  block-of-missing-node      a block affine to a node that has no Node object
                             (`release_node` / a node controller cleans it up)
  dangling-affinity          an affinity record whose block is missing or owned by
                             another node
  overlapping-blocks         two blocks that share addresses (cut from overlapping pools)
  duplicate-address          an address allocated in two overlapping blocks: two
                             holders of one address

release_leaked() frees leaked allocations (the first two kinds) only when they
have been seen leaked before: each run records an observation per leaked
allocation (handle, ordinal and the block's sequence number at allocation time,
when first seen); an address is released only if an observation from an earlier
run, at least `grace` old, names the same handle on the same ordinal with the
same allocation sequence. So an address reused in between (even by the same
handle) starts a new observation instead of being freed, and a pod whose object
is just slow to appear is not robbed of its address.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from podnet.ipam import block as blk
from podnet.ipam import keys
from podnet.ipam.allocator import RETRIES
from podnet.ipam.errors import TooManyConflicts
from podnet.ipam.overlap import overlapping_pairs, shared
from podnet.model.objects import Node, Pod
from podnet.store.base import Conflict, KeyValueStore, NotFound, Op, Record
from podnet.store.objects import kind_prefix

LEAKED = "leaked-allocation"
NO_HANDLE = "allocation-without-handle"
EMPTY_HANDLE = "handle-without-address"
POD_WITHOUT_ADDRESS = "pod-without-address"
MISSING_NODE = "block-of-missing-node"
DANGLING_AFFINITY = "dangling-affinity"
OVERLAPPING_BLOCKS = "overlapping-blocks"
DUPLICATE_ADDRESS = "duplicate-address"

TXN_CHUNK = 64  # ops per transaction (etcd refuses more than 128 by default)


@dataclass(frozen=True)
class Finding:
    kind: str
    message: str
    handle: str | None = None
    address: str | None = None
    block: str | None = None
    node: str | None = None
    pod: str | None = None  # "namespace/name"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Leak:
    """One leaked allocation, as seen at one moment."""

    kind: str  # LEAKED or NO_HANDLE
    block: str
    ordinal: int
    address: str
    handle: str
    sequence: int | None  # the block's sequence number when the address was allocated
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LeakReport:
    released: list[Leak] = field(default_factory=list)
    waiting: list[Leak] = field(default_factory=list)  # seen leaked, grace not yet over (or first seen now)
    forgotten: int = 0  # observations dropped: no longer leaked, or the address was reused


@dataclass(frozen=True)
class _Pod:
    """The few fields of a Pod the audit needs (read from the stored JSON: a large
    cluster has far too many pods to decode each into a model object)."""

    node_name: str | None
    host_network: bool


@dataclass
class _State:
    blocks: list[Record]
    handles: dict[str, Record]  # handle -> record
    affinities: list[Record]
    pods: dict[tuple[str, str], _Pod]
    nodes: set[str]


def _read(kv: KeyValueStore) -> _State:
    blocks, _ = kv.list(keys.BLOCKS)
    handles, _ = kv.list(keys.HANDLES)
    affinities, _ = kv.list(keys.AFFINITIES)
    pods = {}
    for r in kv.list(kind_prefix(Pod))[0]:
        meta = r.value.get("metadata") or {}
        spec = r.value.get("spec") or {}
        pods[(meta.get("namespace") or "default", meta.get("name", ""))] = _Pod(
            spec.get("nodeName"), bool(spec.get("hostNetwork")))
    nodes = {(r.value.get("metadata") or {}).get("name", "") for r in kv.list(kind_prefix(Node))[0]}
    return _State(blocks, {keys.handle_of_key(h.key): h for h in handles}, affinities, pods, nodes)


def _leaks(kv: KeyValueStore, state: _State) -> list[Leak]:
    out = []
    for rec in state.blocks:
        value = rec.value
        cidr = value["cidr"]
        for o, attrs in blk.allocations(value):
            handle = attrs.get("handle_id") or ""
            sec = attrs.get("secondary") or {}
            reason = None
            kind = LEAKED
            if handle not in state.handles and not _handle_exists_now(kv, handle):
                kind, reason = NO_HANDLE, f"handle record {handle} is missing"
            elif sec.get("pod"):
                ns = sec.get("namespace") or "default"
                pod = state.pods.get((ns, sec["pod"]))
                if pod is None:
                    reason = f"pod {ns}/{sec['pod']} no longer exists"
                elif pod.node_name and sec.get("node") and pod.node_name != sec["node"]:
                    reason = f"pod {ns}/{sec['pod']} now runs on node {pod.node_name}, not {sec['node']}"
            if reason:
                out.append(Leak(kind, cidr, o, blk.address(cidr, o), handle, blk.allocation_sequence(value, o), reason))
    return out


def _handle_exists_now(kv: KeyValueStore, handle: str) -> bool:
    # The handle list was read after the blocks: a release in between looks like a
    # missing handle, so ask again before reporting one (and check the block later).
    return kv.get(keys.handle_key(handle)) is not None


def check(kv: KeyValueStore) -> list[Finding]:
    """Everything inconsistent between IPAM records and the cluster's objects (see module doc)."""
    state = _read(kv)
    findings: list[Finding] = []
    for leak in _leaks(kv, state):
        if leak.kind == NO_HANDLE and not _still_allocated(kv, leak):
            continue
        findings.append(Finding(leak.kind, f"{leak.address} (block {leak.block}, handle {leak.handle}): {leak.reason}",
                                handle=leak.handle, address=leak.address, block=leak.block))

    held: dict[str, int] = {}
    allocated_pods: set[tuple[str, str]] = set()
    for rec in state.blocks:
        for _, attrs in blk.allocations(rec.value):
            held[attrs.get("handle_id") or ""] = held.get(attrs.get("handle_id") or "", 0) + 1
            sec = attrs.get("secondary") or {}
            if sec.get("pod"):
                allocated_pods.add((sec.get("namespace") or "default", sec["pod"]))

    for handle in state.handles:
        if held.get(handle) or _handle_holds_now(kv, handle):
            continue
        findings.append(Finding(EMPTY_HANDLE, f"handle {handle} holds no address in any block", handle=handle))

    for (ns, name), pod in sorted(state.pods.items()):
        if pod.host_network or not pod.node_name or (ns, name) in allocated_pods:
            continue
        findings.append(Finding(POD_WITHOUT_ADDRESS, f"pod {ns}/{name} on node {pod.node_name} has no address",
                                node=pod.node_name, pod=f"{ns}/{name}"))

    by_cidr = {r.value["cidr"]: r.value for r in state.blocks}
    for aff in state.affinities:
        node, cidr = keys.parse_affinity_key(aff.key)
        value = by_cidr.get(cidr)
        if value is None or blk.affinity_node(value) != node:
            if kv.get(aff.key) is not None and _dangling_now(kv, node, cidr):
                findings.append(Finding(DANGLING_AFFINITY, f"affinity of node {node} for block {cidr} has no "
                                        "matching block", node=node, block=cidr))
    for cidr, value in sorted(by_cidr.items(), key=lambda kv_: blk.network(kv_[0])):
        node = blk.affinity_node(value)
        if node and node not in state.nodes:
            n = blk.used(value)
            findings.append(Finding(MISSING_NODE, f"block {cidr} is affine to node {node}, which does not exist "
                                    f"({n} address{'' if n == 1 else 'es'} in use)", node=node, block=cidr))
    findings.extend(_overlaps(by_cidr))
    return findings


def _overlaps(by_cidr: dict[str, blk.Block]) -> list[Finding]:
    """Blocks that share addresses, and every address allocated in both of two such blocks."""
    out = []
    for a, b in overlapping_pairs((cidr, cidr) for cidr in by_cidr):
        va, vb = by_cidr[a], by_cidr[b]
        out.append(Finding(OVERLAPPING_BLOCKS, f"block {a} ({_owner(va)}) overlaps block {b} ({_owner(vb)})",
                           block=a))
        common = shared(a, b)
        first = int(common.network_address)
        off_a = first - int(blk.network(a).network_address)
        off_b = first - int(blk.network(b).network_address)
        for i in range(common.num_addresses):
            ha, hb = blk.attributes_at(va, off_a + i), blk.attributes_at(vb, off_b + i)
            if ha is None or hb is None:
                continue
            addr = blk.address(a, off_a + i)
            out.append(Finding(DUPLICATE_ADDRESS, f"{addr} is held twice: handle {ha.get('handle_id')} in block {a} "
                               f"({_owner(va)}) and handle {hb.get('handle_id')} in block {b} ({_owner(vb)})",
                               address=addr, block=a, handle=ha.get("handle_id")))
    return out


def _owner(block: blk.Block) -> str:
    return f"pool {block.get('pool') or '?'}, node {blk.affinity_node(block) or '<none>'}"


def _still_allocated(kv: KeyValueStore, leak: Leak) -> bool:
    rec = kv.get(keys.block_key(leak.block))
    return rec is not None and blk.handle_at(rec.value, leak.ordinal) == leak.handle \
        and kv.get(keys.handle_key(leak.handle)) is None


def _handle_holds_now(kv: KeyValueStore, handle: str) -> bool:
    hrec = kv.get(keys.handle_key(handle))
    if hrec is None:
        return True  # released meanwhile: not an empty handle record
    for cidr in hrec.value.get("blocks", {}):
        rec = kv.get(keys.block_key(cidr))
        if rec is not None and blk.ordinals_of(rec.value, handle):
            return True
    return False


def _dangling_now(kv: KeyValueStore, node: str, cidr: str) -> bool:
    rec = kv.get(keys.block_key(cidr))
    return rec is None or blk.affinity_node(rec.value) != node


def release_leaked(kv: KeyValueStore, grace: float, *, now: float | None = None) -> LeakReport:
    """Record this run's leak observations and release the leaks seen at least `grace` seconds ago.

    `now` (seconds since the epoch) defaults to the clock; tests pass their own.
    """
    now = time.time() if now is None else now
    state = _read(kv)
    observations, _ = kv.list(keys.LEAKS)
    seen = {r.key: r for r in observations}
    report = LeakReport()
    ops: list[Op] = []
    for leak in _leaks(kv, state):
        okey = keys.leak_key(leak.block, leak.ordinal)
        obs = seen.pop(okey, None)
        same = obs is not None and obs.value.get("handle") == leak.handle \
            and obs.value.get("sequence") == leak.sequence
        if same and obs is not None and now - float(obs.value.get("firstSeen", now)) >= grace:
            if _release_one(kv, leak, obs):
                report.released.append(leak)
            else:
                report.forgotten += 1
            continue
        report.waiting.append(leak)
        if not same:
            if obs is not None:
                report.forgotten += 1
            ops.append(Op.put(okey, {
                "handle": leak.handle, "address": leak.address, "block": leak.block, "ordinal": leak.ordinal,
                "sequence": leak.sequence, "reason": leak.reason, "firstSeen": now,
            }))
    for obs in seen.values():  # no longer leaked
        ops.append(Op.delete(obs.key, obs.revision))
        report.forgotten += 1
    for i in range(0, len(ops), TXN_CHUNK):
        try:
            kv.txn(ops[i:i + TXN_CHUNK])
        except (Conflict, NotFound):
            pass  # another run wrote observations meanwhile: its view is as good as ours
    return report


def _release_one(kv: KeyValueStore, leak: Leak, obs: Record) -> bool:
    """Free one leaked ordinal if it still holds the same allocation. False if it changed."""
    bkey = keys.block_key(leak.block)
    hkey = keys.handle_key(leak.handle)
    for _ in range(RETRIES):
        rec = kv.get(bkey)
        if rec is None or blk.handle_at(rec.value, leak.ordinal) != leak.handle \
                or blk.allocation_sequence(rec.value, leak.ordinal) != leak.sequence:
            kv.txn([Op.delete(obs.key)])
            return False
        new = blk.unassign(rec.value, [leak.ordinal])
        if blk.is_empty(new) and blk.affinity_node(new) is None:
            ops = [Op.delete(bkey, rec.revision)]
        else:
            ops = [Op.update(bkey, new, rec.revision)]
        hrec = kv.get(hkey)
        if hrec is not None:
            counts = dict(hrec.value.get("blocks", {}))
            left = len(blk.ordinals_of(new, leak.handle))
            if left:
                counts[leak.block] = left
            else:
                counts.pop(leak.block, None)
            ops.append(Op.update(hkey, {**hrec.value, "blocks": counts}, hrec.revision) if counts
                       else Op.delete(hkey, hrec.revision))
        ops.append(Op.delete(obs.key))
        try:
            kv.txn(ops)
            return True
        except (Conflict, NotFound):
            continue
    raise TooManyConflicts(f"release of leaked {leak.address}: gave up after {RETRIES} conflicting attempts")
