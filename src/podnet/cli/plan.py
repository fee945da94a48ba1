"""`podnet plan`: size the pod pool, IPAM blocks, routes, BGP sessions, MTU, Service CIDR and
conntrack for a cluster shape. The numbers come from `podnet.plan`; this module parses flags
and prints a report (-o table, or wide: the BGP sessions and every block's limits whatever the
routing), JSON or YAML."""

from __future__ import annotations

import argparse
from typing import Any

from podnet.cli.output import EXIT_FOUND, Column, add_output_flag, emit, is_table, table
from podnet.errors import PodnetError
from podnet.plan import (
    ENCAPSULATIONS,
    ROUTING_MODES,
    SERVICE_HEADROOM,
    BlockOption,
    Plan,
    PlanInput,
    plan,
)
from podnet.services.conntrack import DEFAULT_CONNTRACK_MIN

# Exit status of `--strict` when the plan has warnings (invalid input exits 1, usage 2).
EXIT_WARNINGS = EXIT_FOUND


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="plan the pod pool, block size, routes, BGP sessions, MTU, Service CIDR and conntrack",
        description="Plan addresses and per-node limits for a cluster shape. Warnings are advice: "
        "the exit status is 0 with warnings unless --strict.",
    )
    # Values are parsed by cmd_plan, so that every bad value is a one-line error naming its flag.
    p.add_argument("--nodes", metavar="N", help="number of nodes (required)")
    p.add_argument("--max-pods-per-node", metavar="M", help="most pods on one node (required)")
    p.add_argument("--services", metavar="S", help="number of Services (required)")
    p.add_argument("--growth", metavar="PCT", default="0", help="growth to plan for, in percent (default 0)")
    p.add_argument("--routing", metavar="|".join(ROUTING_MODES), default="vxlan", help="default vxlan")
    p.add_argument("--encapsulation", metavar="|".join(ENCAPSULATIONS),
                   help="default: vxlan for vxlan routing, none otherwise")
    p.add_argument("--pool", metavar="CIDR", help="IPv4 pod pool to check (default: propose one in 10.0.0.0/8)")
    p.add_argument("--service-cidr", metavar="CIDR", help="Service CIDR to check (default: propose one)")
    p.add_argument("--node-cpus", metavar="C", default="16", help="CPUs per node, for conntrack (default 16)")
    p.add_argument("--underlay-mtu", metavar="BYTES", default="1500", help="default 1500")
    p.add_argument("--max-routes", metavar="R", default="10000",
                   help="most routes per node you accept (default 10000)")
    p.add_argument("--route-reflectors", metavar="K", default="0",
                   help="BGP route reflectors (default 0 = full mesh; --routing bgp only)")
    p.add_argument("--block-size", metavar="PREFIX", help="IPAM block prefix length, 20-32 (default: chosen)")
    p.add_argument("--max-blocks-per-host", metavar="B", default="0",
                   help="IPAMConfig maxBlocksPerHost to check against (default 0 = no limit)")
    p.add_argument("--conntrack-max-per-core", metavar="N", help="as kube-proxy (default 32768)")
    p.add_argument("--conntrack-min", metavar="N", default=str(DEFAULT_CONNTRACK_MIN),
                   help=f"as kube-proxy (default {DEFAULT_CONNTRACK_MIN})")
    p.add_argument("--conntrack-max", metavar="TOTAL",
                   help="a wanted nf_conntrack_max per node; reports the per-core value that gives it")
    add_output_flag(p, json_flag=True)
    p.add_argument("--strict", action="store_true", help=f"exit {EXIT_WARNINGS} when there are warnings")
    cloud = p.add_argument_group("cloud ENI pools (--cloud aws: only --nodes, --max-pods-per-node and --growth of the "
                                 "above apply)")
    cloud.add_argument("--cloud", choices=("aws",), help="plan ENI pools: max pods, pinned addresses, subnet sizes")
    cloud.add_argument("--instance-type", metavar="TYPE", default="m5.large", help="default m5.large")
    cloud.add_argument("--enis", metavar="N", help="ENIs per instance (a type podnet has no table entry for)")
    cloud.add_argument("--ips-per-eni", metavar="N", help="IPv4 addresses per ENI (with --enis)")
    cloud.add_argument("--mode", default="shared", metavar="shared|exclusive", help="default shared")
    cloud.add_argument("--min-idle", metavar="N", default="2", help="warm pool low watermark (default 2)")
    cloud.add_argument("--max-idle", metavar="N", default="10", help="warm pool high watermark (default 10)")
    cloud.add_argument("--zones", metavar="Z", default="3", help="zones the nodes spread over (default 3)")
    p.set_defaults(func=cmd_plan)


