"""`podnet plan --cloud aws`: what ENI pools need for a cluster shape. Pure, no cloud calls.

Per node, from the instance type's limits (a table of common types below, or --enis and
--ips-per-eni for any other):

    max pods            shared: ENIs x (IPv4 per ENI - 1) + 2; exclusive: ENIs - 1 + 2
    pods planned        --max-pods-per-node if given (not above max pods), else max pods
    idle pinned         the watermarks: min..max idle addresses (exclusive: idle ENIs) a node
                        holds whatever its pods; at full load only what room is left
    ENIs at full load   ceil((pods + max idle) / (IPv4 per ENI - 1)), at most the type's ENIs
    subnet addresses    pods + max idle + one primary address per podnet ENI (the instance's
                        own ENI lives in the node subnet and is not counted)

For the cluster: nodes x subnet addresses per node, spread over the zones, each zone's
subnet also losing EC2's 5 reserved addresses: the prefix each zone's pod subnet needs.
The same numbers for AWS VPC CNI's default (WARM_ENI_TARGET=1: a whole ENI's addresses
idle per node) are shown beside them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from podnet.eni.limits import InstanceLimits
from podnet.errors import PodnetError

EC2_RESERVED = 5  # per subnet: network, router, DNS, future, broadcast
SMALLEST_SUBNET = 28
LARGEST_SUBNET = 16

# (ENIs, IPv4 addresses per ENI) of common instance types (DescribeInstanceTypes' NetworkInfo).
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "t3.micro": (2, 2), "t3.small": (3, 4), "t3.medium": (3, 6), "t3.large": (3, 12), "t3.xlarge": (4, 15),
    "t3.2xlarge": (4, 15),
    "m5.large": (3, 10), "m5.xlarge": (4, 15), "m5.2xlarge": (4, 15), "m5.4xlarge": (8, 30),
    "m5.8xlarge": (8, 30), "m5.12xlarge": (8, 30), "m5.16xlarge": (15, 50), "m5.24xlarge": (15, 50),
    "c5.large": (3, 10), "c5.xlarge": (4, 15), "c5.2xlarge": (4, 15), "c5.4xlarge": (8, 30),
    "c5.9xlarge": (8, 30), "c5.18xlarge": (15, 50),
    "r5.large": (3, 10), "r5.xlarge": (4, 15), "r5.2xlarge": (4, 15), "r5.4xlarge": (8, 30),
    "m6i.large": (3, 10), "m6i.xlarge": (4, 15), "m6i.2xlarge": (4, 15), "m6i.4xlarge": (8, 30),
    "m7i.large": (3, 10), "m7i.xlarge": (4, 15), "m7i.2xlarge": (4, 15), "m7i.4xlarge": (8, 30),
}


class CloudPlanInputError(PodnetError):
    """A `podnet plan --cloud` input that cannot be planned; the message names the flag."""


@dataclass(frozen=True)
class CloudPlanInput:
    nodes: int
    instance_type: str = "m5.large"
    enis: int | None = None  # with ips_per_eni: limits for a type not in the table
    ips_per_eni: int | None = None
    mode: str = "shared"
    max_pods_per_node: int | None = None
    min_idle: int = 2
    max_idle: int = 10
    zones: int = 3
    growth_percent: float = 0.0


@dataclass(frozen=True)
class PoolNumbers:
    idle_min: int
    idle_max: int
    idle_at_full_load: int
    enis_at_full_load: int
    subnet_addresses_per_node: int
    subnet_addresses_total: int
    per_zone: int
    zone_prefix: int


@dataclass(frozen=True)
class CloudPlan:
    input: CloudPlanInput
    limits: InstanceLimits
    nodes_planned: int
    max_pods: int
    pods_planned: int
    podnet: PoolNumbers
    aws_default: PoolNumbers  # WARM_ENI_TARGET=1
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limits_for(inp: CloudPlanInput) -> InstanceLimits:
    if inp.enis is not None or inp.ips_per_eni is not None:
        if inp.enis is None or inp.ips_per_eni is None:
            raise CloudPlanInputError("--enis and --ips-per-eni go together: give both")
        if inp.enis < 1 or inp.ips_per_eni < 2:
            raise CloudPlanInputError("--enis must be 1 or more and --ips-per-eni 2 or more")
        return InstanceLimits(inp.instance_type, inp.enis, inp.ips_per_eni)
    known = INSTANCE_TYPES.get(inp.instance_type)
    if known is None:
        raise CloudPlanInputError(f"--instance-type {inp.instance_type!r} is not in podnet's table of instance types: "
                                  "give its limits with --enis and --ips-per-eni (DescribeInstanceTypes' "
                                  "MaximumNetworkInterfaces and Ipv4AddressesPerInterface)")
    return InstanceLimits(inp.instance_type, *known)


def _prefix_for(addresses: int) -> int:
    need = addresses + EC2_RESERVED
    return max(LARGEST_SUBNET, min(SMALLEST_SUBNET, 32 - max(0, math.ceil(math.log2(need)))))


def _numbers(limits: InstanceLimits, mode: str, pods: int, min_idle: int, max_idle: int, nodes: int,
             zones: int) -> PoolNumbers:
    per_eni = 1 if mode == "exclusive" else limits.secondary_per_eni
    capacity = limits.pod_addresses(mode)
    pod_addresses = min(pods, capacity)
    idle_full = max(0, min(max_idle, capacity - pod_addresses))
    slots = pod_addresses + idle_full
    enis = min(limits.max_enis, math.ceil(slots / per_eni)) if mode == "shared" else slots
    podnet_enis = max(0, enis - 1) if mode == "shared" else enis  # shared: the instance's own ENI holds some
    subnet_per_node = slots + podnet_enis if mode == "shared" else slots
    total = nodes * subnet_per_node
    per_zone = math.ceil(total / zones)
    return PoolNumbers(min(min_idle, capacity), min(max_idle, capacity), idle_full, enis, subnet_per_node,
                       total, per_zone, _prefix_for(per_zone))


def plan_cloud(inp: CloudPlanInput) -> CloudPlan:
    if inp.nodes < 1:
        raise CloudPlanInputError("--nodes must be 1 or more")
    if inp.mode not in ("shared", "exclusive"):
        raise CloudPlanInputError(f"--mode {inp.mode!r}: expected shared or exclusive")
    if inp.min_idle < 0 or inp.max_idle < inp.min_idle:
        raise CloudPlanInputError(f"--min-idle {inp.min_idle} / --max-idle {inp.max_idle}: expected "
                                  "0 <= min <= max")
    if inp.zones < 1:
        raise CloudPlanInputError("--zones must be 1 or more")
    limits = limits_for(inp)
    warnings = []
    max_pods = limits.max_pods(inp.mode)
    pods = max_pods if inp.max_pods_per_node is None else inp.max_pods_per_node
    if pods > max_pods:
        warnings.append(f"--max-pods-per-node {pods} is above what {limits.describe()} holds in {inp.mode} mode "
                        f"({max_pods}): planned at {max_pods}; set the kubelet's maxPods to {max_pods}")
        pods = max_pods
    nodes = math.ceil(inp.nodes * (1 + inp.growth_percent / 100))
    pod_addresses = max(0, pods - 2)  # host-network pods need no address
    ours = _numbers(limits, inp.mode, pod_addresses, inp.min_idle, inp.max_idle, nodes, inp.zones)
    per_eni = limits.secondary_per_eni
    aws = _numbers(limits, inp.mode, pod_addresses, per_eni if inp.mode == "shared" else 1,
                   per_eni if inp.mode == "shared" else 1, nodes, inp.zones)
    if ours.zone_prefix == LARGEST_SUBNET and ours.per_zone + EC2_RESERVED > 2 ** (32 - LARGEST_SUBNET):
        warnings.append(f"each zone needs {ours.per_zone} pod addresses: more than a /16 subnet holds (EC2's "
                        "largest); add zones or subnets")
    if inp.max_idle > limits.pod_addresses(inp.mode):
        warnings.append(f"--max-idle {inp.max_idle} is more than the node can hold ({limits.pod_addresses(inp.mode)})")
    return CloudPlan(inp, limits, nodes, max_pods, pods, ours, aws, warnings)


def render(p: CloudPlan) -> str:
    from podnet.cli.output import Column, table  # the one table printer of every command

    inp, lim, a, b = p.input, p.limits, p.podnet, p.aws_default
    lines = [f"Cloud plan: {inp.nodes} nodes of {lim.instance_type} in {inp.zones} zones, {inp.mode} mode"
             + (f", growth {inp.growth_percent:g}%: sized for {p.nodes_planned} nodes" if inp.growth_percent else ""),
             "",
             "Per node",
             f"  limits              {lim.max_enis} ENIs x {lim.ips_per_eni} IPv4 addresses",
             f"  max pods            {p.max_pods} = "
             + (f"{lim.max_enis} x ({lim.ips_per_eni} - 1) + 2" if inp.mode == "shared" else f"{lim.max_enis} - 1 + 2"),
             f"  pods planned        {p.pods_planned}",
             "",
             f"podnet (idle {inp.min_idle}..{inp.max_idle}) beside AWS VPC CNI (WARM_ENI_TARGET=1)"]
    rows = [("idle pinned (empty)", f"{a.idle_min}-{a.idle_max}", f"{b.idle_max}"),
            ("idle at full load", a.idle_at_full_load, b.idle_at_full_load),
            ("ENIs at full load", a.enis_at_full_load, b.enis_at_full_load),
            ("subnet addresses", a.subnet_addresses_per_node, b.subnet_addresses_per_node),
            ("cluster addresses", a.subnet_addresses_total, b.subnet_addresses_total),
            ("per zone", a.per_zone, b.per_zone),
            ("zone subnet needed", f"/{a.zone_prefix}", f"/{b.zone_prefix}")]
    columns = [Column("per-node", lambda r: r[0]), Column("podnet", lambda r: r[1]),
               Column("aws-vpc-cni", lambda r: r[2])]
    lines.append(table(columns, rows, indent="  "))
    lines += ["", "Warnings"] + ([f"  - {w}" for w in p.warnings] or ["  none"])
    return "\n".join(lines)
