"""Network programming latency end to end, and the agent's cold start, at 50 000 Services.

    .venv/bin/python bench/bench_programming.py [--quick] [--services N] [--nodes N] [--rate R]
                                                [--seconds S] [--backends sqlite,etcd]

The path measured is the one a cluster runs: the (fake, HTTPS) API server holds the Services
and their EndpointSlices (5 endpoints each: 250 000 at 50 000 Services) and the nodes' Node
objects; `podnet kube-sync` (KubeSync, in this process) reflects them into the store (SQLite,
or 3 etcd members on loopback); a real agent per node runs in a network namespace of its own
(2-3 nodes: the machine has 2 cores, and every agent programs the same table).

  cold start   each agent started alone on the loaded store: process start -> first complete
               sync (the agent's .synced file at the store's head), its CPU and RSS then
  programming  EndpointSlice updates at the API server at `rate` per second for `seconds`
               (kube-proxy's SLI network_programming_duration_seconds): each update puts a
               fresh endpoint address into one slice and stamps the slice's
               endpoints.kubernetes.io/last-change-trigger-time; each agent observes the time
               from it to the end of the kernel transaction that carried the change in its
               podnet_service_network_programming_duration_seconds histogram (scraped before
               and after: p50/p99 are read as the bounds of the buckets that hold them, 5 ms
               .. 300 s)
  first hop    the same changes' arrival in the store (a store watch, exact): the baseline of
               the same run, what kube-sync costs before any agent sees a change
  kernel check after the changes, each node's backend map is read back (nft): every fresh
               address the slices hold must be there, on every node. (`nft monitor` per
               namespace, to time each element, falls behind: it lists the 400 000-element
               table before it reads events, and loses them meanwhile.)

Prints a table per store and writes bench/results/programming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.support: the fake API server, etcd members
sys.path.insert(0, str(HERE))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tests.support.fake_apiserver import FakeApiServer  # noqa: E402

from bench_cluster import PY, AgentUnderTest, bench_store, relay_store  # noqa: E402
from common import pct  # noqa: E402
from podnet.kube.crds import render  # noqa: E402
from podnet.store import open_store  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "programming.json"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
ENDPOINTS = 5
NAMESPACES = 50
TARGET_P99_MS = 100.0
TARGET_START_S = 2.0
# initial endpoints come from 10.64.0.0/10, the fresh ones of the changes from 10.128.0.0/10:
# an address of 10.128-191.x.x in an nft element is a change arriving
FRESH = re.compile(r"\b10\.(1(?:2[89]|[3-8]\d)|19[01])\.(\d+)\.(\d+)\b")
HISTOGRAM = "podnet_service_network_programming_duration_seconds"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def node_ip(i: int) -> str:
    return f"10.200.0.{i + 1}"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cluster_ip(s: int) -> str:
    n = s + 2  # 10.96.0.1 is the kubernetes Service's
    return f"10.{96 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def initial_address(s: int, j: int) -> str:
    n = s * ENDPOINTS + j
    return f"10.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def fresh_address(n: int) -> str:
    return f"10.{128 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def service(s: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{s}", "namespace": f"ns{s % NAMESPACES}"},
            "spec": {"clusterIP": cluster_ip(s), "selector": {"app": f"app{s}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(s: int, addresses: list[str], nodes: int, trigger: float | None = None) -> dict:
    meta = {"name": f"svc-{s}-x1", "namespace": f"ns{s % NAMESPACES}",
            "labels": {"kubernetes.io/service-name": f"svc-{s}"}}
    if trigger is not None:
        meta["annotations"] = {TRIGGER: rfc3339(trigger)}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": node_name(j % nodes)}
                          for j, a in enumerate(addresses)]}


def load_api(api: FakeApiServer, services: int, nodes: int) -> list[list[str]]:
    """CRDs, Namespaces, Nodes, Services and their slices; the slices' addresses."""
    import yaml

    for doc in yaml.safe_load_all(render()):
        api.create(doc)
    for i in range(NAMESPACES):
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}"}})
    for i in range(nodes):
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)},
                    "status": {"addresses": [{"type": "InternalIP", "address": node_ip(i)}]}})
    addresses = []
    for s in range(services):
        api.create(service(s))
        eps = [initial_address(s, j) for j in range(ENDPOINTS)]
        api.create(endpoint_slice(s, eps, nodes))
        addresses.append(eps)
    return addresses


