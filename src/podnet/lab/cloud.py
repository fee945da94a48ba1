"""A lab in a cloud VPC: pod addresses from ENIs (spec.cloud of a Lab).

    cloud:
      instanceType: m5.large            # every node's; its limits are EC2's (DescribeInstanceTypes)
      vpcCidr: 10.0.0.0/16
      subnets: [10.0.1.0/24, 10.0.2.0/24]   # pod subnets (zone us-east-1a)
      vpcHost: {address: 10.0.250.10/24, name: vpc-host, ports: [{name: http, containerPort: 8080}]}
      networks:                         # CloudNetworks the lab applies, subnets named by CIDR
        - {name: shared, mode: shared, subnets: [10.0.1.0/24], nodeSelector: {eni: shared},
           warmPool: {minIdle: 2, maxIdle: 6}}
        - {name: solo, mode: exclusive, subnets: [10.0.2.0/24], nodeSelector: {eni: exclusive}}

What it starts, all removed by `lab down`:
  - the EC2 API: moto's server behind tests/support/fake_ec2.py (EC2's limits, unique
    addresses), in the underlay namespace on the gateway's address, port 8773: the agents
    reach it as they reach a VPC endpoint. It makes the VPC, the subnets, a security group
    and one instance per node first; each Node gets its instance as spec.providerID.
  - the cloud fabric (lab/cloudfabric.py): the VPC namespace, programmed by the EC2 server
    after every ENI change, and the VPC host behind it (a pod server, like the external host).
The fake lives in the source checkout's tests/support: a lab with a cloud needs the checkout.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from podnet.errors import PodnetError
from podnet.model.base import Schema
from podnet.model.cloud import WarmPool
from podnet.model.objects import CloudNetwork, ContainerPort

EC2_PORT = 8773
REGION = "us-east-1"
ZONE = "us-east-1a"
ACCESS_KEY = "podnet-lab"
SECRET_KEY = "podnet-lab-secret"
VPC_HOST_KEY = "vpc-host"


class LabCloudHost(Schema):
    address: str = "10.0.250.10/24"
    name: str = VPC_HOST_KEY
    ports: list[ContainerPort] = Field(default_factory=lambda: [ContainerPort(name="http", container_port=8080)])

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            iface = ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an address with a prefix length (e.g. 10.0.250.10/24)") from None
        if iface.version != 4 or iface.network.prefixlen > 30:
            raise ValueError(f"{v}: expected an IPv4 address in a subnet of /30 or larger")
        return v


class LabCloudNetwork(Schema):
    name: str
    mode: Literal["shared", "exclusive"] = "shared"
    subnets: list[str]
    node_selector: dict[str, str] = Field(default_factory=dict)
    warm_pool: WarmPool = Field(default_factory=lambda: WarmPool(min_idle=2, max_idle=6))
    cooldown_seconds: float = 5.0
    batch_size: int = 10


class LabCloud(Schema):
    instance_type: str = "m5.large"
    vpc_cidr: str = "10.0.0.0/16"
    subnets: list[str]
    node_subnet: str | None = None  # the instances' own ENIs (default: the VPC's last /24)
    vpc_host: LabCloudHost = Field(default_factory=LabCloudHost)
    networks: list[LabCloudNetwork]

    @model_validator(mode="after")
    def _inside(self) -> LabCloud:
        vpc = ipaddress.ip_network(self.vpc_cidr)
        nets = []
        for i, c in enumerate([*self.subnets, self.nodes_subnet()]):
            net = ipaddress.ip_network(c)
            if not net.subnet_of(vpc):
                raise ValueError(f"subnets[{i}]: {c} is not inside vpcCidr {self.vpc_cidr}")
            if any(net.overlaps(n) for n in nets):
                raise ValueError(f"subnets[{i}]: {c} overlaps another subnet")
            nets.append(net)
        host = ipaddress.ip_interface(self.vpc_host.address)
        if host.ip not in vpc or any(host.network.overlaps(n) for n in nets):
            raise ValueError(f"vpcHost.address {self.vpc_host.address} must be in vpcCidr {self.vpc_cidr} and outside "
                             "its subnets")
        for i, n in enumerate(self.networks):
            for c in n.subnets:
                if c not in self.subnets:
                    raise ValueError(f"networks[{i}].subnets: {c} is not one of cloud.subnets")
        return self

    def nodes_subnet(self) -> str:
        if self.node_subnet:
            return self.node_subnet
        vpc = ipaddress.ip_network(self.vpc_cidr)
        return str(list(vpc.subnets(new_prefix=max(24, vpc.prefixlen)))[-1])


def fake_ec2_source() -> Path:
    """The checkout's tests/support/fake_ec2.py, or an error saying a checkout is needed."""
    import podnet

    root = Path(podnet.__file__).resolve().parents[2]
    path = root / "tests" / "support" / "fake_ec2.py"
    if not path.exists():
        raise PodnetError(f"a lab with spec.cloud runs podnet's EC2 stand-in from the source checkout "
                          f"({path} is missing): run the lab from a checkout of podnet")
    return root


