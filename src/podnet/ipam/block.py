"""One allocation block: the JSON record stored per block, and its ordinal math.

Every function here is pure: it takes a block record (a dict, as stored) and returns
a new one, never changing its argument, so a caller can retry a lost
compare-and-swap from the record it read.

Record fields (Calico's AllocationBlock):
  cidr          the block, e.g. "10.0.0.64/26"
  pool          name of the IPPool it was carved from
  affinity      "host:<node>" or None (a block with no owner)
  allocations   ordinal -> index into attributes, or None when free
  unallocated   free ordinals as a FIFO: taken from the front, freed ones appended,
                so the address that has been free longest is reused first
  attributes    [{handle_id, secondary: {namespace, pod, node}}]
  sequenceNumber               bumped on every change
  sequenceNumberForAllocation  {ordinal: sequenceNumber when it was allocated};
                               tells a reused ordinal from the same allocation
  reserved      ordinals covered by an IPReservation when the block was last
                written (informational: allocation checks the current reservations)
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Block = dict[str, Any]


@lru_cache(maxsize=65536)
def network(cidr: str) -> Network:
    return ipaddress.ip_network(cidr)


def key_name(cidr: str) -> str:
    """The block's name inside store keys: '/' is not allowed there, so 10.0.0.0/26 -> 10.0.0.0-26."""
    return cidr.replace("/", "-")


def cidr_of_key_name(name: str) -> str:
    base, _, prefix = name.rpartition("-")
    return f"{base}/{prefix}"


def host_prefix_len(cidr: str) -> int:
    return network(cidr).max_prefixlen


def address(cidr: str, ordinal: int) -> str:
    net = network(cidr)
    if not 0 <= ordinal < net.num_addresses:
        raise ValueError(f"ordinal {ordinal} is outside block {cidr}")
    return str(net.network_address + ordinal)


def ordinal(cidr: str, addr: str) -> int:
    net = network(cidr)
    ip = ipaddress.ip_address(addr)
    if ip not in net:
        raise ValueError(f"{addr} is not in block {cidr}")
    return int(ip) - int(net.network_address)


def block_containing(pool_cidr: str, block_size: int, addr: str) -> str:
    """The CIDR of the block of size /block_size in the pool that holds addr."""
    ip = ipaddress.ip_address(addr)
    return str(ipaddress.ip_network(f"{ip}/{block_size}", strict=False))


def nth_block(pool_cidr: str, block_size: int, index: int) -> str:
    pool = network(pool_cidr)
    step = 1 << (pool.max_prefixlen - block_size)
    return f"{pool.network_address + index * step}/{block_size}"


def block_count(pool_cidr: str, block_size: int) -> int:
    return 1 << (block_size - network(pool_cidr).prefixlen)


def reserved_ordinals(cidr: str, reservations: Sequence[Network]) -> frozenset[int]:
    """Ordinals of the block covered by any of the reserved networks."""
    net = network(cidr)
    out: set[int] = set()
    base = int(net.network_address)
    top = int(net.broadcast_address)
    for r in reservations:
        if r.version != net.version:
            continue
        lo = max(base, int(r.network_address))
        hi = min(top, int(r.broadcast_address))
        if lo <= hi:
            out.update(range(lo - base, hi - base + 1))
    return frozenset(out)


def new_block(cidr: str, pool: str, node: str | None, reserved: Iterable[int] = ()) -> Block:
    """A fresh, empty block. Reserved ordinals go to the back of the free list."""
    size = network(cidr).num_addresses
    held = sorted(set(reserved))
    held_set = set(held)
    return {
        "cidr": cidr,
        "pool": pool,
        "affinity": f"host:{node}" if node else None,
        "allocations": [None] * size,
        "unallocated": [o for o in range(size) if o not in held_set] + held,
        "attributes": [],
        "sequenceNumber": 0,
        "sequenceNumberForAllocation": {},
        "reserved": held,
    }


def affinity_node(block: Block) -> str | None:
    aff = block.get("affinity")
    if aff and aff.startswith("host:"):
        return aff[len("host:"):]
    return None


def size(block: Block) -> int:
    return len(block["allocations"])


def used(block: Block) -> int:
    return sum(1 for a in block["allocations"] if a is not None)


def is_empty(block: Block) -> bool:
    return all(a is None for a in block["allocations"])


def free_count(block: Block, reserved: frozenset[int] = frozenset()) -> int:
    if not reserved:
        return len(block["unallocated"])
    return sum(1 for o in block["unallocated"] if o not in reserved)


