"""The etcd client's two paths an agent depends on: its first list and watch delivery.

Not a test: prints two tables and writes bench/results/etcd_list.json.

Fills a 3-member etcd on loopback with the cluster of bench_cluster at --scale, then
reads it from two places: the root namespace, straight to a member, and a network
namespace of its own through the lab's relay (podnet.lab.forward), as the lab's and
bench_cluster's agents reach the store. Each reader is a child process in its place.

The list (what an agent lists: the shared prefix), several times (median shown):

  fetch        the pages only: requests and JSON parsing, no value decoded (the network
               and etcd's share; 100 000 a page: the whole list in one answer)
  sequential   fetch a page, decode it, then ask for the next (EtcdStore before its
               listings were pipelined): the baseline
  stream       EtcdStore.stream(): the next page is asked for before this one is decoded

at several page sizes; ratios against sequential at 1 000 a page, direct, in the same run;
RSS: the child's after its first list, with what it listed still held.

The watch: EndpointSlice-sized values written at --watch-rate per second (a read and a
write each, as bench_cluster's churn) while one watcher in each place follows them:
commit (the write's request until etcd answered it) and delivery (etcd's answer to
the write until the event reached the watcher), p50 / p99.

    .venv/bin/python bench/bench_etcdlist.py [--quick] [--scale 0.1] [--pages 500,1000,2000,5000,100000]
                                                        [--repeat 3] [--watch-rate 500] [--watch-seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.support: etcd members

from bench_cluster import PY, Shape, bench_store, generate, relay_store  # noqa: E402
from common import pct, sh  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.etcd import _b64, _record, _unb64, prefix_range_end  # noqa: E402
from podnet.store.layout import SHARED  # noqa: E402

# ------------------------------------------------------------------ in the child process


def pages(store, prefix: str):
    """Every page's key-values, one request after the other (page size: the store's)."""
    start = prefix.encode()
    end = _b64(prefix_range_end(start))
    rev, key = 0, start
    while True:
        request = {"key": _b64(key), "range_end": end, "limit": str(store.page_size)}
        if rev:
            request["revision"] = str(rev)
        doc = store._call("/v3/kv/range", request)
        rev = rev or int(doc["header"]["revision"])
        kvs = doc.get("kvs") or []
        yield kvs
        if not doc.get("more") or not kvs:
            return
        key = _unb64(kvs[-1]["key"]) + b"\x00"


def run_once(url: str, mode: str, page: int, prefix: str) -> dict:
    store = open_store(url)
    store.page_size = page
    kept: list = []
    cpu0, t0 = time.process_time(), time.monotonic()
    n = size = 0
    if mode == "fetch":
        for kvs in pages(store, prefix):
            n += len(kvs)
            size += sum(len(kv.get("value") or "") for kv in kvs)
    elif mode == "sequential":
        for kvs in pages(store, prefix):
            kept.extend(_record(kv) for kv in kvs)
        n = len(kept)
    else:
        store.stream(prefix, kept.append)
        n = len(kept)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    store.close()
    return {"keys": n, "seconds": wall, "cpu": cpu, "base64_bytes": size, "rss_mib": rss_mib()}


def rss_mib() -> float:
    """This process's resident memory with what it listed still held (as an agent holds it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> int:
    if args.mode == "watch":
        return watch_child(args.url, args.prefix, args.start)
    out = [run_once(args.url, args.mode, args.page, args.prefix) for _ in range(args.repeat)]
    print(json.dumps(out))
    return 0


def watch_child(url: str, prefix: str, start: int) -> int:
    """Follows prefix from revision `start`: says "live" at the first event (its stream is
    open), then prints [[revision, when it arrived], ...] once the key `done` shows."""
    store = open_store(url)
    arrived = []
    for event in store.watch(prefix, start):
        arrived.append((event.revision, time.monotonic()))
        if len(arrived) == 1:
            print("live", flush=True)
        if event.key == prefix + "done":
            break
    store.close()
    print(json.dumps(arrived), flush=True)
    return 0


# ------------------------------------------------------------------ the bench


