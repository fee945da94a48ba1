"""Services with many endpoints: ONE Service with E endpoints (EndpointSlices of 1000)
against the same E endpoints spread over E/5 Services of 5 (the baseline, what
bench_services measures), in the same run.

For each E and each case, inside a fresh network namespace and a fresh worker process
(the agent's compiler and the nftables applier, as bench_services):

    apply        programming everything into an empty node (compile + element load)
    change one  one endpoint replaced by another (the count stays)
    add one     one endpoint more
    remove one  one endpoint less               (median of --reps each)
    verify       the periodic resync's cheap check: nothing but podnet committed since the
                 last one (as here), or (counting) as if something else had: chain names
                 and the element count of every set

Sync times are split into Python and the kernel transaction (nft process, netlink
batches); `sent` is the elements a change adds and deletes. Prints a table and
writes bench/results/endpoints.json.

    .venv/bin/python bench/bench_endpoints.py --sizes 1000,5000,20000
    .venv/bin/python bench/bench_endpoints.py --quick
    .venv/bin/python bench/bench_endpoints.py --src /tmp/other/src   # another copy of podnet's code
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable
SLICE = 1000  # endpoints per EndpointSlice (the API server's limit)
SMALL = 5  # endpoints per Service in the baseline
CLUSTER_BASE = int(ipaddress.IPv4Address("10.96.0.10"))
EP_BASE = int(ipaddress.IPv4Address("10.128.0.1"))
SPARE_BASE = int(ipaddress.IPv4Address("10.200.0.1"))  # endpoints that come during the measurements


# ---------------------------------------------------------------- worker (inside the namespace)


def worker(case: str, endpoints: int, reps: int) -> None:
    from podnet.model.objects import EndpointSlice, Service
    from podnet.services.applier import NftServiceApplier
    from podnet.services.compiler import ServiceCompiler
    from podnet.services.model import ServiceConfig

    def ip(base: int, i: int) -> str:
        return str(ipaddress.IPv4Address(base + i))

    def service(name: str, cluster_ip: str) -> Service:
        return Service.model_validate({"metadata": {"name": name, "namespace": "bench", "resourceVersion": "1"},
                                       "spec": {"clusterIP": cluster_ip,
                                                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})

    version = [1]

    def slice_(svc: str, index: int, ips: list[str]) -> EndpointSlice:
        version[0] += 1
        return EndpointSlice.model_validate({
            "metadata": {"name": f"{svc}-{index}", "namespace": "bench", "resourceVersion": str(version[0]),
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "nodeName": "n2"} for a in ips]})

    compiler = ServiceCompiler("n1", ["10.10.0.1"], ServiceConfig(service_cidrs=("10.96.0.0/12",)))
    ips = [ip(EP_BASE, i) for i in range(endpoints)]
    if case == "one":
        compiler.set_service(service("big", ip(CLUSTER_BASE, 0)))
        groups = {("big", i // SLICE): ips[i:i + SLICE] for i in range(0, endpoints, SLICE)}
        target = ("big", (endpoints // 2) // SLICE)  # the slice the changes touch
    else:
        for s in range(endpoints // SMALL):
            compiler.set_service(service(f"s{s:06d}", ip(CLUSTER_BASE, s)))
        groups = {(f"s{s:06d}", 0): ips[s * SMALL:(s + 1) * SMALL] for s in range(endpoints // SMALL)}
        target = (f"s{endpoints // SMALL // 2:06d}", 0)
    for (svc, index), part in groups.items():
        compiler.set_slice(slice_(svc, index, part))
    applier = NftServiceApplier(conntrack=None)
    kernel = [0.0]
    for attr in ("nft", "commit"):
        inner = getattr(applier, attr)

        def timed(arg, inner=inner) -> None:
            t = time.monotonic()
            try:
                inner(arg)
            finally:
                kernel[0] += time.monotonic() - t

        setattr(applier, attr, timed)

    def sync() -> dict:
        kernel[0] = 0.0
        t0 = time.monotonic()
        state = compiler.state()
        t1 = time.monotonic()
        r = applier.apply(state)
        t2 = time.monotonic()
        return {"total_s": t2 - t0, "compile_s": t1 - t0, "kernel_s": kernel[0], "full": r.full,
                "sent": r.added + r.removed, "reason": r.reason}

    def put(part: list[str], index: int = target[1]) -> dict:
        compiler.set_slice(slice_(target[0], index, part))
        return sync()

    def add(extra: str) -> dict:
        """One endpoint more: in the target slice if it has room, else in a new slice."""
        if len(groups[target]) < SLICE:
            return put([*groups[target], extra])
        return put([extra], index=len(groups))

    def unadd() -> None:
        if len(groups[target]) < SLICE:
            put(groups[target])
        else:
            compiler.delete_slice("bench", f"{target[0]}-{len(groups)}")
            sync()

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "apply":
            out = sync()
            out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        elif cmd["op"] == "ops":
            original = list(groups[target])
            mid = len(original) // 2
            out = {"change": [], "add": [], "remove": [], "verify": [], "count": []}
            for rep in range(reps):
                part = list(original)
                part[mid] = ip(SPARE_BASE, 2 * rep)
                out["change"].append(put(part))
                put(original)
                out["add"].append(add(ip(SPARE_BASE, 2 * rep + 1)))
                unadd()
                out["remove"].append(put(original[:mid] + original[mid + 1:]))
                put(original)
                t = time.monotonic()
                problem = applier.verify()
                out["verify"].append({"total_s": time.monotonic() - t, "problem": problem})
                if hasattr(applier, "generation"):  # as if something else had committed: it counts
                    applier.generation = None
                t = time.monotonic()
                problem = applier.verify()
                out["count"].append({"total_s": time.monotonic() - t, "problem": problem})
        else:
            out = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


def ask(p: subprocess.Popen, cmd: dict, timeout_hint: str) -> dict:
    assert p.stdin and p.stdout
    p.stdin.write(json.dumps(cmd) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"worker died {timeout_hint}: {p.stderr.read()[-3000:] if p.stderr else ''}")
    return json.loads(line)


def run_case(case: str, endpoints: int, reps: int, src: str) -> dict:
    ns = f"pnbe{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    sh("ip", "netns", "add", ns)
    worker_proc = None
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        env = {**os.environ, "PYTHONPATH": src}
        worker_proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PYTHON, os.path.abspath(__file__), "--worker", "--case", case,
             "--endpoints", str(endpoints), "--reps", str(reps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        what = f"({case}, {endpoints} endpoints)"
        applied = ask(worker_proc, {"op": "apply"}, what)
        ops = ask(worker_proc, {"op": "ops"}, what)
        row = {"case": case, "endpoints": endpoints, "services": 1 if case == "one" else endpoints // SMALL,
               "apply_s": applied["total_s"], "apply_kernel_s": applied["kernel_s"],
               "apply_compile_s": applied["compile_s"], "rss_mb": applied["rss_bytes"] / 2**20}
        for op in ("change", "add", "remove"):
            runs = ops[op]
            row[f"{op}_s"] = statistics.median(r["total_s"] for r in runs)
            row[f"{op}_kernel_s"] = statistics.median(r["kernel_s"] for r in runs)
            row[f"{op}_python_s"] = statistics.median(r["total_s"] - r["kernel_s"] for r in runs)
            row[f"{op}_sent"] = statistics.median(r["sent"] for r in runs)
            row[f"{op}_rebuilt"] = sum(1 for r in runs if r["full"])
        row["verify_s"] = statistics.median(r["total_s"] for r in ops["verify"])
        row["count_s"] = statistics.median(r["total_s"] for r in ops["count"]) if ops["count"] else None
        row["verify_problems"] = [r["problem"] for r in ops["verify"] + ops["count"] if r["problem"]]
        return row
    finally:
        if worker_proc is not None:
            if worker_proc.stdin:
                worker_proc.stdin.close()
            try:
                worker_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker_proc.kill()
                worker_proc.wait()
        sh("ip", "netns", "del", ns, check=False)


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


COLUMNS = (("case", "case"), ("endpoints", "endpoints"), ("Services", "services"), ("apply", "apply_s"),
           ("(kernel)", "apply_kernel_s"), ("change one", "change_s"), ("(kernel)", "change_kernel_s"),
           ("sent", "change_sent"), ("add one", "add_s"), ("sent", "add_sent"), ("remove one", "remove_s"),
           ("sent", "remove_sent"), ("verify", "verify_s"), ("(counting)", "count_s"), ("RSS MiB", "rss_mb"))


def print_table(rows: list[dict]) -> None:
    table = []
    for r in rows:
        line = []
        for _, key in COLUMNS:
            v = r.get(key)
            if key.endswith("_s"):
                line.append(fmt(v))
            elif key == "rss_mb":
                line.append(f"{v:.0f}")
            elif key.endswith("_sent"):
                line.append(f"{v:.0f}" + (" (rebuilt)" if r.get(key.replace("_sent", "_rebuilt")) else ""))
            else:
                line.append(str(v))
        table.append(line)
    widths = [max(len(c[0]), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c[0].ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths, strict=True)))


def ratios(rows: list[dict]) -> list[dict]:
    """One Service against the baseline at the same endpoint count, and against itself at
    the smallest count (>1: longer)."""
    out = []
    many = {r["endpoints"]: r for r in rows if r["case"] == "many"}
    one = {r["endpoints"]: r for r in rows if r["case"] == "one"}
    smallest = one[min(one)] if one else None
    for e, r in sorted(one.items()):
        entry: dict = {"endpoints": e}
        for key in ("apply_s", "change_s", "add_s", "remove_s", "count_s"):
            if e in many and many[e].get(key):
                entry[f"{key}_vs_many"] = round(r[key] / many[e][key], 2)
            if smallest is not None and smallest.get(key):
                entry[f"{key}_vs_{smallest['endpoints']}"] = round(r[key] / smallest[key], 2)
        out.append(entry)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--cases", default="one,many")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="sizes 1000,5000; 3 reps")
    ap.add_argument("--src", default=os.path.join(ROOT, "src"), help="the podnet source tree to measure")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "endpoints.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--endpoints", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.case, args.endpoints, args.reps)
        return 0
    if os.geteuid() != 0:
        print("bench_endpoints needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.quick:
        args.sizes, args.reps = "1000,5000", 3
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    started = time.time()
    load = os.getloadavg()
    rows = []
    for e in sizes:
        for case in cases:
            t0 = time.monotonic()
            row = run_case(case, e, args.reps, os.path.abspath(args.src))
            row["case_wall_s"] = time.monotonic() - t0
            rows.append(row)
            print(f"# {case} E={e}: apply {fmt(row['apply_s'])}, change {fmt(row['change_s'])}, add "
                  f"{fmt(row['add_s'])}, remove {fmt(row['remove_s'])}, verify {fmt(row['verify_s'])} "
                  f"({row['case_wall_s']:.0f}s)", flush=True)
    print()
    print_table(rows)
    rel = ratios(rows)
    if rel:
        print("\none Service relative to the baseline (many) and to its smallest size (x times longer):")
        for r in rel:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "src": os.path.abspath(args.src),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "nft": sh("nft", "--version", check=False).stdout.strip(), "loadavg_start": load,
                 "loadavg_end": os.getloadavg()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "ratios": rel,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
