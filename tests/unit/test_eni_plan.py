"""`podnet plan --cloud aws`: max pods, pinned addresses and subnet sizes (pure)."""

from __future__ import annotations

import json

import pytest

from podnet.cli.main import main
from podnet.eni.plan import CloudPlanInput, CloudPlanInputError, plan_cloud


def test_max_pods_and_pinned_addresses_of_an_m5_large():
    p = plan_cloud(CloudPlanInput(nodes=500, instance_type="m5.large", max_pods_per_node=20, min_idle=2,
                                  max_idle=5, zones=2))
    assert p.max_pods == 29 and p.pods_planned == 20
    a, aws = p.podnet, p.aws_default
    assert (a.idle_min, a.idle_max, a.idle_at_full_load) == (2, 5, 5)
    assert aws.idle_at_full_load == 9  # WARM_ENI_TARGET=1 keeps a whole ENI's addresses idle
    # 18 pod addresses + 5 idle + 2 podnet ENIs' primary addresses
    assert a.subnet_addresses_per_node == 25 and a.subnet_addresses_total == 12500
    assert a.per_zone == 6250 and a.zone_prefix == 19  # 6250 + 5 reserved fit a /19 (8192)


def test_exclusive_mode_counts_enis():
    p = plan_cloud(CloudPlanInput(nodes=10, instance_type="m5.4xlarge", mode="exclusive", min_idle=1, max_idle=2))
    assert p.max_pods == 9  # 8 ENIs - 1 + 2
    assert p.podnet.subnet_addresses_per_node == 7  # every ENI but the instance's own, one address each


def test_more_pods_than_the_type_holds_is_a_warning_and_unknown_types_an_error():
    p = plan_cloud(CloudPlanInput(nodes=3, instance_type="t3.medium", max_pods_per_node=110))
    assert p.pods_planned == 17 and "maxPods to 17" in p.warnings[0]
    with pytest.raises(CloudPlanInputError, match="--enis and --ips-per-eni"):
        plan_cloud(CloudPlanInput(nodes=3, instance_type="x9.huge"))
    assert plan_cloud(CloudPlanInput(nodes=3, instance_type="x9.huge", enis=2, ips_per_eni=4)).max_pods == 8
    huge = plan_cloud(CloudPlanInput(nodes=5000, instance_type="m5.4xlarge", max_pods_per_node=110, zones=3))
    assert any("more than a /16" in w for w in huge.warnings)


def test_the_cli(capsys):
    assert main(["plan", "--cloud", "aws", "--nodes", "100", "--instance-type", "m5.xlarge", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_pods"] == 58 and doc["limits"]["max_enis"] == 4
    assert main(["plan", "--cloud", "aws", "--nodes", "100"]) == 0
    assert "max pods            29 = 3 x (10 - 1) + 2" in capsys.readouterr().out
    assert main(["plan", "--cloud", "aws", "--nodes", "x"]) == 1
    assert "--nodes: expected a whole number" in capsys.readouterr().err


def test_the_comparison_is_the_shared_table(capsys):
    """The one table printer of every command: upper-case headers, columns three spaces
    apart, each cell read back under its header."""
    assert main(["plan", "--cloud", "aws", "--nodes", "500", "--instance-type", "m5.large", "--max-pods-per-node",
                 "20", "--min-idle", "2", "--max-idle", "5", "--zones", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  PER-NODE              PODNET   AWS-VPC-CNI")
    rows = {line[2:24].strip(): line[24:].split() for line in lines[start + 1:start + 8]}
    assert rows == {"idle pinned (empty)": ["2-5", "9"], "idle at full load": ["5", "9"],
                    "ENIs at full load": ["3", "3"], "subnet addresses": ["25", "29"],
                    "cluster addresses": ["12500", "14500"], "per zone": ["6250", "7250"],
                    "zone subnet needed": ["/19", "/19"]}
