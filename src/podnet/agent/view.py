"""What the agent reads from the store to route: nodes, pools, IPAM blocks.

Pure conversion from stored records to routing inputs, so it is tested without
a kernel or a store.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

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


def routing_inputs(blocks: list[dict], pools: list[IPPool], nodes: list[Node]) -> RoutingInputs:
    pool_nets = [(ipaddress.ip_network(p.spec.cidr), p) for p in pools]

    def pool_of(block: dict) -> IPPool | None:
        named = [p for _, p in pool_nets if p.name == block.get("pool")]
        if named:
            return named[0]
        net = ipaddress.ip_network(block["cidr"])
        return next((p for n, p in pool_nets if net.version == n.version and net.subnet_of(n)), None)

    owners: list[BlockOwner] = []
    borrowed: list[Borrowed] = []
    for b in blocks:
        pool = pool_of(b)
        if pool is None:
            continue  # a block of a deleted pool: routes go with the pool
        encap = pool.spec.encapsulation
        owner = owner_of(b.get("affinity"))
        owners.append(BlockOwner(b["cidr"], owner, encap))
        base = ipaddress.ip_network(b["cidr"]).network_address
        attrs = b.get("attributes") or []
        for ordinal, attr_index in enumerate(b.get("allocations") or []):
            if attr_index is None or attr_index >= len(attrs):
                continue
            node = ((attrs[attr_index] or {}).get("secondary") or {}).get("node")
            if node and node != owner:
                borrowed.append(Borrowed(str(base + ordinal), node, encap))

    node_ips = {n.name: ip for n in nodes if (ip := n.internal_ip)}
    # Disabled pools count too: their blocks keep routing until their pods are gone.
    vxlan = any(p.spec.encapsulation == "VXLAN" for p in pools)
    nat = NatConfig(
        nat_pools=tuple(sorted(p.spec.cidr for p in pools if p.spec.nat_outgoing)),
        all_pools=tuple(sorted(p.spec.cidr for p in pools)),
    )
    return RoutingInputs(owners, borrowed, node_ips, vxlan, nat)
