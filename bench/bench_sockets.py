"""The node's own connections to a Service: connect latency from a process of the node.

    .venv/bin/python bench/bench_sockets.py [--connects N] [--rounds R] [--quick]

Runs as root; everything happens in network namespaces it creates and deletes. A node
namespace with one backend (a routed veth, as podnet's pods) and a ClusterIP in front
of it; a process of the node opens N TCP connections one after another (connect, read
the server's first byte, close) to:

    direct   the backend's own address (the baseline of the same run)
    nft      the ClusterIP, podnet's nftables Service table (DNAT in the output hook)
    ebpf     the ClusterIP, the eBPF dataplane's socket programs (connect4 picks the backend)

and, for the cost the socket programs put on the rest of the machine (they run for
every socket: they return at once for other namespaces' sockets), connects in another
namespace to a local listener with and without the node's programs attached (`other`).
Each of R rounds builds fresh namespaces and measures every case; the ratio is the
median over rounds of each round's p50 against its own baseline (the machine's load
changes between rounds). Prints a table (p50/p99 of all connects in ms, the ratio) and
writes bench/results/sockets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct, sh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLUSTER_IP, BACKEND, NODE_IP = "10.96.0.10", "10.20.0.11", "10.20.0.1"

SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"x"); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
target, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection((target, port), timeout=5)
    s.recv(1)
    s.close()
    out.append(time.perf_counter() - t0)
print(json.dumps(out))
"""

APPLY = r"""
import sys
from podnet.model.objects import EndpointSlice, Service
from podnet.services.compiler import compile_services
from podnet.services.model import ServiceConfig
backend, pins = sys.argv[1], sys.argv[2]
svc = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "d"},
                              "spec": {"clusterIP": "CLUSTER_IP", "ports": [{"port": 80, "targetPort": 8080}]}})
eps = EndpointSlice.model_validate({
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
    "metadata": {"name": "s-x", "namespace": "d", "labels": {"kubernetes.io/service-name": "s"}},
    "endpoints": [{"addresses": ["BACKEND"], "nodeName": "n1", "conditions": {}}], "ports": [{"port": 8080}]})
state = compile_services([svc], [eps], "n1", ["NODE_IP"], ServiceConfig(service_cidrs=("10.96.0.0/16",)), [])
if backend == "nft":
    from podnet.services.applier import NftServiceApplier
    r = NftServiceApplier().apply(state)
else:
    from podnet.ebpf.bpffs import PinDir
    from podnet.services.ebpf.applier import EbpfServiceApplier
    a = EbpfServiceApplier("n1", pins=PinDir.for_instance(pins), interfaces=lambda ipr: {}, underlay=lambda ipr, ips: {})
    r = a.apply(state)
    assert a.sockets is not None and not a.sockets_error, a.sockets_error
assert not r.errors, r.errors
""".replace("CLUSTER_IP", CLUSTER_IP).replace("BACKEND", BACKEND).replace("NODE_IP", NODE_IP)


def in_ns(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd)


def connects(ns: str, target: str, port: int, n: int) -> list[float]:
    return json.loads(in_ns(ns, PY, "-c", CLIENT, target, str(port), str(n)).stdout)


def one_round(n: int, pin_root: str) -> dict[str, list[float]]:
    """One fresh node, its backend and another namespace; n connects per case."""
    tag = uuid.uuid4().hex[:6]
    node, backend, other = f"pnsk{tag}n", f"pnsk{tag}b", f"pnsk{tag}o"
    pins = f"bench-sockets-{tag}"
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    try:
        for ns in (node, backend, other):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(node, "ip", "link", "add", "vb", "type", "veth", "peer", "name", "eth0", "netns", backend)
        in_ns(node, "ip", "addr", "add", f"{NODE_IP}/32", "dev", "vb")
        in_ns(node, "ip", "link", "set", "vb", "up")
        in_ns(node, "ip", "route", "add", f"{BACKEND}/32", "dev", "vb")
        in_ns(node, "ip", "route", "add", "default", "dev", "vb")  # (a route for the ClusterIP before DNAT)
        in_ns(backend, "ip", "addr", "add", f"{BACKEND}/24", "dev", "eth0")
        in_ns(backend, "ip", "link", "set", "eth0", "up")
        in_ns(backend, "ip", "route", "add", "default", "via", NODE_IP)
        for ns in (backend, other):
            p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", SERVER], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout and p.stdout.readline().strip() == "ready"
        connects(node, BACKEND, 8080, 200)  # warm-up (ARP, caches)
        out = {"direct": connects(node, BACKEND, 8080, n), "other ns, no programs": connects(other, "127.0.0.1", 8080, n)}
        subprocess.run(["ip", "netns", "exec", node, PY, "-c", APPLY, "nft", pins], check=True, env=env)
        out["nft"] = connects(node, CLUSTER_IP, 80, n)
        subprocess.run(["ip", "netns", "exec", node, PY, "-c", APPLY, "ebpf", pins], check=True, env=env)
        out["ebpf"] = connects(node, CLUSTER_IP, 80, n)
        out["other ns, programs attached"] = connects(other, "127.0.0.1", 8080, n)
        return out
    finally:
        for p in procs:
            p.kill()
            p.wait()
        sh("rm", "-rf", f"{pin_root}/podnet/{pins}", check=False)  # unpinning detaches the programs
        for ns in (node, backend, other):
            sh("ip", "netns", "del", ns, check=False)


BASELINES = {"direct": "direct", "nft": "direct", "ebpf": "direct",
             "other ns, no programs": "other ns, no programs", "other ns, programs attached": "other ns, no programs"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connects", type=int, default=2000, help="per case and round (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="fresh namespaces each (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 500 connects")
    args = ap.parse_args()
    if args.quick:
        args.connects, args.rounds = 500, 2
    if os.geteuid() != 0:
        print("needs root (network namespaces, bpf)", file=sys.stderr)
        return 1
    from podnet.ebpf.bpffs import ensure_shared_bpffs

    pin_root = ensure_shared_bpffs()
    rounds = [one_round(args.connects, pin_root) for _ in range(args.rounds)]
    rows = []
    for case, base in BASELINES.items():
        # per round, p50 against its own baseline (the machine's load changes between rounds)
        ratios = [pct(r[case], 50) / pct(r[base], 50) for r in rounds]
        pooled = [x for r in rounds for x in r[case]]
        rows.append({"case": case, "baseline": base, "connects": len(pooled), "p50_ms": round(pct(pooled, 50), 4),
                     "p99_ms": round(pct(pooled, 99), 4), "ratio_p50_median": round(statistics.median(ratios), 3),
                     "ratio_p50_rounds": [round(x, 3) for x in ratios]})
    print(f"{'case':30} {'connects':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 / baseline (median of rounds)':>34}")
    for r in rows:
        print(f"{r['case']:30} {r['connects']:>8} {r['p50_ms']:>8.4f} {r['p99_ms']:>8.4f} "
              f"{r['ratio_p50_median']:>10} vs {r['baseline']}")
    out = ROOT / "bench" / "results" / "sockets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"make bench-sockets BENCH_ARGS='--connects {args.connects} "
                                          f"--rounds {args.rounds}'", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
