"""External DNS: publishing Services to a real BIND through RFC 2136.

    .venv/bin/python bench/bench_externaldns.py [--quick] [--services N]

Each row starts a fresh named (tests/support/bind.py: a dynamic zone, a TSIG key, a free
loopback port) and a fresh SQLite store holding N LoadBalancer Services with a hostname
annotation each.

1. publish from empty: one full sync of `podnet external-dns` (zone read by AXFR, plan,
   UPDATEs) at several --rfc2136-batch-change-size values (a batch too big for one DNS
   message, 64 KiB, is cut into as many parts as it needs). Baseline: batch size 1, one
   change (record + ownership TXT) per UPDATE message; and the same batching with the
   prerequisites stripped (the unguarded messages ExternalDNS sends), for the cost of
   the ownership guard. Counted: UPDATE messages, the zone's SOA serial (one per
   transaction named applied), and CPU time of the controller and of named (less
   sensitive than wall time to the other jobs on a shared machine). Checked: every name answers with its address (dnspython
   over TCP), a sample with dig.
   Each row runs --repeat times (each on a fresh server and store), the median reported.
2. resync with nothing to change (AXFR of the whole zone + plan).
3. one change visible: the controller runs as its own process; one Service's address
   changes in the store and the time until dig against named answers the new address
   is measured, repeated; event syncs work from the controller's copy of the zone (no
   AXFR), against the same change made by a full sync (AXFR first, as ExternalDNS does
   on every sync).

Prints a table and writes bench/results/externaldns.json.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support
sys.path.insert(0, str(ROOT / "src"))

from tests.support.bind import Named  # noqa: E402

from podnet.externaldns import rfc2136  # noqa: E402
from podnet.externaldns.controller import Controller, Settings, follow  # noqa: E402
from podnet.externaldns.rfc2136 import RFC2136Provider, ServerConfig  # noqa: E402
from podnet.externaldns.source import ServiceSource  # noqa: E402
from podnet.model.objects import Service  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from podnet.store.url import open_store  # noqa: E402

ZONE = "bench.test"
RESULTS = ROOT / "bench" / "results" / "externaldns.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ip_of(i: int, gen: int = 0) -> str:
    return f"10.{100 + gen}.{i // 250}.{i % 250 + 1}"


def service(i: int, gen: int = 0) -> Service:
    return Service.model_validate({
        "metadata": {"name": f"svc{i}", "namespace": f"ns{i % 20}",
                     "annotations": {"external-dns.kubernetes.io/hostname": f"svc{i}.{ZONE}"}},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": ip_of(i, gen)}]}}})


def make_store(d: str, n: int) -> str:
    url = f"sqlite:///{d}/podnet.db"
    store = ObjectStore(open_store(url))
    for start in range(0, n, 500):
        store.apply([service(i) for i in range(start, min(n, start + 500))])
    store.kv.close()
    return url


def provider(named: Named, batch: int, guarded: bool = True) -> RFC2136Provider:
    prov = RFC2136Provider(ServerConfig(named.host, (ZONE,), port=named.port, keyname=named.key_name,
                                        secret=named.secret, batch_size=batch, timeout=30.0))
    if not guarded:
        build = prov.message

        def unguarded(zone, batch):  # noqa: ANN001, ANN202
            msg = build(zone, batch)
            msg.prerequisite.clear()
            return msg

        prov.message = unguarded  # type: ignore[method-assign]
    return prov


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (named's), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_published(named: Named, n: int, gen: int = 0) -> None:
    bad = [i for i in range(n) if named.values(f"svc{i}.{ZONE}", "A") != [ip_of(i, gen)]]
    if bad:
        raise SystemExit(f"{len(bad)} names do not answer as published (first: svc{bad[0]})")
    for i in (0, n // 2, n - 1):
        out = subprocess.run(["dig", "+short", "+tcp", "-p", str(named.port), f"@{named.host}", f"svc{i}.{ZONE}", "A"],
                             capture_output=True, text=True, check=True).stdout.split()
        if out != [ip_of(i, gen)]:
            raise SystemExit(f"dig svc{i}.{ZONE}: {out}")


def publish(n: int, batch: int, guarded: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="podnet-bench-edns-") as d, Named(zones=[ZONE]) as named:
        url = make_store(d, n)
        source = ServiceSource()
        follow(url, source)
        ctl = Controller(Settings(owner_id="bench"), provider(named, batch, guarded), source)
        serial = named.serial(ZONE)
        named_cpu = cpu_seconds(named.proc.pid)
        t0, c0 = time.perf_counter(), time.process_time()
        report = ctl.sync(full=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        named_cpu = cpu_seconds(named.proc.pid) - named_cpu
        check_published(named, n)
        row = {"services": n, "batch": batch, "guarded": guarded, "seconds": round(seconds, 3),
               "controller_cpu": round(cpu, 3), "named_cpu": round(named_cpu, 3),
               "messages": report.messages, "transactions": named.serial(ZONE) - serial, "created": report.created}
        t0 = time.perf_counter()
        again = ctl.sync(full=True)
        row["resync_seconds"] = round(time.perf_counter() - t0, 3)
        assert again.messages == 0
        return row


def one_change(n: int, rounds: int) -> dict:
    """The controller as its own process; one Service changes; time until dig shows it."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="podnet-bench-edns-") as d, Named(zones=[ZONE]) as named:
        url = make_store(d, n)
        status = Path(d) / "status.json"
        for mode, interval, event in (("event", "1h", "0s"), ("full", "0s", "1h")):
            # event: store changes sync at once against the controller's copy of the zone;
            # full: every sync reads the zone by AXFR first (and runs back to back)
            env = dict(os.environ, EXTERNAL_DNS_RFC2136_TSIG_SECRET=named.secret)
            proc = subprocess.Popen(
                [sys.executable, "-m", "podnet.cli.main", "--store", url, "external-dns", "--rfc2136-host",
                 named.host, "--rfc2136-port", str(named.port), "--rfc2136-zone", ZONE, "--rfc2136-tsig-keyname",
                 named.key_name, "--txt-owner-id", "bench", "--interval", interval, "--min-event-sync-interval",
                 event, "--status-file", str(status), "--log-level", "warning"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 300
                while True:  # the first full sync done: every name published
                    try:
                        st = json.loads(status.read_text())
                        if st["error"] is None and st["records"] == n:
                            break
                    except (FileNotFoundError, json.JSONDecodeError):
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"controller did not publish: {proc.stderr.read() if proc.stderr else ''}")
                    time.sleep(0.05)
                store = ObjectStore(open_store(url, create=False))
                times = []
                for r in range(rounds):
                    i = (r * 37) % n
                    gen = 1 + r + (100 if mode == "full" else 0)
                    want = ip_of(i, gen % 150)
                    t0 = time.perf_counter()
                    store.apply([service(i, gen % 150)])
                    while True:
                        got = subprocess.run(["dig", "+short", "+tcp", "-p", str(named.port), f"@{named.host}",
                                              f"svc{i}.{ZONE}", "A"], capture_output=True, text=True).stdout.split()
                        if got == [want]:
                            break
                        if time.perf_counter() - t0 > 120:
                            raise SystemExit(f"{mode}: svc{i} never showed {want}")
                    times.append(time.perf_counter() - t0)
                store.kv.close()
                out[mode] = {"rounds": rounds, "p50_ms": round(statistics.median(times) * 1000, 1),
                             "max_ms": round(max(times) * 1000, 1)}
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                if proc.stderr:
                    proc.stderr.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 Services, fewer rounds")
    p.add_argument("--services", type=int)
    p.add_argument("--repeat", type=int, help="runs per publish row, the median reported (default 3; quick 1)")
    args = p.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    n = args.services or (200 if args.quick else 1000)
    rounds = 5 if args.quick else 20
    results: dict = {"services": n, "load_average": {"start": os.getloadavg()}, "publish": [], "one_change": {}}
    for batch, guarded in ((1, True), (50, True), (50, False), (250, True), (n, True)):
        log(f"publish {n} Services, batch {batch}{'' if guarded else ', no prerequisites'} x{args.repeat} ...")
        runs = [publish(n, batch, guarded) for _ in range(args.repeat)]  # each on a fresh server and store
        row = dict(runs[0])
        for k in ("seconds", "resync_seconds", "controller_cpu", "named_cpu"):
            row[k] = statistics.median(r[k] for r in runs)
            row[k + "_all"] = [r[k] for r in runs]
        results["publish"].append(row)
    log(f"one change at {n} Services ...")
    results["one_change"] = one_change(n, rounds)
    results["load_average"]["end"] = os.getloadavg()

    base = results["publish"][0]["seconds"]
    print(f"external DNS: {n} Services (one A record + one ownership TXT each) to BIND {ZONE}, median of "
          f"{args.repeat} per publish row, load average {results['load_average']['start'][0]:.1f} -> "
          f"{results['load_average']['end'][0]:.1f}")
    print(f"{'scenario':<44}{'UPDATEs':>9}{'txns':>7}{'seconds':>10}{'vs batch 1':>12}{'ctl cpu s':>11}"
          f"{'named cpu s':>13}{'resync s':>10}")
    for row in results["publish"]:
        what = f"publish from empty, batch {row['batch']}" + ("" if row["guarded"] else ", unguarded")
        print(f"{what:<44}{row['messages']:>9}{row['transactions']:>7}{row['seconds']:>10.2f}"
              f"{base / row['seconds']:>11.1f}x{row['controller_cpu']:>11.2f}{row['named_cpu']:>13.2f}"
              f"{row['resync_seconds']:>10.3f}")
    for mode, row in results["one_change"].items():
        what = {"event": "one change visible (event sync, no AXFR)",
                "full": "one change visible (AXFR first)"}[mode]
        print(f"{what:<44}{'':>9}{'':>7}{row['p50_ms'] / 1000:>10.3f}   p50 of {row['rounds']}, max "
              f"{row['max_ms']:.0f} ms")
    RESULTS.parent.mkdir(exist_ok=True)
    path = RESULTS if not args.quick else RESULTS.with_name("externaldns-quick.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["rfc2136"]
