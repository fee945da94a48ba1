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
               endpoints.kubernetes.io/last-change-trigger-time; the time is taken when that
               address appears in the kernel of each node: `nft monitor` in each namespace
               prints the backend map elements as the kernel commits them
  first hop    the same changes' arrival in the store (a store watch): the baseline of the
               same run, what kube-sync costs before any agent sees a change
  cross-check  the agents' podnet_service_network_programming_duration_seconds histogram
               (scraped): its count must match the changes and its buckets the kernel's view

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

from bench_cluster import PY, AgentUnderTest, relay_store  # noqa: E402
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


class KernelWatch:
    """`nft monitor` in a node's namespace: when each fresh endpoint address reached its kernel."""

    def __init__(self, netns: str):
        self.seen: dict[str, float] = {}
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "stdbuf", "-oL", "nft", "monitor", "new", "elements"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            now = time.time()
            for m in FRESH.finditer(line):
                self.seen.setdefault(m.group(0), now)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


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
    watches: list[KernelWatch] = []
    cluster = sync = None
    stop = threading.Event()
    try:
        with FakeApiServer(bookmark_interval=600, workdir=str(work / "api")) as api:
            t0 = time.monotonic()
            addresses = load_api(api, args.services, args.nodes)
            log(f"{backend}: API server holds {args.services} Services, {args.services * ENDPOINTS} endpoints "
                f"({time.monotonic() - t0:.0f}s)")
            if backend == "etcd":
                from tests.support.etcd import EtcdCluster

                cluster = EtcdCluster(3, base_dir=str(work / "etcd"), die_with_parent=True,
                                      extra_args=["--quota-backend-bytes", str(8 << 30)])
                cluster.__enter__()
                url = cluster.url
            else:
                url = f"sqlite://{work / 'store.db'}"
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

            # stdbuf: nft writes its stdout in blocks to a pipe; each line must come when the kernel says it
            watches = [KernelWatch(a.netns) for a in agents]
            time.sleep(1)  # nft monitor subscribed (it prints nothing when ready)
            hist0 = [programming_histogram(a) for a in agents]
            in_store: dict[str, float] = {}
            store_arrivals(url, kv.revision() + 1, in_store, stop)
            load0 = os.getloadavg()[0]
            written = churn(api, addresses, args.nodes, args.rate, args.seconds, first=0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(set(written) <= set(w.seen) for w in watches):
                time.sleep(0.1)
            hist1 = [programming_histogram(a) for a in agents]
            stop.set()

        lat = []  # seconds, every (change, node)
        missing = 0
        per_node = []
        for a, w in zip(agents, watches, strict=True):
            mine = [w.seen[ip] - t for ip, t in written.items() if ip in w.seen]
            missing += len(written) - len(mine)
            lat += mine
            per_node.append({"node": a.node, "p50_ms": round(pct(mine, 50), 1), "p99_ms": round(pct(mine, 99), 1),
                             "max_ms": round(max(mine) * 1000, 1) if mine else None})
        hop = [in_store[ip] - t for ip, t in written.items() if ip in in_store]
        hist = []
        for a, h0, h1 in zip(agents, hist0, hist1, strict=True):
            n = h1["count"] - h0["count"]
            under = {le: h1["buckets"].get(le, 0) - h0["buckets"].get(le, 0) for le in h1["buckets"]}
            hist.append({"node": a.node, "observed": n, "mean_ms": round((h1["sum"] - h0["sum"]) / n * 1000, 1)
                         if n else None, "under_le": under})
        return {
            "backend": backend, "services": args.services, "endpoints": args.services * ENDPOINTS,
            "nodes": args.nodes, "store_load_s": round(load_s, 1), "store_revision": head, "start": starts,
            "rate": args.rate, "changes": len(written), "missing": missing, "load_average": load0,
            "kernel_ms": {"p50": round(pct(lat, 50), 1), "p99": round(pct(lat, 99), 1),
                          "max": round(max(lat) * 1000, 1) if lat else None},
            "store_ms": {"p50": round(pct(hop, 50), 1), "p99": round(pct(hop, 99), 1)},
            "per_node": per_node, "histogram": hist,
        }
    finally:
        stop.set()
        for w in watches:
            w.close()
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
    print(f"\nNetwork programming latency: EndpointSlice change at the API server -> the element in every "
          f"node's kernel ({rows[0]['services']} Services, {rows[0]['endpoints']} endpoints, "
          f"{rows[0]['nodes']} nodes, {rows[0]['rate']:g} changes/s)")
    print(f"{'store':<7} {'changes':>7} {'missing':>7} {'store p50/p99 ms':>17} {'kernel p50/p99 ms':>18} "
          f"{'max ms':>7} {'p99 / store p99':>15} {'p99 vs target':>13}")
    for r in rows:
        k, s = r["kernel_ms"], r["store_ms"]
        print(f"{r['backend']:<7} {r['changes']:>7} {r['missing']:>7} {s['p50']:>8.1f}/{s['p99']:<8.1f} "
              f"{k['p50']:>9.1f}/{k['p99']:<8.1f} {k['max']:>7} {k['p99'] / max(s['p99'], 0.1):>14.1f}x "
              f"{k['p99'] / TARGET_P99_MS:>12.2f}x")
    for r in rows:
        for h in r["histogram"]:
            under = h["under_le"]
            print(f"{r['backend']:<7} {h['node']}: agent histogram observed {h['observed']} changes, mean "
                  f"{h['mean_ms']} ms, <= 0.1 s: {under.get('0.1', '-')}, <= 0.25 s: {under.get('0.25', '-')}")
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
