"""IPAM behaviour a user notices, on a temporary SQLite store."""

from __future__ import annotations

import ipaddress
import json

import pytest

from podnet.ipam import (
    ANNOTATION_ADDRESS,
    ANNOTATION_POOLS,
    IPAM,
    AddressUnavailable,
    IPAMExhausted,
    NoPool,
    keys,
)
from podnet.ipam import block as blk
from podnet.model.objects import IPAMConfig, IPPool, IPReservation, Namespace, Node, Pod
from podnet.store.base import Op
from podnet.store.objects import ObjectStore
from podnet.store.sqlite import SQLiteStore


@pytest.fixture
def kv(tmp_path):
    store = SQLiteStore(str(tmp_path / "ipam.db"))
    yield store
    store.close()


@pytest.fixture
def ipam(kv):
    return IPAM(kv)


def apply(kv, *objs):
    ObjectStore(kv).apply(objs)


def pool(name, cidr, block_size=None, **spec):
    body = {"cidr": cidr, **spec}
    if block_size is not None:
        body["blockSize"] = block_size
    return IPPool.model_validate({"metadata": {"name": name}, "spec": body})


def node(name, **labels):
    return Node.model_validate({"metadata": {"name": name, "labels": labels}})


def namespace(name, labels=None, annotations=None):
    return Namespace.model_validate({"metadata": {"name": name, "labels": labels or {},
                                                  "annotations": annotations or {}}})


def pod(ns, name, node_name=None, annotations=None):
    return Pod.model_validate({"metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
                               "spec": {"nodeName": node_name, "containers": [{"name": "c"}]}})


def ipam_config(**spec):
    return IPAMConfig.model_validate({"metadata": {"name": "default"}, "spec": spec})


def reservation(name, *cidrs):
    return IPReservation.model_validate({"metadata": {"name": name}, "spec": {"reservedCIDRs": list(cidrs)}})


def other_process(kv):
    """The same store file under another URL: an IPAM on it has its own cache, as in
    another process (instances of one process on one store share theirs)."""
    directory, name = kv.path.rsplit("/", 1)
    return SQLiteStore(f"{directory}/./{name}")


def in_net(addr, cidr):
    return ipaddress.ip_address(addr) in ipaddress.ip_network(cidr)


def all_allocated(kv):
    """address -> handle, from the block records, asserting each record is consistent."""
    out = {}
    for rec in kv.list(keys.BLOCKS)[0]:
        assert blk.check_consistent(rec.value) == []
        for o, attrs in blk.allocations(rec.value):
            a = blk.address(rec.value["cidr"], o)
            assert a not in out
            out[a] = attrs["handle_id"]
    return out


# ---------------------------------------------------------------- basics


