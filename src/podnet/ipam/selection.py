"""Which pools an allocation may use, and the IPAM configuration it is decided from.

Pools, reservations and the IPAMConfig are read together with one store list
(their keys share the prefix /podnet/objects/IP), and decoded objects are kept
per (key, revision), so a read is always fresh but only changed objects are
decoded again. A stored object that does not decode is logged and left out.

Selection, for one request:
  1. explicit pools (the `pools` argument) if given, else
  2. the pod annotation podnet.io/ippools, else
  3. the namespace annotation podnet.io/ippools: any of these name the pools to
     use, in order, bypassing the selectors; each must exist, be enabled and
     allow Workload use, or the request fails naming the pool.
  4. otherwise every pool that is enabled, allows Workload use, and whose
     nodeSelector matches the Node's labels and namespaceSelector the Namespace's
     labels; IPv4 pools first, then by name (a request gets one address: the
     first of these pools with room gives it).

A Node or Namespace with no stored object has no labels (so only pools without a
selector, or whose selector matches empty labels, select it): allocation does
not require the objects to exist.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from podnet.ipam import block as blk
from podnet.ipam.errors import AddressUnavailable, NoPool
from podnet.model.objects import IPAMConfig, IPPool, IPReservation, Namespace, Pod
from podnet.store.base import KeyValueStore
from podnet.store.objects import OBJECTS_PREFIX, UndecodableObject, decode_or_report

ANNOTATION_POOLS = "podnet.io/ippools"
ANNOTATION_ADDRESS = "podnet.io/ip-address"
IPAM_CONFIG_NAME = "default"
WORKLOAD = "Workload"

# IPPool/, IPReservation/ and IPAMConfig/ all start with this.
CONFIG_PREFIX = OBJECTS_PREFIX + "IP"


@dataclass
class Snapshot:
    pools: list[IPPool]  # sorted by name
    reservations: tuple[blk.Network, ...]
    strict_affinity: bool = False
    reserved_by: tuple[tuple[str, blk.Network], ...] = ()  # (IPReservation name, CIDR) for messages
    max_blocks_per_host: int = 0
    _reserved_cache: dict[str, frozenset[int]] = field(default_factory=dict, repr=False)
    _pool_cache: dict[tuple[str, str], IPPool | None] = field(default_factory=dict, repr=False)

    def pool(self, name: str) -> IPPool | None:
        for p in self.pools:
            if p.name == name:
                return p
        return None

    def reserved_in(self, cidr: str) -> frozenset[int]:
        """Ordinals of block cidr that reservations cover (cached for this snapshot)."""
        got = self._reserved_cache.get(cidr)
        if got is None:
            got = blk.reserved_ordinals(cidr, self.reservations) if self.reservations else frozenset()
            self._reserved_cache[cidr] = got
        return got

    def reservations_in(self, cidr: str) -> list[str]:
        """Names of the IPReservations that hold addresses of cidr (a pool's or a block's)."""
        net = blk.network(cidr)
        return sorted({name for name, r in self.reserved_by if r.overlaps(net)})  # type: ignore[arg-type]

    def is_reserved(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip in r for r in self.reservations)

    def pool_containing(self, addr: str) -> IPPool | None:
        """The pool whose CIDR holds addr (an enabled one first)."""
        ip = ipaddress.ip_address(addr)
        hits = [p for p in self.pools if ip in blk.network(p.spec.cidr)]
        hits.sort(key=lambda p: p.spec.disabled)
        return hits[0] if hits else None

    def pool_of_block(self, block: blk.Block) -> IPPool | None:
        """The block's pool, if it still exists and still contains the block."""
        key = (block["cidr"], block.get("pool", ""))
        if key in self._pool_cache:
            return self._pool_cache[key]
        pool = self.pool(key[1])
        if pool is not None and not blk.network(key[0]).subnet_of(blk.network(pool.spec.cidr)):  # type: ignore[arg-type]
            pool = None
        self._pool_cache[key] = pool
        return pool


class SnapshotReader:
    """Reads Snapshots from a store, decoding only objects whose revision changed."""

    def __init__(self, kv: KeyValueStore):
        self.kv = kv
        self._signature: tuple[tuple[str, int], ...] | None = None
        self._snapshot: Snapshot | None = None
        self._decoded: dict[str, tuple[int, object]] = {}

    def read(self) -> Snapshot:
        records, _ = self.kv.list(CONFIG_PREFIX)
        signature = tuple((r.key, r.revision) for r in records)
        if signature == self._signature and self._snapshot is not None:
            return self._snapshot
        decoded: dict[str, tuple[int, object]] = {}
        for r in records:
            hit = self._decoded.get(r.key)
            decoded[r.key] = hit if hit and hit[0] == r.revision else (r.revision, decode_or_report(r))
        self._decoded = decoded
        objs = [o for _, o in decoded.values() if not isinstance(o, UndecodableObject)]
        pools = sorted((o for o in objs if isinstance(o, IPPool)), key=lambda p: p.name)
        reserved_by = tuple(
            (o.name, blk.network(c)) for o in objs if isinstance(o, IPReservation) for c in o.spec.reserved_cidrs
        )
        reservations = tuple(r for _, r in reserved_by)
        config = next((o for o in objs if isinstance(o, IPAMConfig) and o.name == IPAM_CONFIG_NAME), None)
        snap = Snapshot(
            pools=pools,
            reservations=reservations,
            reserved_by=reserved_by,
            strict_affinity=bool(config and config.spec.strict_affinity),
            max_blocks_per_host=config.spec.max_blocks_per_host if config else 0,
        )
        self._signature, self._snapshot = signature, snap
        return snap


