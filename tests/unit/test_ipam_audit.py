"""IPAM audit findings and leak release with its grace period, on a temporary SQLite store."""

from __future__ import annotations

import pytest

from podnet.ipam import IPAM, keys
from podnet.ipam import block as blk
from podnet.ipam.audit import (
    DANGLING_AFFINITY,
    DUPLICATE_ADDRESS,
    EMPTY_HANDLE,
    LEAKED,
    MISSING_NODE,
    NO_HANDLE,
    OVERLAPPING_BLOCKS,
    POD_WITHOUT_ADDRESS,
    check,
    release_leaked,
)
from podnet.model.objects import IPPool, Node, Pod
from podnet.store.objects import ObjectStore
from podnet.store.sqlite import SQLiteStore

T0 = 1_700_000_000.0
GRACE = 15 * 60


@pytest.fixture
def kv(tmp_path):
    store = SQLiteStore(str(tmp_path / "ipam.db"))
    ObjectStore(store).apply([
        IPPool.model_validate({"metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/24", "blockSize": 28}}),
        Node.model_validate({"metadata": {"name": "n1"}}),
        Node.model_validate({"metadata": {"name": "n2"}}),
    ])
    yield store
    store.close()


@pytest.fixture
def ipam(kv):
    return IPAM(kv)


def add_pod(kv, ns, name, node_name="n1", host_network=False):
    ObjectStore(kv).apply([Pod.model_validate({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node_name, "hostNetwork": host_network, "containers": [{"name": "c"}]},
    })])


def delete_pod(kv, ns, name):
    ObjectStore(kv).delete(Pod, name, ns)


def kinds(findings):
    return sorted(f.kind for f in findings)


def allocated(kv):
    return {blk.address(r.value["cidr"], o): a["handle_id"]
            for r in kv.list(keys.BLOCKS)[0] for o, a in blk.allocations(r.value)}


# ---------------------------------------------------------------- check


def test_clean_cluster_has_no_findings(kv, ipam):
    for i in range(3):
        add_pod(kv, "ns", f"p{i}")
        ipam.allocate(f"h{i}", "n1", namespace="ns", pod=f"p{i}")
    add_pod(kv, "ns", "host", host_network=True)
    add_pod(kv, "ns", "pending", node_name=None)
    ipam.allocate("manual", "n2")  # no pod attributes: not a leak
    assert check(kv) == []


def test_allocation_of_a_deleted_pod_is_reported(kv, ipam):
    add_pod(kv, "ns", "gone")
    a = ipam.allocate("h-gone", "n1", namespace="ns", pod="gone")
    delete_pod(kv, "ns", "gone")
    [f] = check(kv)
    assert f.kind == LEAKED and f.address == a.address and f.handle == "h-gone" and f.block == a.block
    assert "pod ns/gone no longer exists" in f.message


def test_allocation_of_a_pod_now_on_another_node_is_reported(kv, ipam):
    add_pod(kv, "ns", "moved", node_name="n2")
    ipam.allocate("old", "n1", namespace="ns", pod="moved")
    ipam.allocate("new", "n2", namespace="ns", pod="moved")
    [f] = check(kv)
    assert f.kind == LEAKED and f.handle == "old" and "now runs on node n2" in f.message


def test_scheduled_pod_without_address_is_reported(kv, ipam):
    add_pod(kv, "ns", "lonely", node_name="n2")
    [f] = check(kv)
    assert f.kind == POD_WITHOUT_ADDRESS and f.pod == "ns/lonely" and f.node == "n2"
    ipam.allocate("h", "n2", namespace="ns", pod="lonely")
    assert check(kv) == []


def test_handle_record_without_address_is_reported_and_free_clears_it(kv, ipam):
    kv.create(keys.handle_key("ghost"), {"blocks": {"10.0.0.0/28": 1}})
    [f] = check(kv)
    assert f.kind == EMPTY_HANDLE and f.handle == "ghost"
    assert ipam.release("ghost") == []
    assert check(kv) == []


