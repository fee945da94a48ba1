"""Stale UDP flow cleanup: netlink (podnet) against one `conntrack -D` process per flow
(podnet before, as kube-proxy did until 1.31) and against pyroute2's Conntrack.

    .venv/bin/python bench/bench_conntrack.py [--quick] [--repeat N]

Runs as root. Each row is a fresh network namespace holding 20 000 UDP conntrack entries,
inserted over netlink: 10 000 stale (their flows' endpoint was removed) and 10 000 that
stay (the same frontends, answered by an endpoint that is still there). The stale ones
belong to F stale flows (F frontends, one removed endpoint each, 10 000 / F entries
each); F = 1, 100 and 1 000 (--quick: 1 and 100). Each approach runs in the namespace
and is checked: afterwards exactly the 10 000 entries that stay are left.

- process per flow: `conntrack -D -p udp --orig-dst VIP --orig-port-dst P --reply-src EP
  --reply-port-src EPP` for each flow, the count parsed from its stderr (the code podnet
  had, reproduced here);
- netlink: podnet.services.conntrack.delete_stale_flows (one dump of the UDP entries,
  matched against the flows, deletes batched with acknowledgements);
- pyroute2: pyroute2.Conntrack's dump_entries filtered by protocol (the kernel filter),
  the same match, and Conntrack.delete for each entry (one request and its answer each).

Wall time of the cleanup alone (the insert is not timed); the median of --repeat runs.
Prints a table and writes bench/results/conntrack.json (conntrack-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from podnet.dataplane.ctnetlink import Conntrack, Tuple  # noqa: E402
from podnet.services.conntrack import StaleMatcher, delete_stale_flows  # noqa: E402
from podnet.services.model import Backend, Frontend, StaleFlow  # noqa: E402

STALE, STAYING = 10_000, 10_000
ip = socket.inet_aton


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def frontend_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def scenario(flows: int) -> tuple[list[StaleFlow], list[tuple[int, Tuple, Tuple]]]:
    """The stale flows and every entry to insert (the stale ones first)."""
    stale_flows = [StaleFlow(Frontend(frontend_ip(i), "udp", 53), Backend(f"10.1.{i // 250}.{i % 250 + 1}", 5353))
                   for i in range(flows)]
    entries = []
    for kind, count, backend_net in (("stale", STALE, "10.1"), ("stays", STAYING, "10.3")):
        for n in range(count):
            i = n % flows
            client = ip(f"10.{8 if kind == 'stale' else 9}.{n // 250 % 250}.{n % 250 + 1}")
            sport = 10000 + n // 62500
            fe = ip(frontend_ip(i))
            backend = ip(f"{backend_net}.{i // 250}.{i % 250 + 1}")
            entries.append((socket.AF_INET, Tuple(client, fe, 17, sport, 53), Tuple(backend, client, 17, 5353, sport)))
    return stale_flows, entries


# ---------------------------------------------------------------- the three ways


def by_process(flows: list[StaleFlow]) -> int:
    """One `conntrack -D` per flow, its stderr parsed (podnet's former code)."""
    deleted = 0
    for flow in flows:
        fe = flow.frontend
        cmd = ["conntrack", "-D", "-p", fe.proto, "--orig-dst", fe.ip, "--orig-port-dst", str(fe.port)]
        if flow.backend is not None:
            cmd += ["--reply-src", flow.backend.ip, "--reply-port-src", str(flow.backend.port)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        # "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted."
        for word in (proc.stderr or "").split(" flow entries")[0].split()[-1:]:
            if word.isdigit():
                deleted += int(word)
    return deleted


def by_netlink(flows: list[StaleFlow]) -> int:
    return delete_stale_flows(flows)


def by_pyroute2(flows: list[StaleFlow]) -> int:
    from pyroute2 import Conntrack as Pyroute2Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    from podnet.dataplane.ctnetlink import Entry

    matcher = StaleMatcher(flows)
    ct = Pyroute2Conntrack()
    try:
        stale = []
        for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_UDP)):
            o, r = e.tuple_orig, e.tuple_reply
            ours = Entry(socket.AF_INET, Tuple(ip(o.saddr), ip(o.daddr), o.proto, o.sport, o.dport),
                         Tuple(ip(r.saddr), ip(r.daddr), r.proto, r.sport, r.dport), 0, None)
            if matcher.matches(ours):
                stale.append(e)
        for e in stale:
            ct.delete(e)
        return len(stale)
    finally:
        ct.close()


WAYS = {"process per flow": by_process, "netlink (podnet)": by_netlink, "pyroute2": by_pyroute2}


# ---------------------------------------------------------------- one run, inside a namespace


def inside(way: str, flows_n: int) -> dict:
    flows, entries = scenario(flows_n)
    with Conntrack() as ct:
        created, _ = ct.create(entries)
        assert created == len(entries), f"{created} of {len(entries)} entries inserted"
    t0 = time.perf_counter()
    cpu0 = os.times()
    deleted = WAYS[way](flows)
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    with Conntrack() as ct:
        left = [e for e in ct.dump(socket.AF_INET)]
    stays = sum(1 for e in left if e.reply.src[:2] == ip("10.3.0.0")[:2])
    return {"seconds": round(seconds, 4), "deleted": deleted, "left": len(left), "left_staying": stays,
            "cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                           + (cpu1.children_user - cpu0.children_user)
                           + (cpu1.children_system - cpu0.children_system), 3)}


def run_in_namespace(way: str, flows_n: int) -> dict:
    ns = f"pnbct-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600"],
                       check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", way, str(flows_n)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{way}, {flows_n} flows: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--inside", nargs=2, metavar=("WAY", "FLOWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        print(json.dumps(inside(args.inside[0], int(args.inside[1]))))
        return 0
    if os.geteuid() != 0:
        print("bench_conntrack needs root (network namespaces)", file=sys.stderr)
        return 1
    repeat = args.repeat or (1 if args.quick else 3)
    sizes = (1, 100) if args.quick else (1, 100, 1000)
    results: dict = {"stale_entries": STALE, "staying_entries": STAYING, "repeat": repeat, "cpus": os.cpu_count(),
                     "load_average_start": os.getloadavg(), "rows": []}
    for flows_n in sizes:
        for way in WAYS:
            runs = []
            for _ in range(repeat):
                r = run_in_namespace(way, flows_n)
                if r["deleted"] != STALE or r["left"] != STAYING or r["left_staying"] != STAYING:
                    raise SystemExit(f"{way}, {flows_n} flows: wrong result {r}")
                runs.append(r)
            row = {"flows": flows_n, "way": way, "seconds": statistics.median(r["seconds"] for r in runs),
                   "cpu_s": statistics.median(r["cpu_s"] for r in runs), "runs_s": [r["seconds"] for r in runs]}
            results["rows"].append(row)
            log(f"  {flows_n:>5} flows  {way:18} {row['seconds']:8.3f} s")
    results["load_average_end"] = os.getloadavg()
    print(f"\n{STALE} stale UDP entries among {STALE + STAYING}, deleted; median of {repeat}")
    print(f"{'flows':>6}  {'way':18} {'seconds':>9} {'CPU s':>7} {'vs netlink':>11}")
    for row in results["rows"]:
        base = next(r["seconds"] for r in results["rows"] if r["flows"] == row["flows"] and r["way"].startswith("netlink"))
        print(f"{row['flows']:>6}  {row['way']:18} {row['seconds']:9.3f} {row['cpu_s']:7.2f} "
              f"{row['seconds'] / base:10.1f}x")
    out = ROOT / "bench" / "results" / ("conntrack-quick.json" if args.quick else "conntrack.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
