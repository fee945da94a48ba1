"""Building a node's ENI pool against a FakeEC2 world, for the ENI tests and the benchmark."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fake_ec2 import FakeEC2, World

from podnet.eni.ipam import EniIPAM
from podnet.eni.pool import EniPool
from podnet.eni.setup import PoolOptions, build_pool
from podnet.model.objects import CloudNetwork, Node
from podnet.store import open_store


def cloud_network(world: World, *, subnets: list[str] | None = None, name: str = "vpc", **spec: Any) -> CloudNetwork:
    ids = [world.subnets[c] for c in subnets] if subnets else list(world.subnets.values())
    body = {
        "provider": "aws", "region": "us-east-1",
        "subnets": [{"id": s, "zone": world.zones[s]} for s in ids],
        "securityGroups": [world.group],
        "warmPool": {"minIdle": 0, "maxIdle": 10},
        "cooldownSeconds": 0.2,
        "batchWindowMilliseconds": 50,
        "leakGraceSeconds": 300,
        **spec,
    }
    return CloudNetwork.model_validate({"metadata": {"name": name}, "spec": body})


def node(name: str, instance: str, zone: str = "us-east-1a") -> Node:
    return Node.model_validate({"metadata": {"name": name}, "spec": {"providerID": f"aws:///{zone}/{instance}"}})


@dataclass
class NodePool:
    pool: EniPool
    store_url: str
    node: str

    def ipam(self) -> EniIPAM:
        return EniIPAM(open_store(self.store_url, create=False), self.pool)


def start_pool(ec2: FakeEC2, world: World, tmp: Path, network: CloudNetwork, *, instance: int = 0,
               node_name: str | None = None, store_url: str | None = None, **options: Any) -> NodePool:
    url = store_url or f"sqlite://{tmp}/store-{uuid.uuid4().hex[:6]}.db"
    open_store(url).close()
    name = node_name or f"node-{instance}"
    opts = PoolOptions(endpoint=ec2.endpoint, wait=options.pop("wait", 10.0),
                       shrink_interval=options.pop("shrink_interval", 0.05),
                       check_interval=options.pop("check_interval", 0.5),
                       reconcile_interval=options.pop("reconcile_interval", 60.0), **options)
    pool = build_pool(network, node(name, world.instances[instance]),
                      lambda: open_store(url, create=False), opts)
    return NodePool(pool, url, name)
