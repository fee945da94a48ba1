"""ENI pools: pod start (CNI ADD) with addresses from the cloud, against local IPAM in the same run.

Not a test: prints a table and writes bench/results/bench_eni.json.

The cloud is moto's EC2 server behind tests/support/fake_ec2.py (EC2's limits and unique
addresses), with injected latency: AssignPrivateIpAddresses 0.5 s, CreateNetworkInterface
and AttachNetworkInterface 2.5 s each (5 s for a new ENI), as EC2 is slow. Each ADD goes
through the agent's CNI handler (request parsing, attachment record, IPAM, result) on a
SQLite store; the pod dataplane is a recording stand-in, so the numbers are the address's
cost alone (the veth costs the same on any node: see bench-cni). Rows:

  local IPAM burst 30       baseline: 30 concurrent ADDs from podnet's own IPAM (IPPool blocks)
  eni warm burst 30         30 concurrent ADDs on a node whose warm pool holds them (minIdle 30)
  eni cold burst 30         30 concurrent ADDs on a fresh node (empty pool, no podnet ENI yet:
                            one Create + Attach, then batched Assigns)
  eni churn 100 batch 10    100 pods started in bursts of 10 and deleted again, on a node with
                            minIdle 5 / maxIdle 15: every EC2 call counted per 100 pods
  eni churn 100 batch 1     the same with batchSize 1 and no batch window: one call per pod,
                            as a pool without batching makes them
  eni replace 100 batch 10  a node running 30 pods (settled before counting) has 100 of them
                            replaced, 10 deleted then 10 started at a time: every EC2 call of
                            that steady churn counted per 100 pods

Targets (docs/benchmarks.md): warm p50 within 5 ms of local IPAM's p50; at most 12
cloud calls per 100 pods with batches of 10 (AWS VPC CNI: up to three EC2 calls per pod):
the churn rows hold it to their Assign calls (they also make a fresh node's ENIs and give
the surplus back), the replace row to every call.
The idle addresses each node pins are shown after the run (AWS's default, WARM_ENI_TARGET=1,
pins a whole ENI's: 29 on an m5.4xlarge).

    .venv/bin/python bench/bench_eni.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(1, os.path.join(HERE, ".."))  # tests.support

from tests.support.fake_ec2 import ACCESS_KEY, SECRET_KEY, FakeEC2Client  # noqa: E402
from tests.unit.cni_doubles import RecordingDataplane  # noqa: E402

from podnet.cni.handler import CNIHandler  # noqa: E402
from podnet.eni.ipam import EniIPAM  # noqa: E402
from podnet.eni.setup import PoolOptions, build_pool  # noqa: E402
from podnet.model.objects import CloudNetwork, IPPool, Node  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402

BURST = 30
WARM_TARGET_MS = 5.0
ASSIGN_TARGET = 12
HEADER = ["scenario", "pods", "p50 ms", "p99 ms", "vs local p50", "Assign/100", "EC2 calls/100", "idle after",
          "target"]
WIDTHS = [24, 5, 9, 9, 13, 11, 14, 11, 24]


@contextlib.contextmanager
def fake_ec2():
    """The EC2 server in a process of its own: its work never competes with the CNI
    handler's threads for this process's interpreter lock."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_ec2"], cwd=os.path.join(HERE, ".."),
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.path.join(HERE, "..")})
    try:
        line = proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise SystemExit("the fake EC2 server did not start")
        yield FakeEC2Client(line[1])
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


def percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else 0.0


def env(command: str, cid: str) -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_NETNS": "/run/netns/bench", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}


CONF = json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni"})


def burst(handler: CNIHandler, command: str, cids: list[str]) -> list[float]:
    """Concurrent CNI requests; each one's latency in ms (every one must succeed)."""
    lat: list[float] = []
    errors: list[str] = []
    go = threading.Event()
    lock = threading.Lock()

    def one(cid: str) -> None:
        go.wait()
        t = time.perf_counter()
        code, out = handler.handle(env(command, cid), CONF)
        ms = (time.perf_counter() - t) * 1000
        with lock:
            lat.append(ms)
            if code:
                errors.append(out)

    threads = [threading.Thread(target=one, args=(c,)) for c in cids]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"CNI {command} failed: {errors[0]}")
    return lat


