"""`podnet plan --routing bgp` states what podnet.bgp builds: its session counts are the ones
in the BIRD configurations the agent renders for that cluster shape."""

import pytest

from podnet.bgp.scale import shape
from podnet.plan import PlanInput, plan


@pytest.mark.parametrize("nodes", [20, 150])
def test_full_mesh_matches_rendered_configs(nodes):
    p = plan(PlanInput(nodes=nodes, max_pods_per_node=64, services=10, routing="bgp", growth_percent=0))
    rendered = shape(nodes, 0, blocks=p.block.blocks_per_node)["mesh"]
    assert p.bgp.sessions_per_node == rendered.sessions
    assert p.bgp.paths_per_node == rendered.paths_received
    assert p.routing.routes_per_node == rendered.routes_installed
    assert p.bgp.mesh_enabled


@pytest.mark.parametrize(("nodes", "k"), [(20, 2), (300, 3)])
def test_reflectors_match_rendered_configs(nodes, k):
    p = plan(PlanInput(nodes=nodes, max_pods_per_node=64, services=10, routing="bgp", route_reflectors=k,
                       growth_percent=0))
    # the plan's reflectors are dedicated speakers beside the nodes: the cluster has nodes + k BGP nodes
    rendered = shape(nodes + k, k, blocks=p.block.blocks_per_node)
    assert p.bgp.sessions_per_node == rendered["client"].sessions == k
    assert p.bgp.sessions_per_reflector == rendered["reflector"].sessions
    assert not p.bgp.mesh_enabled
    assert p.bgp.routes_announced_per_node == p.block.blocks_per_node
