"""The Service table's fixed structure, built and rendered cold: what the first sync of a
fresh agent pays before `nft` runs (the sets, the chains of the tier tree and their
rules, as objects of the typed nftables layer, rendered to `nft -f` text, and the
layout marker's hash), for 1 Service.

The working tree against earlier revisions (`--base REV`, each exported with `git
archive` into a temporary directory), measured two ways, the trees interleaved:

    fresh       one new process per measurement, imports excluded (what the agent
                and the Services benchmark's apply-all pay once)
    in-process  many times in one process, every cache of the layer and the layout
                emptied before each (the same work without process start-up noise)

Prints a table with the ratio of each tree's minimum to the first base's, and writes
bench/results/nftlayout.json.

    .venv/bin/python bench/bench_nftlayout.py --base 232f7da --base 80fdcc0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "nftlayout.json"


# ---------------------------------------------------------------- worker (runs with one tree's src first on sys.path)


def _state():
    from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState

    rule = FrontendRule(Frontend("10.96.0.10", "tcp", 80), "bench/s:http", "ClusterIP",
                        tuple(Backend(f"10.1.0.{i}", 8080) for i in range(1, 6)))
    return ServiceState(rules=(rule,), service_cidrs=("10.96.0.0/12",), node_ips=("10.10.0.1",))


def _build(nt, state) -> int:
    layout = nt.Layout.for_state(state)
    script = nt.structure_script(layout, state)
    layout.chain_rule_counts()
    layout.sets()
    return len(script)


def _empty_caches() -> None:
    """Every lru cache and checked-name set of the layer and the Service layout modules
    (whatever the revision calls them)."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith(("podnet.services.nftables", "podnet.dataplane.nftables")):
            continue
        for attr, value in vars(mod).items():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
            elif attr.startswith("_CHECKED") and isinstance(value, set):
                value.clear()


def worker(mode: str, runs: int) -> None:
    from podnet.services import nftables as nt

    state = _state()
    if mode == "fresh":
        t = time.perf_counter()
        size = _build(nt, state)
        print(json.dumps({"ms": [(time.perf_counter() - t) * 1e3], "bytes": size}))
        return
    size = _build(nt, state)
    ms = []
    for _ in range(runs):
        _empty_caches()
        t = time.perf_counter()
        _build(nt, state)
        ms.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"ms": ms, "bytes": size}))


# ---------------------------------------------------------------- driver


def _run(src: Path, mode: str, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--runs", str(runs)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", action="append", default=[], help="a revision to compare with (repeatable; "
                    "the first is the ratios' baseline)")
    ap.add_argument("--fresh", type=int, default=30, help="fresh processes per tree")
    ap.add_argument("--rounds", type=int, default=3, help="in-process rounds per tree")
    ap.add_argument("--runs", type=int, default=200, help="builds per in-process round")
    ap.add_argument("--quick", action="store_true", help="10 fresh processes, 1 round of 50")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=("fresh", "in-process"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.runs)
        return
    if args.quick:
        args.fresh, args.rounds, args.runs = 10, 1, 50
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pn-nftlayout-") as tmp:
        trees: dict[str, Path] = {}
        for rev in args.base:
            dest = Path(tmp) / rev
            dest.mkdir()
            tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
            trees[rev] = dest / "src"
        trees["working tree"] = ROOT / "src"
        fresh: dict[str, list[float]] = {name: [] for name in trees}
        inproc: dict[str, list[float]] = {name: [] for name in trees}
        sizes: dict[str, int] = {}
        for _ in range(args.fresh):  # interleaved: load changes hit every tree alike
            for name, src in trees.items():
                out = _run(src, "fresh", 1)
                fresh[name] += out["ms"]
                sizes[name] = out["bytes"]
        for _ in range(args.rounds):
            for name, src in trees.items():
                inproc[name] += _run(src, "in-process", args.runs)["ms"]
    base = next(iter(trees))
    rows = []
    for name in trees:
        rows.append({
            "tree": name, "script_bytes": sizes[name],
            "fresh_min_ms": min(fresh[name]), "fresh_median_ms": statistics.median(fresh[name]),
            "inprocess_min_ms": min(inproc[name]), "inprocess_median_ms": statistics.median(inproc[name]),
            "fresh_ratio": min(fresh[name]) / min(fresh[base]),
            "inprocess_ratio": min(inproc[name]) / min(inproc[base]),
        })
    print(f"\n{'tree':<14} {'text':>8} {'fresh min':>10} {'median':>8} {'in-process min':>15} {'median':>8} "
          f"{'ratio fresh':>12} {'in-process':>11}")
    for r in rows:
        print(f"{r['tree']:<14} {r['script_bytes']:>8} {r['fresh_min_ms']:>8.2f}ms {r['fresh_median_ms']:>6.2f}ms "
              f"{r['inprocess_min_ms']:>13.2f}ms {r['inprocess_median_ms']:>6.2f}ms {r['fresh_ratio']:>12.2f} "
              f"{r['inprocess_ratio']:>11.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "started": started, "seconds": time.time() - started,
                               "fresh_runs": args.fresh, "inprocess_runs": args.rounds * args.runs,
                               "loadavg_after": os.getloadavg()[0], "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
