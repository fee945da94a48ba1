"""The IPAM: hands out pod addresses from per-node blocks, as Calico's IPAM does.

Correctness rests on the store alone: every write that can race is a
compare-and-swap (Op.update on the revision read, Op.create for a new key),
retried a bounded number of times with jitter. An allocation is one transaction
that updates the block record and creates the handle record, so an address is
never given twice and a handle never holds two. Claiming a block is one
transaction too: create the block (expect missing: the loser of a race moves on
to the next candidate block), write the node's affinity, and record the first
allocation in it.

The instance keeps a small cache of each node's affine blocks (their records and
revisions), so the common case (the node already has a block with room) costs
one store list for the pool configuration and one transaction (plus a get of the
Pod and of its Namespace when the request names them). The cache only saves
reads: a stale record just loses its compare-and-swap and is read again.
An instance is for one thread, like a store connection.

Allocations for one node mostly write the same block, so concurrent ones would
mostly lose compare-and-swaps to each other. They are serialised instead: within
a process by a lock per (store, node), and across processes, if `lock_dir` is
given, by a file lock per node in it (as Calico's CNI plugin takes a host-wide
IPAM lock). The locks only avoid wasted work; correctness never depends on them.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from podnet.ipam import block as blk
from podnet.ipam import keys, metrics
from podnet.ipam.errors import AddressUnavailable, IPAMError, IPAMExhausted, NoPool, TooManyConflicts
from podnet.ipam.selection import (
    WORKLOAD,
    Snapshot,
    SnapshotReader,
    choose_pools,
    fixed_address,
    pool_for_fixed,
)
from podnet.model.objects import IPPool, Namespace, Node, Pod
from podnet.store.base import AlreadyExists, Conflict, KeyValueStore, NotFound, Op, Record
from podnet.store.objects import ObjectStore

RETRIES = 100
# Claiming probes candidate blocks one by one; after this many turn out taken,
# it lists the claimed blocks once instead.
PROBES_BEFORE_LIST = 24
BLOCK_CACHE_LIMIT = 20_000


@dataclass(frozen=True)
class Allocation:
    address: str
    prefix_len: int  # 32 (IPv4) or 128 (IPv6): a pod gets a host address, routed per block
    pool: str
    block: str
    handle: str


@dataclass(frozen=True)
class BlockInfo:
    cidr: str
    pool: str
    node: str | None  # the node the block is affine to, None if none
    encapsulation: str | None  # the pool's, None if the pool is gone
    used: int
    size: int


@dataclass(frozen=True)
class NodeRelease:
    deleted: list[str]  # empty blocks deleted together with their affinity
    unaffined: list[str]  # blocks still holding addresses: kept, affinity removed


class _Lost(Exception):
    """A compare-and-swap on a block lost: read again and retry."""


class _HandleTaken(Exception):
    """The handle record exists (or changed) under us: the handle may already hold an address."""


def _lazy(fn: Callable[[], Any]) -> Callable[[], Any]:
    done: list[Any] = []

    def get() -> Any:
        if not done:
            done.append(fn())
        return done[0]

    return get


@dataclass
class _Request:
    handle: str
    node: str
    secondary: dict[str, str]
    handle_rec: Record | None = None  # an existing handle record holding no address

    def handle_op(self, cidr: str) -> Op:
        key = keys.handle_key(self.handle)
        if self.handle_rec is None:
            return Op.create(key, {"blocks": {cidr: 1}})
        counts = dict(self.handle_rec.value.get("blocks", {}))
        counts[cidr] = counts.get(cidr, 0) + 1
        return Op.update(key, {"blocks": counts}, self.handle_rec.revision)


def _prefix_len(cidr: str) -> int:
    return blk.host_prefix_len(cidr)


@dataclass
class _Cache:
    """What the IPAM instances of one process remember about one store."""

    affine: dict[str, list[str]]  # node -> cidrs of its affine blocks
    blocks: dict[str, Record]  # cidr -> block record last seen
    last: dict[str, str]  # node -> the block its last allocation came from
    generations: dict[str, int]  # node -> lock file generation when this process last held it


_caches: dict[str, _Cache] = {}
_node_locks: dict[tuple[str, str], threading.Lock] = {}
_node_locks_guard = threading.Lock()


def _cache_for(url: str) -> _Cache:
    with _node_locks_guard:
        cache = _caches.get(url)
        if cache is None:
            cache = _caches[url] = _Cache({}, {}, {}, {})
        return cache


def _node_lock(url: str, node: str) -> threading.Lock:
    with _node_locks_guard:
        lock = _node_locks.get((url, node))
        if lock is None:
            lock = _node_locks[(url, node)] = threading.Lock()
        return lock


class IPAM:
    def __init__(self, kv: KeyValueStore, *, lock_dir: str | None = None):
        """lock_dir: a directory for per-node lock files shared by the IPAM users of one
        host (see the module doc); None: serialise only within this process."""
        self.kv = kv
        self.lock_dir = lock_dir
        self.objects = ObjectStore(kv)
        self._config = SnapshotReader(kv)
        # Shared by the instances of this process on the same store (so one thread's
        # allocation does not leave another's cache stale); a node's entries are
        # changed under that node's lock.
        cache = _cache_for(kv.url)
        self._affine = cache.affine
        self._blocks = cache.blocks
        self._last = cache.last
        self._generations = cache.generations
        self._rng = random.Random()
        self.conflicts = 0  # compare-and-swaps lost (and retried) by this instance

    # ------------------------------------------------------------ public API

    def allocate(
        self,
        handle: str,
        node: str,
        *,
        namespace: str | None = None,
        pod: str | None = None,
        pools: list[str] | None = None,
        address: str | None = None,
        use: str = WORKLOAD,
    ) -> Allocation:
        """One address for handle on node. Idempotent: a handle that holds an address gets it back.

        Without `pools` and `address`, the pod's annotations (podnet.io/ip-address,
        podnet.io/ippools), then its namespace's (podnet.io/ippools), then the pools'
        selectors decide (see selection.py). When either argument is given, the
        annotations are not consulted: `address` asks for that address (in an enabled
        pool; among `pools` if both are given), `pools` for those pools in that order.
        `use`: what the address is for; pools must allow it (Attachment: an additional
        network's address, podnet-ipam, from the named `pools` only).
        """
        started = time.monotonic()
        try:
            alloc = self._allocate(handle, node, namespace=namespace, pod=pod, pools=pools, address=address, use=use)
        except IPAMExhausted as e:
            metrics.FAILURES.labels("exhausted").inc()
            for pool in e.pools or [""]:
                metrics.EXHAUSTED.labels(pool).inc()
            raise
        except Exception as e:
            metrics.FAILURES.labels(_failure(e)).inc()
            raise
        metrics.ALLOCATIONS.labels(alloc.pool).inc()
        metrics.DURATION.observe(time.monotonic() - started)
        return alloc

    def _allocate(self, handle: str, node: str, *, namespace: str | None, pod: str | None,
                  pools: list[str] | None, address: str | None, use: str) -> Allocation:
        if not handle:
            raise IPAMError("allocate needs a handle")
        if not node:
            raise IPAMError("allocate needs a node name")
        if pod and not namespace:
            namespace = "default"
        snap = self._config.read()
        pod_obj = self.objects.get(Pod, pod, namespace) if pod else None
        secondary = {"node": node}
        if namespace:
            secondary["namespace"] = namespace
        if pod:
            secondary["pod"] = pod
        req = _Request(handle, node, secondary)

        explicit = pools is not None or address is not None
        fixed = fixed_address(address, None if explicit else pod_obj)
        if fixed is not None:
            with self._serialised(node):
                return self._allocate_fixed(req, snap, fixed, pools, use)
        choice = choose_pools(
            snap,
            node=node,
            explicit=pools,
            pod=None if explicit else pod_obj,
            namespace=_lazy(lambda: self.objects.get(Namespace, namespace) if namespace else None),
            namespace_name=namespace,
            node_labels=_lazy(lambda: self._node_labels(node)),
            use=use,
        )
        with self._serialised(node):
            return self._allocate_auto(req, snap, choice.pools)

    def release(self, handle: str) -> list[str]:
        """Free every address handle holds and delete its record. Returns them; [] if none."""
        hkey = keys.handle_key(handle)
        for attempt in range(RETRIES):
            hrec = self.kv.get(hkey)
            if hrec is None:
                return []
            ops: list[Op] = []
            freed: list[str] = []
            new_blocks: dict[str, tuple[Record, blk.Block | None]] = {}
            for cidr in hrec.value.get("blocks", {}):
                # A cached record that shows the handle saves a read: if it is stale, the
                # compare-and-swap fails and the retry reads afresh. One that does not show
                # it proves nothing (the allocation may be newer than the cache): read.
                rec = self._blocks.get(cidr) if attempt == 0 else None
                if rec is None or not blk.ordinals_of(rec.value, handle):
                    rec = self.kv.get(keys.block_key(cidr))
                if rec is None:
                    continue
                ords = blk.ordinals_of(rec.value, handle)
                if not ords:
                    continue
                new = blk.unassign(rec.value, ords)
                freed += [blk.address(cidr, o) for o in ords]
                if blk.is_empty(new) and blk.affinity_node(new) is None:
                    ops.append(Op.delete(rec.key, rec.revision))  # nobody's block and now empty
                    new_blocks[cidr] = (rec, None)
                else:
                    ops.append(Op.update(rec.key, new, rec.revision))
                    new_blocks[cidr] = (rec, new)
            ops.append(Op.delete(hkey, hrec.revision))
            try:
                rev = self.kv.txn(ops)
            except (Conflict, NotFound):
                for cidr in new_blocks:
                    self._blocks.pop(cidr, None)
                self._backoff(attempt)
                continue
            for cidr, (rec, new) in new_blocks.items():
                if new is None:
                    self._blocks.pop(cidr, None)
                else:
                    self._remember(Record(rec.key, new, rev, rec.create_revision))
            if freed:
                metrics.RELEASES.inc(len(freed))
            return freed
        raise TooManyConflicts(f"release of handle {handle}: gave up after {RETRIES} conflicting attempts")

    def lookup(self, handle: str) -> Allocation | None:
        """The address handle holds, if any."""
        return self._existing(handle)[0]

    def node_blocks(self, node: str) -> list[BlockInfo]:
        """Blocks affine to node (one route each)."""
        snap = self._config.read()
        out = []
        cidrs = self._load_affine(node)
        for cidr in list(cidrs):
            rec = self.kv.get(keys.block_key(cidr))
            if rec is None or blk.affinity_node(rec.value) != node:
                continue
            self._remember(rec)
            out.append(self._info(rec.value, snap))
        return sorted(out, key=lambda b: blk.network(b.cidr))

    def claim_block(self, node: str, *, pools: list[str] | None = None) -> BlockInfo:
        """Claim one more (empty) block for node, as a node agent does before its pods arrive.

        Pools: the given ones, else those whose selectors match the node (namespace
        selectors are not consulted). Honours maxBlocksPerHost; raises IPAMExhausted
        when no block can be claimed.
        """
        snap = self._config.read()
        choice = choose_pools(snap, node=node, explicit=pools, pod=None, namespace=lambda: None,
                              node_labels=_lazy(lambda: self._node_labels(node)))
        with self._serialised(node):
            return self._claim_block(node, snap, choice.pools)

    def _claim_block(self, node: str, snap: Snapshot, pools: Sequence[IPPool]) -> BlockInfo:
        names = [p.name for p in pools]
        cap = snap.max_blocks_per_host
        for attempt in range(RETRIES):
            owned = len(self._load_affine(node)) if cap else 0
            if cap and owned >= cap:
                raise IPAMExhausted(node, names, [f"maxBlocksPerHost={cap} reached (node {node} has {owned} blocks)"])
            try:
                for pool in pools:
                    got = self._claim_in_pool(node, snap, pool, None)
                    if got is not None:
                        return self._info(got[0].value, snap)
            except _Lost:
                self._backoff(attempt)
                continue
            raise IPAMExhausted(node, names, [_pool_full(p, snap) for p in pools])
        raise TooManyConflicts(f"claiming a block for node {node}: gave up after {RETRIES} conflicting attempts")

    def blocks(self) -> list[BlockInfo]:
        snap = self._config.read()
        records, _ = self.kv.list(keys.BLOCKS)
        return sorted((self._info(r.value, snap) for r in records), key=lambda b: blk.network(b.cidr))

    def borrowed_addresses(self, node: str) -> list[str]:
        """Addresses allocated for node in blocks not affine to it (routed one by one)."""
        records, _ = self.kv.list(keys.BLOCKS)
        out = []
        for r in records:
            if blk.affinity_node(r.value) == node:
                continue
            for o, attrs in blk.allocations(r.value):
                if attrs.get("secondary", {}).get("node") == node:
                    out.append(blk.address(r.value["cidr"], o))
        return sorted(out, key=ipaddress.ip_address)

    def release_node(self, node: str) -> NodeRelease:
        """Drop a removed node's affinities: empty blocks are deleted, the others kept without owner.

        Addresses still allocated in them stay until released (by handle, or as leaks).
        """
        with self._serialised(node):
            return self._release_node(node)

    def _release_node(self, node: str) -> NodeRelease:
        deleted: list[str] = []
        unaffined: list[str] = []
        affinities, _ = self.kv.list(keys.node_affinities(node))
        for aff in affinities:
            _, cidr = keys.parse_affinity_key(aff.key)
            bkey = keys.block_key(cidr)
            for attempt in range(RETRIES):
                rec = self.kv.get(bkey)
                if rec is None or blk.affinity_node(rec.value) != node:
                    ops = [Op.delete(aff.key)]  # dangling affinity: the block is gone or someone else's
                    outcome = None
                elif blk.is_empty(rec.value):
                    ops = [Op.delete(bkey, rec.revision), Op.delete(aff.key)]
                    outcome = deleted
                else:
                    ops = [Op.update(bkey, blk.with_affinity(rec.value, None), rec.revision), Op.delete(aff.key)]
                    outcome = unaffined
                try:
                    self.kv.txn(ops)
                except (Conflict, NotFound):
                    self._backoff(attempt)
                    continue
                if outcome is not None:
                    outcome.append(cidr)
                self._blocks.pop(cidr, None)
                break
            else:
                raise TooManyConflicts(f"release of node {node}: gave up on block {cidr} after {RETRIES} attempts")
        self._affine.pop(node, None)
        return NodeRelease(deleted, unaffined)

    # ------------------------------------------------------------ allocation paths

    def _allocate_auto(self, req: _Request, snap: Snapshot, pools: Sequence[IPPool]) -> Allocation:
        fresh = False  # whether the node's affinities were read from the store during this call
        for attempt in range(RETRIES):
            try:
                if req.node not in self._affine:
                    self._load_affine(req.node)
                    fresh = True
                got = self._from_affine(req, snap, pools)
                if got is not None:
                    return got
                if not fresh:
                    # The cache said "full": read the truth before claiming a new block.
                    self._load_affine(req.node, forget_blocks=True)
                    fresh = True
                    continue
                reasons: list[str] = []
                got = self._claim(req, snap, pools, reasons)
                if got is None:
                    got = self._borrow(req, snap, pools, reasons)
                if got is not None:
                    return got
                existing, _ = self._existing(req.handle)
                if existing is not None:
                    return existing
                raise IPAMExhausted(req.node, [p.name for p in pools], reasons)
            except _Lost:
                fresh = False
                self._backoff(attempt)
            except _HandleTaken:
                existing = self._after_handle_taken(req)
                if existing is not None:
                    return existing
        raise TooManyConflicts(
            f"allocation for handle {req.handle} on node {req.node}: gave up after {RETRIES} conflicting attempts"
        )

    def _from_affine(self, req: _Request, snap: Snapshot, pools: Sequence[IPPool]) -> Allocation | None:
        """Allocate from the node's affine blocks: the first pool in order that has room."""
        cidrs = self._affine[req.node]
        rank = {p.name: i for i, p in enumerate(pools)}
        # Fast path: the block the node's last allocation came from, if it is of the first pool.
        last = self._last.get(req.node)
        if last in cidrs:
            got = self._usable(req, snap, last, rank)
            if got is not None and got[0] == 0:
                return self._assign(req, snap, got[1], got[2])
        best: tuple[int, Record, int] | None = None  # (pool rank, record, ordinal)
        for cidr in list(cidrs):
            got = self._usable(req, snap, cidr, rank)
            if got is not None and (best is None or got[0] < best[0]):
                best = got
                if best[0] == 0:
                    break
        if best is None:
            return None
        return self._assign(req, snap, best[1], best[2])

    def _usable(self, req: _Request, snap: Snapshot, cidr: str,
                rank: dict[str, int]) -> tuple[int, Record, int] | None:
        """(pool rank, record, free ordinal) if affine block cidr can serve the request."""
        rec = self._block(cidr)
        if rec is None or blk.affinity_node(rec.value) != req.node:
            self._affine[req.node].remove(cidr)
            self._blocks.pop(cidr, None)
            return None
        if not rec.value["unallocated"]:
            return None  # full
        pool = snap.pool_of_block(rec.value)
        if pool is None or pool.name not in rank:
            return None
        ordinal = blk.first_free(rec.value, snap.reserved_in(cidr))
        return None if ordinal is None else (rank[pool.name], rec, ordinal)

    def _claim(self, req: _Request, snap: Snapshot, pools: Sequence[IPPool], reasons: list[str]) -> Allocation | None:
        cap = snap.max_blocks_per_host
        owned = len(self._affine.get(req.node, ()))
        if cap and owned >= cap:
            reasons.append(f"maxBlocksPerHost={cap} reached (node {req.node} has {owned} blocks, all full)")
            return None
        for pool in pools:
            got = self._claim_in_pool(req.node, snap, pool, req)
            if got is not None:
                rec, ordinal = got
                assert ordinal is not None
                return self._allocation(req, pool.name, rec.value["cidr"], ordinal)
            reasons.append(_pool_full(pool, snap))
        return None

    def _candidate_blocks(self, node: str, pool: IPPool) -> Any:
        """Every block of the pool once, in an order of the node's own (as Calico's random block
        generator seeded by host name): nodes start in different places, so claims rarely collide,
        and a node that comes back finds its old block first."""
        assert pool.spec.block_size is not None
        n = blk.block_count(pool.spec.cidr, pool.spec.block_size)
        start = zlib.crc32(node.encode()) % n
        step = (zlib.crc32(b"step:" + node.encode()) | 1) % n if n > 1 else 0
        for i in range(n):
            yield blk.nth_block(pool.spec.cidr, pool.spec.block_size, (start + i * step) % n)

    def _claim_in_pool(self, node: str, snap: Snapshot, pool: IPPool,
                       req: _Request | None) -> tuple[Record, int | None] | None:
        """Claim a free block of the pool for node (with req's address in it, if req is given)."""
        # First pass: probe candidates one get at a time, skipping blocks this process
        # already knows exist. Second pass (if the first found nothing, or too many
        # probes hit taken blocks): list the pool's blocks once and go by that.
        taken: set[str] = set()
        listed = False
        while True:
            misses = 0
            for cidr in self._candidate_blocks(node, pool):
                if cidr in taken or (not listed and cidr in self._blocks):
                    continue
                if len(snap.reserved_in(cidr)) >= blk.network(cidr).num_addresses:
                    continue  # wholly reserved
                if not listed and misses >= PROBES_BEFORE_LIST:
                    break
                if not listed and self.kv.get(keys.block_key(cidr)) is not None:
                    taken.add(cidr)
                    misses += 1
                    continue
                got = self._try_claim(node, snap, pool, cidr, req)
                if got is not None:
                    return got
                taken.add(cidr)
                misses += 1
            if listed:
                return None
            taken |= self._pool_blocks(pool)
            listed = True

    def _try_claim(self, node: str, snap: Snapshot, pool: IPPool, cidr: str,
                   req: _Request | None) -> tuple[Record, int | None] | None:
        """Create block cidr affine to node (holding req's address, if given). None if it exists."""
        bkey = keys.block_key(cidr)
        reserved = snap.reserved_in(cidr)
        value = blk.new_block(cidr, pool.name, node, reserved)
        ordinal = None
        ops = [Op.create(bkey, value),
               Op.put(keys.affinity_key(node, cidr), {"state": "confirmed", "pool": pool.name})]
        if req is not None:
            ordinal = blk.first_free(value, reserved)
            assert ordinal is not None
            value = blk.assign(value, ordinal, req.handle, req.secondary, reserved)
            ops = [Op.create(bkey, value), ops[1], req.handle_op(cidr)]
        try:
            rev = self.kv.txn(ops)
        except AlreadyExists as e:
            if e.key != bkey:
                raise _HandleTaken() from None
            # Lost the race. If a process on this same node won it, allocate from that block
            # rather than claim another one.
            if req is not None:
                rec = self.kv.get(bkey)
                if rec is not None and blk.affinity_node(rec.value) == node:
                    cidrs = self._affine.setdefault(node, [])
                    if cidr not in cidrs:
                        cidrs.append(cidr)
                    self._remember(rec)
                    raise _Lost() from None
            return None
        except (Conflict, NotFound) as e:
            if req is not None and e.key == keys.handle_key(req.handle):
                raise _HandleTaken() from None
            raise _Lost() from None
        cidrs = self._affine.setdefault(node, [])
        if cidr not in cidrs:
            cidrs.append(cidr)
        rec = Record(bkey, value, rev, rev)
        self._remember(rec)
        self._last[node] = cidr
        metrics.BLOCKS_CLAIMED.labels(pool.name).inc()
        return rec, ordinal

    def _borrow(self, req: _Request, snap: Snapshot, pools: Sequence[IPPool], reasons: list[str]) -> Allocation | None:
        names = ", ".join(p.name for p in pools)
        if snap.strict_affinity:
            reasons.append("strictAffinity forbids borrowing addresses from other nodes' blocks")
            return None
        records, _ = self.kv.list(keys.BLOCKS)
        for pool in pools:
            for rec in records:
                if snap.pool_of_block(rec.value) is not pool:
                    continue
                ordinal = blk.first_free(rec.value, snap.reserved_in(rec.value["cidr"]))
                if ordinal is not None:
                    return self._assign(req, snap, rec, ordinal)
        reasons.append(f"no free address to borrow in any block of IPPool {names}")
        return None

    def _allocate_fixed(self, req: _Request, snap: Snapshot, addr: str, pools: list[str] | None,
                        use: str = WORKLOAD) -> Allocation:
        existing, hrec = self._existing(req.handle)
        if existing is not None:
            return existing
        req.handle_rec = hrec
        pool = pool_for_fixed(snap, addr)
        if use not in pool.spec.allowed_uses and (use != WORKLOAD or pool.spec.for_attachments):
            raise AddressUnavailable(addr, f"its IPPool {pool.name} does not allow {use} use")
        if pools and pool.name not in pools:
            raise AddressUnavailable(addr, f"it is in IPPool {pool.name}, not in the requested {', '.join(pools)}")
        assert pool.spec.block_size is not None
        cidr = blk.block_containing(pool.spec.cidr, pool.spec.block_size, addr)
        ordinal = blk.ordinal(cidr, addr)
        bkey = keys.block_key(cidr)
        for attempt in range(RETRIES):
            try:
                rec = self.kv.get(bkey)
                if rec is not None:
                    holder = blk.handle_at(rec.value, ordinal)
                    if holder is not None:
                        if holder == req.handle:
                            return self._allocation(req, rec.value["pool"], cidr, ordinal)
                        raise AddressUnavailable(addr, f"it is in use by handle {holder}")
                    return self._assign(req, snap, rec, ordinal)
                # No block yet: claim it for the node (as Calico does), or for nobody when
                # the node already has maxBlocksPerHost blocks.
                cap = snap.max_blocks_per_host
                owner: str | None = req.node
                if cap and len(self._load_affine(req.node)) >= cap:
                    owner = None
                reserved = snap.reserved_in(cidr)
                value = blk.assign(blk.new_block(cidr, pool.name, owner, reserved), ordinal, req.handle,
                                   req.secondary, reserved)
                ops = [Op.create(bkey, value), req.handle_op(cidr)]
                if owner:
                    ops.append(Op.put(keys.affinity_key(owner, cidr), {"state": "confirmed", "pool": pool.name}))
                try:
                    rev = self.kv.txn(ops)
                except AlreadyExists as e:
                    if e.key != bkey:
                        raise _HandleTaken() from None
                    raise _Lost() from None
                except (Conflict, NotFound):
                    raise _HandleTaken() from None
                if owner:
                    self._affine.setdefault(owner, []).append(cidr)
                self._remember(Record(bkey, value, rev, rev))
                return self._allocation(req, pool.name, cidr, ordinal)
            except _Lost:
                self._backoff(attempt)
            except _HandleTaken:
                existing = self._after_handle_taken(req)
                if existing is not None:
                    return existing
        raise TooManyConflicts(f"allocation of {addr}: gave up after {RETRIES} conflicting attempts")

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _serialised(self, node: str) -> Iterator[None]:
        with _node_lock(self.kv.url, node):
            if self.lock_dir is None:
                yield
                return
            os.makedirs(self.lock_dir, exist_ok=True)
            fd = os.open(os.path.join(self.lock_dir, f"ipam-{quote(node, safe='')}.lock"),
                         os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # The file holds a generation every holder bumps: if another process
                # held the lock since we last did, our cache of the node's blocks is stale.
                raw = os.pread(fd, 8, 0)
                generation = int.from_bytes(raw, "little") if len(raw) == 8 else 0
                if self._generations.get(node) != generation:
                    self._forget_node(node)
                try:
                    yield
                finally:
                    os.pwrite(fd, (generation + 1).to_bytes(8, "little"), 0)
                    self._generations[node] = generation + 1
            finally:
                os.close(fd)  # closing drops the lock

    def _forget_node(self, node: str) -> None:
        """Drop the node's cached block records (another process changed them). The list of
        its blocks is kept: a block claimed meanwhile is found when the known ones look full."""
        for cidr in self._affine.get(node, ()):
            self._blocks.pop(cidr, None)

    def _assign(self, req: _Request, snap: Snapshot, rec: Record, ordinal: int) -> Allocation:
        """Compare-and-swap ordinal of the block to the handle, creating the handle record with it."""
        cidr = rec.value["cidr"]
        new = blk.assign(rec.value, ordinal, req.handle, req.secondary, snap.reserved_in(cidr))
        try:
            rev = self.kv.txn([Op.update(rec.key, new, rec.revision), req.handle_op(cidr)])
        except AlreadyExists as e:
            if e.key == keys.handle_key(req.handle):
                raise _HandleTaken() from None
            raise
        except (Conflict, NotFound) as e:
            if e.key == keys.handle_key(req.handle):
                raise _HandleTaken() from None
            self._blocks.pop(cidr, None)
            raise _Lost() from None
        self._remember(Record(rec.key, new, rev, rec.create_revision))
        if blk.affinity_node(new) == req.node:
            self._last[req.node] = cidr
        return self._allocation(req, rec.value["pool"], cidr, ordinal)

    def _allocation(self, req: _Request, pool: str, cidr: str, ordinal: int) -> Allocation:
        return Allocation(blk.address(cidr, ordinal), _prefix_len(cidr), pool, cidr, req.handle)

    def _after_handle_taken(self, req: _Request) -> Allocation | None:
        """Another writer took the handle meanwhile: its allocation if it has one (an ADD
        retried), else the handle record to build on in the next attempt."""
        existing, hrec = self._existing(req.handle)
        if existing is None:
            req.handle_rec = hrec
        return existing

    def _existing(self, handle: str) -> tuple[Allocation | None, Record | None]:
        """(the handle's allocation, its record): (None, None) when there is no record."""
        hrec = self.kv.get(keys.handle_key(handle))
        if hrec is None:
            return None, None
        for cidr in hrec.value.get("blocks", {}):
            rec = self.kv.get(keys.block_key(cidr))
            if rec is None:
                continue
            ords = blk.ordinals_of(rec.value, handle)
            if ords:
                return Allocation(blk.address(cidr, ords[0]), _prefix_len(cidr), rec.value["pool"], cidr, handle), hrec
        return None, hrec

    def _load_affine(self, node: str, forget_blocks: bool = False) -> list[str]:
        records, _ = self.kv.list(keys.node_affinities(node))
        cidrs = [keys.parse_affinity_key(r.key)[1] for r in records]
        if forget_blocks:
            for c in cidrs:
                self._blocks.pop(c, None)
        self._affine[node] = cidrs
        return cidrs

    def _block(self, cidr: str) -> Record | None:
        rec = self._blocks.get(cidr)
        if rec is None:
            rec = self.kv.get(keys.block_key(cidr))
            if rec is not None:
                self._remember(rec)
        return rec

    def _remember(self, rec: Record) -> None:
        if len(self._blocks) >= BLOCK_CACHE_LIMIT:
            self._blocks.clear()
        self._blocks[rec.value["cidr"]] = rec

    def _pool_blocks(self, pool: IPPool) -> set[str]:
        """CIDRs of the pool's blocks that some node holds, from the (small) affinity records.

        Only a hint for choosing candidates: a block with no owner is not listed, and
        creating it then fails (it exists), which the claim handles like any lost race.
        """
        net = blk.network(pool.spec.cidr)
        records, _ = self.kv.list(keys.AFFINITIES)
        out = set()
        for r in records:
            cidr = keys.parse_affinity_key(r.key)[1]
            if blk.network(cidr).subnet_of(net):  # type: ignore[arg-type]
                out.add(cidr)
        return out

    def _node_labels(self, node: str) -> dict[str, str]:
        obj = self.objects.get(Node, node)
        return dict(obj.labels) if obj is not None else {}

    def _info(self, value: blk.Block, snap: Snapshot) -> BlockInfo:
        pool = snap.pool_of_block(value)
        return BlockInfo(
            cidr=value["cidr"],
            pool=value.get("pool", ""),
            node=blk.affinity_node(value),
            encapsulation=pool.spec.encapsulation if pool else None,
            used=blk.used(value),
            size=blk.size(value),
        )

    def capacity_problem(self, node: str) -> str | None:
        """Why node cannot get an address for a new pod, or None if it can: what CNI STATUS
        reports (code 50) so that the runtime stops sending ADDs that must fail. Reads the
        node's own blocks first, and the pools' blocks only when those are full."""
        snap = self._config.read()
        try:
            pools = choose_pools(snap, node=node, explicit=None, pod=None, namespace=lambda: None,
                                 node_labels=lambda: self._node_labels(node)).pools
        except NoPool as e:
            return str(e)
        chosen = {p.name for p in pools}

        def has_room(value: blk.Block) -> bool:
            pool = snap.pool_of_block(value)
            return (pool is not None and pool.name in chosen
                    and blk.first_free(value, snap.reserved_in(value["cidr"])) is not None)

        affine = self._load_affine(node)
        for cidr in affine:
            rec = self.kv.get(keys.block_key(cidr))
            if rec is not None and has_room(rec.value):
                return None
        records, _ = self.kv.list(keys.BLOCKS)
        reasons = []
        cap = snap.max_blocks_per_host
        if cap and len(affine) >= cap:
            reasons.append(f"maxBlocksPerHost={cap} reached (node {node} has {len(affine)} blocks, all full)")
        else:
            existing = {r.value["cidr"] for r in records}
            for pool in pools:
                assert pool.spec.block_size is not None
                for cidr in self._candidate_blocks(node, pool):
                    if cidr not in existing and len(snap.reserved_in(cidr)) < blk.network(cidr).num_addresses:
                        return None
                reasons.append(_pool_full(pool, snap))
        if snap.strict_affinity:
            reasons.append("strictAffinity forbids borrowing addresses from other nodes' blocks")
        elif any(has_room(r.value) for r in records):
            return None
        else:
            reasons.append(f"no free address to borrow in any block of IPPool {', '.join(sorted(chosen))}")
        return str(IPAMExhausted(node, [p.name for p in pools], reasons))

    def _backoff(self, attempt: int) -> None:
        self.conflicts += 1
        metrics.CONFLICTS.inc()
        time.sleep(self._rng.uniform(0, min(0.001 * (attempt + 1), 0.05)))


def _failure(e: Exception) -> str:
    """The reason label of a failed allocation (podnet_ipam_allocation_failures_total)."""
    if isinstance(e, TooManyConflicts):
        return "conflicts"
    if isinstance(e, AddressUnavailable):
        return "unavailable"
    if isinstance(e, NoPool):
        return "no_pool"
    return "error"


def _pool_full(pool: IPPool, snap: Snapshot) -> str:
    """Why a pool has no block left to claim, naming the IPReservations that hold part of it."""
    held = snap.reservations_in(pool.spec.cidr)
    if not held:
        return f"IPPool {pool.name} ({pool.spec.cidr}) is full: every block is claimed"
    kinds = "IPReservation" if len(held) == 1 else "IPReservations"
    return (f"IPPool {pool.name} ({pool.spec.cidr}) is full: every block is claimed or reserved, and "
            f"{kinds} {', '.join(held)} hold addresses of it")