def aws_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}


def setup(st: Any, cloud: LabCloud, nodes: list[dict], underlay_cidr: str, gateway: str, timeout: float,
          say: Any) -> tuple[list[CloudNetwork], dict[str, str]]:
    """The EC2 server, the world in it, the VPC namespace and host; the CloudNetworks to apply
    and each node's providerID."""
    from podnet.lab import cloudfabric, topology

    root = fake_ec2_source()
    vpc_ns, host_ns = st.netns_name("vpc"), st.netns_name("vpch")
    for ns in (vpc_ns, host_ns):
        st.record_netns(ns)
        topology.create_netns(ns)
    ul_net = ipaddress.ip_network(underlay_cidr)
    vpc_ul_address = str(ul_net.broadcast_address - 1)
    cloudfabric.build_vpc(st.data["underlay_netns"], vpc_ns, host_ns, cloud.vpc_host.address, cloud.vpc_cidr,
                          underlay_cidr, vpc_ul_address)
    for n in nodes:  # the instances reach the VPC through their subnet's router
        topology.add_route(n["netns"], cloud.vpc_cidr, vpc_ul_address)
    world_spec = st.dir / "cloud-world.json"
    world_out = st.dir / "cloud-world-made.json"
    ready = st.dir / "ec2.ready"
    fabric = st.dir / "cloud-fabric.json"
    world_spec.write_text(json.dumps({
        "instanceType": cloud.instance_type, "vpcCidr": cloud.vpc_cidr, "instances": len(nodes),
        "subnets": [[c, ZONE] for c in [*cloud.subnets, cloud.nodes_subnet()]], "nodeSubnet": cloud.nodes_subnet()}))
    st.save_store_credentials({**st.store_env(), **aws_env()})
    argv = [sys.executable, "-m", "tests.support.fake_ec2", "--host", gateway, "--port", str(EC2_PORT),
            "--fabric", str(fabric), "--ready-file", str(ready), "--world", str(world_spec),
            "--world-out", str(world_out)]
    entry = st.start_process("ec2", argv, netns=st.data["underlay_netns"], env={"PYTHONPATH": str(root)},
                             role="cloud")
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if st.process_pid(entry) is None or time.monotonic() > deadline:
            raise PodnetError(f"the EC2 server did not start: see {entry['log']}")
        time.sleep(0.05)
    world = json.loads(world_out.read_text())
    endpoint = f"http://{gateway}:{EC2_PORT}"
    instances = dict(zip((n["name"] for n in nodes), world["instances"], strict=True))
    pod_subnets = {world["subnets"][c]: c for c in cloud.subnets}
    cloudfabric.FabricConfig(vpc_ns, {instances[n["name"]]: n["netns"] for n in nodes}, pod_subnets).write(fabric)
    st.set(cloud={"endpoint": endpoint, "vpc_cidr": cloud.vpc_cidr, "vpc_netns": vpc_ns, "vpc_host_netns": host_ns,
                  "vpc_host": cloud.vpc_host.address, "instances": instances, "subnets": world["subnets"]})
    say(f"cloud: EC2 API {endpoint} (pid {entry['pid']}), VPC {cloud.vpc_cidr} in netns {vpc_ns}, "
        f"{cloud.instance_type} instances {', '.join(world['instances'])}")
    networks = []
    for n in cloud.networks:
        spec: dict[str, Any] = {
            "provider": "aws", "region": REGION, "mode": n.mode, "endpoint": endpoint,
            "subnets": [{"id": world["subnets"][c], "zone": ZONE} for c in n.subnets],
            "securityGroups": [world["group"]], "warmPool": n.warm_pool.to_dict(),
            "cooldownSeconds": n.cooldown_seconds, "batchSize": n.batch_size,
        }
        if n.node_selector:
            spec["nodeSelector"] = {"matchLabels": n.node_selector}
        networks.append(CloudNetwork.model_validate({"metadata": {"name": n.name}, "spec": spec}))
    provider_ids = {name: f"aws:///{ZONE}/{inst}" for name, inst in instances.items()}
    return networks, provider_ids


def vpc_host_ports(cloud: LabCloud) -> list[tuple[str, int]]:
    return [(p.protocol.lower(), p.container_port) for p in cloud.vpc_host.ports]
