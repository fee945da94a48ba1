"""`podnet plan`: the numbers for known cluster shapes, the warnings, the JSON shape and
one-line errors on bad input."""

import json

import pytest

from podnet.cli.main import main
from podnet.errors import PodnetError
from podnet.plan import PlanInput, place, plan, prefix_for


def codes(p):
    return [w.code for w in p.warnings]


def run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- known shapes


def test_5000_nodes_110_pods_direct():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=10000, routing="direct"))
    assert p.block.prefix_length == 26
    assert p.block.chosen_by == "planner"
    assert p.block.addresses_per_node == 110
    assert p.block.blocks_per_node == 2
    assert p.block.waste_per_node == 18
    assert p.block.waste_total == 90000
    assert p.pod_pool.addresses_needed == 5000 * 2 * 64 == 640000
    assert p.pod_pool.prefix_needed == 12
    assert p.pod_pool.cidr == "10.240.0.0/12"
    assert p.pod_pool.proposed
    assert p.pod_pool.addresses == 1 << 20
    assert p.pod_pool.utilisation_percent == 61.04
    assert p.pod_pool.node_capacity == (1 << 20) // 64 // 2
    assert p.routing.remote_nodes == 4999
    assert p.routing.routes_per_node == 9998
    assert p.routing.fdb_entries_per_node == 0
    assert p.routing.neighbour_entries_per_node == 4999
    assert p.bgp.full_mesh_sessions_total == 12497500
    assert p.bgp.full_mesh_sessions_per_node == 4999
    assert p.mtu.pod == 1500
    # 4999 ARP next hops on one L2 segment is the only thing that does not fit
    assert codes(p) == ["neighbour_table"]


def test_block_candidates_show_the_trade_off():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=10000, routing="direct"))
    table = {o.prefix_length: o for o in p.block_options}
    assert sorted(table) == [24, 25, 26, 27, 28]
    assert (table[24].blocks_per_node, table[24].waste_per_node, table[24].routes_per_node) == (1, 146, 4999)
    assert table[24].pool_addresses_needed == 1280000 and table[24].pool_prefix_needed == 11
    assert (table[27].blocks_per_node, table[27].routes_per_node) == (4, 19996)
    assert (table[28].blocks_per_node, table[28].waste_per_node, table[28].routes_per_node) == (7, 2, 34993)
    assert [o.prefix_length for o in p.block_options if o.within_max_routes] == [24, 25, 26]
    assert [o.prefix_length for o in p.block_options if o.chosen] == [26]


def test_block_choice_follows_max_routes():
    # with room for 7 routes per remote node, the /28 wastes least (7 x 16 = 112 for 110 pods)
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100, routing="direct", max_routes=40000))
    assert (p.block.prefix_length, p.block.waste_per_node, p.routing.routes_per_node) == (28, 2, 34993)
    # a small cluster gets the least waste as well
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=100, routing="direct"))
    assert (p.block.prefix_length, p.block.blocks_per_node, p.routing.routes_per_node) == (28, 7, 63)


def test_equal_waste_goes_to_the_smaller_block():
    # 64 pods fill a /26, two /27s or four /28s exactly
    p = plan(PlanInput(nodes=100, max_pods_per_node=64, services=100, routing="direct"))
    assert (p.block.prefix_length, p.block.blocks_per_node, p.block.waste_per_node) == (28, 4, 0)
    # at 5000 nodes four /28s per node is 19996 routes: the /27 is the smallest within 10000
    p = plan(PlanInput(nodes=5000, max_pods_per_node=64, services=100, routing="direct"))
    assert (p.block.prefix_length, p.routing.routes_per_node) == (27, 9998)


def test_vxlan_takes_no_tunnel_address_and_counts_fdb_and_mtu():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=10000))
    assert p.routing.mode == "vxlan" and p.routing.encapsulation == "vxlan"
    assert p.block.addresses_per_node == 110
    assert (p.block.prefix_length, p.block.blocks_per_node, p.block.waste_per_node) == (26, 2, 18)
    assert p.routing.routes_per_node == 9998
    assert p.routing.fdb_entries_per_node == 4999
    assert p.routing.neighbour_entries_per_node == 4999
    assert (p.mtu.overhead, p.mtu.pod) == (50, 1450)
    assert p.warnings == []  # permanent VTEP neighbours do not count against gc_thresh