def test_allocation_whose_handle_record_is_missing_is_reported(kv, ipam):
    a = ipam.allocate("h", "n1")
    kv.delete(keys.handle_key("h"))
    [f] = check(kv)
    assert f.kind == NO_HANDLE and f.address == a.address and f.handle == "h"


def test_blocks_of_missing_nodes_and_dangling_affinities_are_reported(kv, ipam):
    ipam.allocate("a", "n1")
    b = ipam.allocate("b", "removed-node")
    kv.put(keys.affinity_key("n2", "10.0.0.240/28"), {"state": "pending"})
    found = {f.kind: f for f in check(kv)}
    assert set(found) == {MISSING_NODE, DANGLING_AFFINITY}
    assert found[MISSING_NODE].block == b.block and found[MISSING_NODE].node == "removed-node"
    assert found[DANGLING_AFFINITY].node == "n2" and found[DANGLING_AFFINITY].block == "10.0.0.240/28"
    # Removing the node clears its affinity; its address stays until released.
    ipam.release_node("removed-node")
    assert kinds(check(kv)) == [DANGLING_AFFINITY]


# ---------------------------------------------------------------- release --leaked


def leak_one(kv, ipam, name="gone", handle="h-gone"):
    add_pod(kv, "ns", name)
    a = ipam.allocate(handle, "n1", namespace="ns", pod=name)
    delete_pod(kv, "ns", name)
    return a


def test_leak_is_released_only_after_the_grace_period(kv, ipam):
    a = leak_one(kv, ipam)
    keep = ipam.allocate("keep", "n1")
    r = release_leaked(kv, GRACE, now=T0)
    assert r.released == [] and [w.address for w in r.waiting] == [a.address]
    r = release_leaked(kv, GRACE, now=T0 + GRACE - 1)
    assert r.released == [] and len(r.waiting) == 1
    assert a.address in allocated(kv)
    r = release_leaked(kv, GRACE, now=T0 + GRACE)
    assert [x.address for x in r.released] == [a.address] and r.waiting == []
    assert allocated(kv) == {keep.address: "keep"}
    assert kv.get(keys.handle_key("h-gone")) is None
    assert kv.list(keys.LEAKS)[0] == []
    assert check(kv) == []


def test_zero_grace_still_needs_two_observations(kv, ipam):
    a = leak_one(kv, ipam)
    assert release_leaked(kv, 0, now=T0).released == []
    assert a.address in allocated(kv)
    assert [x.address for x in release_leaked(kv, 0, now=T0).released] == [a.address]


def test_address_reused_in_between_is_not_released(kv, ipam):
    a = leak_one(kv, ipam)
    release_leaked(kv, GRACE, now=T0)
    # The leak is cleaned up by its owner and the same address goes to another dead pod's handle.
    ipam.release("h-gone")
    ipam.allocate("h-new", "n1", address=a.address, namespace="ns", pod="also-gone")
    r = release_leaked(kv, GRACE, now=T0 + 2 * GRACE)
    assert r.released == [] and r.forgotten == 1 and [w.handle for w in r.waiting] == ["h-new"]
    assert allocated(kv)[a.address] == "h-new"
    # Seen again after a full grace period of its own, it goes.
    r = release_leaked(kv, GRACE, now=T0 + 3 * GRACE)
    assert [x.handle for x in r.released] == ["h-new"]


def test_same_handle_reallocated_on_the_same_address_is_a_new_allocation(kv, ipam):
    a = leak_one(kv, ipam)
    release_leaked(kv, GRACE, now=T0)
    ipam.release("h-gone")
    again = ipam.allocate("h-gone", "n1", address=a.address, namespace="ns", pod="gone")
    assert again.address == a.address
    r = release_leaked(kv, GRACE, now=T0 + 2 * GRACE)
    assert r.released == [] and len(r.waiting) == 1