def _int(value: str | None, flag: str, *, required: bool = False, prefix: bool = False) -> int | None:
    if value is None:
        if required:
            raise PodnetError(f"{flag} is required")
        return None
    text = value.strip()
    if prefix:
        text = text.removeprefix("/")
    try:
        return int(text)
    except ValueError:
        raise PodnetError(f"{flag}: expected a whole number, got {value!r}") from None


def _percent(value: str) -> float:
    try:
        return float(value.strip().removesuffix("%"))
    except ValueError:
        raise PodnetError(f"--growth: expected a percentage, got {value!r}") from None


def input_from_args(args: argparse.Namespace) -> PlanInput:
    kwargs: dict[str, Any] = {}
    if args.conntrack_max_per_core is not None:
        kwargs["conntrack_max_per_core"] = _int(args.conntrack_max_per_core, "--conntrack-max-per-core")
    growth = _percent(args.growth)
    if growth != growth or growth in (float("inf"), float("-inf")):
        raise PodnetError(f"--growth: expected a percentage, got {args.growth!r}")
    return PlanInput(
        nodes=_int(args.nodes, "--nodes", required=True),
        max_pods_per_node=_int(args.max_pods_per_node, "--max-pods-per-node", required=True),
        services=_int(args.services, "--services", required=True),
        growth_percent=growth,
        routing=args.routing.strip().lower(),
        encapsulation=args.encapsulation.strip().lower() if args.encapsulation else None,
        pool=args.pool,
        service_cidr=args.service_cidr,
        node_cpus=_int(args.node_cpus, "--node-cpus"),
        underlay_mtu=_int(args.underlay_mtu, "--underlay-mtu"),
        max_routes=_int(args.max_routes, "--max-routes"),
        route_reflectors=_int(args.route_reflectors, "--route-reflectors"),
        block_size=_int(args.block_size, "--block-size", prefix=True),
        max_blocks_per_host=_int(args.max_blocks_per_host, "--max-blocks-per-host"),
        conntrack_min=_int(args.conntrack_min, "--conntrack-min"),
        conntrack_max=_int(args.conntrack_max, "--conntrack-max"),
        **kwargs,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    if args.cloud:
        return cmd_plan_cloud(args)
    result = plan(input_from_args(args))
    if is_table(args.output):
        print(render(result, wide=args.output == "wide"))
    else:
        emit(result.to_dict(), args.output)
    if args.strict and result.warnings:
        return EXIT_WARNINGS
    return 0


def cmd_plan_cloud(args: argparse.Namespace) -> int:
    from podnet.eni.plan import CloudPlanInput, plan_cloud
    from podnet.eni.plan import render as render_cloud

    result = plan_cloud(CloudPlanInput(
        nodes=_int(args.nodes, "--nodes", required=True), instance_type=args.instance_type.strip(),
        enis=_int(args.enis, "--enis"), ips_per_eni=_int(args.ips_per_eni, "--ips-per-eni"),
        mode=args.mode.strip().lower(), max_pods_per_node=_int(args.max_pods_per_node, "--max-pods-per-node"),
        min_idle=_int(args.min_idle, "--min-idle"), max_idle=_int(args.max_idle, "--max-idle"),
        zones=_int(args.zones, "--zones"), growth_percent=_percent(args.growth)))
    if is_table(args.output):
        print(render_cloud(result))
    else:
        emit(result.to_dict(), args.output)
    return EXIT_WARNINGS if args.strict and result.warnings else 0


# ---------------------------------------------------------------- table output


def _table(columns: list[Column], rows: list[Any], wide: bool, indent: str = "  ") -> list[str]:
    return table(columns, rows, wide=wide, indent=indent).splitlines()


def _pairs(rows: list[tuple[str, Any]], indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _growth(p: Plan) -> str:
    g = p.input.growth_percent
    return f"{g:g}%"


def _notes(o: BlockOption) -> str:
    notes = ["chosen"] if o.chosen else []
    if not o.within_max_routes:
        notes.append("over --max-routes")
    if not o.within_max_blocks_per_host:
        notes.append("over maxBlocksPerHost")
    return ", ".join(notes)


BLOCK_COLUMNS = [
    Column("BLOCK", lambda o: f"/{o.prefix_length}"),
    Column("ADDRESSES", lambda o: o.addresses),
    Column("BLOCKS/NODE", lambda o: o.blocks_per_node),
    Column("WASTE/NODE", lambda o: o.waste_per_node),
    Column("WASTE-TOTAL", lambda o: o.waste_total),
    Column("ROUTES/NODE", lambda o: o.routes_per_node),
    Column("POOL-NEEDED", lambda o: f"{o.pool_addresses_needed} (/{o.pool_prefix_needed})"),
    Column("WITHIN-MAX-ROUTES", lambda o: o.within_max_routes, wide=True),
    Column("WITHIN-MAX-BLOCKS", lambda o: o.within_max_blocks_per_host, wide=True),
    Column("NOTE", _notes, empty=""),
]


def _route_columns(selected: str) -> list[Column]:
    return [
        Column("MODE", lambda m: m.mode),
        Column("ENCAPSULATION", lambda m: m.encapsulation),
        Column("ROUTES", lambda m: m.routes_per_node),
        Column("FDB-ENTRIES", lambda m: m.fdb_entries_per_node),
        Column("NEIGHBOUR-ENTRIES", lambda m: m.neighbour_entries_per_node),
        Column("BGP-SESSIONS", lambda m: "-" if m.bgp_sessions_per_node is None else m.bgp_sessions_per_node),
        Column("NOTE", lambda m: "selected" if m.mode == selected else "", empty=""),
    ]


def render(p: Plan, wide: bool = False) -> str:
    inp, b, pool, r, bgp, mtu, svc, ct = (
        p.input, p.block, p.pod_pool, p.routing, p.bgp, p.mtu, p.service_cidr, p.conntrack
    )
    out: list[str] = []
    out.append(
        f"Plan for {inp.nodes} nodes x {inp.max_pods_per_node} pods, {inp.services} Services, "
        f"growth {_growth(p)}: sized for {p.nodes_planned} nodes and {p.services_planned} Services"
    )
    out.append(f"routing {r.mode}, encapsulation {r.encapsulation}")

    out += ["", "Pod pool"]
    per_node = f"{b.addresses_per_node} ({b.pods_per_node} pods)"
    out += _pairs([
        ("addresses per node", per_node),
        ("block size", f"/{b.prefix_length} ({b.addresses} addresses), "
                       + ("chosen by the planner" if b.chosen_by == "planner" else "given")),
        ("blocks per node", f"{b.blocks_per_node} ({b.blocks_per_node * b.addresses} addresses)"),
        ("waste", f"{b.waste_per_node} per node, {b.waste_total} in total"),
        ("addresses needed", f"{pool.addresses_needed} = {p.nodes_planned} nodes x {_n(b.blocks_per_node, 'block')}"
                             f" x {b.addresses}, a /{pool.prefix_needed}"),
        ("pool", f"{pool.cidr} ({'proposed' if pool.proposed else 'given'})"),
        ("pool addresses", f"{pool.addresses}, {pool.utilisation_percent:g}% claimed at full load, "
                           f"room for {pool.node_capacity} full nodes"),
    ])

    out += ["", f"Block sizes (routes per node must stay within --max-routes {r.max_routes})"]
    out += _table(BLOCK_COLUMNS, p.block_options, wide)

    out += ["", f"Routes per node ({_n(r.remote_nodes, 'remote node')} x {_n(b.blocks_per_node, 'block')}; "
                "one route per remote block in every mode)"]
    out += _table(_route_columns(r.mode), r.modes, wide)
    out.append("  neighbour entries: one per remote VTEP with VXLAN (permanent); without encapsulation")
    out.append("  up to one ARP entry per remote node the node talks to (next hop on a shared L2 segment)")

    if r.mode == "bgp" or wide:
        out += ["", "BGP sessions" + ("" if r.mode == "bgp" else f" (if routing were bgp; it is {r.mode})")]
        rows = [("full mesh", f"{bgp.full_mesh_sessions_total} in total = n(n-1)/2, "
                              f"{bgp.full_mesh_sessions_per_node} per node = n-1")]
        if bgp.route_reflectors:
            rows.append((f"{bgp.route_reflectors} route reflectors",
                         f"{bgp.reflector_sessions_total} in total = n*K + K(K-1)/2, "
                         f"{bgp.reflector_sessions_per_node} per node = K, "
                         f"{bgp.sessions_per_reflector} per reflector = n+K-1 (selected)"))
        elif r.mode == "bgp":
            rows[0] = (rows[0][0], rows[0][1] + " (selected)")
        rows.append(("routes", f"{bgp.routes_announced_per_node} announced per node (one per block), "
                               f"{bgp.paths_per_node} paths received per node"
                               + (f" ({r.remote_blocks} remote blocks x {bgp.route_reflectors} reflectors)"
                                  if bgp.route_reflectors else "") + f", {r.remote_blocks} installed"))
        out += _pairs(rows)
        if bgp.route_reflectors:
            out.append("  n nodes peer with K dedicated reflectors (not counted in --nodes), which mesh among themselves")
            out.append("  podnet builds it from: K Nodes with spec.bgp.routeReflectorClusterID (one cluster ID), "
                       "BGPConfiguration nodeToNodeMeshEnabled: false,")
            out.append("  one BGPPeer with a peerSelector for the reflectors (every node peers with them, they peer "
                       "back); see docs/bgp.md")
        elif r.mode == "bgp":
            out.append("  podnet builds it from: spec.bgp on every Node, BGPConfiguration nodeToNodeMeshEnabled: true "
                       "(the default); see docs/bgp.md")

    out += ["", "MTU"]
    ref = ", ".join(f"{k} -{v}" for k, v in mtu.reference_overhead.items())
    out += _pairs([
        ("underlay", mtu.underlay),
        ("pod interfaces", f"{mtu.pod} (encapsulation {mtu.encapsulation}, -{mtu.overhead})"),
        ("overheads", f"{ref} (IPv4 underlay)"),
    ])

    out += ["", "Service CIDR"]
    out += _pairs([
        ("Services", f"{svc.services_planned} planned, {svc.services_with_headroom} with headroom "
                     f"(x{SERVICE_HEADROOM}), a /{svc.prefix_needed}"),
        ("CIDR", f"{svc.cidr} ({'proposed' if svc.proposed else 'given'})"),
        ("usable", f"{svc.usable} addresses, {svc.utilisation_percent:g}% used by planned Services"),
    ])

    out += ["", "Conntrack per node (as kube-proxy)"]
    if ct.from_total:
        per_core = f"{ct.max_per_core} = {inp.conntrack_max} / {ct.cpus} cores"
        if ct.max_per_core * ct.cpus != inp.conntrack_max:
            per_core = f"{ct.max_per_core} = ceil({inp.conntrack_max} / {ct.cpus} cores)"
        per_core += " (set --conntrack-max-per-core to this)"
    else:
        per_core = str(ct.max_per_core)
    out += _pairs([
        ("nf_conntrack_max", f"{ct.max} = max({ct.max_per_core} per core x {ct.cpus} cores, min {ct.min})"),
        ("per core", per_core),
        ("hashsize", f"{ct.hashsize} buckets = max / 4"),
    ])

    out += ["", "Warnings"]
    out += [f"  - {w.message}" for w in p.warnings] or ["  none"]
    return "\n".join(out)
