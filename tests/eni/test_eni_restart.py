"""kill -9 of the process holding a node's ENI pool in the middle of an allocation burst,
then a restart: no address leaked, none held twice, checked against the cloud's state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from tests.eni.pools import cloud_network, start_pool

from podnet.eni import records as rec
from podnet.store import open_store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kill_9_mid_burst_then_restart_leaks_nothing_and_duplicates_nothing(ec2, tmp_path):
    world = ec2.world(instance_type="m5.4xlarge", subnets=[("10.20.1.0/24", "us-east-1a")], vpc_cidr="10.20.0.0/16")
    network = cloud_network(world, batchSize=5, warmPool={"minIdle": 2, "maxIdle": 6}, batchWindowMilliseconds=20)
    url = f"sqlite://{tmp_path}/store.db"
    open_store(url).close()
    ec2.latency["AssignPrivateIpAddresses"] = 0.15  # calls in flight when the kill comes
    env = {**os.environ, "PYTHONPATH": ROOT}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.eni.burst_child", ec2.endpoint, url, "node-0", world.instances[0],
         json.dumps(network.to_dict()), "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines: list[str] = []
        enough = threading.Event()

        def read() -> None:
            for line in child.stdout:
                lines.append(line.strip())
                if len(lines) > 20:
                    enough.set()
            enough.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert enough.wait(60), child.stderr.read() if child.poll() is not None else "no progress"
        assert "done" not in lines, "the burst ended before the kill"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        reader.join(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
    ec2.latency.clear()

    np = start_pool(ec2, world, tmp_path, network, store_url=url, node_name="node-0")
    try:
        assert np.pool.wait_settled(15)
        kv = open_store(url, create=False)
        stored = rec.read(kv, "node-0")
        held = {h: a for h, a in stored.handles.items()}
        assert len(set(held.values())) == len(held), "an address recorded for two pods"
        on_cloud = {a for addrs in ec2.instance_addresses(world.instances[0]).values() for a in addrs}
        assert set(held.values()) <= on_cloud, "a pod holds an address the node does not have"
        st = np.pool.state
        # every address the node holds in the cloud is accounted for: a pod's, or in the pool
        assert set(st.eni_of) == on_cloud
        assert set(st.assigned) == set(held.values())
        assert set(st.idle) | set(st.cooling) == on_cloud - set(held.values())
        # the pool is back within its watermarks: what the killed burst got from the cloud and
        # never gave to a pod was adopted, and the surplus went back
        c = np.pool.counts()
        assert 2 <= c.idle and c.idle + c.cooling <= 6, c
        # the burst goes on after the restart: never an address a pod already holds
        ipam = np.ipam()
        more = [ipam.allocate(f"after-{i}", "node-0").address for i in range(20)]
        assert not set(more) & set(held.values()) and len(set(more)) == 20
        assert ec2.duplicates() == [] and not ec2.limit_errors
        ipam.kv.close()
        kv.close()
    finally:
        np.pool.stop()