def fresh_in_kernel(netns: str) -> set[str]:
    """The fresh endpoint addresses in a node's backend map of 5-endpoint frontends (read once,
    after the changes: listing 250 000 elements takes seconds)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "map", "ip", "podnet-svc", "backends_5"],
                         capture_output=True, text=True, timeout=600).stdout
    return {m.group(0) for m in FRESH.finditer(out)}


def bucket_quantile(buckets: dict[str, int], q: float) -> float:
    """The upper bound (ms) of the histogram bucket holding quantile q (a bound, not a value)."""
    bounds = sorted((float(le), n) for le, n in buckets.items())
    total = bounds[-1][1] if bounds else 0
    for le, n in bounds:
        if total and n >= q * total:
            return le * 1000
    return float("nan")


def store_arrivals(url: str, from_rev: int, seen: dict[str, float], stop: threading.Event) -> threading.Thread:
    """The first hop: when each fresh address reached the store (a watch of the slices)."""
    def follow() -> None:
        kv = open_store(url, create=False)
        try:
            for ev in kv.watch("/podnet/objects/EndpointSlice/", from_rev, previous=False):
                now = time.time()
                if ev.value is not None:
                    for ep in ev.value.get("endpoints") or ():
                        for a in ep.get("addresses") or ():
                            if FRESH.fullmatch(a):
                                seen.setdefault(a, now)
                if stop.is_set():
                    return
        finally:
            kv.close()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    return t


def programming_histogram(agent: AgentUnderTest) -> dict:
    """The agent's network programming histogram: count, sum and cumulative buckets."""
    out = {"count": 0, "sum": 0.0, "buckets": {}}
    for fam in text_string_to_metric_families(agent.metrics()):
        if fam.name != HISTOGRAM:
            continue
        for s in fam.samples:
            if s.name.endswith("_count"):
                out["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_bucket"):
                out["buckets"][s.labels["le"]] = int(s.value)
    return out


def churn(api: FakeApiServer, addresses: list[list[str]], nodes: int, rate: float, seconds: float,
          first: int) -> dict[str, float]:
    """Slice updates at `rate`/s; fresh address -> its trigger time (epoch seconds)."""
    written: dict[str, float] = {}
    start = time.monotonic()
    k = 0
    services = len(addresses)
    while time.monotonic() - start < seconds:
        n = first + k
        s = (n * 7919) % services  # spread over the Services, none twice in a row
        eps = addresses[s]
        fresh = fresh_address(n)
        eps[n % ENDPOINTS] = fresh
        t = time.time()
        api.apply(endpoint_slice(s, eps, nodes, trigger=t))
        written[fresh] = t
        k += 1
        pause = start + k / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return written


