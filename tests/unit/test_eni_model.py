"""CloudNetwork validation, instance limits and the watermark arithmetic (no cloud, no root)."""

from __future__ import annotations

import pytest

from podnet.eni import watermarks
from podnet.eni.errors import SetupError
from podnet.eni.limits import InstanceLimits
from podnet.eni.setup import select
from podnet.errors import ValidationError
from podnet.model.cloud import parse_provider_id
from podnet.model.manifests import ManifestErrors, parse_documents
from podnet.model.objects import Node

GOOD = """
apiVersion: podnet.io/v1
kind: CloudNetwork
metadata: {name: vpc-main}
spec:
  provider: aws
  region: us-east-1
  nodeSelector: {matchLabels: {podnet.io/cloud: aws}}
  subnets:
    - {id: subnet-0a1b2c3d, zone: us-east-1a}
    - {id: subnet-0a1b2c3e, zone: us-east-1b}
  securityGroups: [sg-0a1b2c3d]
  warmPool: {minIdle: 5, maxIdle: 15}
  rateLimits: {assign: {perMinute: 100, burst: 5}}
"""


def parse(text: str):
    objs, errs = parse_documents(text, "cn.yaml")
    if errs:
        raise ManifestErrors(errs)
    return objs[0]


def test_a_good_cloud_network_gets_defaults():
    cn = parse(GOOD)
    assert cn.ref == "CloudNetwork/vpc-main"
    assert cn.spec.mode == "shared" and cn.spec.batch_size == 10 and cn.spec.cooldown_seconds == 30
    assert cn.spec.rate_limits["assign"].per_minute == 100
    assert cn.spec.rate_limits["create"].per_minute == 500  # the defaults fill the rest
    assert cn.spec.zones() == ["us-east-1a", "us-east-1b"]


@pytest.mark.parametrize("change, field, words", [
    (("subnet-0a1b2c3d, zone", "subnet-XYZ, zone"), "spec.subnets[0].id", "not a subnet ID"),
    (("[sg-0a1b2c3d]", "[default]"), "spec.securityGroups", "not a security group ID"),
    (("minIdle: 5, maxIdle: 15", "minIdle: 5, maxIdle: 1"), "spec.warmPool", "maxIdle 1 is below minIdle 5"),
    (("zone: us-east-1b", "zone: eu-west-1b"), "spec", "not a zone of region us-east-1"),
    (("provider: aws", "provider: gcp"), "spec.provider", "'aws'"),
    (("region: us-east-1", "region: mars"), "spec.region", "not a region name"),
    (("assign: {", "assignn: {"), "spec.rateLimits", "unknown API 'assignn'"),
    (("  warmPool:", "  batchSize: 0\n  warmPool:"), "spec", "batchSize 0 is out of range"),
    (("  warmPool:", "  subnetz: []\n  warmPool:"), "spec.subnetz", "unknown field"),
])
def test_bad_cloud_networks_name_the_file_object_and_field(change, field, words):
    with pytest.raises(ValidationError) as err:
        parse(GOOD.replace(*change))
    text = str(err.value)
    assert "cn.yaml: document 0 (CloudNetwork/vpc-main)" in text, text
    assert f"field {field}" in text and words in text, text


def test_a_subnet_listed_twice_is_refused():
    text = GOOD.replace("subnet-0a1b2c3e, zone: us-east-1b", "subnet-0a1b2c3d, zone: us-east-1a")
    with pytest.raises(ValidationError, match=r"subnets\[1\]: subnet-0a1b2c3d is already subnets\[0\]"):
        parse(text)


def test_provider_ids():
    assert parse_provider_id("aws:///us-east-1a/i-0abc") == ("us-east-1a", "i-0abc")
    assert parse_provider_id("aws://i-0abc") == (None, "i-0abc")
    with pytest.raises(ValueError, match="not an AWS one"):
        parse_provider_id("gce://p/z/n")


def test_max_pods_follows_the_instance_type():
    m5 = InstanceLimits("m5.large", 3, 10)
    assert m5.max_pods("shared") == 29  # 3 x (10 - 1) + 2, as AWS's eni-max-pods.txt
    assert m5.max_pods("exclusive") == 4
    assert m5.pod_addresses("shared") == 27
    assert InstanceLimits("m5.4xlarge", 8, 30).max_pods() == 234


def test_watermarks():
    assert watermarks.shortfall(idle=3, waiting=0, min_idle=5) == 2
    assert watermarks.shortfall(idle=0, waiting=25, min_idle=0) == 25
    assert watermarks.shortfall(idle=9, waiting=0, min_idle=5) == 0
    assert watermarks.surplus(idle=20, cooling=0, waiting=0, max_idle=15) == 5
    assert watermarks.surplus(idle=4, cooling=20, waiting=0, max_idle=15) == 0  # cooling ones count once idle
    assert watermarks.ask(idle=0, waiting=5, min_idle=5, max_idle=15, batch=10) == 10  # a whole batch
    assert watermarks.ask(idle=0, waiting=2, min_idle=5, max_idle=7, batch=10) == 9  # within max
    assert watermarks.ask(idle=6, waiting=0, min_idle=5, max_idle=15, batch=10) == 0
    assert watermarks.surplus(idle=20, cooling=0, waiting=1, max_idle=15) == 0
    # 25 addresses in batches of 10 over ENIs with room 29 and 29: 3 calls
    assert watermarks.split(25, [("a", 29), ("b", 29)], 10) == [("a", 10), ("a", 10), ("a", 5)]
    assert watermarks.split(12, [("a", 3), ("b", 29)], 10) == [("b", 10), ("a", 2)]  # whole batches first
    assert watermarks.split(10, [("a", 9), ("b", 29), ("c", 12)], 10) == [("c", 10)]  # the best fit
    assert watermarks.split(50, [("a", 3)], 10) == [("a", 3)]  # no more room than that


def test_aws_settings_map_onto_the_watermarks():
    assert watermarks.from_aws(ips_per_eni=10, warm_ip_target=5, minimum_ip_target=10).model_dump() == \
        {"min_idle": 5, "max_idle": 10}
    assert watermarks.from_aws(ips_per_eni=10).model_dump() == {"min_idle": 9, "max_idle": 17}  # WARM_ENI_TARGET=1


def test_a_node_takes_the_cloud_network_its_labels_select_and_two_are_an_error_naming_both():
    aws = parse(GOOD)
    other = parse(GOOD.replace("vpc-main", "vpc-other").replace("podnet.io/cloud: aws", "pool: b"))
    node = lambda **labels: Node.model_validate({"metadata": {"name": "n1", "labels": labels}})  # noqa: E731
    assert select([aws, other], node(**{"podnet.io/cloud": "aws"})) is aws
    assert select([aws, other], node(pool="b")) is other
    assert select([aws, other], node(pool="c")) is None  # the node keeps podnet's own IPAM
    with pytest.raises(SetupError, match=r"Node/n1 is selected by more than one CloudNetwork "
                                         r"\(CloudNetwork/vpc-main, CloudNetwork/vpc-other\)"):
        select([aws, other], node(**{"podnet.io/cloud": "aws", "pool": "b"}))