def test_64_pods_with_vxlan_fill_one_block_exactly():
    p = plan(PlanInput(nodes=10, max_pods_per_node=64, services=10, block_size=26))
    assert (p.block.blocks_per_node, p.block.waste_per_node) == (1, 0)
    p = plan(PlanInput(nodes=10, max_pods_per_node=64, services=10, block_size=26, routing="bgp"))
    assert (p.block.blocks_per_node, p.block.waste_per_node) == (1, 0)


def test_modes_compared_side_by_side():
    p = plan(PlanInput(nodes=200, max_pods_per_node=110, services=100, routing="bgp", route_reflectors=2,
                       block_size=26))
    rows = {m.mode: m for m in p.routing.modes}
    assert {m: rows[m].routes_per_node for m in rows} == {"vxlan": 398, "direct": 398, "bgp": 398}
    assert (rows["vxlan"].fdb_entries_per_node, rows["direct"].fdb_entries_per_node) == (199, 0)
    assert rows["bgp"].bgp_sessions_per_node == 2
    assert rows["vxlan"].bgp_sessions_per_node is None


def test_growth_plans_for_more_nodes_and_services():
    p = plan(PlanInput(nodes=1000, max_pods_per_node=110, services=3000, growth_percent=10, routing="bgp",
                       route_reflectors=3, block_size=26))
    assert (p.nodes_planned, p.services_planned) == (1100, 3300)
    assert p.pod_pool.addresses_needed == 1100 * 128
    assert p.routing.routes_per_node == 1099 * 2
    p = plan(PlanInput(nodes=3, max_pods_per_node=10, services=1, growth_percent=12.5))
    assert p.nodes_planned == 4  # ceil(3.375)


def test_single_node_has_no_remote_routes():
    p = plan(PlanInput(nodes=1, max_pods_per_node=110, services=1, routing="bgp"))
    assert (p.routing.routes_per_node, p.bgp.full_mesh_sessions_total) == (0, 0)


# ---------------------------------------------------------------- BGP


def test_route_reflector_sessions():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=10000, routing="bgp", route_reflectors=4))
    assert p.bgp.reflector_sessions_total == 5000 * 4 + 4 * 3 // 2 == 20006
    assert p.bgp.reflector_sessions_per_node == 4
    assert p.bgp.sessions_per_reflector == 5003
    assert (p.bgp.sessions_total, p.bgp.sessions_per_node) == (20006, 4)
    assert p.bgp.full_mesh_sessions_total == 12497500
    assert "bgp_full_mesh" not in codes(p)
    assert p.warnings == []


def test_full_mesh_warning_above_100_nodes_only():
    p = plan(PlanInput(nodes=101, max_pods_per_node=110, services=100, routing="bgp"))
    assert codes(p) == ["bgp_full_mesh"]
    assert "101 nodes" in p.warnings[0].message and "--route-reflectors" in p.warnings[0].message
    assert plan(PlanInput(nodes=100, max_pods_per_node=110, services=100, routing="bgp")).warnings == []
    # growth counts: 91 nodes + 20% = 110 BGP speakers
    assert "bgp_full_mesh" in codes(plan(PlanInput(nodes=91, max_pods_per_node=110, services=100,
                                                   routing="bgp", growth_percent=20)))
    # no BGP sessions with VXLAN routing
    assert "bgp_full_mesh" not in codes(plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100)))


def test_single_route_reflector_warns():
    p = plan(PlanInput(nodes=50, max_pods_per_node=110, services=100, routing="bgp", route_reflectors=1))
    assert codes(p) == ["single_route_reflector"]


# ---------------------------------------------------------------- warnings


def test_pool_too_small_names_the_needed_prefix():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100, routing="bgp", route_reflectors=3,
                       pool="10.244.0.0/16"))
    assert codes(p) == ["pool_too_small"]
    msg = p.warnings[0].message
    assert "10.244.0.0/16" in msg and "640000" in msg and "/12" in msg and "512 full nodes" in msg
    assert p.pod_pool.node_capacity == 512
    assert p.pod_pool.utilisation_percent == pytest.approx(976.56)
    fits = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100, routing="bgp", route_reflectors=3,
                          pool="10.0.0.0/12"))
    assert fits.warnings == [] and not fits.pod_pool.proposed