def measure(where: str, netns: str | None, url: str, mode: str, page: int, repeat: int) -> dict:
    argv = [PY, str(Path(__file__).resolve()), "--child", "--url", url, "--mode", mode, "--page", str(page),
            "--prefix", SHARED, "--repeat", str(repeat)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    runs = json.loads(sh(*argv).stdout)
    return {"where": where, "mode": mode, "page": page, "keys": runs[0]["keys"],
            "seconds": statistics.median(r["seconds"] for r in runs),
            "cpu": statistics.median(r["cpu"] for r in runs), "runs": [r["seconds"] for r in runs],
            "rss_mib": runs[0]["rss_mib"]}  # the first list of a fresh process, as an agent's start


def slice_value(gen: int) -> dict:
    """About the size of bench_cluster's EndpointSlices (5 endpoints)."""
    eps = [{"addresses": [f"10.{gen % 200}.{k}.{gen % 250}"], "conditions": {"ready": True},
            "nodeName": f"node-{gen % 5000:05d}", "targetRef": {"kind": "Pod", "name": f"pod-{gen}-{k}",
                                                              "namespace": "ns1"}} for k in range(5)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "svc-1-abcde", "namespace": "ns1", "generation": gen,
                         "labels": {"kubernetes.io/service-name": "svc-1"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}


def watch_lag(url: str, places: list, rate: float, seconds: float) -> list[dict]:
    """One watcher per place; writes at `rate`; commit and delivery times per place (ms)."""
    prefix = f"{SHARED}bench-watch-{secrets.token_hex(4)}/"
    kv = open_store(url)
    watchers = []
    try:
        start_rev = kv.revision() + 1  # the warm-up writes below, whenever a watcher's stream opens
        for where, ns, target in places:
            argv = [PY, str(Path(__file__).resolve()), "--child", "--url", target, "--mode", "watch",
                    "--prefix", prefix, "--start", str(start_rev)]
            watchers.append((where, subprocess.Popen(["ip", "netns", "exec", ns, *argv] if ns else argv,
                                                     stdout=subprocess.PIPE, text=True)))
        for k, (where, proc) in enumerate(watchers):  # each says "live" once its stream is open
            kv.put(prefix + f"warm-{k}", {})
            if proc.stdout.readline().strip() != "live":
                raise SystemExit(f"the {where} watcher did not start")
        keys = [prefix + f"slice-{i}" for i in range(50)]
        written = []  # (revision, request sent, answer read)
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            key = keys[n % len(keys)]
            kv.get(key)
            t1 = time.monotonic()
            rev = kv.put(key, slice_value(n))
            written.append((rev, t1, time.monotonic()))
            n += 1
            pause = start + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        kv.put(prefix + "done", {})
        rows = []
        commit = [(answered - sent) for _, sent, answered in written]
        for where, proc in watchers:
            out, _ = proc.communicate(timeout=60)
            arrived = dict(json.loads(out.strip().splitlines()[-1]))
            delivery = [(arrived[rev] - answered) for rev, _, answered in written if rev in arrived]
            rows.append({"where": where, "rate": rate, "writes": len(written), "delivered": len(delivery),
                         "commit_p50_ms": pct(commit, 50), "commit_p99_ms": pct(commit, 99),
                         "delivery_p50_ms": pct(delivery, 50), "delivery_p99_ms": pct(delivery, 99),
                         "achieved_rate": len(written) / seconds})
        return rows
    finally:
        for _, proc in watchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kv.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scale 0.02, pages of 1 000 and 2 000, one run each")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--pages", default="500,1000,2000,5000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--watch-rate", type=float, default=500)
    ap.add_argument("--watch-seconds", type=float, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "etcd_list.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--page", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if os.geteuid() != 0:
        raise SystemExit("bench_etcdlist needs root (it reads from a network namespace)")
    if args.quick:
        args.scale, args.pages, args.repeat, args.watch_seconds = 0.02, "1000,2000", 1, 2
    pages_sizes = [int(x) for x in args.pages.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="pnec-"))
    netns = f"pnec-{secrets.token_hex(3)}"
    relay = cluster = None
    rows: list[dict] = []
    watch_rows: list[dict] = []
    try:
        url, cluster = bench_store("etcd", work)
        kv = open_store(url)
        world = generate(Shape(args.scale), kv, batch=100)
        kv.close()
        print(f"scale {args.scale:g}: {world['keys']} keys in a 3-member etcd", flush=True)
        sh("ip", "netns", "add", netns)
        sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        relay, relayed = relay_store(cluster.endpoints, netns, work)
        places = [("direct", None, "etcd://" + cluster.endpoints[0].removeprefix("http://")),
                  ("relay", netns, relayed.split(",")[0])]
        for where, ns, target in places:
            rows.append(measure(where, ns, target, "sequential", 1000, args.repeat))
            for page in pages_sizes:
                for mode in ("fetch", "stream"):
                    rows.append(measure(where, ns, target, mode, page, args.repeat))
                    print(f"  {where} {mode} {page}: {rows[-1]['seconds']:.2f}s", flush=True)
        if args.watch_rate > 0:
            watch_rows = watch_lag(url, places, args.watch_rate, args.watch_seconds)
    finally:
        if relay is not None:
            relay.kill()
            relay.wait(timeout=10)
        sh("ip", "netns", "del", netns, check=False)
        if cluster is not None:
            cluster.stop()
        sh("rm", "-rf", str(work), check=False)
    base = next(r["seconds"] for r in rows if (r["where"], r["mode"], r["page"]) == ("direct", "sequential", 1000))
    print(f"\n{'where':8} {'mode':11} {'page':>6} {'keys':>7} {'seconds':>8} {'cpu s':>6} {'x seq':>6} {'RSS MiB':>7}")
    for r in rows:
        print(f"{r['where']:8} {r['mode']:11} {r['page']:6d} {r['keys']:7d} {r['seconds']:8.2f} {r['cpu']:6.2f} "
              f"{r['seconds'] / base:6.2f} {r['rss_mib']:7.0f}")
    if watch_rows:
        print(f"\nwatch at {args.watch_rate:g} writes/s for {args.watch_seconds:g}s (ms):")
        print(f"{'where':8} {'writes':>6} {'per s':>6} {'seen':>6} {'commit p50':>10} {'p99':>6} "
              f"{'delivery p50':>12} {'p99':>6}")
        for w in watch_rows:
            print(f"{w['where']:8} {w['writes']:6d} {w['achieved_rate']:6.0f} {w['delivered']:6d} "
                  f"{w['commit_p50_ms']:10.1f} {w['commit_p99_ms']:6.1f} {w['delivery_p50_ms']:12.1f} "
                  f"{w['delivery_p99_ms']:6.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "bench/bench_etcdlist.py " + " ".join(sys.argv[1:]), "rows": rows,
                               "watch": watch_rows,
                               "machine": {"cpus": os.cpu_count()}}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
