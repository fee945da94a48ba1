"""Cross-node routing as a pure function of blocks, pools and nodes."""

from podnet.agent.view import routing_inputs
from podnet.dataplane.routing import BlockOwner, Borrowed, Route, desired_routing, vtep_mac
from podnet.ipam import block as blk
from podnet.model.objects import IPPool, Node

IPS = {"n1": "10.99.0.11", "n2": "10.99.0.12", "n3": "10.99.0.13"}


def test_one_route_per_remote_block_and_blackhole_for_own_blocks():
    blocks = [
        BlockOwner("10.244.0.0/26", "n1", "VXLAN"),
        BlockOwner("10.244.0.64/26", "n2", "VXLAN"),
        BlockOwner("10.244.0.128/26", "n2", "VXLAN"),
        BlockOwner("10.245.0.0/26", "n3", "None"),
    ]
    d = desired_routing("n1", blocks, [], IPS, vxlan_in_use=True)
    assert d.routes == {
        Route("10.244.0.0/26", "blackhole"),
        Route("10.244.0.64/26", "vxlan", "10.99.0.12", "10.99.0.11"),
        Route("10.244.0.128/26", "vxlan", "10.99.0.12", "10.99.0.11"),
        Route("10.245.0.0/26", "direct", "10.99.0.13", "10.99.0.11"),
    }
    # one VTEP per remote node with VXLAN blocks, none for direct-only nodes
    assert d.vteps == {("10.99.0.12", vtep_mac("n2"))}


def test_borrowed_addresses_get_a_host_route_except_on_the_borrower():
    blocks = [BlockOwner("10.244.0.0/26", "n1", "VXLAN")]
    borrowed = [Borrowed("10.244.0.5", "n2", "VXLAN")]
    on_n3 = desired_routing("n3", blocks, borrowed, IPS, True)
    assert Route("10.244.0.5/32", "vxlan", "10.99.0.12", "10.99.0.13") in on_n3.routes
    on_n1 = desired_routing("n1", blocks, borrowed, IPS, True)
    assert Route("10.244.0.5/32", "vxlan", "10.99.0.12", "10.99.0.11") in on_n1.routes  # more specific than its blackhole
    on_n2 = desired_routing("n2", blocks, borrowed, IPS, True)
    assert all(r.dst != "10.244.0.5/32" for r in on_n2.routes)


def test_routes_to_other_nodes_leave_from_this_nodes_address():
    blocks = [BlockOwner("10.244.0.64/26", "n2", "VXLAN"), BlockOwner("10.245.0.0/26", "n3", "None")]
    d = desired_routing("n1", blocks, [], IPS, True)
    assert {r.src for r in d.routes} == {"10.99.0.11"}
    # an address given by the agent (--node-ip) wins over the Node's InternalIP
    d = desired_routing("n1", blocks, [], IPS, True, local_ip="10.99.0.111")
    assert {r.src for r in d.routes} == {"10.99.0.111"}


def test_unknown_node_address_gives_no_route_rather_than_a_wrong_one():
    d = desired_routing("n1", [BlockOwner("10.244.0.64/26", "ghost", "None")], [], IPS, False)
    assert d.routes == frozenset()


def test_vtep_macs_are_stable_unique_and_locally_administered():
    macs = {vtep_mac(f"node-{i}") for i in range(2000)}
    assert len(macs) == 2000
    assert vtep_mac("node-1") == vtep_mac("node-1")
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)


def _pool(name, cidr, encap="VXLAN", nat=False):
    return IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": name},
                                  "spec": {"cidr": cidr, "encapsulation": encap, "natOutgoing": nat}})


