"""One node's BGP configuration, computed from the store's objects (pure).

A node runs BGP when its Node has `spec.bgp`; it speaks from `spec.bgp.ipv4Address`
(else its InternalIP), in `spec.bgp.asNumber` (else BGPConfiguration's, else 64512).

Sessions (Calico's, one protocol per peer, named from the peer's address only):
- `Mesh_<ip>`: with nodeToNodeMeshEnabled, every BGP node that is not a route reflector
  peers with every other such node; the one with the lower address opens (the other is
  passive), so each pair has one TCP connection.
- `Node_<ip>`: nodes a BGPPeer's peerSelector picks, for the nodes its node /
  nodeSelector picks (all BGP nodes when neither is set), and in reverse: a node the
  peerSelector picks peers back with those nodes. A node with a routeReflectorClusterID
  treats iBGP peers without that cluster ID as `rr client`.
- `Global_<ip>` / `Node_<ip>`: a BGPPeer's peerIP, for every node (Global) or the nodes
  it names (Node). One whose address is a BGP node's counts as a cluster peer.

Routes (each node originates its own, in a static protocol of blackholes):
- one route per IPAM block affine to the node, and a /32 per address it borrowed from
  another node's block; the service ranges of BGPConfiguration;
- cluster peers receive the blocks of pools without encapsulation (the ones BGP routes:
  VXLAN pools are routed by the agent's routes dataplane) and, on a route reflector,
  what it reflects; nothing outside those pools;
- external peers receive the node's own blocks of every pool except those with
  disableBGPExport (kept inside the cluster), and the service ranges, with the
  communities of BGPConfiguration's prefixAdvertisements; never what the node learnt;
- imports never accept the node's own blocks; BIRD installs learnt routes of pools
  without encapsulation in the kernel, nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from podnet.agent.view import BlockRecord, PoolIndex
from podnet.model.bgp import DEFAULT_AS_NUMBER, DEFAULT_LISTEN_PORT, restart_seconds
from podnet.model.objects import BGPConfiguration, BGPPeer, IPPool, Node

PeerKind = Literal["Mesh", "Node", "Global"]


@dataclass(frozen=True, order=True)
class Peer:
    name: str  # BIRD protocol name: <kind>_<a_b_c_d>[_port_<n>]
    kind: PeerKind
    address: str
    port: int
    asn: int
    cluster: bool  # a BGP node of this cluster (cluster routes); else an external router
    passive: bool = False
    rr_client: bool = False
    source_address: str | None = None
    password: str | None = None
    restart_time: int | None = None  # seconds; None: BIRD's default (120 s)
    keep_next_hop: bool = False


@dataclass(frozen=True)
class Advertisement:
    prefix: str
    communities: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class NodeBgp:
    node: str
    router_id: str
    asn: int
    listen_port: int
    cluster_id: str | None  # this node is a route reflector for that cluster ID
    peers: tuple[Peer, ...]
    blocks: tuple[str, ...]  # blocks affine to this node (all pools)
    borrowed: tuple[str, ...]  # /32s this node holds in other nodes' blocks
    services: tuple[str, ...]  # service ranges announced to external peers
    cluster_pools: tuple[str, ...]  # pools BGP routes inside the cluster (no encapsulation)
    export_pools: tuple[str, ...]  # pools whose blocks external peers receive
    all_pools: tuple[str, ...]
    advertisements: tuple[Advertisement, ...] = field(default=())  # communities per prefix

    @property
    def statics(self) -> tuple[str, ...]:
        return (*self.blocks, *self.borrowed, *self.services)


def node_asn(node: Node, default: int) -> int:
    bgp = node.spec.bgp
    return bgp.as_number if bgp is not None and bgp.as_number is not None else default


def _ip_key(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


def protocol_name(kind: PeerKind, address: str, port: int | None = None) -> str:
    """A BIRD symbol from an address (digits and '_' only: nothing a user wrote)."""
    name = f"{kind}_{address.replace('.', '_')}"
    return f"{name}_port_{port}" if port else name


def _applies_to(peer: BGPPeer, node: Node) -> bool:
    spec = peer.spec
    if spec.node is not None:
        return spec.node == node.name
    if spec.node_selector is not None:
        return spec.node_selector.matches(node.labels)
    return True


def compile_node(node_name: str, nodes: Iterable[Node], config: BGPConfiguration | None, peers: Iterable[BGPPeer],
                 pools: list[IPPool], blocks: Iterable[BlockRecord]) -> NodeBgp | None:
    """This node's BGP configuration; None when it does not run BGP (no spec.bgp, or no
    address to speak from)."""
    speakers = {n.name: n for n in nodes if n.spec.bgp is not None and n.bgp_address}
    me = speakers.get(node_name)
    if me is None:
        return None
    spec = config.spec if config is not None else None
    default_as = spec.as_number if spec is not None else DEFAULT_AS_NUMBER
    port = spec.listen_port if spec is not None else DEFAULT_LISTEN_PORT
    mesh = spec.node_to_node_mesh_enabled if spec is not None else True
    mesh_restart = restart_seconds(spec.node_mesh_max_restart_time) if spec is not None else None
    my_ip = me.bgp_address
    assert my_ip is not None and me.spec.bgp is not None
    my_as = node_asn(me, default_as)
    my_cluster = me.spec.bgp.route_reflector_cluster_id
    by_address = {n.bgp_address: n for n in speakers.values()}

    chosen: dict[tuple[str, int], Peer] = {}

    def node_peer(kind: PeerKind, other: Node, restart: int | None, password: str | None = None,
                  source: bool = True, keep_next_hop: bool = False, peer_port: int | None = None) -> None:
        address = other.bgp_address
        assert address is not None and other.spec.bgp is not None
        asn = node_asn(other, default_as)
        their_cluster = other.spec.bgp.route_reflector_cluster_id
        rr_client = bool(my_cluster) and asn == my_as and their_cluster != my_cluster
        key = (address, peer_port or port)
        if key in chosen and chosen[key].kind != "Mesh":
            return  # explicit peers win over the mesh; the first explicit one stays
        chosen[key] = Peer(
            name=protocol_name(kind, address, peer_port), kind=kind, address=address, port=peer_port or port,
            asn=asn, cluster=True, passive=_ip_key(address) > _ip_key(my_ip), rr_client=rr_client,
            source_address=my_ip if source else None, password=password, restart_time=restart,
            keep_next_hop=keep_next_hop and asn != my_as)

    if mesh and not my_cluster:
        for other in speakers.values():
            if other.name != node_name and not other.spec.bgp.route_reflector_cluster_id:  # type: ignore[union-attr]
                node_peer("Mesh", other, mesh_restart)

    for p in sorted(peers, key=lambda p: p.name):
        s = p.spec
        restart = restart_seconds(s.max_restart_time)
        source = s.source_address == "UseNodeIP"
        if s.peer_selector is not None:
            if _applies_to(p, me):
                for other in speakers.values():
                    if other.name != node_name and s.peer_selector.matches(other.labels):
                        node_peer("Node", other, restart, s.password, source, s.keep_original_next_hop)
            if s.peer_selector.matches(me.labels):  # reverse peering: the selected side peers back
                for other in speakers.values():
                    if other.name != node_name and _applies_to(p, other):
                        node_peer("Node", other, restart, s.password, source, s.keep_original_next_hop)
            continue
        if not _applies_to(p, me) or p.spec.peer_address is None:
            continue
        address, peer_port = p.spec.peer_address
        if address == my_ip:
            continue
        other = by_address.get(address)
        kind: PeerKind = "Global" if s.node is None and s.node_selector is None else "Node"
        if other is not None:  # a peerIP that is one of the cluster's nodes
            node_peer(kind, other, restart, s.password, source, s.keep_original_next_hop, peer_port)
            continue
        key = (address, peer_port or DEFAULT_LISTEN_PORT)
        if key in chosen:
            continue
        asn = s.as_number or default_as
        chosen[key] = Peer(
            name=protocol_name(kind, address, peer_port), kind=kind, address=address,
            port=peer_port or DEFAULT_LISTEN_PORT, asn=asn, cluster=False,
            rr_client=bool(my_cluster) and asn == my_as, source_address=my_ip if source else None,
            password=s.password, restart_time=restart, keep_next_hop=s.keep_original_next_hop and asn != my_as)

    # Attachment pools (additional networks' addresses) are the underlay's to route, never BGP's.
    v4 = [p for p in pools if ipaddress.ip_network(p.spec.cidr).version == 4 and not p.spec.for_attachments]
    index = PoolIndex(v4)
    own: list[str] = []
    borrowed: list[str] = []
    for b in blocks:
        pool = index.pool_of(b)
        if pool is None:
            continue  # a deleted pool's blocks: not announced
        if b.owner == node_name:
            own.append(b.cidr)
        if b.borrowed:
            base = int(ipaddress.ip_network(b.cidr).network_address)
            borrowed += [f"{ipaddress.IPv4Address(base + ordinal)}/32"
                         for ordinal, holder in b.borrowed if holder == node_name and b.owner != node_name]

    advertisements: tuple[Advertisement, ...] = ()
    if spec is not None and spec.prefix_advertisements:
        advertisements = tuple(Advertisement(a.cidr, tuple(spec.community_values(a)))
                               for a in spec.prefix_advertisements)
    return NodeBgp(
        node=node_name, router_id=my_ip, asn=my_as, listen_port=port, cluster_id=my_cluster,
        peers=tuple(sorted(chosen.values(), key=lambda p: (_ip_key(p.address), p.port))),
        blocks=tuple(sorted(set(own), key=_net_key)), borrowed=tuple(sorted(set(borrowed), key=_net_key)),
        services=tuple(spec.service_cidrs) if spec is not None else (),
        cluster_pools=tuple(sorted(p.spec.cidr for p in v4 if p.spec.encapsulation == "None")),
        export_pools=tuple(sorted(p.spec.cidr for p in v4 if not p.spec.disable_bgp_export)),
        all_pools=tuple(sorted(p.spec.cidr for p in v4)),
        advertisements=advertisements,
    )


def _net_key(cidr: str) -> tuple[int, int]:
    net = ipaddress.ip_network(cidr)
    return int(net.network_address), net.prefixlen


def default_config(configs: Iterable[BGPConfiguration]) -> BGPConfiguration | None:
    return next((c for c in configs if c.name == BGPConfiguration.DEFAULT_NAME), None)
