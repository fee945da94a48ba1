"""CNI requests on a node a CloudNetwork selects: the agent's ENI IPAM mode behind the CNI
handler (the pod dataplane a recording stand-in: no kernel), against moto's EC2 server."""

from __future__ import annotations

import json

from tests.eni.pools import cloud_network, node
from tests.unit.cni_doubles import RecordingDataplane

from podnet.cni.handler import CNIHandler
from podnet.eni import records as rec
from podnet.eni.agent import EniAgent
from podnet.eni.setup import PoolOptions
from podnet.store import open_store
from podnet.store.objects import ObjectStore

NET = "podnet"


def env(command: str, cid: str) -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_NETNS": "/run/netns/pod", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}


def conf() -> str:
    return json.dumps({"cniVersion": "1.1.0", "name": NET, "type": "podnet-cni"})


def agent_for(ec2, world, tmp_path, network, **opts):
    url = f"sqlite://{tmp_path}/store.db"
    kv = open_store(url)
    objects = ObjectStore(kv)
    objects.apply([network, node("node-0", world.instances[0])])
    agent = EniAgent.for_node(objects, "node-0", lambda: open_store(url, create=False),
                              PoolOptions(endpoint=opts.pop("endpoint", ec2.endpoint), **opts))
    assert agent is not None
    handler = CNIHandler(kv, "node-0", agent.pod_dataplane(RecordingDataplane()), verify_netns=lambda p: None,
                         ipam_factory=agent.ipam_factory)
    return agent, handler, kv


def test_add_gets_a_vpc_address_and_del_cools_it_down(ec2, tmp_path):
    world = ec2.world(subnets=[("10.30.1.0/24", "us-east-1a")], vpc_cidr="10.30.0.0/16")
    agent, handler, kv = agent_for(ec2, world, tmp_path, cloud_network(world, warmPool={"minIdle": 2, "maxIdle": 4}))
    try:
        agent.start()
        assert agent.wait_started(30), agent.problem
        code, out = handler.handle(env("ADD", "c0ffee01"), conf())
        assert code == 0, out
        address = json.loads(out)["ips"][0]["address"]
        assert address.startswith("10.30.1.") and address.endswith("/32")
        ip = address.split("/")[0]
        on_cloud = {a for addrs in ec2.instance_addresses(world.instances[0]).values() for a in addrs}
        assert ip in on_cloud
        assert rec.get_address(kv, "node-0", ip).handle == f"{NET}.c0ffee01.eth0"
        code, out = handler.handle(env("CHECK", "c0ffee01"), json.dumps(
            {"cniVersion": "1.1.0", "name": NET, "type": "podnet-cni", "prevResult": json.loads(out)}))
        assert code == 0, out
        code, out = handler.handle(env("DEL", "c0ffee01"), conf())
        assert code == 0, out
        r = rec.get_address(kv, "node-0", ip)
        assert r.handle is None and r.cooling_until is not None
        assert ip in agent.pool.state.cooling
    finally:
        handler.close()
        agent.stop()
        kv.close()


def test_an_empty_pool_with_the_api_throttled_is_code_11_saying_why(ec2, tmp_path):
    world = ec2.world(subnets=[("10.31.1.0/24", "us-east-1a")], vpc_cidr="10.31.0.0/16")
    agent, handler, kv = agent_for(ec2, world, tmp_path, cloud_network(world), wait=0.3)
    try:
        agent.start()
        assert agent.wait_started(30), agent.problem
        ec2.throttle("AssignPrivateIpAddresses", 5)
        code, out = handler.handle(env("ADD", "c0ffee02"), conf())
        doc = json.loads(out)
        assert code == 11 and doc["code"] == 11, out
        assert "warm pool of node node-0 is empty" in doc["msg"] and "RequestLimitExceeded" in doc["msg"], doc
    finally:
        handler.close()
        agent.stop()
        kv.close()


def test_a_cloud_that_is_down_at_start_answers_code_11_and_the_pool_starts_when_it_is_back(ec2, tmp_path):
    world = ec2.world(subnets=[("10.32.1.0/24", "us-east-1a")], vpc_cidr="10.32.0.0/16")
    network = cloud_network(world)
    agent, handler, kv = agent_for(ec2, world, tmp_path, network, endpoint="http://127.0.0.1:9")
    try:
        agent.start()
        assert agent.tried.wait(30) and agent.pool is None
        code, out = handler.handle(env("ADD", "c0ffee03"), conf())
        doc = json.loads(out)
        assert code == 11, out
        assert "cannot start" in doc["msg"] and "DescribeInstances" in doc["msg"] and \
            "EndpointConnectionError" in doc["msg"], doc
        code, out = handler.handle(env("STATUS", ""), conf())
        assert code == 50 and "cannot start" in json.loads(out)["msg"], out
        agent.options.endpoint = ec2.endpoint  # the endpoint is back
        assert agent.wait_started(30), agent.problem
        code, out = handler.handle(env("ADD", "c0ffee03"), conf())
        assert code == 0, out
    finally:
        handler.close()
        agent.stop()
        kv.close()


def test_concurrent_adds_through_the_handler_wait_on_one_batched_call_each(ec2, tmp_path):
    """25 pods at once on an empty pool: three Assign calls (ceil(25 / 10)), and no ADD waits
    for another pod's (the handler orders requests per attachment only)."""
    import threading

    world = ec2.world(instance_type="m5.4xlarge", subnets=[("10.33.1.0/24", "us-east-1a")], vpc_cidr="10.33.0.0/16")
    agent, handler, kv = agent_for(ec2, world, tmp_path, cloud_network(world, batchWindowMilliseconds=300))
    try:
        agent.start()
        assert agent.wait_started(30), agent.problem
        ec2.latency["AssignPrivateIpAddresses"] = 1.0
        ec2.reset_counts()
        codes, go = [], threading.Event()

        def one(i: int) -> None:
            go.wait()
            codes.append(handler.handle(env("ADD", f"c{i:02d}"), conf())[0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(25)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(60)
        assert codes == [0] * 25
        assert ec2.calls["AssignPrivateIpAddresses"] == 3, ec2.calls  # in parallel: one round
    finally:
        handler.close()
        agent.stop()
        kv.close()
