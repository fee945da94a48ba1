"""A process holding a node's ENI pool and allocating addresses in a burst, to be killed
with SIGKILL in the middle of it (tests/eni/test_eni_restart.py).

    python -m tests.eni.burst_child ENDPOINT STORE_URL NODE INSTANCE NETWORK_JSON COUNT

Prints "ready" once the pool runs, then one line per address recorded for a pod.
"""

from __future__ import annotations

import json
import sys
import threading

from podnet.eni.ipam import EniIPAM
from podnet.eni.setup import PoolOptions, build_pool
from podnet.model.objects import CloudNetwork, Node
from podnet.store import open_store


def main() -> None:
    endpoint, url, node_name, instance, network_json, count = sys.argv[1:7]
    network = CloudNetwork.model_validate(json.loads(network_json))
    node = Node.model_validate({"metadata": {"name": node_name},
                                "spec": {"providerID": f"aws:///us-east-1a/{instance}"}})
    pool = build_pool(network, node, lambda: open_store(url, create=False),
                      PoolOptions(endpoint=endpoint, wait=60, shrink_interval=0.05))
    print("ready", flush=True)
    lock = threading.Lock()

    def one(i: int) -> None:
        ipam = EniIPAM(open_store(url, create=False), pool)
        a = ipam.allocate(f"burst-{i}", node_name)
        with lock:
            print(f"{a.handle} {a.address}", flush=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(int(count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
