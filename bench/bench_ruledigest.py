"""What comparing rules by content costs the periodic checks (dataplane/ruledigest.py).

The Service table's check dumps its rules only when something other than podnet committed
to nf_tables since the last check; it counted them per chain and now also digests them.
A rebuild of the table now ends with one such dump (the reference to compare with).
The policy check reads the whole table every resync; its one dump of rules now gives
their digests as well as their counts. A policy change now ends with a dump of the
chains it wrote. Both measured in process in a fresh network namespace, before and
after interleaved (before: the rule counts / the table read and compared, as the checks
did; after: the same with the digests), median and minimum of --reps each.

    .venv/bin/python bench/bench_ruledigest.py
    .venv/bin/python bench/bench_ruledigest.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def worker(reps: int, policy_sizes: list[tuple[int, int]]) -> dict:
    """Runs inside the fresh namespace."""
    from bench_policy import synthetic
    from podnet.dataplane import nfnetlink as nl
    from podnet.dataplane.nftables import read_ruleset
    from podnet.dataplane.ruledigest import read_digests
    from podnet.policy.applier import PolicyProgrammer, compare_with_kernel, kernel_view
    from podnet.services import nftables as nt
    from podnet.services.applier import NftServiceApplier
    from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState

    def pair(before, after, reps: int = reps) -> dict:
        b, a = [], []
        for _ in range(reps):  # interleaved: the machine's load falls on both alike
            t = time.perf_counter()
            before()
            b.append(time.perf_counter() - t)
            t = time.perf_counter()
            after()
            a.append(time.perf_counter() - t)
        return {"before_ms": [statistics.median(b) * 1e3, min(b) * 1e3],
                "after_ms": [statistics.median(a) * 1e3, min(a) * 1e3]}

    link = nl.Netlink()
    rows = []
    rule = FrontendRule(Frontend("10.96.0.10", "tcp", 80), "default/web:http", "ClusterIP", (Backend("10.1.0.1", 8080),))
    applier = NftServiceApplier(conntrack=None)
    applier.apply(ServiceState(rules=(rule,)))
    rules = sum(d.rules for d in read_digests(link, nt.TABLE).values())

    row = {"table": f"podnet-svc ({rules} rules)", "check": "rule dump: counts -> counts+digests"}
    row.update(pair(lambda: link.rule_counts(nt.TABLE), lambda: read_digests(link, nt.TABLE)))
    rows.append(row)
    applier.remove()

    def rebuild(reference: bool) -> None:
        """A rebuild into an empty table (an agent start without one), with the reference dump
        after it or without (the kernel's digests stubbed: the applier as it was)."""
        fresh = NftServiceApplier(conntrack=None)
        if not reference:
            fresh.kernel.rule_digests = lambda chains=None: {}
        fresh.apply(ServiceState(rules=(rule,)))
        fresh.remove()

    row = {"table": f"podnet-svc ({rules} rules), 1 Service", "check": "rebuild: + the reference dump"}
    row.update(pair(lambda: rebuild(False), lambda: rebuild(True), max(3, reps // 3)))
    rows.append(row)
    for n_pods, n_policies in policy_sizes:
        pp = PolicyProgrammer()
        pods, nss, pols, local = synthetic(n_pods, n_policies)
        pp.sync(pods, nss, pols, local)
        rules = sum(d.rules for d in read_digests(link, "podnet-policy").values())

        def before(pp=pp) -> None:  # the check as it was: the table with its rule counts, compared
            own = nl.Netlink()
            try:
                assert not compare_with_kernel(pp.applier.applied, kernel_view(read_ruleset(own, "podnet-policy")))
            finally:
                own.close()

        def after(pp=pp) -> None:
            assert pp.verify() == []

        row = {"table": f"podnet-policy ({n_pods} pods, {n_policies} policies, {rules} rules)",
               "check": "verify(): counts -> counts+digests"}
        row.update(pair(before, after))
        rows.append(row)
        row = {"table": f"podnet-policy ({n_pods} pods, {n_policies} policies, {rules} rules)",
               "check": "policy change: + the chains' dump"}
        row.update(policy_change(pp, (pods, nss, pols, local), pair))
        rows.append(row)
        subprocess.run(["nft", "delete", "table", "ip", "podnet-policy"], check=True)
    return {"rows": rows}


def policy_change(pp, world, pair) -> dict:
    """A policy changed back and forth (its chain rewritten by nft), with the dump of the
    chains written after it or without (the chain dumps stubbed: the programmer as it was)."""
    from podnet.model.objects import NetworkPolicy

    pods, nss, pols, local = world
    first = pols[0].metadata
    alt = NetworkPolicy.model_validate({"metadata": {"name": first.name, "namespace": first.namespace},
                                        "spec": {"podSelector": {"matchLabels": {"app": "app0"}},
                                                 "ingress": [{"ports": [{"port": 81}]}]}})
    variants = [pols, [alt, *pols[1:]]]
    real = pp.digests

    def change(reference: bool) -> None:
        pp.digests = real if reference else (lambda chains=None: {} if chains is not None else real())
        variants.reverse()
        assert pp.sync(pods, nss, variants[0], local).commands

    try:
        return pair(lambda: change(False), lambda: change(True))
    finally:
        pp.digests = real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 reps, the smaller policy size only")
    ap.add_argument("--out", default=str(HERE / "results" / "ruledigest.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1000x100,5000x1000", help="policy tables: PODSxPOLICIES,...")
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    if args.quick:
        args.reps, sizes = 10, sizes[:1]
    if args.worker:
        print(json.dumps(worker(args.reps, sizes)))
        return 0
    ns = f"pnb-rd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(["ip", "netns", "exec", ns, PY, __file__, "--worker", "--reps", str(args.reps),
                               "--sizes", ",".join(f"{p}x{q}" for p, q in sizes)],
                              capture_output=True, text=True, env=env, timeout=900)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    result = json.loads(proc.stdout)
    print(f"{'table':<55} {'check':<40} {'before median/min':>18} {'after median/min':>18} {'ratio':>6}")
    for r in result["rows"]:
        b, a = r["before_ms"], r["after_ms"]
        ratio = f"{a[0] / b[0]:.2f}" if b[0] > 0.01 else "-"
        r["ratio"] = a[0] / b[0] if b[0] > 0.01 else None
        print(f"{r['table']:<55} {r['check']:<40} {b[0]:8.2f}/{b[1]:<8.2f}ms {a[0]:8.2f}/{a[1]:<8.2f}ms {ratio:>6}")
    result.update({"reps": args.reps, "loadavg": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
