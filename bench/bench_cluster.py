"""One real agent fed a whole cluster: start-up, memory and change latency against
cluster size. Not a test: prints a table and writes bench/results/cluster.json.

The cluster at scale 1.0 (the size podnet is designed for): 5 000 Nodes, 150 000
Pods (30 per node, labels, a named port), every node's IPAM block with its handles,
affinities and CNI attachment records, 500 Namespaces, 50 000 Services with an
EndpointSlice of 5 endpoints each, their ClusterIP records, 2 000 NetworkPolicies.
Each scale is generated into a fresh store (SQLite, or a 3-member etcd on loopback
that the agent reaches through a relay into its namespace); one agent (node-00000,
30 local pods) runs in a network namespace of its own, and the bench measures:

  start           process start -> first complete sync (the agent's .synced file)
  rss             the agent's resident memory after the first sync
  slice change    one EndpointSlice changed -> every dataplane programmed (median, max)
  label change    one remote pod's labels changed (selected by policies) -> programmed
  new block       a block claimed by another node -> programmed (its route)
  new pod         a pod started on another node (block, pod, slice) -> programmed
  churn R/s       EndpointSlice updates at R per second for a while: lag p50 / p99, agent CPU
  pod churn R/s   label updates of pods on other nodes at R per second: policy lag, agent CPU
  idle cpu        the agent's CPU while nothing changes (between resyncs)
  restart         a clean stop (SIGTERM: the agent writes its snapshot) and start: start ->
                  first sync, and -> a change made while it was down programmed
  resync          the time of one periodic full resync, per dataplane (from its metrics)

The baseline is the smallest scale of the same run: the ratio columns say how each
cost grew against how the cluster grew (the node's own work is the same at every
scale: cost should stay flat).

    .venv/bin/python bench/bench_cluster.py [--quick] [--scales 0.1,0.25,0.5,1.0] [--backends sqlite,etcd]
                                            [--plot docs/img/cluster-scale.png]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.support: etcd members

from podnet.cni.attachments import attachment_key  # noqa: E402
from podnet.ipam import block as blk  # noqa: E402
from podnet.ipam import keys  # noqa: E402
from podnet.services.clusterip import CLUSTERIP_PREFIX  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.base import Op  # noqa: E402
from podnet.store.layout import SHARED  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
FULL = {"nodes": 5000, "pods_per_node": 30, "namespaces": 500, "services": 50000, "endpoints": 5,
        "policies": 2000}
POOL, POOL_CIDR, BLOCK_SIZE = "default", "10.64.0.0/10", 26
NODE = "node-00000"


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def node_ip(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 1}"


def obj_key(kind: str, name: str, ns: str | None = None) -> str:
    return f"/podnet/objects/{kind}/{ns}/{name}" if ns else f"/podnet/objects/{kind}/{name}"


# ------------------------------------------------------------------ the cluster


class Shape:
    def __init__(self, scale: float):
        self.scale = scale
        self.nodes = max(3, int(FULL["nodes"] * scale))
        self.per_node = FULL["pods_per_node"]
        self.namespaces = max(5, int(FULL["namespaces"] * scale))
        self.services = max(10, int(FULL["services"] * scale))
        self.policies = max(4, int(FULL["policies"] * scale))

    @property
    def pods(self) -> int:
        return self.nodes * self.per_node


def pod_of(shape: Shape, n: int, j: int, ip: str) -> tuple[str, dict]:
    k = n * shape.per_node + j
    ns = f"ns{k % shape.namespaces}"
    name = f"pod-{k}"
    app = f"app{(k // shape.namespaces) % 100}"
    return obj_key("Pod", name, ns), {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{k}",
                     "labels": {"app": app, "tier": ("web", "api", "db")[k % 3], "pod-template-hash": f"h{k % 7}"}},
        "spec": {"nodeName": node_name(n), "containers": [
            {"name": "main", "image": "registry.example/app:1.0",
             "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": node_ip(n)},
    }


def generate(shape: Shape, kv, batch: int = 5000) -> dict:
    """Write the cluster in batches; returns what the measurements need."""
    ops: list[Op] = []
    count = 0

    def put(key: str, value: dict) -> None:
        nonlocal count
        ops.append(Op.put(key, value))
        count += 1
        if len(ops) >= batch:
            kv.txn(ops)
            ops.clear()

    put(obj_key("IPPool", POOL), {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": POOL},
                                  "spec": {"cidr": POOL_CIDR, "blockSize": BLOCK_SIZE, "encapsulation": "VXLAN",
                                           "natOutgoing": True}})
    for i in range(shape.namespaces):
        put(obj_key("Namespace", f"ns{i}"), {"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 10}"}}})
    pod_ips: list[tuple[str, str, int]] = []  # (ns, name, node)
    addresses: list[str] = []
    for n in range(shape.nodes):
        name = node_name(n)
        put(obj_key("Node", name), {"apiVersion": "v1", "kind": "Node",
                                    "metadata": {"name": name, "labels": {"zone": f"z{n % 3}"}},
                                    "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n)}]}})
        cidr = blk.nth_block(POOL_CIDR, BLOCK_SIZE, n)
        block = blk.new_block(cidr, POOL, name)
        for j in range(shape.per_node):
            ip = blk.address(cidr, j)
            key, pod = pod_of(shape, n, j, ip)
            cid = secrets.token_hex(32)
            handle = f"podnet.{cid}.eth0"
            block = blk.assign(block, j, handle, {"node": name, "namespace": pod["metadata"]["namespace"],
                                                  "pod": pod["metadata"]["name"]})
            put(key, pod)
            put(keys.handle_key(handle), {"blocks": {cidr: 1}})
            put(attachment_key(name, handle), {"network": "podnet", "containerID": cid, "ifname": "eth0",
                                               "netns": f"/var/run/netns/cni-{cid[:8]}",
                                               "namespace": pod["metadata"]["namespace"],
                                               "pod": pod["metadata"]["name"], "podUID": pod["metadata"]["uid"],
                                               "handle": handle, "created": time.time()})
            pod_ips.append((pod["metadata"]["namespace"], pod["metadata"]["name"], n))
            addresses.append(ip)
        put(keys.block_key(cidr), block)
        put(keys.affinity_key(name, cidr), {"state": "confirmed", "pool": POOL})
    rng = random.Random(1)
    slices = []
    for s in range(shape.services):
        ns = f"ns{s % shape.namespaces}"
        name = f"svc-{s}"
        ip = f"10.{96 + (s >> 16)}.{(s >> 8) & 255}.{s & 255 or 1}"
        put(obj_key("Service", name, ns), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": f"app{s % 100}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
        put(CLUSTERIP_PREFIX + ip, {"service": f"{ns}/{name}"})
        picks = rng.sample(range(len(addresses)), FULL["endpoints"])
        slice_key = obj_key("EndpointSlice", f"{name}-x1", ns)
        put(slice_key, endpoint_slice(ns, name, [(addresses[p], pod_ips[p]) for p in picks], 1))
        slices.append(slice_key)
    for p in range(shape.policies):
        ns = f"ns{p % shape.namespaces}"
        put(obj_key("NetworkPolicy", f"pol-{p}", ns), {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"pol-{p}", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": f"app{p % 100}"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}},
                                           {"namespaceSelector": {"matchLabels": {"team": f"t{p % 10}"}}}],
                                  "ports": [{"port": "http"}]}]}})
    if ops:
        kv.txn(ops)
    return {"keys": count, "slices": slices, "addresses": addresses, "pods": pod_ips}


def endpoint_slice(ns: str, svc: str, eps: list[tuple[str, tuple[str, str, int]]], gen: int) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-x1", "namespace": ns, "generation": gen,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node_name(n),
                           "targetRef": {"kind": "Pod", "name": name, "namespace": pns}}
                          for ip, (pns, name, n) in eps]}


def store_bytes(kv, db: Path, cluster) -> tuple[int, int, int]:
    """(bytes on disk, bytes of every value, bytes of the values an agent lists at start)."""
    if cluster is None:
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    else:
        from bench_scale import etcd_sizes

        size = max(etcd_sizes(cluster.endpoints))
    total = agent = 0
    for prefix in ("/",):
        records, _ = kv.list(prefix)
        for r in records:
            n = len(json.dumps(r.value, separators=(",", ":")))
            total += n
            if r.key.startswith(SHARED):
                agent += n
        del records
    return size, total, agent


def relay_store(endpoints: list[str], netns: str, work: Path) -> tuple[subprocess.Popen, str]:
    """A relay (podnet.lab.forward) listening on the namespace's loopback for each member."""
    ready = work / "relay.ready"
    maps, relayed = [], []
    for i, ep in enumerate(endpoints):
        port = 23790 + i
        maps += ["--map", f"127.0.0.1:{port}={ep.removeprefix('http://')}"]
        relayed.append(f"127.0.0.1:{port}")
    proc = subprocess.Popen([PY, "-m", "podnet.lab.forward", "--netns", f"/run/netns/{netns}", *maps,
                             "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the store relay did not start")
        time.sleep(0.05)
    return proc, "etcd://" + ",".join(relayed)


# ------------------------------------------------------------------ the agent


class AgentUnderTest:
    def __init__(self, workdir: Path, resync: float, node: str = NODE, address: str = node_ip(0)):
        self.netns = f"pnbc-{secrets.token_hex(3)}"
        self.node = node
        self.socket = workdir / f"cni-{node}.sock"
        self.synced_path = Path(str(self.socket) + ".synced")
        self.log = workdir / f"agent-{node}.log"
        self.metrics_port = 9911
        self.resync = resync
        self.proc: subprocess.Popen | None = None
        sh("ip", "netns", "add", self.netns)
        self.ns = ["ip", "netns", "exec", self.netns]
        sh(*self.ns, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        sh(*self.ns, "ip", "addr", "add", f"{address}/16", "dev", "ul0")
        for dev in ("lo", "ul0", "ul1"):
            sh(*self.ns, "ip", "link", "set", dev, "up")

    def start(self, url: str, log_mode: str = "w") -> None:
        self.started = time.monotonic()
        with open(self.log, log_mode) as logf:
            self.proc = subprocess.Popen([*self.ns, PY, "-m", "podnet.cli.main", "--store", url, "agent",
                                          "--node", self.node, "--socket", str(self.socket), "--resync", str(self.resync),
                                          "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1"],
                                         stdout=logf, stderr=subprocess.STDOUT)

    def synced(self) -> int:
        try:
            return int(self.synced_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return -1

    def wait_synced(self, rev: int, timeout: float = 300) -> float:
        """Seconds until the agent has programmed `rev`."""
        t0 = time.monotonic()
        while self.synced() < rev:
            if self.proc.poll() is not None:
                raise SystemExit(f"the agent exited ({self.proc.returncode}); log {self.log}:\n"
                                 + self.log.read_text()[-3000:])
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"the agent did not program revision {rev} within {timeout}s; log {self.log}:\n"
                                 + self.log.read_text()[-3000:])
            time.sleep(0.001)
        return time.monotonic() - t0

    def restart(self, url: str, while_down) -> dict:
        """A clean restart (SIGTERM, as a DaemonSet rollout): how long the stop took (the
        snapshot written), then start -> first sync and start -> the change `while_down()`
        made (its revision) programmed; whether the start used the snapshot."""
        snap = Path(str(self.socket) + ".snapshot")
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout=120)
        stop_s = time.monotonic() - t0
        snap_mib = snap.stat().st_size / 2**20 if snap.exists() else 0.0
        rev = while_down()
        self.synced_path.unlink(missing_ok=True)
        offset = self.log.stat().st_size
        self.start(url, log_mode="a")
        first = self.wait_synced(1)
        current = first + self.wait_synced(rev)
        return {"stop_s": round(stop_s, 2), "snapshot_mib": round(snap_mib, 1), "first_sync_s": round(first, 2),
                "current_s": round(current, 2), "cpu_s": round(self.cpu_seconds(), 2), "rss_mib": round(self.rss_mib(), 1),
                "from_snapshot": "started from" in self.log.read_text()[offset:]}

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> str:
        code = (f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{self.metrics_port}"
                "/metrics', timeout=10).read().decode())")
        return sh("ip", "netns", "exec", self.netns, PY, "-c", code).stdout

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


def sync_sums(metrics: str) -> dict[str, tuple[float, int]]:
    """dataplane -> (sum of sync seconds, syncs) from the agent's metrics."""
    out: dict[str, list[float]] = {}
    for line in metrics.splitlines():
        for part, idx in (("podnet_dataplane_sync_duration_seconds_sum{", 0),
                          ("podnet_dataplane_sync_duration_seconds_count{", 1)):
            if line.startswith(part):
                name = line.split('dataplane="', 1)[1].split('"', 1)[0]
                out.setdefault(name, [0.0, 0])[idx] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def sh(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


# ------------------------------------------------------------------ one scale


def changes(kv, agent: AgentUnderTest, what, n: int) -> list[float]:
    """Time from each write to every dataplane having programmed it (ms)."""
    out = []
    for k in range(n):
        rev = what(k)
        t0 = time.monotonic()
        agent.wait_synced(rev)
        out.append((time.monotonic() - t0) * 1000)
    return out


def churn(agent: AgentUnderTest, write, rate: float, seconds: float) -> tuple[list[float], float]:
    """`write(k) -> revision` at `rate` per second; the lag of each write until the agent has
    programmed it (ms), and the agent's CPU meanwhile (% of one core)."""
    written: list[tuple[int, float]] = []
    seen: list[tuple[int, float]] = []
    done = threading.Event()

    def watch() -> None:
        last = -1
        while not done.is_set() or (written and last < written[-1][0]):
            s = agent.synced()
            if s != last:
                seen.append((s, time.monotonic()))
                last = s
            time.sleep(0.001)
            if done.is_set() and time.monotonic() > end + 30:
                break

    end = time.monotonic() + seconds
    poller = threading.Thread(target=watch)
    poller.start()
    k = 0
    start = time.monotonic()
    cpu0 = agent.cpu_seconds()
    while time.monotonic() < end:
        rev = write(k)
        written.append((rev, time.monotonic()))
        k += 1
        next_at = start + k / rate
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    done.set()
    cpu = (agent.cpu_seconds() - cpu0) / (time.monotonic() - start) * 100
    poller.join()
    lags = []
    for rev, t in written:
        hit = next((ts for s, ts in seen if s >= rev), None)
        if hit is not None:
            lags.append(max(0.0, hit - t) * 1000)
    return lags, cpu


def update_slice(kv, world: dict, i: int, gen: int) -> int:
    key = world["slices"][i]
    rec = kv.get(key)
    value = dict(rec.value)
    eps = list(value["endpoints"])
    p = random.Random(gen).randrange(len(world["addresses"]))
    ns, name, n = world["pods"][p]
    eps[gen % len(eps)] = {"addresses": [world["addresses"][p]], "conditions": {"ready": True},
                           "nodeName": node_name(n), "targetRef": {"kind": "Pod", "name": name, "namespace": ns}}
    value["endpoints"] = eps
    value["metadata"] = {**value["metadata"], "generation": gen}
    return kv.put(key, value)



def bench_store(backend: str, work: Path):
    """The store a benchmark loads: a SQLite file in work, or 3 etcd members on loopback with
    room for the whole cluster (its owner exits them). (url, the etcd cluster or None)."""
    if backend != "etcd":
        return f"sqlite://{work / 'store.db'}", None
    from tests.support.etcd import EtcdCluster

    cluster = EtcdCluster(3, base_dir=str(work / "etcd"), die_with_parent=True,
                          extra_args=["--quota-backend-bytes", str(8 << 30)])
    cluster.__enter__()
    return cluster.url, cluster


def run_scale(scale: float, backend: str, args) -> dict:
    shape = Shape(scale)
    work = Path(tempfile.mkdtemp(prefix="pnbc-"))
    agent = relay = cluster = None
    try:
        url, cluster = bench_store(backend, work)
        kv = open_store(url)
        t0 = time.monotonic()
        world = generate(shape, kv, batch=100 if backend == "etcd" else 5000)
        gen_s = time.monotonic() - t0
        size, values, agent_values = store_bytes(kv, work / "store.db", cluster)
        print(f"{backend} scale {scale:g}: {world['keys']} keys, {values / 2**20:.0f} MiB of values "
              f"({agent_values / 2**20:.0f} MiB listed by an agent), generated in {gen_s:.0f}s; starting the agent",
              flush=True)
        head = kv.revision()
        agent = AgentUnderTest(work, args.resync)
        if cluster is not None:  # the agent's namespace reaches the members through a relay
            relay, url = relay_store(cluster.endpoints, agent.netns, work)
        agent.start(url)
        agent.wait_synced(head)
        start_s = time.monotonic() - agent.started  # from the process's start
        cpu_start = agent.cpu_seconds()
        rss = agent.rss_mib()
        rng = random.Random(3)

        slice_ms = changes(kv, agent, lambda k: update_slice(kv, world, rng.randrange(len(world["slices"])), 10 + k),
                           args.samples)

        def label(k: int) -> int:
            p = shape.per_node + rng.randrange(shape.pods - shape.per_node)  # not on this node
            key, pod = pod_of(shape, p // shape.per_node, p % shape.per_node, world["addresses"][p])
            pod["metadata"]["labels"]["tier"] = ("web", "api")[k % 2]
            return kv.put(key, pod)

        label_ms = changes(kv, agent, label, args.samples)

        def new_block(k: int) -> int:
            n = 1 + rng.randrange(shape.nodes - 1)
            cidr = blk.nth_block(POOL_CIDR, BLOCK_SIZE, shape.nodes + k)
            return kv.txn([Op.put(keys.block_key(cidr), blk.new_block(cidr, POOL, node_name(n))),
                           Op.put(keys.affinity_key(node_name(n), cidr), {"state": "confirmed", "pool": POOL})])

        block_ms = changes(kv, agent, new_block, args.samples)

        def new_pod(k: int) -> int:
            n = 1 + rng.randrange(shape.nodes - 1)
            cidr = blk.nth_block(POOL_CIDR, BLOCK_SIZE, shape.nodes + args.samples + k)
            ip = blk.address(cidr, 0)
            key, pod = pod_of(shape, n, shape.per_node + k, ip)
            pod["spec"]["nodeName"] = node_name(n)
            block = blk.assign(blk.new_block(cidr, POOL, node_name(n)), 0, f"new-{k}", {"node": node_name(n)})
            s = rng.randrange(len(world["slices"]))
            rec = kv.get(world["slices"][s]).value
            sl = {**rec, "endpoints": rec["endpoints"][:-1] + [
                {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node_name(n),
                 "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"],
                               "namespace": pod["metadata"]["namespace"]}}]}
            kv.txn([Op.put(keys.block_key(cidr), block), Op.put(key, pod)])
            return kv.put(world["slices"][s], sl)

        pod_ms = changes(kv, agent, new_pod, args.samples)

        churns = {}
        for rate in args.churn:
            lags, cpu = churn(agent, lambda k: update_slice(kv, world, rng.randrange(len(world["slices"])), 1000 + k),
                              rate, args.churn_seconds)
            churns[str(int(rate))] = {"p50_ms": round(pct(lags, 50), 1), "p99_ms": round(pct(lags, 99), 1),
                                      "writes": len(lags), "cpu_pct": round(cpu, 1)}
        pod_churn = {}
        for rate in args.pod_churn:  # pods anywhere in the cluster changing labels (policy work)
            lags, cpu = churn(agent, label, rate, args.churn_seconds)
            pod_churn[str(int(rate))] = {"p50_ms": round(pct(lags, 50), 1), "p99_ms": round(pct(lags, 99), 1),
                                         "max_ms": round(max(lags), 1) if lags else None,
                                         "writes": len(lags), "cpu_pct": round(cpu, 1)}
        cpu0, t_idle = agent.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_seconds)  # the measurement window: nothing changes
        idle_cpu = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t_idle) * 100
        sums = sync_sums(agent.metrics())
        restart = agent.restart(url, lambda: update_slice(kv, world, rng.randrange(len(world["slices"])), 5000))
        row = {
            "backend": backend, "scale": scale, "nodes": shape.nodes, "pods": shape.pods, "services": shape.services,
            "policies": shape.policies, "keys": world["keys"], "store_mib": round(size / 2**20, 1),
            "values_mib": round(values / 2**20, 1), "agent_values_mib": round(agent_values / 2**20, 1),
            "generate_s": round(gen_s, 1), "start_s": round(start_s, 2), "start_cpu_s": round(cpu_start, 2),
            "rss_mib": round(rss, 1),
            "slice_change_ms": {"median": round(statistics.median(slice_ms), 1), "max": round(max(slice_ms), 1)},
            "label_change_ms": round(statistics.median(label_ms), 1),
            "new_block_ms": round(statistics.median(block_ms), 1),
            "new_pod_ms": round(statistics.median(pod_ms), 1),
            "churn": churns, "pod_churn": pod_churn, "idle_cpu_pct": round(idle_cpu, 2),
            "sync_seconds": {k: {"sum": round(v[0], 3), "count": v[1]} for k, v in sums.items()},
            "restart": restart,
        }
        return row
    finally:
        if agent is not None:
            agent.close()
        if relay is not None:
            relay.kill()
            relay.wait(timeout=10)
        if cluster is not None:
            cluster.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{base['backend']}:")
    print(f"{'scale':>5} {'nodes':>6} {'pods':>7} {'svcs':>6} {'keys':>7} {'listed':>7} {'start s':>8} {'x':>5} "
          f"{'rss MiB':>8} {'x':>5} {'slice ms':>13} {'label':>7} {'block':>7} {'pod':>7} "
          f"{'churn p50/p99 ms':>24} {'idle%':>6}")
    for r in rows:
        grow = r["keys"] / base["keys"]
        ch = " ".join(f"{k}/s {v['p50_ms']:g}/{v['p99_ms']:g}" for k, v in r["churn"].items())
        print(f"{r['scale']:>5g} {r['nodes']:>6} {r['pods']:>7} {r['services']:>6} {r['keys']:>7} "
              f"{r['agent_values_mib']:>6.0f}M {r['start_s']:>8.2f} {r['start_s'] / base['start_s'] / grow:>5.2f} "
              f"{r['rss_mib']:>8.0f} {r['rss_mib'] / base['rss_mib'] / grow:>5.2f} "
              f"{r['slice_change_ms']['median']:>6g}/{r['slice_change_ms']['max']:<6g} {r['label_change_ms']:>7g} "
              f"{r['new_block_ms']:>7g} {r['new_pod_ms']:>7g} {ch:>24} {r['idle_cpu_pct']:>6.2f}")
    for r in rows:
        print(f"scale {r['scale']:g} pod label churn (lag p50/p99/max ms, agent CPU %): " + ", ".join(
            f"{k}/s {v['p50_ms']:g}/{v['p99_ms']:g}/{v['max_ms']}, {v['cpu_pct']:g}%" for k, v in r["pod_churn"].items())
            + "; slice churn CPU %: " + ", ".join(f"{k}/s {v['cpu_pct']:g}%" for k, v in r["churn"].items()))
        rs = r["restart"]
        print(f"scale {r['scale']:g} clean restart: stop {rs['stop_s']:g} s (snapshot {rs['snapshot_mib']:g} MiB), "
              f"start -> first sync {rs['first_sync_s']:g} s, -> a change made while down {rs['current_s']:g} s, "
              f"CPU {rs['cpu_s']:g} s, RSS {rs['rss_mib']:g} MiB, from the snapshot: {rs['from_snapshot']}")
        print(f"scale {r['scale']:g} sync seconds (sum/count): " + ", ".join(
            f"{k} {v['sum']:.2f}/{v['count']}" for k, v in r["sync_seconds"].items()))