def run_backend(backend: str, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pnbp-"))
    agents: list[AgentUnderTest] = []
    relays: list[subprocess.Popen] = []
    cluster = sync = None
    stop = threading.Event()
    try:
        with FakeApiServer(bookmark_interval=600, workdir=str(work / "api")) as api:
            t0 = time.monotonic()
            addresses = load_api(api, args.services, args.nodes)
            log(f"{backend}: API server holds {args.services} Services, {args.services * ENDPOINTS} endpoints "
                f"({time.monotonic() - t0:.0f}s)")
            url, cluster = bench_store(backend, work)
            open_store(url, create=True).close()
            # kube-sync in a process of its own, as deployed (the API server is this process)
            kubeconfig = api.kubeconfig(str(work / "kubeconfig"))
            sync = subprocess.Popen([PY, "-m", "podnet.cli.main", "--store", url, "kube-sync", "--kubeconfig",
                                     kubeconfig, "--no-write-back", "--log-level", "warning"],
                                    stdout=open(work / "kube-sync.log", "w"), stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            kv = open_store(url, create=False)
            last = f"/podnet/objects/EndpointSlice/ns{(args.services - 1) % NAMESPACES}/svc-{args.services - 1}-x1"
            head, quiet_since = -1, time.monotonic()
            while kv.get(last) is None or time.monotonic() - quiet_since < 2:  # every kind written
                if sync.poll() is not None or time.monotonic() - t0 > 1800:
                    raise SystemExit("kube-sync did not fill the store: " + (work / "kube-sync.log").read_text()[-2000:])
                if kv.revision() != head:
                    head, quiet_since = kv.revision(), time.monotonic()
                time.sleep(0.2)
            head = kv.revision()
            load_s = time.monotonic() - t0
            log(f"{backend}: kube-sync wrote the store in {load_s:.0f}s (revision {head})")

            starts = []
            for i in range(args.nodes):  # one at a time: each start measured alone
                agent = AgentUnderTest(work, args.resync, node=node_name(i), address=node_ip(i))
                agents.append(agent)
                agent_url = url
                if cluster is not None:
                    (work / f"relay{i}").mkdir()
                    relay, agent_url = relay_store(cluster.endpoints, agent.netns, work / f"relay{i}")
                    relays.append(relay)
                agent.start(agent_url)
                agent.wait_synced(head, timeout=600)
                start_s = time.monotonic() - agent.started
                starts.append({"node": agent.node, "start_s": round(start_s, 2),
                               "start_cpu_s": round(agent.cpu_seconds(), 2), "rss_mib": round(agent.rss_mib(), 1)})
                log(f"{backend}: {agent.node} synced in {start_s:.2f}s, RSS {starts[-1]['rss_mib']:.0f} MiB")

            hist0 = [programming_histogram(a) for a in agents]
            in_store: dict[str, float] = {}
            store_arrivals(url, kv.revision() + 1, in_store, stop)
            load0 = os.getloadavg()[0]
            written = churn(api, addresses, args.nodes, args.rate, args.seconds, first=0)
            # every agent has programmed every change once its histogram counted them all (each
            # slice changes once in the run: one observation per change)
            deadline = time.monotonic() + 120
            while True:
                hist1 = [programming_histogram(a) for a in agents]
                if all(h1["count"] - h0["count"] >= len(written) for h0, h1 in zip(hist0, hist1, strict=True)) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(1)
            expected = {a for eps in addresses for a in eps if FRESH.fullmatch(a)}
            in_kernel = [fresh_in_kernel(a.netns) for a in agents]
            stop.set()

        hop = [in_store[ip] - t for ip, t in written.items() if ip in in_store]
        per_node = []
        merged: dict[str, int] = {}
        for a, h0, h1, got in zip(agents, hist0, hist1, in_kernel, strict=True):
            n = h1["count"] - h0["count"]
            under = {le: h1["buckets"].get(le, 0) - h0["buckets"].get(le, 0) for le in h1["buckets"]}
            for le, c in under.items():
                merged[le] = merged.get(le, 0) + c
            per_node.append({"node": a.node, "observed": n, "mean_ms": round((h1["sum"] - h0["sum"]) / n * 1000, 1)
                             if n else None, "p50_le_ms": bucket_quantile(under, 0.5),
                             "p99_le_ms": bucket_quantile(under, 0.99), "under_le": under,
                             "kernel_missing": len(expected - got)})
        observed = sum(p["observed"] for p in per_node)
        return {
            "backend": backend, "services": args.services, "endpoints": args.services * ENDPOINTS,
            "nodes": args.nodes, "store_load_s": round(load_s, 1), "store_revision": head, "start": starts,
            "rate": args.rate, "changes": len(written), "observed": observed, "load_average": load0,
            "programmed_ms": {"p50_le": bucket_quantile(merged, 0.5), "p99_le": bucket_quantile(merged, 0.99),
                              "mean": round(sum(p["mean_ms"] or 0 for p in per_node) / len(per_node), 1)},
            "store_ms": {"p50": round(pct(hop, 50), 1), "p99": round(pct(hop, 99), 1)},
            "kernel_check": {"expected": len(expected), "missing": sum(p["kernel_missing"] for p in per_node)},
            "per_node": per_node,
        }
    finally:
        stop.set()
        for a in agents:
            a.close()
        for r in relays:
            r.kill()
            r.wait(timeout=10)
        if sync is not None:
            sync.terminate()
            sync.wait(timeout=30)
        if cluster is not None:
            cluster.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    print(f"\nNetwork programming latency: EndpointSlice change at the API server -> programmed in every node's "
          f"kernel ({rows[0]['services']} Services, {rows[0]['endpoints']} endpoints, {rows[0]['nodes']} nodes, "
          f"{rows[0]['rate']:g} changes/s); the agents' histogram, p50/p99 as its bucket bounds")
    print(f"{'store':<7} {'changes':>7} {'observed':>8} {'store p50/p99 ms':>17} {'programmed p50/p99 ms':>22} "
          f"{'mean ms':>8} {'p99 / store p99':>15} {'p99 vs target':>13} {'kernel check':>14}")
    for r in rows:
        p, s, k = r["programmed_ms"], r["store_ms"], r["kernel_check"]
        print(f"{r['backend']:<7} {r['changes']:>7} {r['observed']:>8} {s['p50']:>8.1f}/{s['p99']:<8.1f} "
              f"{'<=':>6}{p['p50_le']:>6g}/<={p['p99_le']:<8g} {p['mean']:>8} "
              f"{p['p99_le'] / max(s['p99'], 0.1):>14.1f}x {p['p99_le'] / TARGET_P99_MS:>12.2f}x "
              f"{k['expected'] - k['missing'] // max(1, r['nodes']):>6}/{k['expected']:<7}")
    for r in rows:
        for n in r["per_node"]:
            print(f"{r['backend']:<7} {n['node']}: observed {n['observed']}, mean {n['mean_ms']} ms, p50 <= "
                  f"{n['p50_le_ms']:g} ms, p99 <= {n['p99_le_ms']:g} ms; fresh endpoints missing in its kernel: "
                  f"{n['kernel_missing']}")
    print(f"\nAgent cold start (store loaded by kube-sync; start -> first complete sync; target {TARGET_START_S:g} s)")
    print(f"{'store':<7} {'node':<11} {'start s':>8} {'CPU s':>7} {'RSS MiB':>8} {'vs target':>9}")
    for r in rows:
        for s in r["start"]:
            print(f"{r['backend']:<7} {s['node']:<11} {s['start_s']:>8.2f} {s['start_cpu_s']:>7.2f} "
                  f"{s['rss_mib']:>8.0f} {s['start_s'] / TARGET_START_S:>8.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 000 Services, 20 s of changes, SQLite only")
    ap.add_argument("--services", type=int, default=50000)
    ap.add_argument("--nodes", type=int, default=3, help="agents, each in a network namespace")
    ap.add_argument("--rate", type=float, default=200.0, help="EndpointSlice changes per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--backends", default="sqlite,etcd", help="comma list: sqlite, etcd (3 members)")
    ap.add_argument("--resync", type=float, default=600.0, help="the agents' --resync")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_programming needs root (the agents run in network namespaces)")
    if args.quick:
        args.services, args.seconds, args.backends = 5000, 20.0, "sqlite"
    import logging

    logging.getLogger("podnet").setLevel(logging.ERROR)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for backend in args.backends.split(","):  # each store's rows printed and written as soon as measured
        rows.append(run_backend(backend, args))
        print_table(rows)
        out.write_text(json.dumps({"command": "bench/bench_programming.py " + " ".join(sys.argv[1:]), "rows": rows,
                                   "machine": {"cpus": os.cpu_count()}}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