def test_pool_bigger_than_any_private_range():
    p = plan(PlanInput(nodes=200000, max_pods_per_node=110, services=100, routing="bgp", route_reflectors=3,
                       block_size=25, max_routes=10**6))
    assert p.pod_pool.prefix_needed == 7
    assert p.pod_pool.cidr == "10.0.0.0/8"
    assert codes(p) == ["pool_too_small"]
    assert "no private range" in p.warnings[0].message
    # the proposed Service CIDR moves out of the way of 10.0.0.0/8
    assert p.service_cidr.cidr == "172.16.0.0/24"


def test_routes_over_max_routes():
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100, block_size=28))
    assert codes(p) == ["routes_over_limit"]
    assert "34993 routes" in p.warnings[0].message and "--block-size 26" in p.warnings[0].message
    # one block per node is still 4999 routes
    p = plan(PlanInput(nodes=5000, max_pods_per_node=110, services=100, max_routes=1000))
    assert p.block.prefix_length == 25  # fewest routes, then least waste
    assert codes(p) == ["routes_over_limit"]
    assert "raise --max-routes" in p.warnings[0].message


def test_max_blocks_per_host():
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=10, routing="direct", block_size=26,
                       max_blocks_per_host=1))
    assert codes(p) == ["max_blocks_per_host"]
    assert "64 pods" in p.warnings[0].message
    # when choosing, the planner keeps within the limit
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=10, routing="direct", max_blocks_per_host=1))
    assert (p.block.prefix_length, p.block.blocks_per_node) == (25, 1)
    assert p.warnings == []


def test_overlap_between_pool_and_service_cidr():
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=100, pool="10.96.0.0/16",
                       service_cidr="10.96.0.0/12"))
    assert codes(p) == ["pool_service_overlap"]
    # a proposed Service CIDR steers clear of the given pool
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=100, pool="10.96.0.0/16"))
    assert p.service_cidr.proposed and p.service_cidr.cidr == "10.97.0.0/24"
    assert p.warnings == []
    # and a proposed pool of a given Service CIDR
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=100, service_cidr="10.244.0.0/16"))
    assert p.pod_pool.cidr == "10.245.0.0/21"  # 10 nodes x 7 /28 blocks = 1120 addresses
    assert p.warnings == []


def test_service_cidr_sizing():
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=10000))
    assert p.service_cidr.cidr == "10.96.0.0/17"
    assert (p.service_cidr.usable, p.service_cidr.services_with_headroom) == (32766, 20000)
    assert plan(PlanInput(nodes=10, max_pods_per_node=110, services=5)).service_cidr.cidr == "10.96.0.0/24"
    small = plan(PlanInput(nodes=10, max_pods_per_node=110, services=1000, service_cidr="10.96.0.0/24"))
    assert codes(small) == ["service_cidr_too_small"]
    assert "254 usable" in small.warnings[0].message and "/21" in small.warnings[0].message
    big = plan(PlanInput(nodes=10, max_pods_per_node=110, services=1000, service_cidr="10.96.0.0/11"))
    assert codes(big) == ["service_cidr_too_large"]
    ok = plan(PlanInput(nodes=10, max_pods_per_node=110, services=1000, service_cidr="10.96.0.0/12"))
    assert ok.warnings == []


def test_public_pool_warns():
    p = plan(PlanInput(nodes=10, max_pods_per_node=110, services=10, pool="8.0.0.0/16"))
    assert codes(p) == ["pool_not_private"]
    assert plan(PlanInput(nodes=10, max_pods_per_node=110, services=10, pool="100.64.0.0/16")).warnings == []


def test_direct_routing_neighbour_table():
    assert plan(PlanInput(nodes=1025, max_pods_per_node=110, services=10, routing="direct")).warnings == []
    p = plan(PlanInput(nodes=1026, max_pods_per_node=110, services=10, routing="direct"))
    assert codes(p) == ["neighbour_table"] and "gc_thresh3" in p.warnings[0].message


# ---------------------------------------------------------------- conntrack


def test_conntrack_as_kube_proxy():
    p = plan(PlanInput(nodes=1, max_pods_per_node=1, services=1))
    assert (p.conntrack.max_per_core, p.conntrack.max, p.conntrack.hashsize) == (32768, 524288, 131072)
    p = plan(PlanInput(nodes=1, max_pods_per_node=1, services=1, node_cpus=2))
    assert p.conntrack.max == 131072  # the minimum wins over 2 x 32768