class Node_:
    """A node's store, CNI handler and (ENI) pool."""

    def __init__(self, tmp: str, name: str, pool=None):
        self.url = f"sqlite://{tmp}/{name}-{uuid.uuid4().hex[:6]}.db"
        self.kv = open_store(self.url)
        self.pool = pool
        factory = (lambda kv: EniIPAM(kv, self.pool)) if pool is not None else None
        self.handler = CNIHandler(self.kv, name, RecordingDataplane(), verify_netns=lambda p: None,
                                  ipam_factory=factory)

    def close(self) -> None:
        self.handler.close()
        if self.pool is not None:
            self.pool.stop()
        self.kv.close()


def local_node(tmp: str) -> Node_:
    n = Node_(tmp, "local")
    ObjectStore(n.kv).apply([IPPool.model_validate({"metadata": {"name": "p"},
                                                    "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
    return n


def eni_node(ec2: FakeEC2Client, world, tmp: str, index: int, spec: dict) -> Node_:
    body = {"provider": "aws", "region": "us-east-1",
            "subnets": [{"id": world.subnets[c], "zone": "us-east-1a"} for c in ("10.0.1.0/24", "10.0.2.0/24")],
            "securityGroups": [world.group], "cooldownSeconds": 1, "batchWindowMilliseconds": 100, **spec}
    network = CloudNetwork.model_validate({"metadata": {"name": "vpc"}, "spec": body})
    node = Node.model_validate({"metadata": {"name": f"node-{index}"},
                                "spec": {"providerID": f"aws:///us-east-1a/{world.instances[index]}"}})
    url = f"sqlite://{tmp}/eni-{index}.db"
    open_store(url).close()
    pool = build_pool(network, node, lambda: open_store(url, create=False),
                      PoolOptions(endpoint=ec2.endpoint, wait=60, shrink_interval=0.2, check_interval=1))
    n = Node_(tmp, f"node-{index}", pool)
    return n


def row(name: str, lat: list[float], local_p50: float | None, calls: dict | None = None, pods: int = 0,
        idle: int | None = None, target: str = "") -> dict:
    p50 = percentile(lat, 50) if lat else None
    per100 = (lambda k: round(calls.get(k, 0) * 100 / pods, 1)) if calls and pods else (lambda k: None)
    return {"scenario": name, "pods": pods or len(lat), "p50_ms": p50, "p99_ms": percentile(lat, 99) if lat else None,
            "vs_local_p50_ms": None if p50 is None or local_p50 is None else round(p50 - local_p50, 2),
            "assign_per_100": per100("AssignPrivateIpAddresses"),
            "calls_per_100": round(sum(calls.values()) * 100 / pods, 1) if calls and pods else None,
            "calls": calls or {}, "idle_after": idle, "target": target}


def print_row(r: dict) -> None:
    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    cells = [r["scenario"], r["pods"], f(r["p50_ms"]), f(r["p99_ms"]), f(r["vs_local_p50_ms"], "{:+.2f}"),
             f(r["assign_per_100"], "{:g}"), f(r["calls_per_100"], "{:g}"), f(r["idle_after"], "{}"), r["target"]]
    print("  ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS, strict=True)).rstrip(), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (less latency injected, fewer bursts)")
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    scale = 0.2 if args.quick else 1.0
    rounds = 2 if args.quick else 5
    latency = {"AssignPrivateIpAddresses": 0.5 * scale, "UnassignPrivateIpAddresses": 0.5 * scale,
               "CreateNetworkInterface": 2.5 * scale, "AttachNetworkInterface": 2.5 * scale}
    rows: list[dict] = []
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, WIDTHS, strict=True)).rstrip())
    with tempfile.TemporaryDirectory(prefix="bench-eni-") as tmp, fake_ec2() as ec2:
        world = ec2.world(instanceType="m5.4xlarge", instances=2 + rounds + 3, nodeSubnet="10.0.9.0/24",
                          subnets=[("10.0.9.0/24", "us-east-1a"), ("10.0.1.0/24", "us-east-1a"),
                                   ("10.0.2.0/24", "us-east-1a")])
        ec2.control(latency=latency)

        # baseline: podnet's own IPAM
        local = local_node(tmp)
        lat: list[float] = []
        for r in range(rounds + 1):
            cids = [f"l{r}-{i}" for i in range(BURST)]
            got = burst(local.handler, "ADD", cids)
            if r:  # the first claims the node's block: not a pod start in steady state
                lat += got
            burst(local.handler, "DEL", cids)
        local.close()
        local_p50 = percentile(lat, 50)
        rows.append(row(f"local IPAM burst {BURST}", lat, None))
        print_row(rows[-1])

        # warm: the pool holds a burst
        warm = eni_node(ec2, world, tmp, 0, {"warmPool": {"minIdle": BURST, "maxIdle": BURST + 10}})
        warm.pool.wait_settled(120)
        lat = []
        ec2.control(reset=True)
        for r in range(rounds):
            cids = [f"w{r}-{i}" for i in range(BURST)]
            lat += burst(warm.handler, "ADD", cids)
            burst(warm.handler, "DEL", cids)
            warm.pool.wait_settled(120)
        calls = ec2.state()["calls"]
        ok = percentile(lat, 50) - local_p50 <= WARM_TARGET_MS
        rows.append(row(f"eni warm burst {BURST}", lat, local_p50, calls, BURST * rounds, warm.pool.counts().idle,
                        f"p50 <= local +{WARM_TARGET_MS:g} ms {'ok' if ok else 'MISS'}"))
        print_row(rows[-1])
        warm.close()

        # cold: a fresh node, no podnet ENI yet
        lat = []
        ec2.control(reset=True)
        for r in range(rounds):
            cold = eni_node(ec2, world, tmp, 2 + r, {"warmPool": {"minIdle": 0, "maxIdle": 10}})
            lat += burst(cold.handler, "ADD", [f"c{r}-{i}" for i in range(BURST)])
            cold.pool.wait_settled(120)
            idle_cold = cold.pool.counts().idle
            cold.close()
        rows.append(row(f"eni cold burst {BURST}", lat, local_p50, ec2.state()["calls"], BURST * rounds, idle_cold))
        print_row(rows[-1])

        # churn: calls per 100 pods, batched and not
        for batch, window, index in ((10, 100, 1), (1, 0, 2 + rounds)):
            node = eni_node(ec2, world, tmp, index, {"warmPool": {"minIdle": 5, "maxIdle": 15},
                                                     "batchSize": batch, "batchWindowMilliseconds": window})
            node.pool.wait_settled(120)
            ec2.control(reset=True)
            lat = []
            cids = [f"ch{batch}-{i}" for i in range(100)]
            for i in range(0, 100, 10):
                lat += burst(node.handler, "ADD", cids[i:i + 10])
            for i in range(0, 100, 10):
                burst(node.handler, "DEL", cids[i:i + 10])
            node.pool.wait_settled(120, cooled=True)  # the surplus goes back once the cooldown has passed
            calls = ec2.state()["calls"]
            target = ""
            if batch == 10:
                ok = calls.get("AssignPrivateIpAddresses", 0) <= ASSIGN_TARGET
                target = f"Assign <= {ASSIGN_TARGET} {'ok' if ok else 'MISS'}"
            rows.append(row(f"eni churn 100 batch {batch}", lat, local_p50, calls, 100, node.pool.counts().idle,
                            target))
            print_row(rows[-1])
            node.close()
        # steady churn: pods replaced on a node whose ENIs are made, every call counted
        node = eni_node(ec2, world, tmp, 3 + rounds, {"warmPool": {"minIdle": 5, "maxIdle": 15}})
        running = [f"rp-{i}" for i in range(BURST)]
        burst(node.handler, "ADD", running)
        node.pool.wait_settled(120, cooled=True)
        ec2.control(reset=True)
        lat = []
        for i in range(0, 100, 10):
            new = [f"rn-{j}" for j in range(i, i + 10)]
            burst(node.handler, "DEL", running[:10])
            lat += burst(node.handler, "ADD", new)
            running = running[10:] + new
        node.pool.wait_settled(120, cooled=True)
        calls = ec2.state()["calls"]
        ok = sum(calls.values()) <= ASSIGN_TARGET
        rows.append(row("eni replace 100 batch 10", lat, local_p50, calls, 100, node.pool.counts().idle,
                        f"calls <= {ASSIGN_TARGET} {'ok' if ok else 'MISS'}"))
        print_row(rows[-1])
        node.close()
        state = ec2.state()
        limits, dups = state["limit_errors"], state["duplicates"]
    print("\nidle addresses pinned per node: podnet at most maxIdle (above: 'idle after'); AWS VPC CNI's "
          "default WARM_ENI_TARGET=1 pins a whole ENI's: 29 on an m5.4xlarge")
    print(f"injected latency: {', '.join(f'{k} {v:g} s' for k, v in latency.items())}")
    print(f"calls past an instance limit: {sum(limits.values())}; addresses held twice in the cloud: {len(dups)}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "bench_eni" + ("-quick" if args.quick else "") + ".json")
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "cpus": os.cpu_count(), "latency": latency, "rows": rows,
                   "limit_errors": dict(limits), "duplicates": dups}, f, indent=2)
    print(f"wrote {os.path.relpath(path)}")
    return 1 if limits or dups else 0


if __name__ == "__main__":
    sys.exit(main())
