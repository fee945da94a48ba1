"""Address and capacity planner for a cluster: pod pool, IPAM block size, routes per node,
BGP sessions, MTU, Service CIDR and conntrack sizing.

Pure: a `PlanInput` in, a `Plan` out, no I/O. Invalid input raises `PlanInputError`
(a `PodnetError`) whose one-line message names the `podnet plan` flag at fault; things
that are valid but do not fit become `PlanWarning`s on the plan.

What is counted:

* Every node is planned at full load: `max_pods_per_node` pods. VXLAN takes no pool
  address: podnet routes a remote block via the remote node's underlay address (onlink),
  so there is no tunnel address per node. A node claims `ceil(pods / block size)` blocks.
* Waste per node is what a full node's blocks hold beyond those addresses:
  `blocks_per_node * block_size - addresses_per_node`.
* Routes per node: one route per remote block, whatever the routing mode (VXLAN routes a
  remote block via the remote node's VTEP; direct and BGP via the remote node's address).
  VXLAN adds one FDB entry and one (permanent) neighbour entry per remote node; direct
  routing needs one ARP entry per remote node it talks to (all nodes share an L2 segment).
* BGP full mesh: `n(n-1)/2` sessions, `n-1` per node. With K route reflectors (dedicated
  BGP speakers, not counted in `nodes`): every node peers with each reflector and the
  reflectors mesh among themselves: `n*K + K(K-1)/2` sessions, K per node, `n + K - 1`
  per reflector. This is what podnet.bgp builds (docs/bgp.md): the K reflectors are
  Nodes with spec.bgp.routeReflectorClusterID (one cluster ID), BGPConfiguration turns
  nodeToNodeMeshEnabled off, and one BGPPeer with a peerSelector for the reflectors
  peers every node with them (and them back). Each node announces one route per block
  it holds and receives every remote block once per session that carries it: once in a
  mesh, K times as a client (`paths_per_node`); it installs each once (ECMP merges).
* Nodes and Services are planned at `ceil(count * (1 + growth/100))`.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from podnet.errors import PodnetError
from podnet.services.conntrack import (
    DEFAULT_CONNTRACK_MAX_PER_CORE,
    DEFAULT_CONNTRACK_MIN,
    ConntrackSizing,
    conntrack_max,
)

ROUTING_MODES = ("vxlan", "direct", "bgp")
ENCAPSULATIONS = ("none", "vxlan")
# Bytes each encapsulation adds on an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner
# Ethernet 14 for VXLAN). The others are shown for reference only.
ENCAPSULATION_OVERHEAD = {"none": 0, "vxlan": 50}
REFERENCE_OVERHEAD = {"vxlan": 50, "ipip": 20, "wireguard": 60}

# Block prefix lengths IPPool accepts for IPv4 (see IPPoolSpec), and the ones the planner
# compares when it chooses (Calico's default is /26 = 64 addresses).
BLOCK_PREFIX_MIN = 20
BLOCK_PREFIX_MAX = 32
CANDIDATE_LARGEST = 24
CANDIDATE_SMALLEST = 28

FULL_MESH_NODE_LIMIT = 100  # above this many BGP speakers, use route reflectors
SERVICE_PREFIX_LIMIT = 12  # the API server refuses an IPv4 service range bigger than /12
SERVICE_HEADROOM = 2  # a proposed Service CIDR holds twice the planned Services ...
SERVICE_SMALLEST_PROPOSED = 24  # ... and is never smaller than a /24
GC_THRESH3_DEFAULT = 1024  # net.ipv4.neigh.default.gc_thresh3

DEFAULT_POOL_START = ipaddress.IPv4Address("10.244.0.0")
DEFAULT_SERVICE_START = ipaddress.IPv4Address("10.96.0.0")
PRIVATE_RANGES = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
SHARED_RANGE = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, also fine for pods



class PlanInputError(PodnetError):
    """A `podnet plan` input that cannot be planned; the message names the flag."""


@dataclass(frozen=True)
class PlanInput:
    nodes: int
    max_pods_per_node: int
    services: int
    growth_percent: float = 0
    routing: str = "vxlan"
    encapsulation: str | None = None  # None: vxlan for vxlan routing, none otherwise
    pool: str | None = None  # IPv4 pod pool; None: proposed
    service_cidr: str | None = None  # None: proposed
    node_cpus: int = 16
    underlay_mtu: int = 1500
    max_routes: int = 10000
    route_reflectors: int = 0
    block_size: int | None = None  # prefix length; None: chosen
    max_blocks_per_host: int = 0  # 0: no limit
    conntrack_max_per_core: int | None = None  # None: kube-proxy's 32768 (unless conntrack_max)
    conntrack_min: int = DEFAULT_CONNTRACK_MIN
    conntrack_max: int | None = None  # a total per node; the per-core value is derived from it


@dataclass(frozen=True)
class PlanWarning:
    code: str
    message: str


@dataclass(frozen=True)
class BlockOption:
    prefix_length: int
    addresses: int
    blocks_per_node: int
    waste_per_node: int
    waste_total: int
    routes_per_node: int
    pool_addresses_needed: int
    pool_prefix_needed: int
    within_max_routes: bool
    within_max_blocks_per_host: bool
    chosen: bool


@dataclass(frozen=True)
class BlockPlan:
    prefix_length: int
    addresses: int
    chosen_by: str  # "planner" or "user"
    pods_per_node: int
    addresses_per_node: int
    blocks_per_node: int
    waste_per_node: int
    waste_total: int


@dataclass(frozen=True)
class PoolPlan:
    cidr: str
    proposed: bool
    prefix_length: int
    addresses: int
    addresses_needed: int
    prefix_needed: int
    utilisation_percent: float
    node_capacity: int  # full nodes the pool's blocks can hold


@dataclass(frozen=True)
class RouteCount:
    mode: str
    encapsulation: str
    routes_per_node: int
    fdb_entries_per_node: int
    neighbour_entries_per_node: int
    bgp_sessions_per_node: int | None


@dataclass(frozen=True)
class RoutingPlan:
    mode: str
    encapsulation: str
    remote_nodes: int
    remote_blocks: int
    routes_per_node: int
    fdb_entries_per_node: int
    neighbour_entries_per_node: int
    max_routes: int
    modes: list[RouteCount]


@dataclass(frozen=True)
class BgpPlan:
    speakers: int
    full_mesh_sessions_total: int
    full_mesh_sessions_per_node: int
    route_reflectors: int
    reflector_sessions_total: int
    reflector_sessions_per_node: int
    sessions_per_reflector: int
    sessions_total: int  # of the chosen topology
    sessions_per_node: int
    mesh_enabled: bool = True  # BGPConfiguration nodeToNodeMeshEnabled
    routes_announced_per_node: int = 0  # one per block the node holds
    paths_per_node: int = 0  # remote block routes received, once per session carrying them


@dataclass(frozen=True)
class MtuPlan:
    underlay: int
    encapsulation: str
    overhead: int
    pod: int
    reference_overhead: dict[str, int]


@dataclass(frozen=True)
class ServicePlan:
    cidr: str
    proposed: bool
    prefix_length: int
    addresses: int
    usable: int  # the API server never hands out the network and broadcast addresses
    services_planned: int
    services_with_headroom: int
    prefix_needed: int
    utilisation_percent: float


@dataclass(frozen=True)
class ConntrackPlan:
    cpus: int
    max_per_core: int
    min: int
    max: int  # nf_conntrack_max = max(max_per_core * cpus, min), as kube-proxy sets it
    hashsize: int  # kube-proxy raises the hash table to max / 4 buckets
    from_total: bool  # max_per_core was derived from a requested total


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    nodes_planned: int
    services_planned: int
    block: BlockPlan
    block_options: list[BlockOption]
    pod_pool: PoolPlan
    routing: RoutingPlan
    bgp: BgpPlan
    mtu: MtuPlan
    service_cidr: ServicePlan
    conntrack: ConntrackPlan
    warnings: list[PlanWarning] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- arithmetic


def prefix_for(addresses: int) -> int:
    """The longest IPv4 prefix holding at least `addresses` addresses (may be below 0)."""
    return 32 - max(addresses - 1, 0).bit_length()


def blocks_per_node(addresses_per_node: int, block_prefix: int) -> int:
    return -(-addresses_per_node // (1 << (32 - block_prefix)))


def grow(count: int, growth_percent: Fraction) -> int:
    return math.ceil(count * (100 + growth_percent) / 100)


def full_mesh_sessions(n: int) -> int:
    return n * (n - 1) // 2


def reflector_sessions(n: int, k: int) -> int:
    """Every node peers with each of K reflectors; the reflectors mesh among themselves."""
    return n * k + k * (k - 1) // 2


def _percent(part: int, whole: int) -> float:
    return round(100 * part / whole, 2) if whole else 0.0


# ---------------------------------------------------------------- validation


def _check_range(value: int, flag: str, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanInputError(f"{flag}: expected a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise PlanInputError(f"{flag} must be {span}{why}, got {value}")


def _parse_v4(text: str, flag: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            fixed = ipaddress.ip_network(text.strip(), strict=False)
            raise PlanInputError(f"{flag} {text} has host bits set; did you mean {fixed}?") from None
        raise PlanInputError(f"{flag} {text!r} is not a valid CIDR") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise PlanInputError(f"{flag} {text} is IPv6; the planner handles IPv4 only")
    return net


def _validate(inp: PlanInput) -> tuple[Fraction, str]:
    _check_range(inp.nodes, "--nodes", 1)
    _check_range(inp.max_pods_per_node, "--max-pods-per-node", 1)
    _check_range(inp.services, "--services", 1, why=" (the kubernetes Service always exists)")
    try:
        growth = Fraction(str(inp.growth_percent))
    except (ValueError, ZeroDivisionError):
        raise PlanInputError(f"--growth: expected a percentage, got {inp.growth_percent!r}") from None
    if growth < 0:
        raise PlanInputError(f"--growth must be 0 or more (a percentage), got {inp.growth_percent:g}")
    if inp.routing not in ROUTING_MODES:
        raise PlanInputError(f"--routing must be one of {', '.join(ROUTING_MODES)}, got {inp.routing!r}")
    encapsulation = inp.encapsulation or ("vxlan" if inp.routing == "vxlan" else "none")
    if encapsulation not in ENCAPSULATIONS:
        raise PlanInputError(
            f"--encapsulation must be one of {', '.join(ENCAPSULATIONS)}, got {inp.encapsulation!r}"
        )
    if inp.routing == "vxlan" and encapsulation != "vxlan":
        raise PlanInputError("--encapsulation none does not go with --routing vxlan, which encapsulates")
    _check_range(inp.node_cpus, "--node-cpus", 1)
    _check_range(inp.underlay_mtu, "--underlay-mtu", 576, 65535)
    _check_range(inp.max_routes, "--max-routes", 1)
    _check_range(inp.route_reflectors, "--route-reflectors", 0)
    if inp.route_reflectors and inp.routing != "bgp":
        raise PlanInputError(f"--route-reflectors applies to --routing bgp only, not {inp.routing}")
    if inp.block_size is not None:
        _check_range(inp.block_size, "--block-size", BLOCK_PREFIX_MIN, BLOCK_PREFIX_MAX,
                     why=" (an IPv4 block prefix length)")
    _check_range(inp.max_blocks_per_host, "--max-blocks-per-host", 0, why=" (0 = no limit)")
    if inp.conntrack_max_per_core is not None:
        _check_range(inp.conntrack_max_per_core, "--conntrack-max-per-core", 1)
        if inp.conntrack_max is not None:
            raise PlanInputError("give --conntrack-max or --conntrack-max-per-core, not both")
    _check_range(inp.conntrack_min, "--conntrack-min", 0)
    if inp.conntrack_max is not None:
        _check_range(inp.conntrack_max, "--conntrack-max", 1)
    return growth, encapsulation


# ---------------------------------------------------------------- placement


def _aligned_up(addr: int, prefix: int) -> int:
    size = 1 << (32 - prefix)
    return -(-addr // size) * size


def place(
    prefix: int, preferred: ipaddress.IPv4Address, avoid: list[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network | None:
    """A private /prefix, preferably the one holding `preferred`, that overlaps none of `avoid`."""
    for region in PRIVATE_RANGES:
        if prefix < region.prefixlen:
            continue
        starts: list[int] = []
        if preferred in region:
            starts.append(int(preferred) >> (32 - prefix) << (32 - prefix))
        starts += [_aligned_up(int(a.broadcast_address) + 1, prefix) for a in avoid]
        starts.append(int(region.network_address))
        for start in starts:
            if start + (1 << (32 - prefix)) - 1 > 0xFFFFFFFF:
                continue
            net = ipaddress.IPv4Network((start, prefix))
            if net.subnet_of(region) and not any(net.overlaps(a) for a in avoid):
                return net
    return None


def propose(prefix: int, preferred: ipaddress.IPv4Address, avoid: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """`place`, or when no private range has room, the /prefix holding `preferred` (warnings say the rest)."""
    return place(prefix, preferred, avoid) or ipaddress.IPv4Network(
        (int(preferred) >> (32 - prefix) << (32 - prefix), prefix))


def _is_private(net: ipaddress.IPv4Network) -> bool:
    return any(net.subnet_of(r) for r in (*PRIVATE_RANGES, SHARED_RANGE))


# ---------------------------------------------------------------- the plan


def _candidates(addresses_per_node: int, pool: ipaddress.IPv4Network | None) -> list[int]:
    one_block = max(BLOCK_PREFIX_MIN, prefix_for(addresses_per_node))
    largest = min(CANDIDATE_LARGEST, one_block)
    if pool is not None:
        largest = max(largest, pool.prefixlen)
    return list(range(largest, CANDIDATE_SMALLEST + 1))


def _block_option(prefix: int, inp: PlanInput, nodes: int, addresses_per_node: int,
                  chosen: bool = False) -> BlockOption:
    size = 1 << (32 - prefix)
    bpn = blocks_per_node(addresses_per_node, prefix)
    waste = bpn * size - addresses_per_node
    routes = (nodes - 1) * bpn
    needed = nodes * bpn * size
    return BlockOption(
        prefix_length=prefix,
        addresses=size,
        blocks_per_node=bpn,
        waste_per_node=waste,
        waste_total=waste * nodes,
        routes_per_node=routes,
        pool_addresses_needed=needed,
        pool_prefix_needed=prefix_for(needed),
        within_max_routes=routes <= inp.max_routes,
        within_max_blocks_per_host=inp.max_blocks_per_host == 0 or bpn <= inp.max_blocks_per_host,
        chosen=chosen,
    )


def choose_block(options: list[BlockOption]) -> BlockOption:
    """Least waste per node among the options within --max-routes (and maxBlocksPerHost);
    ties go to the smaller block, since blocks are claimed on demand and a node running
    fewer pods then claims fewer addresses. If none fits, the fewest routes."""
    fitting = [o for o in options if o.within_max_routes and o.within_max_blocks_per_host]
    if fitting:
        return min(fitting, key=lambda o: (o.waste_per_node, -o.prefix_length))
    pool = [o for o in options if o.within_max_blocks_per_host] or options
    return min(pool, key=lambda o: (o.routes_per_node, o.waste_per_node))


def _route_count(mode: str, encapsulation: str, remote_nodes: int, remote_blocks: int,
                 bgp_sessions_per_node: int) -> RouteCount:
    # VXLAN: a permanent neighbour and an FDB entry per remote VTEP. Without encapsulation
    # the next hop of each route is the remote node itself: an ARP entry per remote node.
    fdb = remote_nodes if encapsulation == "vxlan" else 0
    return RouteCount(
        mode=mode,
        encapsulation=encapsulation,
        routes_per_node=remote_blocks,
        fdb_entries_per_node=fdb,
        neighbour_entries_per_node=remote_nodes,
        bgp_sessions_per_node=bgp_sessions_per_node if mode == "bgp" else None,
    )


def plan(inp: PlanInput) -> Plan:
    growth, encapsulation = _validate(inp)
    pool_net = _parse_v4(inp.pool, "--pool") if inp.pool is not None else None
    svc_net = _parse_v4(inp.service_cidr, "--service-cidr") if inp.service_cidr is not None else None
    if pool_net is not None and inp.block_size is not None and inp.block_size < pool_net.prefixlen:
        raise PlanInputError(f"--block-size /{inp.block_size} is larger than --pool {pool_net}")
    if pool_net is not None and inp.block_size is None and pool_net.prefixlen > CANDIDATE_SMALLEST:
        raise PlanInputError(
            f"--pool {pool_net} is smaller than the smallest block the planner considers "
            f"(/{CANDIDATE_SMALLEST}); pass --block-size"
        )

    warnings: list[PlanWarning] = []

    def warn(code: str, message: str) -> None:
        warnings.append(PlanWarning(code, message))

    nodes = grow(inp.nodes, growth)
    services = grow(inp.services, growth)
    per_node = inp.max_pods_per_node

    # --- block size
    prefixes = _candidates(per_node, pool_net)
    if inp.block_size is not None and inp.block_size not in prefixes:
        prefixes = sorted({*prefixes, inp.block_size})
    options = [_block_option(p, inp, nodes, per_node) for p in prefixes]
    if inp.block_size is None:
        chosen_prefix = choose_block(options).prefix_length
    else:
        chosen_prefix = inp.block_size
    options = [_block_option(o.prefix_length, inp, nodes, per_node, o.prefix_length == chosen_prefix)
               for o in options]
    chosen = next(o for o in options if o.chosen)
    block = BlockPlan(
        prefix_length=chosen.prefix_length,
        addresses=chosen.addresses,
        chosen_by="user" if inp.block_size is not None else "planner",
        pods_per_node=inp.max_pods_per_node,
        addresses_per_node=per_node,
        blocks_per_node=chosen.blocks_per_node,
        waste_per_node=chosen.waste_per_node,
        waste_total=chosen.waste_total,
    )

    # --- pod pool
    needed = chosen.pool_addresses_needed
    prefix_needed = chosen.pool_prefix_needed
    if pool_net is None:
        prefix = max(prefix_needed, PRIVATE_RANGES[0].prefixlen)
        pool_net = propose(prefix, DEFAULT_POOL_START, [svc_net] if svc_net else [])
        pool_proposed = True
    else:
        pool_proposed = False
    node_capacity = (pool_net.num_addresses // chosen.addresses) // chosen.blocks_per_node
    pool = PoolPlan(
        cidr=str(pool_net),
        proposed=pool_proposed,
        prefix_length=pool_net.prefixlen,
        addresses=pool_net.num_addresses,
        addresses_needed=needed,
        prefix_needed=prefix_needed,
        utilisation_percent=_percent(needed, pool_net.num_addresses),
        node_capacity=node_capacity,
    )
    if needed > pool_net.num_addresses:
        where = "the proposed pool" if pool_proposed else f"--pool {pool_net}"
        fix = ("no private range is that big; plan fewer nodes or pods per node"
               if prefix_needed < PRIVATE_RANGES[0].prefixlen else f"use a /{prefix_needed} or bigger --pool")
        warn("pool_too_small",
             f"{where} holds {pool_net.num_addresses} addresses ({node_capacity} full nodes), but {nodes} nodes x "
             f"{chosen.blocks_per_node} /{chosen.prefix_length} blocks need {needed} (a /{prefix_needed}): {fix}")
    if not pool_proposed and not _is_private(pool_net):
        warn("pool_not_private",
             f"--pool {pool_net} is outside the private ranges (10/8, 172.16/12, 192.168/16, 100.64/10): "
             "pods would use public addresses")
    if inp.max_blocks_per_host and chosen.blocks_per_node > inp.max_blocks_per_host:
        holds = inp.max_blocks_per_host * chosen.addresses
        warn("max_blocks_per_host",
             f"{inp.max_pods_per_node} pods per node need {chosen.blocks_per_node} /{chosen.prefix_length} blocks "
             f"but --max-blocks-per-host is {inp.max_blocks_per_host} ({holds} pods): raise maxBlocksPerHost to "
             f"{chosen.blocks_per_node} or use a bigger --block-size")

    # --- routes and BGP
    remote_nodes = nodes - 1
    remote_blocks = remote_nodes * chosen.blocks_per_node
    k = inp.route_reflectors
    full_mesh_per_node = remote_nodes
    bgp = BgpPlan(
        speakers=nodes,
        full_mesh_sessions_total=full_mesh_sessions(nodes),
        full_mesh_sessions_per_node=full_mesh_per_node,
        route_reflectors=k,
        reflector_sessions_total=reflector_sessions(nodes, k) if k else 0,
        reflector_sessions_per_node=k,
        sessions_per_reflector=nodes + k - 1 if k else 0,
        sessions_total=reflector_sessions(nodes, k) if k else full_mesh_sessions(nodes),
        sessions_per_node=k if k else full_mesh_per_node,
        mesh_enabled=k == 0,
        routes_announced_per_node=chosen.blocks_per_node,
        paths_per_node=remote_blocks * (k or 1),
    )
    modes = [
        _route_count(m, encapsulation if m == inp.routing else ("vxlan" if m == "vxlan" else "none"),
                     remote_nodes, remote_blocks, bgp.sessions_per_node)
        for m in ROUTING_MODES
    ]
    selected = next(m for m in modes if m.mode == inp.routing)
    routing = RoutingPlan(
        mode=inp.routing,
        encapsulation=encapsulation,
        remote_nodes=remote_nodes,
        remote_blocks=remote_blocks,
        routes_per_node=selected.routes_per_node,
        fdb_entries_per_node=selected.fdb_entries_per_node,
        neighbour_entries_per_node=selected.neighbour_entries_per_node,
        max_routes=inp.max_routes,
        modes=modes,
    )
    if remote_blocks > inp.max_routes:
        fits = [o for o in options if o.within_max_routes]
        if fits:
            best = choose_block(fits)
            fix = f"use --block-size {best.prefix_length} ({best.routes_per_node} routes) or raise --max-routes"
        elif remote_nodes > inp.max_routes:
            fix = f"even one block per node gives {remote_nodes} routes; raise --max-routes"
        else:
            fix = "use a bigger --block-size or raise --max-routes"
        warn("routes_over_limit",
             f"{remote_blocks} routes per node ({remote_nodes} remote nodes x {chosen.blocks_per_node} blocks each) "
             f"exceed --max-routes {inp.max_routes}: {fix}")
    if inp.routing == "bgp" and k == 0 and nodes > FULL_MESH_NODE_LIMIT:
        warn("bgp_full_mesh",
             f"full-mesh BGP with {nodes} nodes: {full_mesh_per_node} sessions per node, "
             f"{bgp.full_mesh_sessions_total} in total; above {FULL_MESH_NODE_LIMIT} nodes use route reflectors "
             f"(--route-reflectors 3: 3 per node, {reflector_sessions(nodes, 3)} in total)")
    if inp.routing == "bgp" and k == 1:
        warn("single_route_reflector",
             "one route reflector is a single point of failure for every route: use --route-reflectors 2 or more")
    if inp.routing == "direct" and encapsulation == "none" and remote_nodes > GC_THRESH3_DEFAULT:
        warn("neighbour_table",
             f"direct routing: up to {remote_nodes} ARP entries per node (one per remote node) exceed the "
             f"default net.ipv4.neigh.default.gc_thresh3 of {GC_THRESH3_DEFAULT}: raise gc_thresh3 above "
             f"{remote_nodes} (with gc_thresh1/gc_thresh2)")

    # --- MTU
    overhead = ENCAPSULATION_OVERHEAD[encapsulation]
    mtu = MtuPlan(
        underlay=inp.underlay_mtu,
        encapsulation=encapsulation,
        overhead=overhead,
        pod=inp.underlay_mtu - overhead,
        reference_overhead=dict(REFERENCE_OVERHEAD),
    )

    # --- Service CIDR
    with_headroom = services * SERVICE_HEADROOM
    svc_prefix_needed = prefix_for(with_headroom + 2)
    if svc_net is None:
        prefix = min(max(svc_prefix_needed, SERVICE_PREFIX_LIMIT), SERVICE_SMALLEST_PROPOSED)
        svc_net = propose(prefix, DEFAULT_SERVICE_START, [pool_net])
        svc_proposed = True
    else:
        svc_proposed = False
    usable = max(svc_net.num_addresses - 2, 0)
    service = ServicePlan(
        cidr=str(svc_net),
        proposed=svc_proposed,
        prefix_length=svc_net.prefixlen,
        addresses=svc_net.num_addresses,
        usable=usable,
        services_planned=services,
        services_with_headroom=with_headroom,
        prefix_needed=svc_prefix_needed,
        utilisation_percent=_percent(services, usable),
    )
    where = "the proposed Service CIDR" if svc_proposed else f"--service-cidr {svc_net}"
    if svc_net.prefixlen < SERVICE_PREFIX_LIMIT:
        warn("service_cidr_too_large",
             f"--service-cidr {svc_net} is bigger than /{SERVICE_PREFIX_LIMIT}, which the Kubernetes API server "
             f"refuses: use a /{max(svc_prefix_needed, SERVICE_PREFIX_LIMIT)}")
    if usable < services:
        if svc_prefix_needed >= SERVICE_PREFIX_LIMIT:
            fix = f"use a /{svc_prefix_needed} (room for {with_headroom})"
        elif prefix_for(services + 2) >= SERVICE_PREFIX_LIMIT:
            fix = f"use a /{SERVICE_PREFIX_LIMIT}, the most Kubernetes allows"
        else:
            fix = f"even a /{SERVICE_PREFIX_LIMIT}, the most Kubernetes allows, is too small; plan fewer Services"
        warn("service_cidr_too_small",
             f"{where} has {usable} usable addresses for {services} planned Services: {fix}")
    if pool_net.overlaps(svc_net):
        warn("pool_service_overlap",
             f"pod pool {pool_net} overlaps Service CIDR {svc_net}: move one of them (--pool or --service-cidr)")

    # --- conntrack
    cpus = inp.node_cpus
    if inp.conntrack_max is not None:
        per_core = -(-inp.conntrack_max // cpus)
        total = conntrack_max(cpus, ConntrackSizing(per_core, inp.conntrack_min))
        if total != inp.conntrack_max:
            reason = (f"--conntrack-min {inp.conntrack_min} is higher" if total == inp.conntrack_min
                      else f"it is not a multiple of {cpus} cores")
            warn("conntrack_max_inexact",
                 f"--conntrack-max {inp.conntrack_max} cannot be set exactly with {cpus} cores: kube-proxy "
                 f"would set {total} ({reason})")
    else:
        per_core = inp.conntrack_max_per_core or DEFAULT_CONNTRACK_MAX_PER_CORE
        total = conntrack_max(cpus, ConntrackSizing(per_core, inp.conntrack_min))
    conntrack = ConntrackPlan(
        cpus=cpus,
        max_per_core=per_core,
        min=inp.conntrack_min,
        max=total,
        hashsize=total // 4,
        from_total=inp.conntrack_max is not None,
    )

    return Plan(
        input=inp,
        nodes_planned=nodes,
        services_planned=services,
        block=block,
        block_options=options,
        pod_pool=pool,
        routing=routing,
        bgp=bgp,
        mtu=mtu,
        service_cidr=service,
        conntrack=conntrack,
        warnings=warnings,
    )
