"""IPAM allocation throughput and latency, on SQLite and on a 3-member etcd cluster.

Not a test: prints a table and writes bench/results/bench_ipam.json.

Rows per backend:
  baseline CAS x1       one process, a bare read + compare-and-swap loop on one key: the
                        store's own floor for "read, then conditional write"
  baseline CAS x20      20 processes, one key each: the store's write throughput
  allocate x1           one process, one node
  allocate x20          20 processes, one node each (concurrent pods on different nodes)
  allocate x20 / 2 nodes  20 processes on 2 nodes: same-node contention on each block
  ... + host lock       the same, with IPAM(lock_dir=...): same-node allocations queue on a
                        per-node lock file instead of racing (as one host's CNI calls would)

Every allocation is checked afterwards: duplicates (an address handed to two
handles, from what the workers were told and from the block records) must be 0.

    .venv/bin/python bench/bench_ipam.py [--quick] [--backends sqlite,etcd]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(1, os.path.join(HERE, ".."))  # tests.support

from podnet.ipam import block as blk  # noqa: E402
from podnet.ipam import keys  # noqa: E402
from podnet.model.objects import IPPool  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.base import Op  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from workers import start_together  # noqa: E402

TARGETS = {("sqlite", "allocate x1"): 2000, ("etcd", "allocate x20"): 500}


# ---------------------------------------------------------------- worker side


def worker(args: argparse.Namespace) -> None:
    from podnet.ipam import IPAM

    kv = open_store(args.url)
    kv.get("/bench/warm-up")  # connect before the clock starts
    print("ready", flush=True)
    deadline = time.time() + 300
    while not os.path.exists(args.go) and time.time() < deadline:
        time.sleep(0.002)
    lat: list[float] = []
    out: dict = {"addresses": {}}
    start = time.perf_counter()
    if args.mode == "cas":
        key = f"/bench/cas/{args.id}"
        kv.put(key, {"n": 0})
        for i in range(args.ops):
            t = time.perf_counter()
            rec = kv.get(key)
            kv.txn([Op.update(key, {"n": i}, rec.revision)])
            lat.append(time.perf_counter() - t)
    else:
        ipam = IPAM(kv, lock_dir=args.lock_dir or None)
        for i in range(args.ops):
            handle = f"bench.{args.id}-{i}.eth0"
            t = time.perf_counter()
            a = ipam.allocate(handle, args.node)
            lat.append(time.perf_counter() - t)
            out["addresses"][handle] = a.address
        out["conflicts"] = ipam.conflicts
    out["elapsed"] = time.perf_counter() - start
    out["end"] = time.time()
    out["latencies"] = lat
    kv.close()
    print(json.dumps(out))


# ---------------------------------------------------------------- driver side


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def prepare(url: str) -> None:
    with open_store(url) as kv:
        ObjectStore(kv).apply([IPPool.model_validate(
            {"metadata": {"name": "bench"}, "spec": {"cidr": "10.0.0.0/8", "blockSize": 26}})])


def clear_ipam(url: str) -> None:
    with open_store(url) as kv:
        for prefix in (keys.BLOCKS, keys.AFFINITIES, keys.HANDLES):
            records, _ = kv.list(prefix)
            for i in range(0, len(records), 64):
                kv.txn([Op.delete(r.key) for r in records[i:i + 64]])


def run(url: str, mode: str, procs: int, ops: int, nodes: int, lock: bool, tmp: str) -> dict:
    go = os.path.join(tmp, f"go-{time.monotonic_ns()}")
    lock_dir = os.path.join(tmp, "locks") if lock else ""
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--url", url, "--mode", mode, "--id", f"w{i}",
             "--node", f"node-{i % nodes}", "--ops", str(ops), "--go", go, "--lock-dir", lock_dir],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(procs)
    ]
    t0 = start_together(children, go)
    results = []
    for c in children:
        out, err = c.communicate(timeout=900)
        if c.returncode != 0:
            raise SystemExit(f"worker failed:\n{err[-3000:]}")
        results.append(json.loads(out))
    wall = max(r["end"] for r in results) - t0
    lat = [x for r in results for x in r["latencies"]]
    told = Counter(a for r in results for a in r["addresses"].values())
    duplicates = sum(n - 1 for n in told.values() if n > 1)
    if mode == "allocate":
        duplicates += stored_duplicates(url, {h: a for r in results for h, a in r["addresses"].items()})
    return {
        "ops": len(lat),
        "seconds": round(wall, 3),
        "ops_per_s": round(len(lat) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1e3, 2),
        "p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "conflicts": sum(r.get("conflicts", 0) for r in results),
        "duplicates": duplicates,
    }


def stored_duplicates(url: str, told: dict[str, str]) -> int:
    """Addresses held twice in the block records, or disagreeing with what workers were told."""
    with open_store(url) as kv:
        seen: dict[str, str] = {}
        bad = 0
        for rec in kv.list(keys.BLOCKS)[0]:
            for o, attrs in blk.allocations(rec.value):
                a = blk.address(rec.value["cidr"], o)
                if a in seen:
                    bad += 1
                seen[a] = attrs["handle_id"]
        for h, a in told.items():
            if seen.get(a) != h:
                bad += 1
        return bad


def scenarios(quick: bool) -> list[tuple[str, str, int, int, int, bool]]:
    n1, n20 = (300, 25) if quick else (3000, 150)
    return [
        ("baseline CAS x1", "cas", 1, n1, 1, False),
        ("baseline CAS x20", "cas", 20, n20, 20, False),
        ("allocate x1", "allocate", 1, n1, 1, False),
        ("allocate x20", "allocate", 20, n20, 20, False),
        ("allocate x20 / 2 nodes", "allocate", 20, n20, 2, False),
        ("... + host lock", "allocate", 20, n20, 2, True),
    ]


def bench_backend(name: str, url: str, quick: bool, tmp: str, only: list[str]) -> list[dict]:
    prepare(url)
    rows = []
    baseline: dict[int, float] = {}
    for label, mode, procs, ops, nodes, lock in scenarios(quick):
        if only and label not in only:
            continue
        clear_ipam(url)
        r = run(url, mode, procs, ops, nodes, lock, tmp)
        if mode == "cas":
            baseline[procs] = r["ops_per_s"]
        ratio = r["ops_per_s"] / baseline[procs] if mode == "allocate" and baseline.get(procs) else None
        row = {"backend": name, "scenario": label, "procs": procs, **r,
               "vs_baseline": round(ratio, 2) if ratio is not None else None,
               "target": TARGETS.get((name, label))}
        rows.append(row)
        print_row(row)
    return rows


HEADER = ["backend", "scenario", "ops", "ops/s", "p50 ms", "p99 ms", "conflicts", "dups", "vs CAS", "target"]
WIDTHS = [8, 24, 6, 9, 8, 8, 10, 5, 7, 12]


def fmt(cells: list[str]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


def print_row(row: dict) -> None:
    target = row["target"]
    verdict = "" if target is None else f"{target} {'ok' if row['ops_per_s'] >= target else 'MISS'}"
    print(fmt([row["backend"], row["scenario"], row["ops"], f"{row['ops_per_s']:.0f}", f"{row['p50_ms']:.2f}",
               f"{row['p99_ms']:.2f}", row["conflicts"], row["duplicates"],
               "" if row["vs_baseline"] is None else f"{row['vs_baseline']:.2f}", verdict]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run")
    ap.add_argument("--backends", default="sqlite,etcd", help="comma-separated: sqlite, etcd")
    ap.add_argument("--only", default="", help="comma-separated scenario names to run (default: all)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--id", help=argparse.SUPPRESS)
    ap.add_argument("--node", help=argparse.SUPPRESS)
    ap.add_argument("--ops", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    ap.add_argument("--lock-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows: list[dict] = []
    print(fmt(HEADER))
    with tempfile.TemporaryDirectory(prefix="bench-ipam-") as tmp:
        if "sqlite" in backends:
            rows += bench_backend("sqlite", f"sqlite://{tmp}/bench.db", args.quick, tmp, only)
        if "etcd" in backends:
            from tests.support.etcd import EtcdCluster

            with EtcdCluster(3, base_dir=os.path.join(tmp, "etcd"), die_with_parent=True) as cluster:
                rows += bench_backend("etcd", cluster.url, args.quick, tmp, only)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "bench_ipam.json")
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"\nwrote {os.path.relpath(path)}")
    dups = sum(r["duplicates"] for r in rows)
    print(f"duplicate addresses: {dups}")
    return 1 if dups else 0


if __name__ == "__main__":
    sys.exit(main())
