"""What the agent reads from the store to route: nodes, pools, IPAM blocks.

Pure conversion from stored records to routing inputs, so it is tested without
a kernel or a store.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from podnet.dataplane.nat import NatConfig
from podnet.dataplane.routing import BlockOwner, Borrowed
from podnet.model.objects import IPPool, Node


@dataclass(frozen=True)
class RoutingInputs:
    blocks: list[BlockOwner]
    borrowed: list[Borrowed]
    node_ips: dict[str, str]
    vxlan_in_use: bool
    nat: NatConfig


def owner_of(affinity: str | None) -> str | None:
    return affinity[len("host:"):] if affinity and affinity.startswith("host:") else None


class BlockRecord(NamedTuple):
    """What routing needs of an IPAM block (a few strings instead of the block's
    allocation lists): its CIDR, pool, owner, and the addresses other nodes borrowed."""

    cidr: str
    pool: str | None
    owner: str | None
    borrowed: tuple[tuple[int, str], ...]  # (ordinal, node) of addresses allocated to another node


def compact_block(block: dict) -> BlockRecord:
    owner = owner_of(block.get("affinity"))
    attrs = block.get("attributes") or []
    borrowed = []
    for ordinal, attr_index in enumerate(block.get("allocations") or []):
        if attr_index is None or attr_index >= len(attrs):
            continue
        node = ((attrs[attr_index] or {}).get("secondary") or {}).get("node")
        if node and node != owner:
            borrowed.append((ordinal, node))
    return BlockRecord(block["cidr"], block.get("pool"), owner, tuple(borrowed))


class PoolIndex:
    """Which pool a block belongs to: by the name it records, else by address."""

    def __init__(self, pools: list[IPPool]):
        self.pools = pools
        self.by_name = {p.name: p for p in pools}
        self.nets = [(ipaddress.ip_network(p.spec.cidr), p) for p in pools]

    def pool_of(self, block: BlockRecord) -> IPPool | None:
        named = self.by_name.get(block.pool or "")
        if named is not None:
            return named
        net = ipaddress.ip_network(block.cidr)
        return next((p for n, p in self.nets if net.version == n.version and net.subnet_of(n)), None)


def block_routing(block: BlockRecord, pools: PoolIndex) -> tuple[BlockOwner | None, list[Borrowed]]:
    """One block's share of the routing inputs: its owner, and the addresses other
    nodes borrowed from it. (None, []) for a block of a deleted pool: its routes go
    with the pool, and for a block of an Attachment pool: the underlay routes those."""
    pool = pools.pool_of(block)
    if pool is None or pool.spec.for_attachments:
        return None, []
    encap = pool.spec.encapsulation
    borrowed: list[Borrowed] = []
    if block.borrowed:
        base = ipaddress.ip_network(block.cidr).network_address
        borrowed = [Borrowed(str(base + ordinal), node, encap) for ordinal, node in block.borrowed]
    return BlockOwner(block.cidr, block.owner, encap), borrowed


def node_addresses(nodes: list[Node]) -> dict[str, str]:
    return {n.name: ip for n in nodes if (ip := n.internal_ip)}


def nat_config(pools: list[IPPool]) -> NatConfig:
    return NatConfig(
        nat_pools=tuple(sorted(p.spec.cidr for p in pools if p.spec.nat_outgoing)),
        all_pools=tuple(sorted(p.spec.cidr for p in pools)),
    )


def vxlan_in_use(pools: list[IPPool]) -> bool:
    # Disabled pools count too: their blocks keep routing until their pods are gone.
    return any(p.spec.encapsulation == "VXLAN" for p in pools)


def routing_inputs(blocks: list[dict], pools: list[IPPool], nodes: list[Node]) -> RoutingInputs:
    index = PoolIndex(pools)
    owners: list[BlockOwner] = []
    borrowed: list[Borrowed] = []
    for b in blocks:
        owner, lent = block_routing(compact_block(b), index)
        if owner is not None:
            owners.append(owner)
            borrowed += lent
    return RoutingInputs(owners, borrowed, node_addresses(nodes), vxlan_in_use(pools), nat_config(pools))