@dataclass(frozen=True)
class PoolChoice:
    pools: list[IPPool]
    source: str  # how they were chosen, for messages


def parse_pool_list(value: str, where: str) -> list[str]:
    """A JSON list of pool names (as Calico's cni.projectcalico.org/ipv4pools)."""
    try:
        names = json.loads(value)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise NoPool(f"{where}: annotation {ANNOTATION_POOLS} must be a JSON list of IPPool names, "
                     f"e.g. [\"pool-a\"], got {value!r}")
    return names


def _named_pools(snap: Snapshot, names: Sequence[str], source: str, use: str = WORKLOAD) -> list[IPPool]:
    out = []
    for name in names:
        pool = snap.pool(name)
        if pool is None:
            raise NoPool(f"IPPool {name} (from {source}) does not exist")
        if pool.spec.disabled:
            raise NoPool(f"IPPool {name} (from {source}) is disabled")
        if use not in pool.spec.allowed_uses:
            raise NoPool(f"IPPool {name} (from {source}) does not allow {use} use")
        if pool not in out:
            out.append(pool)
    return out


def selects(pool: IPPool, node_labels: Callable[[], dict[str, str]],
            namespace_labels: Callable[[], dict[str, str]]) -> bool:
    spec = pool.spec
    if spec.node_selector is not None and not spec.node_selector.is_empty():
        if not spec.node_selector.matches(node_labels()):
            return False
    if spec.namespace_selector is not None and not spec.namespace_selector.is_empty():
        if not spec.namespace_selector.matches(namespace_labels()):
            return False
    return True


def choose_pools(
    snap: Snapshot,
    *,
    node: str,
    explicit: Sequence[str] | None,
    pod: Pod | None,
    namespace: Callable[[], Namespace | None],
    node_labels: Callable[[], dict[str, str]],
    namespace_name: str | None = None,
    use: str = WORKLOAD,
) -> PoolChoice:
    """The pools to allocate from, in order of preference (see module doc). `use` other than
    Workload (Attachment: podnet-ipam) needs explicit pools that allow it."""
    if explicit:
        return PoolChoice(_named_pools(snap, explicit, "the request", use), "the request")
    if use != WORKLOAD:
        raise NoPool(f"an allocation for {use} use must name its IPPools")
    if pod is not None and ANNOTATION_POOLS in pod.metadata.annotations:
        where = f"pod {pod.namespace}/{pod.name}"
        names = parse_pool_list(pod.metadata.annotations[ANNOTATION_POOLS], where)
        return PoolChoice(_named_pools(snap, names, f"{where} annotation {ANNOTATION_POOLS}"), where)
    ns = namespace() if namespace_name else None
    if ns is not None and ANNOTATION_POOLS in ns.metadata.annotations:
        where = f"namespace {ns.name}"
        names = parse_pool_list(ns.metadata.annotations[ANNOTATION_POOLS], where)
        return PoolChoice(_named_pools(snap, names, f"{where} annotation {ANNOTATION_POOLS}"), where)
    ns_labels = (lambda: dict(ns.labels)) if ns is not None else (lambda: {})
    chosen = [
        p for p in snap.pools
        if not p.spec.disabled and WORKLOAD in p.spec.allowed_uses and selects(p, node_labels, ns_labels)
    ]
    chosen.sort(key=lambda p: blk.network(p.spec.cidr).version)  # IPv4 first, then by name
    if not chosen:
        usable = [p.name for p in snap.pools if not p.spec.disabled and WORKLOAD in p.spec.allowed_uses]
        if not usable:
            raise NoPool("no enabled IPPool allows Workload use: create an IPPool first")
        who = f"node {node}" + (f" and namespace {namespace_name}" if namespace_name else "")
        raise NoPool(f"no IPPool selects {who} (enabled Workload pools: {', '.join(usable)}; "
                     f"check their nodeSelector/namespaceSelector)")
    return PoolChoice(chosen, "selectors")


def fixed_address(explicit: str | None, pod: Pod | None) -> str | None:
    """The one address asked for: the `address` argument, else the pod annotation podnet.io/ip-address."""
    value = explicit
    source = "the request"
    if value is None and pod is not None:
        value = pod.metadata.annotations.get(ANNOTATION_ADDRESS)
        source = f"pod {pod.namespace}/{pod.name} annotation {ANNOTATION_ADDRESS}"
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise AddressUnavailable(value, f"not an IP address (from {source})") from None


def pool_for_fixed(snap: Snapshot, addr: str) -> IPPool:
    pool = snap.pool_containing(addr)
    if pool is None:
        raise AddressUnavailable(addr, "it is not in any IPPool")
    if pool.spec.disabled:
        raise AddressUnavailable(addr, f"its IPPool {pool.name} is disabled")
    if snap.is_reserved(addr):
        raise AddressUnavailable(addr, "it is reserved by an IPReservation")
    return pool
