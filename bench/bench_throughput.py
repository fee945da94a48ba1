"""Pod-to-pod TCP throughput (iperf3) through podnet, against plain veth in the same run.

For each routing mode (VXLAN, direct) a 2-node lab with pods a1, a2 on node-1 and b
on node-2: same-node a1->a2 and cross-node a1->b. Baselines measured in the same run:
two namespaces joined by one veth pair (no routing, no podnet), and node-1 -> node-2
over the lab's underlay bridge (what cross-node traffic rides on).

    python bench/bench_throughput.py [--seconds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from podnet.lab.cluster import down_by_name, up
from podnet.lab.connectivity import Lab
from podnet.lab.spec import parse_lab

RESULTS = Path(__file__).resolve().parent / "results"


def iperf(server_ns: str, server_ip: str, client_ns: str, seconds: float) -> float:
    """Gbit/s received by an iperf3 server in server_ns from a client in client_ns."""
    port = "5299"
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            ss = subprocess.run(["ip", "netns", "exec", server_ns, "ss", "-ltn", f"sport = :{port}"],
                                capture_output=True, text=True)
            if port in ss.stdout:
                break
            time.sleep(0.05)
        out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", port,
                              "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait(timeout=10)


def veth_baseline(seconds: float) -> float:
    tag = f"pnbt{secrets.token_hex(3)}"
    a, b = f"{tag}-a", f"{tag}-b"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b],
                       check=True)
        for ns, ip in ((a, "10.77.0.1/24"), (b, "10.77.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", ip, "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        return iperf(b, "10.77.0.2", a, seconds)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def lab_doc(name: str, encapsulation: str) -> dict:
    return {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"underlay": {"cidr": "10.99.0.0/24"},
                     "nodes": [{"name": "node-1"}, {"name": "node-2"}],
                     "pods": [{"name": "a1", "node": "node-1", "ports": [{"containerPort": 8080}]},
                              {"name": "a2", "node": "node-1", "ports": [{"containerPort": 8080}]},
                              {"name": "b", "node": "node-2", "ports": [{"containerPort": 8080}]}],
                     "manifests": [{"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                                    "spec": {"cidr": "10.244.0.0/16", "encapsulation": encapsulation}}]}}


def measure_mode(encapsulation: str, seconds: float) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="pnbt-"))
    name = f"bt-{secrets.token_hex(3)}"
    try:
        st = up(parse_lab(yaml.safe_dump(lab_doc(name, encapsulation)), f"{name}.yaml"), root=root, timeout=90)
        lab = Lab(st)
        a1, a2, b = lab.pod("a1"), lab.pod("a2"), lab.pod("b")
        n1, n2 = lab.node("node-1"), lab.node("node-2")
        return {
            "same-node": iperf(a2["netns"], a2["ips"][0], a1["netns"], seconds),
            "cross-node": iperf(b["netns"], b["ips"][0], a1["netns"], seconds),
            "underlay node->node": iperf(n2["netns"], n2["address"], n1["netns"], seconds),
        }
    finally:
        down_by_name(name, root)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="2-second runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (network namespaces)", file=sys.stderr)
        return 1
    seconds = 2.0 if args.quick else args.seconds
    load = os.getloadavg()[0]
    veth = veth_baseline(seconds)
    rows = [("veth pair (no podnet)", "-", veth)]
    for mode in ("VXLAN", "None"):
        for path, gbps in measure_mode(mode, seconds).items():
            rows.append((path, "vxlan" if mode == "VXLAN" else "direct", gbps))
    print(f"\n{'path':<24}{'routing':<9}{'Gbit/s':>9}{'vs veth':>9}")
    for path, mode, gbps in rows:
        print(f"{path:<24}{mode:<9}{gbps:>9.2f}{gbps / veth:>8.2f}x")
    print(f"\nload average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs; "
          f"{seconds:g} s per iperf3 run")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(
        {"seconds": seconds, "load": load, "rows": [{"path": p, "routing": m, "gbps": g} for p, m, g in rows]},
        indent=1))
    print(f"wrote {RESULTS / 'throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
