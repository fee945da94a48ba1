"""A CloudNetwork changed under a running pool (moto's EC2 server behind FakeEC2): the
watermarks, the batch size, the rate limits, the subnets and the security groups are
taken at once, with no restart; a subnet or group the cloud does not know is refused
naming the object and the field, and nothing changes; a field only a restart can change
(the mode) is named and left as it runs."""

from __future__ import annotations

import itertools

import pytest
from tests.eni.pools import cloud_network, start_pool
from tests.support.bgp import wait_until

from podnet.eni.errors import SetupError
from podnet.eni.metrics import call_results
from podnet.eni.setup import reconfigure

VPCS = itertools.count(21)  # moto's state is the process's: each test's VPC has addresses of its own


@pytest.fixture
def pool(ec2, tmp_path):
    octet = next(VPCS)
    a, b = f"10.{octet}.1.0/24", f"10.{octet}.2.0/24"
    world = ec2.world(instance_type="m5.large", subnets=[(a, "us-east-1a"), (b, "us-east-1a")],
                      vpc_cidr=f"10.{octet}.0.0/16")
    network = cloud_network(world, subnets=[a], warmPool={"minIdle": 0, "maxIdle": 10})
    np = start_pool(ec2, world, tmp_path, network)
    try:
        yield np.pool, network, world.subnets[b]  # the pool, its CloudNetwork (subnet a), another subnet
    finally:
        np.pool.stop()


def changed(network, **spec):
    return network.model_validate({"metadata": {"name": network.name}, "spec": {**network.spec.to_dict(), **spec}})


def test_watermarks_and_batch_size_are_taken_by_the_running_pool(ec2, pool):
    pool_, network, _ = pool
    assert pool_.wait_settled(10) and pool_.counts().idle == 0
    before = ec2.calls["AssignPrivateIpAddresses"]
    done, later = reconfigure(pool_, network, changed(network, warmPool={"minIdle": 4, "maxIdle": 4}, batchSize=2))
    assert later == [] and any(c.startswith("min_idle 0 -> 4") for c in done) and "batch 10 -> 2" in done
    assert pool_.wait_settled(30) and pool_.counts().idle == 4
    assert ec2.calls["AssignPrivateIpAddresses"] - before == 2  # two batches of 2, not one call of 4


def test_a_lower_rate_limit_holds_the_next_calls_back(ec2, pool):
    pool_, network, _ = pool
    slow = changed(network, warmPool={"minIdle": 6, "maxIdle": 6}, batchSize=2,
                   rateLimits={"assign": {"perMinute": 1, "burst": 1}})
    done, _ = reconfigure(pool_, network, slow)
    assert "rate limit assign" in done
    # one Assign goes out (the bucket keeps one token), the next are podnet's to hold back
    wait_until(lambda: pool_.counts().idle == 2 and call_results(pool_.cloud)[0].get(
        ("AssignPrivateIpAddresses", "throttled")), "one batch in, an Assign held back by the new bucket", timeout=30)
    results, _ = call_results(pool_.cloud)
    assert results[("AssignPrivateIpAddresses", "ok")] == 1 and ec2.calls["AssignPrivateIpAddresses"] == 1


def test_new_subnets_and_groups_are_checked_with_the_cloud_and_a_bad_one_changes_nothing(ec2, pool):
    pool_, network, other = pool
    assert pool_.wait_settled(10)
    cfg_before = (list(pool_.cfg.subnets), list(pool_.cfg.security_groups), pool_.cfg.min_idle)
    missing = changed(network, warmPool={"minIdle": 3, "maxIdle": 5},
                      subnets=[{"id": other, "zone": "us-east-1a"},
                               {"id": "subnet-00000000000000000", "zone": "us-east-1a"}])
    with pytest.raises(SetupError, match=r"CloudNetwork/vpc: field spec\.subnets\[1\]\.id: subnet "
                                         r"subnet-00000000000000000 does not exist"):
        reconfigure(pool_, network, missing)
    no_group = changed(network, securityGroups=["sg-00000000000000000"])
    with pytest.raises(SetupError, match=r"CloudNetwork/vpc: field spec\.securityGroups\[0\]: security group "
                                         r"sg-00000000000000000 does not exist"):
        reconfigure(pool_, network, no_group)
    assert (list(pool_.cfg.subnets), list(pool_.cfg.security_groups), pool_.cfg.min_idle) == cfg_before
    # the other subnet alone: the next ENI goes there (the first is the instance's own: its ENI stays)
    moved = changed(network, warmPool={"minIdle": 12, "maxIdle": 12},
                    subnets=[{"id": other, "zone": "us-east-1a"}])
    done, _ = reconfigure(pool_, network, moved)
    assert any(c.startswith("subnets ") for c in done)
    assert pool_.wait_settled(60) and pool_.counts().idle == 12
    made = [e for e in pool_.state.enis.values() if e.podnet]
    assert made and {e.subnet_id for e in made} == {other}


def test_a_field_only_a_restart_changes_is_named_and_left_as_it_runs(pool):
    pool_, network, _ = pool
    done, later = reconfigure(pool_, network, changed(network, mode="exclusive"))
    assert later == ["spec.mode"] and done == [] and pool_.cfg.mode == "shared"
