"""Cross-node routing as a pure function: which routes, VTEP neighbours and FDB
entries a node should have, given every block's owner and pool.

One route per remote block (not per pod), as Calico does:
- VXLAN pools: `<block> via <remote node IP> dev pn-vxlan onlink`, with a permanent
  neighbour entry (remote node IP -> remote VTEP MAC) and an FDB entry (remote
  VTEP MAC -> remote node IP) on the VXLAN device. The gateway is the remote
  node's underlay address, so no tunnel addresses need allocating.
- direct pools (encapsulation None): `<block> via <remote node IP>` over the
  underlay; nodes must share an L2 segment.
- the node's own blocks: a blackhole route, so unallocated addresses of its
  blocks are dropped here instead of following the default route.
- addresses a node borrowed from another node's block: a /32 towards the
  borrower, more specific than the owner's block route.
- on a node that runs BGP (`bgp`), direct pools are BGP's: BIRD installs the routes
  towards other nodes' blocks and borrowed addresses (podnet.bgp); only VXLAN routes
  and the node's own blackholes are left here.

Every route towards another node carries `src <this node's address>` (prefsrc).
Without it the kernel picks the source of traffic the node itself sends to a remote
pod (kubelet probes, hostNetwork pods) from the outgoing device, and `pn-vxlan` has
no address: the choice then falls back to the first address of the namespace, on
`lo`, where the node-local DNS addresses live (169.254.20.10 is on every node, so
the answer never comes back). The node's underlay address is what kube-proxy users
expect backends to see, it exists on every routing mode (VXLAN, direct, BGP) and it
needs no tunnel addresses allocated; see docs/architecture.md ("Node-originated
traffic").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

VXLAN_IFNAME = "pn-vxlan"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
RTPROT_PODNET = 88  # routing protocol id marking cross-node routes podnet owns
RTPROT_PODNET_POD = 89  # ... and local pod /32 routes

Encapsulation = Literal["None", "VXLAN"]


def vtep_mac(node: str) -> str:
    """A stable, locally administered unicast MAC per node: every node computes
    every other node's VTEP MAC the same way, so nothing needs publishing."""
    h = hashlib.sha256(node.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))


@dataclass(frozen=True)
class BlockOwner:
    cidr: str
    node: str | None  # affinity; None for a block with no owner
    encapsulation: Encapsulation


@dataclass(frozen=True)
class Borrowed:
    address: str  # a single address allocated to `node` from a block it does not own
    node: str
    encapsulation: Encapsulation


@dataclass(frozen=True, order=True)
class Route:
    dst: str  # CIDR
    kind: Literal["blackhole", "vxlan", "direct"]
    gateway: str | None = None
    src: str | None = None  # prefsrc: the source of traffic this node sends along the route


@dataclass(frozen=True)
class DesiredRouting:
    routes: frozenset[Route]
    vteps: frozenset[tuple[str, str]]  # (remote node IP, remote VTEP MAC)
    vxlan: bool  # whether this node needs its VXLAN device


def desired_routing(
    local_node: str,
    blocks: list[BlockOwner],
    borrowed: list[Borrowed],
    node_ips: dict[str, str],
    vxlan_in_use: bool,
    local_ip: str | None = None,
    bgp: bool = False,
) -> DesiredRouting:
    """`local_ip`: this node's underlay address, the routes' source (by default its
    InternalIP in `node_ips`). `bgp`: this node runs BGP, which routes direct pools."""
    routes: set[Route] = set()
    vteps: set[tuple[str, str]] = set()
    src = local_ip or node_ips.get(local_node)

    def towards(dst: str, node: str, encap: Encapsulation) -> None:
        ip = node_ips.get(node)
        if ip is None:
            return  # the owner's address is unknown yet: no route rather than a wrong one
        if encap == "VXLAN":
            routes.add(Route(dst, "vxlan", ip, src))
            vteps.add((ip, vtep_mac(node)))
        elif bgp:
            return  # BIRD installs it
        else:
            routes.add(Route(dst, "direct", ip, src))

    for b in blocks:
        if b.node == local_node:
            routes.add(Route(b.cidr, "blackhole"))
        elif b.node is not None:
            towards(b.cidr, b.node, b.encapsulation)
    for a in borrowed:
        if a.node != local_node:
            towards(f"{a.address}/32", a.node, a.encapsulation)
    return DesiredRouting(frozenset(routes), frozenset(vteps), vxlan_in_use)
