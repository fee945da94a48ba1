"""The API server's load with N node agents: every agent watching the API directly (baseline)
against one kube-sync that reflects the API into podnet's store, which the agents follow.

    .venv/bin/python bench/bench_kube.py [--quick] [--agents N] [--changes N]

Both rows run against the fake API server (tests/support/fake_apiserver.py, HTTPS), which
counts open watches and the bytes it sends on them. The same changes are made in each row:
Pods created (kubectl-shaped: managedFields, last-applied annotation, env, volumes), Pod status
updates that touch only conditions (what the kubelet sends most), and EndpointSlice updates.

  direct    N agents, each with its own watches of Pods, Services and EndpointSlices (podnet's
            reflector over podnet's client): what Calico's KDD mode does without Typha
  kube-sync one kube-sync (all kinds), writing into a SQLite store; the agents follow the store,
            so the API server sends each change once. The store side is reported from the
            writes: each write reaches each agent once (etcd sends a watcher the new value),
            so store bytes per change = bytes written x N

Also measured in the kube-sync row: the time from an EndpointSlice change at the API server to
its value in the store (the first hop of network programming latency), p50 and p99, from the
slice's endpoints.kubernetes.io/last-change-trigger-time annotation, which kube-sync keeps.

Prints a table and writes bench/results/kube.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support
sys.path.insert(0, str(ROOT / "src"))

from tests.support.fake_apiserver import FakeApiServer  # noqa: E402

from podnet.kube.client import KubeClient, KubeConfig, Resource  # noqa: E402
from podnet.kube.crds import render  # noqa: E402
from podnet.kube.reflector import Reflector  # noqa: E402
from podnet.kube.sync import KubeSync, KubeSyncConfig  # noqa: E402
from podnet.store import open_store  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kube.json"
WATCHED = [Resource("", "v1", "pods", "Pod", True), Resource("", "v1", "services", "Service", True),
           Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def full_pod(i: int) -> dict:
    name = f"web-{i}"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "default", "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": json.dumps({"spec": {"x": "y" * 600}})},
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                           "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                                                                  "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {}}}}}]},
        "spec": {"nodeName": f"node-{i % 100}", "restartPolicy": "Always", "serviceAccountName": "default",
                 "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {
                     "path": "token", "expirationSeconds": 3607}}]}}],
                 "containers": [{"name": "web", "image": "registry.example/web:1.2.3",
                                 "env": [{"name": f"VAR_{j}", "value": "value"} for j in range(10)],
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}}


def slice_at(i: int, version: int) -> dict:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {
        "name": f"svc-{i}-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"10.244.{i % 250}.{(version + j) % 250 + 1}"], "conditions": {"ready": True},
                       "nodeName": f"node-{j}"} for j in range(5)]}


LAST_RV: dict[str, int] = {}


def changes(api: FakeApiServer, n: int, rate: float) -> dict[str, int]:
    """n Pods created, n Pod status updates (conditions only), n EndpointSlice updates, at `rate`
    changes per second; the count of events per kind."""
    gap = 1.0 / rate if rate else 0.0
    start = time.monotonic()
    done = 0
    for i in range(n):
        api.create(full_pod(i))
        pod = api.patch_status("v1", "Pod", f"web-{i}", "default", {"conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]})
        eps = api.apply(slice_at(i % 20, i + 1))
        LAST_RV["pods"] = int(pod["metadata"]["resourceVersion"])
        LAST_RV["endpointslices"] = int(eps["metadata"]["resourceVersion"])
        done += 3
        if gap:
            ahead = start + done * gap - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return {"pods": 2 * n, "services": 0, "endpointslices": n}


def preload(api: FakeApiServer) -> None:
    for i in range(20):
        api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "default"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}})
        api.create(slice_at(i, 0))


def run_direct(agents: int, n: int, rate: float) -> dict:
    with FakeApiServer(bookmark_interval=600) as api:
        preload(api)
        kc = api.kubeconfig()
        counts: dict[tuple[int, str], int] = {}
        cond = threading.Condition()
        reflectors = []

        def handler_for(a: int):  # noqa: ANN202
            def handle(r: Reflector, chs: list, rv: str, relist: bool) -> None:
                if not relist:
                    with cond:
                        counts[(a, r.name)] = counts.get((a, r.name), 0) + len(chs)
                        cond.notify_all()
            return handle

        for a in range(agents):
            client = KubeClient(KubeConfig.load(kc))
            for res in WATCHED:
                r = Reflector(client, res, handler_for(a), keep_objects=False)
                reflectors.append(r)
                threading.Thread(target=r.run, daemon=True).start()
        for r in reflectors:
            r.synced.wait(120)
        with api.changed:
            api.changed.wait_for(lambda: api.stats.watches_open >= len(reflectors), 60)
        watches = api.stats.watches_open
        base_bytes, base_events = api.stats.watch_bytes, api.stats.watch_events
        t0 = time.monotonic()
        expected = changes(api, n, rate)
        with cond:
            ok = cond.wait_for(lambda: all(counts.get((a, k), 0) >= v for a in range(agents)
                                           for k, v in expected.items() if v), 300)
        elapsed = time.monotonic() - t0
        sent = api.stats.watch_bytes - base_bytes
        events = api.stats.watch_events - base_events
        for r in reflectors:
            r.stop()
            r.client.close()
        total = sum(expected.values())
        return {"mode": "direct", "agents": agents, "changes": total, "complete": ok, "api_watches": watches,
                "api_watch_bytes": sent, "api_bytes_per_change": sent / total, "api_events_sent": events,
                "store_writes": 0, "store_bytes_per_change_all_agents": 0, "seconds": elapsed}


def run_kube_sync(agents: int, n: int, rate: float) -> dict:
    with FakeApiServer(bookmark_interval=600) as api, tempfile.TemporaryDirectory(prefix="podnet-bench-kube-") as d:
        import yaml

        for doc in yaml.safe_load_all(render()):
            api.create(doc)
        preload(api)
        url = f"sqlite://{d}/store.db"
        open_store(url, create=True).close()
        client = KubeClient(KubeConfig.load(api.kubeconfig()))
        sync = KubeSync(client, lambda: open_store(url, create=False),
                        KubeSyncConfig(identity="bench", lease_duration=15, renew_deadline=10, retry=2,
                                       write_back=False))
        t = threading.Thread(target=sync.run, daemon=True)
        t.start()
        sync.synced.wait(120)
        with api.changed:
            api.changed.wait_for(lambda: api.stats.watches_open >= sum(not r.unserved for r in sync.reflectors), 60)
        watches = api.stats.watches_open
        base_bytes, base_events = api.stats.watch_bytes, api.stats.watch_events
        writes0 = sync.writer.stats.writes
        latencies: list[float] = []
        stop_watch = threading.Event()
        kv_watch = open_store(url, create=False)
        stored_bytes = [0]

        def follow() -> None:  # what one agent would receive, and the API->store latency of slices
            rev = kv_watch.revision() + 1
            try:
                for ev in kv_watch.watch("/podnet/objects/", rev, previous=False):
                    if ev.value is not None:
                        stored_bytes[0] += len(json.dumps(ev.value, separators=(",", ":")))
                        trig = ((ev.value.get("metadata") or {}).get("annotations") or {}).get(
                            "endpoints.kubernetes.io/last-change-trigger-time")
                        if trig and "/EndpointSlice/" in ev.key:
                            at = datetime.strptime(trig, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                            latencies.append((datetime.now(UTC) - at).total_seconds())
                    if stop_watch.is_set():
                        return
            except Exception:
                return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        t0 = time.monotonic()
        expected = changes(api, n, rate)
        sync.wait(lambda: all(int(r.resource_version or 0) >= LAST_RV.get(r.name, 0) for r in sync.reflectors)
                  and sync._queue.empty(), 300)
        # the last slice write must have reached the store watcher too
        deadline = time.monotonic() + 30
        while len(latencies) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        sent = api.stats.watch_bytes - base_bytes
        writes = sync.writer.stats.writes - writes0
        stop_watch.set()
        sync.stop()
        t.join(30)
        kv_watch.close()
        total = sum(expected.values())
        lat = sorted(latencies)
        return {"mode": "kube-sync", "agents": agents, "changes": total, "complete": len(lat) >= n,
                "api_watches": watches, "api_watch_bytes": sent, "api_bytes_per_change": sent / total,
                "api_events_sent": api.stats.watch_events - base_events, "store_writes": writes,
                "store_bytes_per_change_all_agents": stored_bytes[0] * agents / total, "seconds": elapsed,
                "slice_to_store_ms_p50": 1000 * statistics.median(lat) if lat else None,
                "slice_to_store_ms_p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--changes", type=int, default=100, help="Pods created (and as many status and slice updates)")
    p.add_argument("--rate", type=float, default=200.0, help="changes per second")
    args = p.parse_args()
    import logging

    logging.getLogger("podnet").setLevel(logging.ERROR)  # the direct agents' watches end with their server
    agents, n = (20, 30) if args.quick else (args.agents, args.changes)
    results = {"load_average": {"start": os.getloadavg()}, "rows": []}
    log(f"direct: {agents} agents x {len(WATCHED)} watches ...")
    results["rows"].append(run_direct(agents, n, args.rate))
    log("kube-sync ...")
    results["rows"].append(run_kube_sync(agents, n, args.rate))
    results["load_average"]["end"] = os.getloadavg()
    base = results["rows"][0]
    print(f"\nAPI server load for {agents} agents, {base['changes']} changes (Pods created, Pod status-only updates, "
          f"EndpointSlice updates) at {args.rate:g}/s; load average "
          f"{results['load_average']['start'][0]:.1f} -> {results['load_average']['end'][0]:.1f}")
    print(f"{'mode':<10} {'API watches':>11} {'API bytes/change':>17} {'vs direct':>9} {'store writes':>12} "
          f"{'store bytes/change (all agents)':>31}")
    for row in results["rows"]:
        print(f"{row['mode']:<10} {row['api_watches']:>11} {row['api_bytes_per_change']:>17,.0f} "
              f"{base['api_bytes_per_change'] / max(1.0, row['api_bytes_per_change']):>8.1f}x "
              f"{row['store_writes']:>12} {row['store_bytes_per_change_all_agents']:>31,.0f}")
    ks = results["rows"][1]
    if ks.get("slice_to_store_ms_p50") is not None:
        print(f"EndpointSlice change at the API server -> value in the store: p50 {ks['slice_to_store_ms_p50']:.1f} ms, "
              f"p99 {ks['slice_to_store_ms_p99']:.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