def test_pod_that_comes_back_is_not_released_and_its_observation_is_dropped(kv, ipam):
    a = leak_one(kv, ipam)
    release_leaked(kv, GRACE, now=T0)
    add_pod(kv, "ns", "gone")
    r = release_leaked(kv, GRACE, now=T0 + 2 * GRACE)
    assert r.released == [] and r.waiting == [] and r.forgotten == 1
    assert kv.list(keys.LEAKS)[0] == []
    assert a.address in allocated(kv)


def test_allocation_without_handle_record_is_released_after_grace(kv, ipam):
    a = ipam.allocate("orphan", "n1")
    kv.delete(keys.handle_key("orphan"))
    assert release_leaked(kv, 60, now=T0).released == []
    assert [x.address for x in release_leaked(kv, 60, now=T0 + 60).released] == [a.address]
    assert allocated(kv) == {}


def test_released_leak_address_is_allocatable_again_without_duplicates(kv, ipam):
    leaks = [leak_one(kv, ipam, f"gone{i}", f"h{i}") for i in range(5)]
    release_leaked(kv, 0, now=T0)
    assert len(release_leaked(kv, 0, now=T0 + 1).released) == 5
    fresh = IPAM(kv)
    got = [fresh.allocate(f"new{i}", "n1").address for i in range(16)]
    assert len(set(got)) == 16
    assert {x.address for x in leaks} <= set(got)


# ---------------------------------------------------------------- overlapping pools


def test_address_held_twice_across_overlapping_blocks_is_reported(kv, ipam):
    # Pools stored without `podnet apply` (which refuses them), as an older store may hold them.
    ObjectStore(kv).apply([
        IPPool.model_validate({"metadata": {"name": "wide"}, "spec": {"cidr": "10.50.0.0/23", "blockSize": 24}}),
        IPPool.model_validate({"metadata": {"name": "narrow"}, "spec": {"cidr": "10.50.0.0/24", "blockSize": 26}}),
    ])
    # n1 fills 10.50.0.0/24 from its start; n2's /26 of the narrow pool lies inside it.
    on_n1 = [ipam.allocate(f"a{i}", "n1", pools=["wide"]) for i in range(136)]
    on_n2 = [ipam.allocate(f"b{i}", "n2", pools=["narrow"]) for i in range(4)]
    twice = sorted({a.address for a in on_n1} & {b.address for b in on_n2})
    assert twice, "the two pools should have handed out one address twice"
    wide_block, narrow_block = on_n1[0].block, on_n2[0].block
    found = check(kv)
    dups = [f for f in found if f.kind == DUPLICATE_ADDRESS]
    assert sorted(f.address for f in dups) == twice
    first = next(f for f in dups if f.address == twice[0])
    a = next(x for x in on_n1 if x.address == twice[0])
    b = next(x for x in on_n2 if x.address == twice[0])
    assert f"handle {a.handle} in block {wide_block} (pool wide, node n1)" in first.message
    assert f"handle {b.handle} in block {narrow_block} (pool narrow, node n2)" in first.message
    [over] = [f for f in found if f.kind == OVERLAPPING_BLOCKS]
    assert over.message == (f"block {wide_block} (pool wide, node n1) overlaps block {narrow_block} "
                            "(pool narrow, node n2)")
    assert kinds(found) == [DUPLICATE_ADDRESS] * len(twice) + [OVERLAPPING_BLOCKS]


def test_blocks_of_disjoint_pools_do_not_overlap(kv, ipam):
    ObjectStore(kv).apply([
        IPPool.model_validate({"metadata": {"name": "q"}, "spec": {"cidr": "10.0.1.0/24", "blockSize": 26}}),
    ])
    ipam.allocate("a", "n1", pools=["p"])
    ipam.allocate("b", "n1", pools=["q"])
    assert check(kv) == []
