"""CNI ADD/DEL latency: podnet-cni (plugin -> agent socket -> handler -> IPAM + real pod
dataplane) against the reference bridge + host-local plugins, on the same machine in the
same run.

Not a test: prints a table and writes bench/results/cni.json. Needs root (network
namespaces); nothing outside the namespaces it creates is touched.

Scenarios, for each plugin:
  sequential    one pod at a time on an empty node: ADD, then DEL, repeated
  burst of 30   30 ADDs started at once on one node (as after a node drain), then 30 DELs

Each plugin runs in its own node namespace; the measuring driver runs inside it, so a
plugin call is one plain exec, as from containerd. Every ADD must succeed with a distinct
address, and after the DELs no pod interface may remain.

    sudo .venv/bin/python bench/bench_cni.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from common import pct, sh  # bench/common.py (bench/ is the script's directory)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

REFERENCE = "/usr/lib/cni"
BURST = 30
RESULTS = os.path.join(HERE, "results", "cni.json")



# ---------------------------------------------------------------- driver (runs inside a node namespace)


def invoke(plugin: str, conf: bytes, command: str, cid: str, netns: str) -> tuple[float, bytes, int]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": REFERENCE, "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}",
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    start = time.perf_counter()
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True)
    return time.perf_counter() - start, proc.stdout, proc.returncode


def burst(plugin: str, conf: bytes, command: str, cids: list[str], pods: list[str]
          ) -> tuple[float, list[tuple[float, bytes, int]]]:
    """One command for every pod at once; (wall time, per-pod results)."""
    barrier = threading.Barrier(len(pods) + 1)
    results: list[tuple[float, bytes, int]] = [(0.0, b"not run", 1)] * len(pods)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = invoke(plugin, conf, command, cids[i], f"/run/netns/{pods[i]}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pods))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def driver(args: argparse.Namespace) -> None:
    conf = args.conf.encode()
    pods = args.pods.split(",")
    out: dict = {"seq_add": [], "seq_del": [], "burst_add": [], "burst_del": [], "burst_wall_add": [],
                 "burst_wall_del": [], "failures": [], "addresses": []}

    def check(what: str, rc: int, stdout: bytes) -> None:
        if rc != 0:
            out["failures"].append(f"{what}: {stdout.decode(errors='replace')[:300]}")

    # Warm-up: the first ADD claims an IPAM block / creates the bridge.
    netns = f"/run/netns/{pods[0]}"
    _, so, rc = invoke(args.plugin, conf, "ADD", "warmup", netns)
    check("warm-up ADD", rc, so)
    _, so, rc = invoke(args.plugin, conf, "DEL", "warmup", netns)
    check("warm-up DEL", rc, so)

    for i in range(args.rounds):
        cid = f"seq{i}-{uuid.uuid4().hex[:8]}"
        dt, so, rc = invoke(args.plugin, conf, "ADD", cid, netns)
        check("sequential ADD", rc, so)
        out["seq_add"].append(dt)
        dt, so, rc = invoke(args.plugin, conf, "DEL", cid, netns)
        check("sequential DEL", rc, so)
        out["seq_del"].append(dt)

    for r in range(args.bursts):
        cids = [f"b{r}p{i}-{uuid.uuid4().hex[:8]}" for i in range(len(pods))]
        for command in ("ADD", "DEL"):
            wall, results = burst(args.plugin, conf, command, cids, pods)
            out[f"burst_wall_{command.lower()}"].append(wall)
            for dt, so, rc in results:
                check(f"burst {command}", rc, so)
                out[f"burst_{command.lower()}"].append(dt)
                if command == "ADD" and rc == 0:
                    out["addresses"].append(json.loads(so)["ips"][0]["address"])
            if command == "ADD":
                addrs = out["addresses"][-len(pods):]
                if len(set(addrs)) != len(addrs):
                    out["failures"].append(f"burst {r}: duplicate addresses {sorted(addrs)}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    out["leftover_links"] = [ln.split(":")[1].strip() for ln in links.splitlines()
                             if ln.split(":")[1].strip().startswith(("pn", "veth"))]
    print(json.dumps(out))


# ---------------------------------------------------------------- orchestration (root namespace)


def summary(raw: dict) -> dict:
    rows = {}
    for key in ("seq_add", "seq_del", "burst_add", "burst_del"):
        xs = raw[key]
        rows[key] = {"n": len(xs), "p50_ms": round(pct(xs, 50), 2), "p99_ms": round(pct(xs, 99), 2),
                     "mean_ms": round(statistics.fmean(xs) * 1000, 2) if xs else None}
    for key in ("burst_wall_add", "burst_wall_del"):
        xs = raw[key]
        rows[key] = {"n": len(xs), "median_ms": round(statistics.median(xs) * 1000, 1) if xs else None}
    return rows


def run_driver(netns: str, plugin: str, conf: dict, pods: list[str], rounds: int, bursts: int) -> dict:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__), "--driver", "--plugin", plugin,
         "--conf", json.dumps(conf), "--pods", ",".join(pods), "--rounds", str(rounds), "--bursts", str(bursts)],
        capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"driver in {netns} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run in well under a minute")
    ap.add_argument("--podnet-cni", metavar="PATH",
                    help="measure this podnet-cni executable (default: the one built from this checkout)")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plugin", help=argparse.SUPPRESS)
    ap.add_argument("--conf", help=argparse.SUPPRESS)
    ap.add_argument("--pods", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bursts", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return 0
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        import podnet.dataplane.pods  # noqa: F401
    except ModuleNotFoundError as e:
        print(f"bench_cni: podnet.dataplane.pods is not available ({e}); nothing to measure", file=sys.stderr)
        return 0

    from podnet.cni.install import install_plugin
    from podnet.model.objects import IPPool
    from podnet.store import open_store
    from podnet.store.objects import ObjectStore

    rounds, bursts = (10, 1) if args.quick else (40, 3)
    tag = f"cnib{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"  # namespaces this run creates (and deletes)
    created: list[str] = []
    agent: subprocess.Popen | None = None

    def netns(name: str) -> str:
        full = f"{tag}-{name}"
        created.append(full)
        sh("ip", "netns", "add", full)
        sh("ip", "netns", "exec", full, "ip", "link", "set", "lo", "up")
        return full

    tmp = tempfile.mkdtemp(prefix="bench-cni-")
    try:
        node_p, node_b = netns("np"), netns("nb")
        pods_p = [netns(f"pp{i}") for i in range(BURST)]
        pods_b = [netns(f"pb{i}") for i in range(BURST)]

        url = "sqlite://" + os.path.join(tmp, "podnet.db")
        kv = open_store(url)
        ObjectStore(kv).apply([IPPool.model_validate({
            "apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "bench"},
            "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
        kv.close()
        sock = os.path.join(tmp, "cni.sock")
        agent = subprocess.Popen(["ip", "netns", "exec", node_p, sys.executable, "-m", "podnet.cni.serve", sock, url, "bench-node"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert agent.stdout is not None
        if agent.stdout.readline().strip() != "ready":
            raise RuntimeError(f"agent did not start: {agent.stderr.read() if agent.stderr else ''}")
        plugin = os.path.abspath(args.podnet_cni) if args.podnet_cni else install_plugin(os.path.join(tmp, "bin"))

        podnet_conf = {"cniVersion": "1.0.0", "name": "bench-podnet", "type": "podnet-cni", "agentSocket": sock}
        bridge_conf = {"cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cni0",
                       "isGateway": True, "ipMasq": False,
                       "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                                "dataDir": os.path.join(tmp, "host-local")}}
        load_before = os.getloadavg()
        print(f"podnet-cni: {rounds} sequential ADD/DEL, {bursts} burst(s) of {BURST} ...", flush=True)
        raw_p = run_driver(node_p, plugin, podnet_conf, pods_p, rounds, bursts)
        print(f"bridge + host-local: {rounds} sequential ADD/DEL, {bursts} burst(s) of {BURST} ...", flush=True)
        raw_b = run_driver(node_b, os.path.join(REFERENCE, "bridge"), bridge_conf, pods_b, rounds, bursts)
        load_after = os.getloadavg()
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for name in reversed(created):
            sh("ip", "netns", "del", name, check=False)
        subprocess.run(["rm", "-rf", tmp], check=False)

    sp, sb = summary(raw_p), summary(raw_b)
    problems = []
    for name, raw in (("podnet-cni", raw_p), ("bridge", raw_b)):
        problems += [f"{name}: {f}" for f in raw["failures"]]
        if raw["leftover_links"]:
            problems.append(f"{name}: interfaces left after DEL: {raw['leftover_links'][:5]}")

    labels = {"seq_add": "sequential ADD", "seq_del": "sequential DEL", "burst_add": f"burst of {BURST}: ADD",
              "burst_del": f"burst of {BURST}: DEL"}
    print()
    print(f"{'':22} {'podnet-cni':>21} {'bridge+host-local':>21} {'ratio':>13}")
    print(f"{'':22} {'p50':>10} {'p99':>10} {'p50':>10} {'p99':>10} {'p50':>6} {'p99':>6}")
    ratios = {}
    for key, label in labels.items():
        a, b = sp[key], sb[key]
        r50 = a["p50_ms"] / b["p50_ms"] if b["p50_ms"] else float("nan")
        r99 = a["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan")
        ratios[key] = {"p50": round(r50, 2), "p99": round(r99, 2)}
        print(f"{label:22} {a['p50_ms']:8.1f}ms {a['p99_ms']:8.1f}ms {b['p50_ms']:8.1f}ms {b['p99_ms']:8.1f}ms "
              f"{r50:5.2f}x {r99:5.2f}x")
    for key, label in (("burst_wall_add", "burst ADD wall"), ("burst_wall_del", "burst DEL wall")):
        a, b = sp[key]["median_ms"], sb[key]["median_ms"]
        print(f"{label:22} {a:8.1f}ms {'':10} {b:8.1f}ms {'':10} {a / b:5.2f}x")
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    print("checks: " + ("all ADDs succeeded with distinct addresses; no interface left" if not problems
                        else "FAILED: " + "; ".join(problems[:5])))

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"quick": args.quick, "podnet_cni": args.podnet_cni or "built from this checkout", "burst": BURST, "rounds": rounds, "bursts": bursts, "cpus": os.cpu_count(),
                   "loadavg": [load_before[0], load_after[0]], "podnet": sp, "bridge": sb, "ratio": ratios,
                   "problems": problems, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(RESULTS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