def test_conntrack_total_to_per_core():
    p = plan(PlanInput(nodes=1, max_pods_per_node=1, services=1, node_cpus=16, conntrack_max=2310720))
    assert (p.conntrack.max_per_core, p.conntrack.max, p.conntrack.from_total) == (144420, 2310720, True)
    assert p.warnings == []
    uneven = plan(PlanInput(nodes=1, max_pods_per_node=1, services=1, node_cpus=16, conntrack_max=2310721))
    assert (uneven.conntrack.max_per_core, uneven.conntrack.max) == (144421, 2310736)
    assert codes(uneven) == ["conntrack_max_inexact"]
    low = plan(PlanInput(nodes=1, max_pods_per_node=1, services=1, node_cpus=16, conntrack_max=100000))
    assert low.conntrack.max == 131072 and codes(low) == ["conntrack_max_inexact"]


# ---------------------------------------------------------------- helpers


def test_prefix_for_and_place():
    assert [prefix_for(n) for n in (1, 2, 64, 65, 640000, 1 << 20)] == [32, 31, 26, 25, 12, 12]
    from ipaddress import IPv4Address, IPv4Network

    assert str(place(16, IPv4Address("10.244.0.0"), [])) == "10.244.0.0/16"
    assert str(place(12, IPv4Address("10.244.0.0"), [])) == "10.240.0.0/12"
    assert str(place(12, IPv4Address("10.96.0.0"), [IPv4Network("10.0.0.0/8")])) == "172.16.0.0/12"
    assert place(8, IPv4Address("10.0.0.0"), [IPv4Network("10.0.0.0/8")]) is None


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"nodes": 0}, "--nodes"),
        ({"nodes": -3}, "--nodes"),
        ({"max_pods_per_node": 0}, "--max-pods-per-node"),
        ({"services": 0}, "--services"),
        ({"growth_percent": -1}, "--growth"),
        ({"block_size": 19}, "--block-size"),
        ({"block_size": 33}, "--block-size"),
        ({"pool": "10.244.0.1/16"}, "--pool"),
        ({"pool": "10.244.0.0/33"}, "--pool"),
        ({"pool": "fd00::/48"}, "--pool"),
        ({"service_cidr": "nope"}, "--service-cidr"),
        ({"pool": "10.0.0.0/24", "block_size": 23}, "--block-size"),
        ({"routing": "ospf"}, "--routing"),
        ({"encapsulation": "gre"}, "--encapsulation"),
        ({"encapsulation": "none"}, "--encapsulation"),
        ({"route_reflectors": 2}, "--route-reflectors"),
        ({"node_cpus": 0}, "--node-cpus"),
        ({"underlay_mtu": 100}, "--underlay-mtu"),
        ({"conntrack_max": 10, "conntrack_max_per_core": 10}, "--conntrack-max"),
    ],
)
def test_invalid_input_names_the_flag(kwargs, flag):
    base = {"nodes": 10, "max_pods_per_node": 110, "services": 10}
    with pytest.raises(PodnetError, match=flag):
        plan(PlanInput(**{**base, **kwargs}))


# ---------------------------------------------------------------- CLI


BASE = ["--nodes", "5000", "--max-pods-per-node", "110", "--services", "10000"]


def test_cli_table(capsys):
    code, out, err = run(capsys, *BASE, "--routing", "bgp", "--route-reflectors", "4")
    assert code == 0 and err == ""
    assert "block size          /26 (64 addresses), chosen by the planner" in out
    assert "waste               18 per node, 90000 in total" in out
    assert "pool                10.240.0.0/12 (proposed)" in out
    assert "12497500 in total = n(n-1)/2" in out
    assert "20006 in total = n*K + K(K-1)/2" in out
    assert "CIDR      10.96.0.0/17 (proposed)" in out
    assert "Warnings\n  none" in out
    lines = out.splitlines()
    header = lines[lines.index("Block sizes (routes per node must stay within --max-routes 10000)") + 1]
    assert header.split() == ["BLOCK", "ADDRESSES", "BLOCKS/NODE", "WASTE/NODE", "WASTE-TOTAL", "ROUTES/NODE",
                              "POOL-NEEDED", "NOTE"]
    bgp_row = next(line for line in out.splitlines() if line.startswith("  bgp "))
    assert bgp_row.split() == ["bgp", "none", "9998", "0", "4999", "4", "selected"]


