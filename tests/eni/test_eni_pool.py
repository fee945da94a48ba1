"""The ENI pool manager against moto's EC2 server (behind FakeEC2's EC2-like layer):
watermarks, batching, limits, throttling, subnets, cooldown, reconcile and bad input."""

from __future__ import annotations

import math
import threading

import pytest
from tests.eni.pools import cloud_network, node, start_pool
from tests.support.bgp import wait_until

from podnet.eni.cloud import MANAGED_BY, TAG_INSTANCE, TAG_MANAGED, TAG_NETWORK, TAG_NODE
from podnet.eni.errors import PoolExhausted, PoolUnavailable, SetupError
from podnet.eni.metrics import call_results
from podnet.eni.setup import PoolOptions, build_pool
from podnet.store import open_store


def burst(ipam_factory, handles):
    """Concurrent ADDs (one store connection each, as the CNI handler's sessions)."""
    results, errors = {}, {}
    go = threading.Event()

    def one(h):
        ipam = ipam_factory()
        go.wait()
        try:
            results[h] = ipam.allocate(h, "n").address
        except Exception as e:  # noqa: BLE001 - the test looks at each
            errors[h] = e
        finally:
            ipam.kv.close()

    threads = [threading.Thread(target=one, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    return results, errors


def settle(pool):
    """The pool's counts once it has nothing left to do and nothing cooling down."""
    assert pool.wait_settled(30, cooled=True), pool.counts()
    return pool.counts()


def test_concurrent_adds_share_batched_assign_calls(ec2, tmp_path):
    world = ec2.world(instance_type="m5.4xlarge", subnets=[("10.10.1.0/24", "us-east-1a")], vpc_cidr="10.10.0.0/16")
    np = start_pool(ec2, world, tmp_path, cloud_network(world, batchSize=10, batchWindowMilliseconds=200))
    try:
        ec2.latency["AssignPrivateIpAddresses"] = 0.2
        ec2.reset_counts()
        n = 25
        results, errors = burst(np.ipam, [f"pod-{i}" for i in range(n)])
        assert not errors, errors
        assert len(set(results.values())) == n
        assert ec2.calls["AssignPrivateIpAddresses"] <= math.ceil(n / 10), ec2.calls
        assert not ec2.limit_errors and ec2.duplicates() == []
        on_cloud = {a for addrs in ec2.instance_addresses(world.instances[0]).values() for a in addrs}
        assert set(results.values()) <= on_cloud
    finally:
        np.pool.stop()


def test_watermarks_hold_under_churn(ec2, tmp_path):
    world = ec2.world(instance_type="m5.4xlarge", subnets=[("10.11.1.0/24", "us-east-1a")], vpc_cidr="10.11.0.0/16")
    np = start_pool(ec2, world, tmp_path, cloud_network(world, warmPool={"minIdle": 4, "maxIdle": 8},
                                                       cooldownSeconds=0.1))
    ipam = np.ipam()
    try:
        assert np.pool.wait_settled(10)
        assert 4 <= np.pool.counts().idle <= 8
        live: list[str] = []
        for round_ in range(5):
            handles = [f"r{round_}-{i}" for i in range(7 + round_ * 3)]
            results, errors = burst(np.ipam, handles)
            assert not errors, errors
            live += handles
            c = settle(np.pool)
            assert 4 <= c.idle <= 8 and c.assigned == len(live), (round_, c)
            for h in live[: len(live) // 2]:
                ipam.release(h)
            live = live[len(live) // 2:]
            c = settle(np.pool)
            assert 4 <= c.idle <= 8 and c.assigned == len(live), (round_, c)
        assert not ec2.limit_errors and ec2.duplicates() == []
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_no_call_exceeds_an_instance_limit_and_a_full_node_says_so(ec2, tmp_path):
    world = ec2.world(instance_type="m5.large", subnets=[("10.12.1.0/24", "us-east-1a")], vpc_cidr="10.12.0.0/16")
    np = start_pool(ec2, world, tmp_path, cloud_network(world, warmPool={"minIdle": 3, "maxIdle": 6}), wait=5)
    ipam = np.ipam()
    try:
        got = [ipam.allocate(f"p{i}", "n").address for i in range(27)]  # 3 ENIs x (10 - 1)
        assert len(set(got)) == 27
        with pytest.raises(PoolExhausted, match=r"m5.large: 3 ENIs x 10 IPv4 addresses.*max pods 29"):
            ipam.allocate("p27", "n")
        assert ec2.limit_errors == {}  # counted: no call ever went past a limit
        assert len(ec2.instance_addresses(world.instances[0])) == 3
        assert np.pool.capacity_problem() is not None
        ipam.release("p0")  # cooling: at the limit a waiting pod gets it before the cooldown ends
        assert ipam.allocate("p27", "n").address == got[0]
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_throttling_backs_off_says_why_and_recovers(ec2, tmp_path):
    world = ec2.world(instance_type="m5.large", subnets=[("10.13.1.0/24", "us-east-1a")], vpc_cidr="10.13.0.0/16")
    np = start_pool(ec2, world, tmp_path, cloud_network(world), wait=0.3)
    ipam = np.ipam()
    try:
        ec2.throttle("AssignPrivateIpAddresses", 2)
        with pytest.raises(PoolUnavailable, match=r"warm pool of node node-0 is empty.*RequestLimitExceeded.*try "
                                                  r"again later"):
            ipam.allocate("a", "n")
        # A pod that can wait longer than the back-off waits: the pool retries after 0.5 s
        # (throttled again: 1 s), then gets its addresses.
        np.pool.cfg.wait = 10
        assert ipam.allocate("a", "n").address
        assert ec2.errors["RequestLimitExceeded"] == 2 and ec2.calls["AssignPrivateIpAddresses"] == 3
        assert np.pool.problem is None and np.pool.backoff_until == 0.0
        # the agent's metrics say the same: two throttled Assigns, then one that went through
        results, errors = call_results(np.pool.cloud)
        assert results[("AssignPrivateIpAddresses", "throttled")] == 2
        assert results[("AssignPrivateIpAddresses", "ok")] == 1
        assert errors == {("AssignPrivateIpAddresses", "RequestLimitExceeded"): 2}
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_the_local_token_bucket_answers_try_again_with_its_reason(ec2, tmp_path):
    world = ec2.world(instance_type="m5.large", subnets=[("10.14.1.0/24", "us-east-1a")], vpc_cidr="10.14.0.0/16")
    network = cloud_network(world, batchSize=1, rateLimits={"assign": {"perMinute": 1, "burst": 1}})
    np = start_pool(ec2, world, tmp_path, network, wait=0.5)
    ipam = np.ipam()
    try:
        ipam.allocate("first", "n")  # the one token
        with pytest.raises(PoolUnavailable, match=r"assign token bucket \(1/min, burst 1\) is empty"):
            ipam.allocate("second", "n")
        assert ec2.calls["AssignPrivateIpAddresses"] == 1
        results, errors = call_results(np.pool.cloud)  # held back by podnet: throttled, no call made
        assert results[("AssignPrivateIpAddresses", "ok")] == 1
        assert results[("AssignPrivateIpAddresses", "throttled")] == errors[("AssignPrivateIpAddresses",
                                                                            "LocallyThrottled")] >= 1
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_an_exhausted_subnet_moves_new_enis_to_the_next(ec2, tmp_path):
    world = ec2.world(instance_type="m5.4xlarge", vpc_cidr="10.15.0.0/16", node_subnet="10.15.9.0/24",
                      subnets=[("10.15.9.0/24", "us-east-1a"), ("10.15.1.0/27", "us-east-1a"),
                               ("10.15.2.0/26", "us-east-1a")])
    small, big = world.subnets["10.15.1.0/27"], world.subnets["10.15.2.0/26"]
    # the node's own subnet is not the CloudNetwork's: podnet's ENIs hold every pod address
    network = cloud_network(world, subnets=["10.15.1.0/27", "10.15.2.0/26"])
    ec2.admin.create_network_interface(SubnetId=big, PrivateIpAddress="10.15.2.4")  # someone else's
    for i in range(5, 40):  # leave /26 with fewer free than the /27
        ec2.admin.assign_private_ip_addresses(
            NetworkInterfaceId=ec2.enis(subnet=big)[0]["NetworkInterfaceId"], PrivateIpAddresses=[f"10.15.2.{i}"])
    np = start_pool(ec2, world, tmp_path, network)
    try:
        results, errors = burst(np.ipam, [f"p{i}" for i in range(40)])
        assert not errors, errors
        enis = ec2.enis(instance=world.instances[0])
        subnets = {e["SubnetId"] for e in enis if e["Attachment"]["DeviceIndex"] > 0}
        assert subnets == {small, big}, subnets  # the /27 first (most free), then the next one
        assert ec2.errors["InsufficientFreeAddressesInSubnet"] >= 1
        assert len(set(results.values())) == 40 and ec2.duplicates() == []
    finally:
        np.pool.stop()


def test_bad_cloud_input_at_start_names_the_object_field_and_call(ec2, tmp_path):
    world = ec2.world(instance_type="m5.large", subnets=[("10.16.1.0/24", "us-east-1a")], vpc_cidr="10.16.0.0/16")
    kv = lambda: open_store(f"sqlite://{tmp_path}/s.db")  # noqa: E731
    opts = PoolOptions(endpoint=ec2.endpoint)
    good = cloud_network(world)
    n = node("node-0", world.instances[0])
    bad_subnet = cloud_network(world, subnets=None).model_copy(deep=True)
    spec = bad_subnet.spec.model_dump(by_alias=True)
    spec["subnets"].append({"id": "subnet-0000dead", "zone": "us-east-1a"})
    bad_subnet = type(good).model_validate({"metadata": {"name": "vpc"}, "spec": spec})
    with pytest.raises(SetupError, match=r"CloudNetwork/vpc: field spec.subnets\[1\].id: subnet subnet-0000dead "
                                         r"does not exist .*InvalidSubnetID.NotFound"):
        build_pool(bad_subnet, n, kv, opts)
    spec = good.spec.model_dump(by_alias=True)
    spec["securityGroups"] = [world.group, "sg-0000dead"]
    with pytest.raises(SetupError, match=r"field spec.securityGroups\[1\]: security group sg-0000dead does not "
                                         r"exist .*InvalidGroup.NotFound"):
        build_pool(type(good).model_validate({"metadata": {"name": "vpc"}, "spec": spec}), n, kv, opts)
    odd = ec2.run_instance("m5.galactic", world.subnets["10.16.1.0/24"])
    with pytest.raises(SetupError, match=r"instance type m5.galactic of Node/node-x: EC2 DescribeInstanceTypes "
                                         r"failed: InvalidInstanceType"):
        build_pool(good, node("node-x", odd), kv, opts)
    with pytest.raises(SetupError, match=r"EC2 DescribeInstances failed: EndpointConnectionError"):
        build_pool(good, n, kv, PoolOptions(endpoint="http://127.0.0.1:9"))
    ec2.refused_keys.add("AKIAREFUSED")
    with pytest.raises(SetupError, match=r"EC2 DescribeInstances failed: AuthFailure"):
        build_pool(good, n, kv, PoolOptions(endpoint=ec2.endpoint, client=ec2.client("AKIAREFUSED")))
    with pytest.raises(SetupError, match=r"Node/bare: field spec.providerID is not set"):
        build_pool(good, type(n).model_validate({"metadata": {"name": "bare"}}), kv, opts)


def test_the_instances_own_eni_counts_against_the_limit_when_pods_may_not_use_it(ec2, tmp_path):
    world = ec2.world(instance_type="m5.large", vpc_cidr="10.17.0.0/16", node_subnet="10.17.9.0/24",
                      subnets=[("10.17.9.0/24", "us-east-1a"), ("10.17.1.0/24", "us-east-1a")])
    np = start_pool(ec2, world, tmp_path, cloud_network(world, subnets=["10.17.1.0/24"]), wait=5)
    ipam = np.ipam()
    try:
        results, errors = burst(np.ipam, [f"p{i}" for i in range(18)])  # 2 ENIs of podnet's x 9
        assert not errors, errors
        with pytest.raises(PoolExhausted):
            ipam.allocate("p18", "n")
        assert ec2.limit_errors == {} and len(ec2.enis(instance=world.instances[0])) == 3
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_reconcile_releases_what_leaked_after_the_grace_period_and_adopts_the_rest(ec2, tmp_path):
    from podnet.eni import records as rec
    from podnet.eni.cloud import MANAGED_BY, TAG_CREATED, TAG_MANAGED, TAG_NODE

    world = ec2.world(instance_type="m5.large", subnets=[("10.18.1.0/24", "us-east-1a")], vpc_cidr="10.18.0.0/16")
    subnet = world.subnets["10.18.1.0/24"]
    tags = lambda created: [{"ResourceType": "network-interface", "Tags": [  # noqa: E731
        {"Key": TAG_MANAGED, "Value": MANAGED_BY}, {"Key": TAG_NODE, "Value": "node-0"},
        {"Key": TAG_CREATED, "Value": str(created)}]}]
    import time as _time

    old = ec2.admin.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.18.1.200",
                                             TagSpecifications=tags(int(_time.time()) - 3600))["NetworkInterface"]
    young = ec2.admin.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.18.1.201",
                                               TagSpecifications=tags(int(_time.time())))["NetworkInterface"]
    # a cooldown far longer than the test: the released address must still be cooling when looked at
    np = start_pool(ec2, world, tmp_path, cloud_network(world, leakGraceSeconds=60, cooldownSeconds=600))
    ipam = np.ipam()
    try:
        gone = ipam.allocate("gone-pod", "n").address  # its pod went and no DEL came
        kept = ipam.allocate("live-pod", "n").address
        primary = [e for e in ec2.enis(instance=world.instances[0])][0]["NetworkInterfaceId"]
        ec2.admin.assign_private_ip_addresses(NetworkInterfaceId=primary, PrivateIpAddresses=["10.18.1.150"])
        kv = ipam.kv
        r = rec.get_address(kv, "node-0", gone)
        kv.put(rec.address_key("node-0", gone), {"handle": "gone-pod", "eni": r.eni, "at": _time.time() - 3600})
        np.pool.reconciler.attachment_exists = lambda kv, handle: handle == "live-pod"
        np.pool.reconciler(np.pool)
        ids = {e["NetworkInterfaceId"] for e in ec2.admin.describe_network_interfaces()["NetworkInterfaces"]}
        assert old["NetworkInterfaceId"] not in ids  # never attached, older than the grace period
        assert young["NetworkInterfaceId"] in ids  # within it: it may be an attach in flight
        assert rec.get_handle(kv, "node-0", "gone-pod") is None and gone in np.pool.state.cooling
        assert rec.get_handle(kv, "node-0", "live-pod") == kept and np.pool.state.assigned[kept] == "live-pod"
        assert "10.18.1.150" in np.pool.state.idle  # an address the node got out of band: adopted
    finally:
        ipam.kv.close()
        np.pool.stop()


def test_enis_carry_podnets_tags_and_the_periodic_reconcile_follows_the_cloud(ec2, tmp_path):
    """The ENI podnet makes is tagged as podnet's (reconcile finds its own by them); with no
    call from the test, the periodic reconcile adopts an address the node got out of band and
    drops an idle one the cloud took away behind the pool's back."""
    world = ec2.world(instance_type="m5.large", vpc_cidr="10.19.0.0/16", node_subnet="10.19.9.0/24",
                      subnets=[("10.19.9.0/24", "us-east-1a"), ("10.19.1.0/24", "us-east-1a")])
    network = cloud_network(world, subnets=["10.19.1.0/24"], warmPool={"minIdle": 3, "maxIdle": 8})
    np = start_pool(ec2, world, tmp_path, network, reconcile_interval=0.5)
    try:
        assert np.pool.wait_settled(30), np.pool.counts()
        (ours,) = [e for e in ec2.enis(instance=world.instances[0]) if e["Attachment"]["DeviceIndex"] > 0]
        tags = {t["Key"]: t["Value"] for t in ours["TagSet"]}
        assert tags[TAG_MANAGED] == MANAGED_BY and tags[TAG_NODE] == "node-0", tags
        assert tags[TAG_INSTANCE] == world.instances[0] and tags[TAG_NETWORK] == "vpc", tags
        eni_id = ours["NetworkInterfaceId"]
        taken = sorted(np.pool.state.idle)[0]
        ec2.admin.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=[taken])
        ec2.admin.assign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=["10.19.1.200"])
        wait_until(lambda: "10.19.1.200" in np.pool.state.idle and taken not in np.pool.state.eni_of,
                   "the periodic reconcile adopting 10.19.1.200 and dropping the address the cloud took", timeout=20)
        ipam = np.ipam()
        try:
            got = {ipam.allocate(f"p{i}", "n").address for i in range(6)}
            assert taken not in got and len(got) == 6  # never an address the node no longer holds
        finally:
            ipam.kv.close()
        assert ec2.duplicates() == [] and not ec2.limit_errors
    finally:
        np.pool.stop()
