"""A large cluster's IPAM shape: 5000 nodes x 110 pods, on SQLite and a 3-member etcd.

Not a test: prints a table and writes bench/results/bench_scale.json.

Phases per backend:
  claim         every node claims the blocks 110 pods need (2 x /26 from a /12),
                by WORKERS processes in parallel, as node agents starting at once would
  store size    bytes on disk: the SQLite file (+ WAL), etcd's dbSize from
                /v3/maintenance/status on each member
  read blocks   IPAM.blocks(): every block (what route programming reads)
  node blocks   IPAM.node_blocks() for a sample of nodes
  allocate      a sample of pod allocations on random nodes, one process, cold cache
                per node (as a short-lived CNI call), with all blocks present
  plan          podnet.plan for the same shape (if podnet.plan exists), and whether its
                blocks per node matches what IPAM claimed

    .venv/bin/python bench/bench_scale.py [--quick] [--backends sqlite,etcd]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(1, os.path.join(HERE, ".."))  # tests.support

from podnet.ipam import IPAM, keys  # noqa: E402
from podnet.model.objects import IPPool  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from workers import start_together  # noqa: E402

POOL_CIDR = "10.0.0.0/12"
BLOCK_SIZE = 26
WORKERS = 8


# ---------------------------------------------------------------- worker side


def worker(args: argparse.Namespace) -> None:
    kv = open_store(args.url)
    ipam = IPAM(kv)
    kv.get("/bench/warm-up")
    print("ready", flush=True)
    deadline = time.time() + 300
    while not os.path.exists(args.go) and time.time() < deadline:
        time.sleep(0.002)
    claimed = 0
    for n in range(args.first, args.last):
        for _ in range(args.blocks):
            ipam.claim_block(f"node-{n:05d}")
            claimed += 1
    print(json.dumps({"claimed": claimed, "end": time.time(), "conflicts": ipam.conflicts}))
    kv.close()


# ---------------------------------------------------------------- driver side


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def claim_all(url: str, nodes: int, blocks: int, workers: int, tmp: str) -> tuple[float, int, int]:
    go = os.path.join(tmp, f"go-{time.monotonic_ns()}")
    per = math.ceil(nodes / workers)
    children = []
    for w in range(workers):
        first, last = w * per, min(nodes, (w + 1) * per)
        if first >= last:
            continue
        children.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--url", url, "--first", str(first), "--last", str(last),
             "--blocks", str(blocks), "--go", go],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = start_together(children, go)
    claimed = conflicts = 0
    end = t0
    for c in children:
        out, err = c.communicate(timeout=3600)
        if c.returncode != 0:
            raise SystemExit(f"worker failed:\n{err[-3000:]}")
        r = json.loads(out)
        claimed += r["claimed"]
        conflicts += r["conflicts"]
        end = max(end, r["end"])
    return end - t0, claimed, conflicts


def sqlite_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def etcd_sizes(endpoints: list[str]) -> list[int]:
    sizes = []
    for ep in endpoints:
        host, port = ep.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v3/maintenance/status", body="{}", headers={"Content-Type": "application/json"})
        doc = json.loads(conn.getresponse().read())
        conn.close()
        sizes.append(int(doc.get("dbSize", 0)))
    return sizes


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def bench_backend(name: str, url: str, nodes: int, pods: int, samples: int, tmp: str,
                  size_of, emit) -> None:
    blocks_per_node = math.ceil(pods / 2 ** (32 - BLOCK_SIZE))
    with open_store(url) as kv:
        ObjectStore(kv).apply([IPPool.model_validate(
            {"metadata": {"name": "pods"}, "spec": {"cidr": POOL_CIDR, "blockSize": BLOCK_SIZE}})])
    seconds, claimed, conflicts = claim_all(url, nodes, blocks_per_node, WORKERS, tmp)
    emit(name, "claim", claimed, seconds, f"{nodes} nodes x {blocks_per_node} blocks, {WORKERS} procs, "
         f"{conflicts} lost CAS")

    size = size_of()
    emit(name, "store size", claimed, None, f"{mib(size)} ({size / claimed:.0f} B per block)")

    with open_store(url) as kv:
        ipam = IPAM(kv)
        infos, s = timed(ipam.blocks)
        emit(name, "read blocks", len(infos), s, "IPAM.blocks()")
        per_node: dict[str, int] = {}
        for b in infos:
            per_node[b.node or ""] = per_node.get(b.node or "", 0) + 1
        assert len(per_node) == nodes and set(per_node.values()) == {blocks_per_node}, "claim result is wrong"
        assert len({b.cidr for b in infos}) == len(infos)

        rng = random.Random(1)
        sample_nodes = [f"node-{rng.randrange(nodes):05d}" for _ in range(samples)]
        t = time.perf_counter()
        for n in sample_nodes:
            assert len(ipam.node_blocks(n)) == blocks_per_node
        emit(name, "node blocks", samples, time.perf_counter() - t, "IPAM.node_blocks(node), one node at a time")

        lat = []
        t = time.perf_counter()
        for i, n in enumerate(sample_nodes):
            fresh = IPAM(kv)  # cold cache, as a CNI invocation
            t1 = time.perf_counter()
            fresh.allocate(f"scale.{i}.eth0", n)
            lat.append(time.perf_counter() - t1)
        total = time.perf_counter() - t
        lat.sort()
        emit(name, "allocate", samples, total,
             f"cold cache, p50 {lat[len(lat) // 2] * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
        handles, _ = kv.list(keys.HANDLES)
        assert len(handles) == samples


def bench_plan(nodes: int, pods: int, emit) -> None:
    try:
        from podnet import plan as planner
    except ImportError:
        print("(podnet.plan not present: plan row skipped)")
        return
    inp = planner.PlanInput(nodes=nodes, max_pods_per_node=pods, services=nodes * 2, pool=POOL_CIDR,
                            block_size=BLOCK_SIZE)
    runs = 20
    t = time.perf_counter()
    for _ in range(runs):
        result = planner.plan(inp)
    per = (time.perf_counter() - t) / runs
    claimed = math.ceil(pods / 2 ** (32 - BLOCK_SIZE))
    bpn = result.block.blocks_per_node
    emit("-", "plan", runs, per * runs,
         f"{per * 1e3:.2f} ms per plan; plans {bpn} blocks/node, IPAM claimed {claimed}"
         + (" (agree)" if bpn == claimed else " (DISAGREE)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 nodes instead of 5000")
    ap.add_argument("--nodes", type=int, help="number of nodes (default 5000, or 200 with --quick)")
    ap.add_argument("--pods", type=int, default=110, help="pods per node (default 110)")
    ap.add_argument("--backends", default="sqlite,etcd", help="comma-separated: sqlite, etcd")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--last", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    nodes = args.nodes or (200 if args.quick else 5000)
    samples = 100 if args.quick else 500
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[dict] = []
    widths = [8, 12, 8, 9, 10]
    print("  ".join(h.ljust(w) for h, w in zip(["backend", "phase", "count", "seconds", "per s"], widths,
                                                 strict=True)) + "  notes")

    def emit(backend: str, phase: str, count: int, seconds: float | None, notes: str) -> None:
        rate = count / seconds if seconds else None
        rows.append({"backend": backend, "phase": phase, "count": count,
                     "seconds": None if seconds is None else round(seconds, 3),
                     "per_s": None if rate is None else round(rate, 1), "notes": notes})
        cells = [backend, phase, str(count), "" if seconds is None else f"{seconds:.2f}",
                 "" if rate is None else f"{rate:.0f}"]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + notes, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if "sqlite" in backends:
            path = os.path.join(tmp, "scale.db")
            bench_backend("sqlite", f"sqlite://{path}", nodes, args.pods, samples, tmp,
                          lambda: sqlite_size(path), emit)
        if "etcd" in backends:
            from tests.support.etcd import EtcdCluster

            with EtcdCluster(3, base_dir=os.path.join(tmp, "etcd"), die_with_parent=True) as cluster:
                def etcd_size() -> int:
                    sizes = etcd_sizes(cluster.endpoints)
                    return max(sizes)
                bench_backend("etcd", cluster.url, nodes, args.pods, samples, tmp, etcd_size, emit)
    bench_plan(nodes, args.pods, emit)

    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "bench_scale.json")
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "nodes": nodes, "pods_per_node": args.pods, "pool": POOL_CIDR,
                   "block_size": BLOCK_SIZE, "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