def test_cli_json_shape(capsys):
    code, out, _ = run(capsys, *BASE, "--routing", "bgp", "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {
        "input", "nodes_planned", "services_planned", "block", "block_options", "pod_pool", "routing", "bgp",
        "mtu", "service_cidr", "conntrack", "warnings",
    }
    assert data["block"]["prefix_length"] == 26 and data["block"]["waste_per_node"] == 18
    assert data["pod_pool"] == {
        "cidr": "10.240.0.0/12", "proposed": True, "prefix_length": 12, "addresses": 1048576,
        "addresses_needed": 640000, "prefix_needed": 12, "utilisation_percent": 61.04, "node_capacity": 8192,
    }
    assert data["routing"]["routes_per_node"] == 9998
    assert [m["mode"] for m in data["routing"]["modes"]] == ["vxlan", "direct", "bgp"]
    assert data["bgp"]["full_mesh_sessions_total"] == 12497500
    assert data["mtu"]["pod"] == 1500 and data["mtu"]["reference_overhead"]["wireguard"] == 60
    assert data["conntrack"]["max"] == 524288
    assert [w["code"] for w in data["warnings"]] == ["bgp_full_mesh"]
    assert set(data["warnings"][0]) == {"code", "message"}
    assert {o["prefix_length"] for o in data["block_options"]} == {24, 25, 26, 27, 28}


def test_cli_conntrack_reverse(capsys):
    code, out, _ = run(capsys, "--nodes", "3", "--max-pods-per-node", "10", "--services", "1",
                       "--conntrack-max", "2310720", "--node-cpus", "16", "-o", "json")
    assert code == 0
    ct = json.loads(out)["conntrack"]
    assert (ct["max_per_core"], ct["max"], ct["cpus"]) == (144420, 2310720, 16)
    code, out, _ = run(capsys, "--nodes", "3", "--max-pods-per-node", "10", "--services", "1",
                       "--conntrack-max", "2310720", "--node-cpus", "16")
    assert "144420 = 2310720 / 16 cores" in out


def test_cli_warnings_exit_zero_unless_strict(capsys):
    code, out, _ = run(capsys, *BASE, "--routing", "bgp")
    assert code == 0 and "full-mesh BGP with 5000 nodes" in out
    assert run(capsys, *BASE, "--routing", "bgp", "--strict")[0] == 3  # ran fine, found warnings
    assert run(capsys, *BASE, "--routing", "bgp", "--route-reflectors", "3", "--strict")[0] == 0


def test_cli_accepts_slash_block_size_and_percent_growth(capsys):
    code, out, _ = run(capsys, *BASE, "--block-size", "/25", "--growth", "10%", "-o", "json")
    data = json.loads(out)
    assert code == 0 and data["block"]["prefix_length"] == 25 and data["block"]["chosen_by"] == "user"
    assert data["nodes_planned"] == 5500


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--nodes", "0", "--max-pods-per-node", "110", "--services", "1"], "--nodes"),
        (["--nodes", "-5", "--max-pods-per-node", "110", "--services", "1"], "--nodes"),
        (["--nodes", "many", "--max-pods-per-node", "110", "--services", "1"], "--nodes"),
        (["--max-pods-per-node", "110", "--services", "1"], "--nodes"),
        (["--nodes", "5", "--services", "1"], "--max-pods-per-node"),
        (BASE + ["--pool", "10.244.0.0/99"], "--pool"),
        (BASE + ["--pool", "10.244.1.0/16"], "--pool"),
        (BASE + ["--service-cidr", "10.96.0.0/x"], "--service-cidr"),
        (BASE + ["--block-size", "40"], "--block-size"),
        (BASE + ["--routing", "rip"], "--routing"),
        (BASE + ["--route-reflectors", "2"], "--route-reflectors"),
        (BASE + ["--growth", "lots"], "--growth"),
        (BASE + ["--conntrack-max", "1.5"], "--conntrack-max"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, argv, flag):
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0]
    assert "Traceback" not in err