def test_allocate_returns_a_pool_address_and_is_idempotent(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/16"))
    a = ipam.allocate("net.c1.eth0", "n1")
    assert in_net(a.address, "10.0.0.0/16") and a.prefix_len == 32 and a.pool == "p"
    assert in_net(a.address, a.block) and a.handle == "net.c1.eth0"
    again = ipam.allocate("net.c1.eth0", "n1")
    assert again == a
    # A fresh instance (no cache) agrees, and nothing was allocated twice.
    assert IPAM(kv).allocate("net.c1.eth0", "n1") == a
    assert all_allocated(kv) == {a.address: "net.c1.eth0"}
    assert ipam.lookup("net.c1.eth0") == a


def test_distinct_handles_get_distinct_addresses(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24"))
    got = [ipam.allocate(f"h{i}", "n1").address for i in range(100)]
    assert len(set(got)) == 100
    assert set(all_allocated(kv)) == set(got)


def test_release_frees_exactly_that_handles_address_and_is_idempotent(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24"))
    a, b, c = (ipam.allocate(h, "n1") for h in ("h1", "h2", "h3"))
    assert ipam.release("h2") == [b.address]
    assert ipam.release("h2") == []
    assert ipam.release("never-allocated") == []
    assert all_allocated(kv) == {a.address: "h1", c.address: "h3"}
    assert kv.get(keys.handle_key("h2")) is None
    assert ipam.lookup("h2") is None
    # Released addresses go to the back of the queue: the next ones are new.
    assert ipam.allocate("h4", "n1").address != b.address


def test_release_frees_the_handle_in_every_block_it_lists(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    a = ipam.allocate("multi", "n1")
    other = ipam.allocate("other", "n2")
    assert a.block != other.block
    # Give "multi" a second address in n2's block, as another IPAM client could.
    rec = kv.get(keys.block_key(other.block))
    o = blk.first_free(rec.value)
    hrec = kv.get(keys.handle_key("multi"))
    kv.txn([Op.update(rec.key, blk.assign(rec.value, o, "multi", {}), rec.revision),
            Op.update(hrec.key, {"blocks": {a.block: 1, other.block: 1}}, hrec.revision)])
    second = blk.address(other.block, o)
    assert sorted(ipam.release("multi")) == sorted([a.address, second])
    assert all_allocated(kv) == {other.address: "other"}


def test_handle_with_slash_and_odd_characters(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24"))
    a = ipam.allocate("k8s-pod-network.abc/def.eth0", "n1")
    assert ipam.allocate("k8s-pod-network.abc/def.eth0", "n1") == a
    assert ipam.release("k8s-pod-network.abc/def.eth0") == [a.address]


def test_ipv6_pool(kv, ipam):
    apply(kv, pool("v6", "fd00:10::/112"))
    a = ipam.allocate("h", "n1")
    assert a.prefix_len == 128 and in_net(a.address, "fd00:10::/112")
    assert blk.network(a.block).prefixlen == 122


# ---------------------------------------------------------------- blocks and nodes


def test_each_node_claims_its_own_blocks_and_never_shares_one(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/20", block_size=26))
    addrs = {n: [ipam.allocate(f"{n}-{i}", n).address for i in range(70)] for n in ("n1", "n2", "n3")}
    blocks = {n: {b.cidr for b in ipam.node_blocks(n)} for n in addrs}
    for n, mine in blocks.items():
        assert len(mine) == 2  # 70 addresses need two /26 blocks, no more
        for a in addrs[n]:  # every address routes via one of the node's own blocks
            assert any(in_net(a, c) for c in mine)
    assert not blocks["n1"] & blocks["n2"] and not blocks["n2"] & blocks["n3"] and not blocks["n1"] & blocks["n3"]
    # Each block names exactly one node, the one whose affinity record points at it.
    for rec in kv.list(keys.AFFINITIES)[0]:
        n, cidr = keys.parse_affinity_key(rec.key)
        assert blk.affinity_node(kv.get(keys.block_key(cidr)).value) == n
    info = {b.cidr: b for b in ipam.blocks()}
    assert len(info) == 6 and sum(b.used for b in info.values()) == 210
    assert {b.encapsulation for b in info.values()} == {"VXLAN"}


def test_independent_instances_share_blocks_without_duplicates(kv):
    apply(kv, pool("p", "10.0.0.0/24", block_size=26))
    x, y = IPAM(kv), IPAM(other_process(kv))
    got = []
    for i in range(60):
        got.append((x if i % 2 else y).allocate(f"h{i}", "n1").address)
    assert len(set(got)) == 60
    assert len(x.node_blocks("n1")) == 1


def test_stale_cache_is_corrected_by_compare_and_swap(kv):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    x, y = IPAM(kv), IPAM(other_process(kv))
    x.allocate("warm", "n1")  # x caches n1's block
    for i in range(15):  # y fills it behind x's back
        y.allocate(f"y{i}", "n1")
    a = x.allocate("late", "n1")
    assert a.address not in {y.lookup(f"y{i}").address for i in range(15)}
    assert len(all_allocated(kv)) == 17
    assert x.conflicts >= 1  # x's cached record was stale, and its compare-and-swap said so


def test_release_node_deletes_empty_blocks_and_unaffines_used_ones(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    for i in range(20):  # two blocks for n1
        ipam.allocate(f"h{i}", "n1")
    for i in range(16, 20):  # empty the second block
        ipam.release(f"h{i}")
    used_block = ipam.lookup("h0").block
    res = ipam.release_node("n1")
    assert res.unaffined == [used_block] and len(res.deleted) == 1
    assert ipam.node_blocks("n1") == []
    assert kv.list(keys.node_affinities("n1"))[0] == []
    assert kv.get(keys.block_key(res.deleted[0])) is None
    assert blk.affinity_node(kv.get(keys.block_key(used_block)).value) is None
    # Freeing the last address of a block nobody owns deletes the block.
    for i in range(16):
        ipam.release(f"h{i}")
    assert kv.get(keys.block_key(used_block)) is None


# ---------------------------------------------------------------- pool selection


def test_node_selector_chooses_the_pool(kv, ipam):
    apply(kv, pool("zone-a", "10.1.0.0/16", nodeSelector={"matchLabels": {"zone": "a"}}),
          pool("zone-b", "10.2.0.0/16", nodeSelector={"matchLabels": {"zone": "b"}}),
          node("na", zone="a"), node("nb", zone="b"), node("nc", zone="c"))
    assert ipam.allocate("h1", "na").pool == "zone-a"
    assert ipam.allocate("h2", "nb").pool == "zone-b"
    with pytest.raises(NoPool, match="no IPPool selects node nc"):
        ipam.allocate("h3", "nc")
    with pytest.raises(NoPool, match="node ghost"):  # no Node object: no labels
        ipam.allocate("h4", "ghost")


def test_namespace_selector_chooses_the_pool(kv, ipam):
    apply(kv, pool("default-pool", "10.1.0.0/16", namespaceSelector={
              "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["red"]}]}),
          pool("red-pool", "10.2.0.0/16", namespaceSelector={"matchLabels": {"team": "red"}}),
          namespace("red", {"team": "red"}), namespace("blue", {"team": "blue"}))
    assert ipam.allocate("h1", "n1", namespace="red", pod="x").pool == "red-pool"
    assert ipam.allocate("h2", "n1", namespace="blue", pod="x").pool == "default-pool"
    assert ipam.allocate("h3", "n1", namespace="nons", pod="x").pool == "default-pool"


GLOBAL = {"nodeSelector": {"matchLabels": {"podnet.io/never": "true"}}}


def test_pod_annotation_maps_a_workload_to_the_global_pool(kv, ipam):
    apply(kv, pool("default", "10.1.0.0/16"), pool("global", "203.0.113.0/24", block_size=28, **GLOBAL),
          pod("web", "edge", "n1", {ANNOTATION_POOLS: json.dumps(["global"])}), pod("web", "plain", "n1"))
    assert ipam.allocate("h1", "n1", namespace="web", pod="edge").pool == "global"
    assert ipam.allocate("h2", "n1", namespace="web", pod="plain").pool == "default"
    # Nobody else ever lands in the global pool through the selectors.
    assert all(ipam.allocate(f"x{i}", "n1").pool == "default" for i in range(20))


def test_namespace_annotation_applies_to_its_pods_and_pod_annotation_wins(kv, ipam):
    apply(kv, pool("default", "10.1.0.0/16"), pool("global", "203.0.113.0/24", **GLOBAL),
          pool("other", "10.9.0.0/16", **GLOBAL),
          namespace("dmz", annotations={ANNOTATION_POOLS: '["global"]'}),
          pod("dmz", "special", "n1", {ANNOTATION_POOLS: '["other"]'}))
    assert ipam.allocate("h1", "n1", namespace="dmz", pod="any").pool == "global"
    assert ipam.allocate("h2", "n1", namespace="dmz", pod="special").pool == "other"
    # The pools argument overrides every annotation.
    assert ipam.allocate("h3", "n1", namespace="dmz", pod="special", pools=["default"]).pool == "default"


def test_annotated_pools_are_tried_in_order(kv, ipam):
    apply(kv, pool("small", "10.1.0.0/30", block_size=30), pool("big", "10.2.0.0/24"),
          namespace("ns", annotations={ANNOTATION_POOLS: '["small", "big"]'}))
    got = [ipam.allocate(f"h{i}", "n1", namespace="ns", pod=f"p{i}").pool for i in range(6)]
    assert got == ["small"] * 4 + ["big"] * 2


def test_bad_pool_annotations_give_clear_errors(kv, ipam):
    apply(kv, pool("default", "10.1.0.0/16"), pool("off", "10.2.0.0/16", disabled=True),
          pool("lb", "10.3.0.0/16", allowedUses=["LoadBalancer"]),
          pod("ns", "a", annotations={ANNOTATION_POOLS: '["missing"]'}),
          pod("ns", "b", annotations={ANNOTATION_POOLS: "global"}),
          pod("ns", "c", annotations={ANNOTATION_POOLS: '["off"]'}),
          pod("ns", "d", annotations={ANNOTATION_POOLS: '["lb"]'}))
    with pytest.raises(NoPool, match="IPPool missing .*pod ns/a.* does not exist"):
        ipam.allocate("h", "n1", namespace="ns", pod="a")
    with pytest.raises(NoPool, match="must be a JSON list"):
        ipam.allocate("h", "n1", namespace="ns", pod="b")
    with pytest.raises(NoPool, match="IPPool off .* is disabled"):
        ipam.allocate("h", "n1", namespace="ns", pod="c")
    with pytest.raises(NoPool, match="IPPool lb .* does not allow Workload"):
        ipam.allocate("h", "n1", namespace="ns", pod="d")
    with pytest.raises(NoPool, match="IPPool nope"):
        ipam.allocate("h", "n1", pools=["nope"])
    assert all_allocated(kv) == {}


def test_disabled_pool_is_not_used_even_for_existing_blocks(kv, ipam):
    apply(kv, pool("a", "10.1.0.0/16"), pool("b", "10.2.0.0/16"))
    assert ipam.allocate("h1", "n1").pool == "a"
    apply(kv, pool("a", "10.1.0.0/16", disabled=True))
    assert {ipam.allocate(f"h{i}", "n1").pool for i in range(2, 10)} == {"b"}
    apply(kv, pool("b", "10.2.0.0/16", disabled=True))
    with pytest.raises(NoPool, match="no enabled IPPool"):
        ipam.allocate("h99", "n1")


def test_pool_not_allowing_workloads_is_not_used(kv, ipam):
    apply(kv, pool("lb", "10.1.0.0/16", allowedUses=["LoadBalancer"]), pool("w", "10.2.0.0/16"))
    assert {ipam.allocate(f"h{i}", "n1").pool for i in range(5)} == {"w"}


# ---------------------------------------------------------------- fixed addresses


def test_fixed_address_from_argument_and_annotation(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/16"), pod("ns", "db", "n1", {ANNOTATION_ADDRESS: "10.0.200.7"}))
    a = ipam.allocate("h1", "n1", address="10.0.100.5")
    assert a.address == "10.0.100.5" and a.block == "10.0.100.0/26" and a.pool == "p"
    assert ipam.allocate("h2", "n1", namespace="ns", pod="db").address == "10.0.200.7"
    # The address argument overrides the annotation.
    assert ipam.allocate("h3", "n1", namespace="ns", pod="db", address="10.0.200.8").address == "10.0.200.8"
    # The block holding it was claimed for the node, and later allocations may use it.
    assert "10.0.100.0/26" in {b.cidr for b in ipam.node_blocks("n1")}
    assert ipam.allocate("h1", "n1", address="10.0.100.5") == a  # idempotent


def test_fixed_address_errors_name_the_address(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24"), pool("off", "10.5.0.0/24", disabled=True),
          reservation("gw", "10.0.0.1/32"))
    ipam.allocate("owner", "n1", address="10.0.0.9")
    with pytest.raises(AddressUnavailable, match=r"10\.0\.0\.9 .*in use by handle owner"):
        ipam.allocate("thief", "n2", address="10.0.0.9")
    with pytest.raises(AddressUnavailable, match=r"192\.168\.1\.1 .*not in any IPPool"):
        ipam.allocate("h", "n1", address="192.168.1.1")
    with pytest.raises(AddressUnavailable, match=r"10\.0\.0\.1 .*reserved"):
        ipam.allocate("h", "n1", address="10.0.0.1")
    with pytest.raises(AddressUnavailable, match=r"10\.5\.0\.3 .*disabled"):
        ipam.allocate("h", "n1", address="10.5.0.3")
    with pytest.raises(AddressUnavailable, match="not an IP address"):
        ipam.allocate("h", "n1", address="10.0.0.300")
    assert all_allocated(kv) == {"10.0.0.9": "owner"}


def test_fixed_address_in_another_nodes_block(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    a = ipam.allocate("h1", "n1")
    wanted = blk.address(a.block, 9)
    b = ipam.allocate("h2", "n2", address=wanted)
    assert b.address == wanted and b.block == a.block
    assert ipam.allocate("h3", "n1").address != wanted


# ---------------------------------------------------------------- reservations


def test_reserved_addresses_are_never_handed_out(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/28", block_size=28), reservation("r", "10.0.0.0/30", "10.0.0.15/32"))
    got = [ipam.allocate(f"h{i}", "n1").address for i in range(11)]
    assert sorted(got, key=ipaddress.ip_address) == [f"10.0.0.{i}" for i in range(4, 15)]
    with pytest.raises(IPAMExhausted):
        ipam.allocate("one-more", "n1")


def test_reservation_added_after_the_block_exists(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/28", block_size=28))
    first = ipam.allocate("h0", "n1")
    assert first.address == "10.0.0.0"
    apply(kv, reservation("late", "10.0.0.1/32", "10.0.0.8/29"))
    got = [ipam.allocate(f"h{i}", "n1").address for i in range(1, 7)]
    assert set(got) == {f"10.0.0.{i}" for i in range(2, 8)}
    with pytest.raises(IPAMExhausted):
        ipam.allocate("h7", "n1")
    # Lifting the reservation makes the addresses usable again.
    ObjectStore(kv).delete(IPReservation, "late")
    assert ipam.allocate("h8", "n1").address in {"10.0.0.1"} | {f"10.0.0.{i}" for i in range(8, 16)}


def test_wholly_reserved_block_is_skipped_when_claiming(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/27", block_size=28), reservation("r", "10.0.0.0/28"))
    got = {ipam.allocate(f"h{i}", f"n{i}").block for i in range(3)}
    assert got == {"10.0.0.16/28"}  # later nodes borrow, never the reserved block


# ---------------------------------------------------------------- limits and exhaustion


def test_max_blocks_per_host_caps_claims_then_borrows(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28), ipam_config(maxBlocksPerHost=1))
    other = ipam.allocate("o", "n2")
    mine = [ipam.allocate(f"h{i}", "n1") for i in range(16)]
    assert len({a.block for a in mine}) == 1
    borrowed = ipam.allocate("h16", "n1")
    assert borrowed.block == other.block  # borrowed from n2's block rather than claiming a second
    assert len(ipam.node_blocks("n1")) == 1
    assert ipam.borrowed_addresses("n1") == [borrowed.address]


def test_max_blocks_per_host_with_strict_affinity_fails_with_reason(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28), ipam_config(maxBlocksPerHost=2, strictAffinity=True))
    ipam.allocate("o", "n2")
    for i in range(32):
        ipam.allocate(f"h{i}", "n1")
    with pytest.raises(IPAMExhausted) as err:
        ipam.allocate("h32", "n1")
    msg = str(err.value)
    assert "node n1" in msg and "IPPool p" in msg and "maxBlocksPerHost=2 reached" in msg
    assert "strictAffinity" in msg


def test_strict_affinity_forbids_borrowing(kv, ipam):
    apply(kv, pool("tiny", "10.0.0.0/27", block_size=28), ipam_config(strictAffinity=True))
    ipam.allocate("a", "n1")
    ipam.allocate("b", "n2")
    with pytest.raises(IPAMExhausted) as err:
        ipam.allocate("c", "n3")
    msg = str(err.value)
    assert msg.startswith("no address available for node n3 in IPPool tiny")
    assert "IPPool tiny (10.0.0.0/27) is full" in msg and "strictAffinity forbids borrowing" in msg
    assert kv.get(keys.handle_key("c")) is None


def test_without_strict_affinity_a_node_borrows_when_the_pool_has_no_free_block(kv, ipam):
    apply(kv, pool("tiny", "10.0.0.0/27", block_size=28))
    a = ipam.allocate("a", "n1")
    b = ipam.allocate("b", "n2")
    c = ipam.allocate("c", "n3")
    assert c.block in {a.block, b.block}
    assert ipam.node_blocks("n3") == []
    assert ipam.borrowed_addresses("n3") == [c.address]


def test_exhaustion_names_pool_node_and_reason_and_never_duplicates(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/28", block_size=28))
    got = {ipam.allocate(f"h{i}", "n1").address for i in range(16)}
    assert len(got) == 16
    with pytest.raises(IPAMExhausted) as err:
        ipam.allocate("h16", "n2")
    msg = str(err.value)
    assert "node n2" in msg and "IPPool p" in msg and "full" in msg
    assert err.value.pools == ["p"] and err.value.node == "n2"
    # An existing handle still gets its address even when the pool is full.
    assert ipam.allocate("h3", "n1").address in got
    assert len(all_allocated(kv)) == 16


def test_no_pools_at_all(kv, ipam):
    with pytest.raises(NoPool, match="create an IPPool"):
        ipam.allocate("h", "n1")


# ---------------------------------------------------------------- pre-claiming blocks


def test_claim_block_pre_claims_empty_blocks_that_allocation_then_uses(kv, ipam):
    apply(kv, pool("p", "10.0.0.0/26", block_size=28), ipam_config(maxBlocksPerHost=2))
    first = ipam.claim_block("n1")
    second = ipam.claim_block("n1")
    assert first.cidr != second.cidr and first.node == second.node == "n1" and first.used == 0
    assert {b.cidr for b in ipam.node_blocks("n1")} == {first.cidr, second.cidr}
    with pytest.raises(IPAMExhausted, match="maxBlocksPerHost=2 reached"):
        ipam.claim_block("n1")
    got = IPAM(kv).allocate("h", "n1")
    assert got.block in {first.cidr, second.cidr}
    ipam.claim_block("n2")
    ipam.claim_block("n3")
    with pytest.raises(IPAMExhausted, match=r"node n4 in IPPool p: IPPool p \(10.0.0.0/26\) is full"):
        ipam.claim_block("n4")


def test_pod_without_namespace_means_the_default_namespace(kv, ipam):
    apply(kv, pool("a", "10.1.0.0/16"), pool("b", "10.2.0.0/16", **GLOBAL),
          namespace("default", annotations={ANNOTATION_POOLS: '["b"]'}))
    a = ipam.allocate("h", "n1", pod="web")
    assert a.pool == "b"
    attrs = blk.attributes_at(kv.get(keys.block_key(a.block)).value, blk.ordinal(a.block, a.address))
    assert attrs["secondary"] == {"node": "n1", "namespace": "default", "pod": "web"}


def test_ipv4_pools_are_preferred_when_both_families_are_selected(kv, ipam):
    apply(kv, pool("a-v6", "fd00::/112"), pool("z-v4", "10.2.0.0/16"))
    assert ipam.allocate("h", "n1").pool == "z-v4"
    assert ipam.allocate("h6", "n1", pools=["a-v6"]).prefix_len == 128


def test_release_through_an_instance_with_a_stale_cache(kv):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    x, y = IPAM(kv), IPAM(other_process(kv))
    x.allocate("warm", "n1")  # x caches n1's block before y's allocation exists
    a = y.allocate("h", "n1")
    assert x.release("h") == [a.address]
    assert all_allocated(kv) == {x.lookup("warm").address: "warm"}
    b = y.allocate("h2", "n1")  # and y's now stale cache still releases correctly
    x.allocate("h3", "n1")
    assert y.release("h2") == [b.address]
    assert y.release("warm") != []
    assert set(all_allocated(kv).values()) == {"h3"}


# ---------------------------------------------------------------- same-node serialisation


def test_instances_in_one_process_share_their_cache(kv):
    apply(kv, pool("p", "10.0.0.0/24", block_size=28))
    x, y = IPAM(kv), IPAM(SQLiteStore(kv.path))
    x.allocate("a", "n1")
    y.allocate("b", "n1")
    x.allocate("c", "n1")
    assert x.conflicts == y.conflicts == 0


def test_threads_allocating_for_one_node_do_not_fight_over_its_block(kv):
    import threading

    apply(kv, pool("p", "10.0.0.0/22", block_size=26))
    results, instances, errors = {}, [], []

    def work(t):
        try:
            mine = IPAM(SQLiteStore(kv.path))
            instances.append(mine)
            for i in range(25):
                results[f"t{t}-{i}"] = mine.allocate(f"t{t}-{i}", "n1").address
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results.values())) == 150
    assert sum(i.conflicts for i in instances) == 0  # serialised per node, not retried
    assert {v: k for k, v in all_allocated(kv).items()} == results


def test_lock_dir_serialises_through_a_lock_file(kv, tmp_path):
    apply(kv, pool("p", "10.0.0.0/24"))
    locks = tmp_path / "locks"
    a = IPAM(kv, lock_dir=str(locks)).allocate("h", "node/with-slash")
    assert a.pool == "p"
    assert [p.name for p in locks.iterdir()] == ["ipam-node%2Fwith-slash.lock"]
    assert IPAM(kv, lock_dir=str(locks)).claim_block("n2").node == "n2"