def plot(rows: list[dict], path: Path) -> None:
    """Start time and memory against cluster size, one line per backend. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "start_s", "start to first complete sync (s)"),
                           (axes[1], "rss_mib", "agent RSS after the first sync (MiB)")):
        for backend in sorted({r["backend"] for r in rows}):
            mine = [r for r in rows if r["backend"] == backend]
            pts = sorted((r["nodes"], r[key]) for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend}, a new node")
            restarted = {"start_s": "first_sync_s", "rss_mib": "rss_mib"}[key]
            pts = sorted((r["nodes"], r["restart"][restarted]) for r in mine if r.get("restart"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--",
                    label=f"{backend}, a clean restart (snapshot)")
        ax.axhline({"start_s": 5, "rss_mib": 300}[key], color="grey", linestyle=":", label="target")
        ax.set_xlabel("cluster size (nodes; 30 pods and 10 Services per node)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scales 0.02 and 0.1, fewer samples, SQLite only")
    ap.add_argument("--scales", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--backends", default="sqlite,etcd", help="comma list: sqlite, etcd (3 members)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--churn", default="100,500", help="EndpointSlice updates per second (comma list)")
    ap.add_argument("--pod-churn", default="10,50", help="pod label updates per second (comma list)")
    ap.add_argument("--churn-seconds", type=float, default=10)
    ap.add_argument("--idle-seconds", type=float, default=20)
    ap.add_argument("--resync", type=float, default=60.0, help="the agent's --resync")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    ap.add_argument("--plot", default="", help="write the start/memory plot here (PNG)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_cluster needs root (the agent runs in a network namespace)")
    if args.quick:
        args.scales, args.samples, args.churn_seconds, args.idle_seconds = "0.02,0.1", 10, 5, 10
        args.backends = "sqlite"
    args.churn = [float(x) for x in str(args.churn).split(",") if x]
    args.pod_churn = [float(x) for x in str(args.pod_churn).split(",") if x]
    rows = []
    for backend in args.backends.split(","):
        done = [run_scale(float(sc), backend, args) for sc in args.scales.split(",")]
        print_table(done)
        rows += done
    print("x: cost ratio to the smallest scale of the same store, divided by the cluster's growth "
          "(1.0: grows with the cluster; towards 0: flat, the node's own work)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "bench/bench_cluster.py " + " ".join(sys.argv[1:]), "rows": rows,
                               "machine": {"cpus": os.cpu_count()}}, indent=1) + "\n")
    print(f"wrote {out}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
