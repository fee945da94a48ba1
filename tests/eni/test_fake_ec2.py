"""The EC2-like layer in front of moto answers as EC2 where podnet depends on it."""

from __future__ import annotations

import ipaddress
import time

import pytest

from podnet.eni.cloud import CloudClient
from podnet.eni.errors import CloudError


def client(ec2) -> CloudClient:
    return CloudClient(ec2.region, endpoint=ec2.endpoint)


def test_limits_answer_with_ec2s_error_codes(ec2):
    world = ec2.world(instance_type="m5.large", subnets=[("10.1.1.0/24", "us-east-1a")], vpc_cidr="10.1.0.0/16")
    c, inst, subnet = client(ec2), world.instances[0], world.subnets["10.1.1.0/24"]
    enis = []
    for index in (1, 2):
        eni = c.create_eni(subnet, [world.group], {})
        c.attach_eni(eni.id, inst, index)
        enis.append(eni)
    extra = c.create_eni(subnet, [world.group], {})
    with pytest.raises(CloudError) as err:
        c.attach_eni(extra.id, inst, 3)  # m5.large: 3 ENIs, the primary one included
    assert err.value.code == "AttachmentLimitExceeded" and "m5.large" in str(err.value)
    assert len(c.assign(enis[0].id, 9)) >= 9  # 10 per ENI, its primary included
    with pytest.raises(CloudError) as err:
        c.assign(enis[0].id, 1)
    assert err.value.code == "PrivateIpAddressLimitExceeded"
    assert ec2.limit_errors == {"AttachmentLimitExceeded": 1, "PrivateIpAddressLimitExceeded": 1}


def test_addresses_are_unique_in_a_subnet_and_never_its_reserved_ones(ec2):
    world = ec2.world(instance_type="m5.4xlarge", subnets=[("10.2.1.0/27", "us-east-1a")], vpc_cidr="10.2.0.0/16")
    c, inst, subnet = client(ec2), world.instances[0], world.subnets["10.2.1.0/27"]
    held = []
    for index in (1, 2):
        eni = c.create_eni(subnet, [], {})
        c.attach_eni(eni.id, inst, index)
        held.append(eni.primary_ip)
        held += [a for a in c.assign(eni.id, 10) if a != eni.primary_ip]
    net = ipaddress.ip_network("10.2.1.0/27")
    assert len(held) == len(set(held)) == 22
    reserved = {str(net.network_address + i) for i in range(4)} | {str(net.broadcast_address)}
    assert not reserved & set(held)
    assert ec2.duplicates() == []
    # 32 - 5 reserved - 1 instance - 22 = 4 left: asking for 5 is refused, not a hang
    eni = c.instance_enis(inst)[0]
    with pytest.raises(CloudError) as err:
        c.assign([e for e in c.instance_enis(inst) if e.device_index == 1][0].id, 5)
    assert err.value.code == "InsufficientFreeAddressesInSubnet", eni


def test_throttling_latency_refused_keys_and_a_down_endpoint(ec2):
    world = ec2.world(subnets=[("10.3.1.0/24", "us-east-1a")], vpc_cidr="10.3.0.0/16")
    c = client(ec2)
    ec2.throttle("DescribeSubnets", 2)
    for _ in range(2):
        with pytest.raises(CloudError) as err:
            c.describe_subnets(list(world.subnets.values()))
        assert err.value.code == "RequestLimitExceeded" and err.value.throttled
    assert c.describe_subnets(list(world.subnets.values()))[0].cidr == "10.3.1.0/24"
    ec2.latency["DescribeInstances"] = 0.3
    started = time.monotonic()
    c.describe_instance(world.instances[0])
    assert time.monotonic() - started >= 0.3
    ec2.refused_keys.add("AKIAREFUSED")
    refused = CloudClient(ec2.region, endpoint=ec2.endpoint, client=ec2.client("AKIAREFUSED"))
    with pytest.raises(CloudError, match="EC2 DescribeInstances failed: AuthFailure"):
        refused.describe_instance(world.instances[0])
    down = CloudClient(ec2.region, endpoint="http://127.0.0.1:9", connect_timeout=0.5)
    with pytest.raises(CloudError, match="EC2 DescribeInstances failed: EndpointConnectionError"):
        down.describe_instance(world.instances[0])