def _node(name, ip):
    return Node.model_validate({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


def test_view_reads_block_records_into_routing_inputs():
    block = {
        "cidr": "10.244.0.0/26", "pool": "vx", "affinity": "host:n1",
        "allocations": [0, None, 1] + [None] * 61,
        "attributes": [{"handle_id": "h0", "secondary": {"node": "n1"}},
                       {"handle_id": "h1", "secondary": {"node": "n2"}}],
    }
    direct = {"cidr": "10.245.0.0/26", "affinity": "host:n2", "allocations": [], "attributes": []}
    orphan = {"cidr": "10.9.0.0/26", "affinity": "host:n2", "allocations": [], "attributes": []}
    view = routing_inputs([block, direct, orphan], [_pool("vx", "10.244.0.0/16", nat=True),
                                                    _pool("dr", "10.245.0.0/16", "None")],
                          [_node("n1", "10.99.0.11"), _node("n2", "10.99.0.12")])
    assert view.blocks == [BlockOwner("10.244.0.0/26", "n1", "VXLAN"), BlockOwner("10.245.0.0/26", "n2", "None")]
    assert view.borrowed == [Borrowed("10.244.0.2", "n2", "VXLAN")]
    assert view.node_ips == {"n1": "10.99.0.11", "n2": "10.99.0.12"}
    assert view.vxlan_in_use
    assert view.nat.nat_pools == ("10.244.0.0/16",)
    assert view.nat.all_pools == ("10.244.0.0/16", "10.245.0.0/16")


class RecordingRoutes:
    """Stands in for the kernel side of RouteProgrammer: records what it is asked to hold."""

    node_ip = "10.99.0.11"

    def __init__(self) -> None:
        self.applied = []

    def underlay(self):
        return 2, 1500

    def apply(self, desired, full=True):
        from podnet.dataplane.routes import RoutingChanges

        self.applied.append((desired, full))
        return RoutingChanges(added=[r.dst for r in desired.routes])


def test_routes_follow_block_events_one_share_at_a_time_and_a_reload_forgets_what_is_gone():
    from podnet.agent.cache import ObjectCache
    from podnet.agent.dataplanes import RoutesDataplane
    from podnet.ipam import keys
    from podnet.model.objects import Node
    from podnet.store.base import Event
    from podnet.store.objects import ObjectEvent, key_of, stored_form

    cache = ObjectCache()
    for name, ip in (("n1", "10.99.0.11"), ("n2", "10.99.0.12")):
        node = Node.model_validate({"metadata": {"name": name},
                                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
        cache.apply(Event("ADDED", key_of(node), stored_form(node), 1))
    pool = _pool("vx", "10.244.0.0/16")
    cache.apply(Event("ADDED", key_of(pool), stored_form(pool), 1))
    programmer = RecordingRoutes()
    dp = RoutesDataplane("n1", cache, programmer)  # type: ignore[arg-type]

    def block_event(cidr, node, kind="ADDED"):
        raw = None if kind == "DELETED" else blk.new_block(cidr, "vx", node)
        return ObjectEvent(kind, None, keys.block_key(cidr), 2, raw=raw)

    assert dp.on_event(block_event("10.244.0.0/26", "n1"))
    assert dp.on_event(block_event("10.244.0.64/26", "n2"))
    dp.sync(full=True)
    desired, full = programmer.applied[-1]
    assert full and {(r.dst, r.kind) for r in desired.routes} == {("10.244.0.0/26", "blackhole"),
                                                                  ("10.244.0.64/26", "vxlan")}
    dp.on_event(block_event("10.244.0.128/26", "n2"))
    dp.sync(full=False)
    desired, full = programmer.applied[-1]
    assert not full and "10.244.0.128/26" in {r.dst for r in desired.routes}
    # a relist that no longer names the second block: its route goes
    dp.begin_reload()
    dp.on_event(block_event("10.244.0.0/26", "n1"))
    dp.on_event(block_event("10.244.0.128/26", "n2"))
    dp.end_reload({keys.block_key("10.244.0.0/26"), keys.block_key("10.244.0.128/26")})
    dp.sync(full=False)
    assert {r.dst for r in programmer.applied[-1][0].routes} == {"10.244.0.0/26", "10.244.0.128/26"}