def first_free(block: Block, reserved: frozenset[int] = frozenset()) -> int | None:
    """The free ordinal that has been free longest and is not reserved, or None if full."""
    for o in block["unallocated"]:
        if o not in reserved:
            return o
    return None


def is_free(block: Block, ordinal_: int) -> bool:
    return block["allocations"][ordinal_] is None


def attributes_at(block: Block, ordinal_: int) -> dict[str, Any] | None:
    idx = block["allocations"][ordinal_]
    return None if idx is None else block["attributes"][idx]


def handle_at(block: Block, ordinal_: int) -> str | None:
    attrs = attributes_at(block, ordinal_)
    return None if attrs is None else attrs.get("handle_id")


def allocation_sequence(block: Block, ordinal_: int) -> int | None:
    return block.get("sequenceNumberForAllocation", {}).get(str(ordinal_))


def ordinals_of(block: Block, handle: str) -> list[int]:
    idxs = {i for i, a in enumerate(block["attributes"]) if a.get("handle_id") == handle}
    if not idxs:
        return []
    return [o for o, a in enumerate(block["allocations"]) if a in idxs]


def allocations(block: Block) -> Iterable[tuple[int, dict[str, Any]]]:
    """(ordinal, attributes) for every allocated ordinal."""
    attrs = block["attributes"]
    for o, a in enumerate(block["allocations"]):
        if a is not None:
            yield o, attrs[a]


def _bump(block: Block) -> int:
    block["sequenceNumber"] = block.get("sequenceNumber", 0) + 1
    return block["sequenceNumber"]


def assign(block: Block, ordinal_: int, handle: str, secondary: dict[str, str],
           reserved: Iterable[int] | None = None) -> Block:
    """A copy of block with ordinal_ allocated to handle. Raises ValueError if it is taken."""
    if block["allocations"][ordinal_] is not None:
        raise ValueError(f"{address(block['cidr'], ordinal_)} is already allocated")
    new = copy.copy(block)
    new["allocations"] = list(block["allocations"])
    new["unallocated"] = [o for o in block["unallocated"] if o != ordinal_]
    new["attributes"] = list(block["attributes"])
    new["attributes"].append({"handle_id": handle, "secondary": dict(secondary)})
    new["allocations"][ordinal_] = len(new["attributes"]) - 1
    seq = _bump(new)
    new["sequenceNumberForAllocation"] = {**block.get("sequenceNumberForAllocation", {}), str(ordinal_): seq}
    if reserved is not None:
        new["reserved"] = sorted(reserved)
    return new


def unassign(block: Block, ordinals: Iterable[int]) -> Block:
    """A copy of block with the given ordinals freed (appended to the free FIFO).

    Attributes no longer referenced are dropped and the rest renumbered.
    """
    drop = {o for o in ordinals if block["allocations"][o] is not None}
    new = copy.copy(block)
    allocs = list(block["allocations"])
    for o in sorted(drop):
        allocs[o] = None
    # Compact attributes: keep the referenced ones, in order.
    referenced = sorted({a for a in allocs if a is not None})
    remap = {old: i for i, old in enumerate(referenced)}
    new["attributes"] = [block["attributes"][i] for i in referenced]
    new["allocations"] = [None if a is None else remap[a] for a in allocs]
    new["unallocated"] = list(block["unallocated"]) + sorted(drop)
    seqs = dict(block.get("sequenceNumberForAllocation", {}))
    for o in drop:
        seqs.pop(str(o), None)
    new["sequenceNumberForAllocation"] = seqs
    _bump(new)
    return new


def with_affinity(block: Block, node: str | None) -> Block:
    new = copy.copy(block)
    new["affinity"] = f"host:{node}" if node else None
    _bump(new)
    return new


def check_consistent(block: Block) -> list[str]:
    """Problems with a record's internal bookkeeping (used by tests and audit)."""
    problems = []
    n = size(block)
    allocated = {o for o, a in enumerate(block["allocations"]) if a is not None}
    free = block["unallocated"]
    if len(free) != len(set(free)):
        problems.append("unallocated lists an ordinal twice")
    if set(free) & allocated:
        problems.append("an ordinal is both allocated and free")
    if set(free) | allocated != set(range(n)):
        problems.append("some ordinals are neither allocated nor free")
    for a in block["allocations"]:
        if a is not None and not 0 <= a < len(block["attributes"]):
            problems.append(f"allocation points at missing attribute {a}")
    return problems
