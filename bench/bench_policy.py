"""NetworkPolicy benchmark: program size and change latency, and connect latency.

    .venv/bin/python bench/bench_policy.py [--quick]

Runs as root; everything happens in network namespaces it creates and deletes.
For each (pods, policies) shape it programs a synthetic cluster into an empty
table and times: the apply from empty, one policy change, one label change of
a local pod (compile + the nft transaction, end to end), and counts kernel
elements, chains and rules. Then TCP connect latency between two pods through a
node with 0 policies and with 1000 (the server selected by many of them, the
allowing rule in the last one). Prints a table and writes bench/results/policy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NAMESPACES = 20
APPS = 50
LOCAL_PODS = 110  # a node's usual pod limit


def synthetic(n_pods: int, n_policies: int):
    from podnet.model.objects import Namespace, NetworkPolicy, Pod

    nss = [Namespace.model_validate({"metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 5}"}}})
           for i in range(NAMESPACES)]
    pods = []
    for i in range(n_pods):
        pods.append(Pod.model_validate({
            "metadata": {"name": f"p{i}", "namespace": f"ns{i % NAMESPACES}",
                         "labels": {"app": f"app{i % APPS}", "tier": ("web", "api", "db")[i % 3]}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8000 + i % 3}]}]},
            "status": {"podIP": f"10.64.{i // 250}.{i % 250 + 1}"},
        }))
    pols = []
    for j in range(n_policies):
        ns = f"ns{j % NAMESPACES}"
        spec = {
            "podSelector": {"matchLabels": {"app": f"app{j % APPS}"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": f"app{(j + 1) % APPS}"}}},
                          {"namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}},
                           "podSelector": {"matchLabels": {"tier": "web"}}}],
                 "ports": [{"port": 80}, {"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": [f"192.168.{j % 256}.0/24"]}}]},
            ],
        }
        if j % 4 == 0:
            spec["egress"] = [{"to": [{"namespaceSelector": {"matchLabels": {"team": f"t{(j + 2) % 5}"}}}],
                               "ports": [{"port": 443}, {"port": 53, "protocol": "UDP"}]}]
            spec["policyTypes"] = ["Ingress", "Egress"]
        pols.append(NetworkPolicy.model_validate({"metadata": {"name": f"pol{j}", "namespace": ns}, "spec": spec}))
    local = [p.status.pod_ip for p in pods[:LOCAL_PODS]]
    return pods, nss, pols, local


def inner_shape(n_pods: int, n_policies: int) -> dict:
    """Runs inside a fresh network namespace."""
    from podnet.model.objects import NetworkPolicy
    from podnet.policy.applier import PolicyProgrammer

    pods, nss, pols, local = synthetic(n_pods, n_policies)
    pp = PolicyProgrammer()
    t = time.perf_counter()
    ch = pp.sync(pods, nss, pols, local)
    t_full = time.perf_counter() - t
    st = pp.state

    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def timed(fn, prog, apply, kernel_key: str, repeat: int = 7) -> tuple[float, dict]:
        """Median time of `repeat` changes made by fn: compile with prog's compiler, then apply."""
        times, last = [], None
        for k in range(repeat):
            args = fn(k)
            u0 = cpu()
            t0 = time.perf_counter()
            inputs = prog.inputs.inputs(*args)
            state = prog.compiler.compile(inputs)
            t1 = time.perf_counter()
            last = apply(state, inputs)
            prog.state = state
            times.append((time.perf_counter() - t0, t1 - t0, cpu() - u0))
        return statistics.median(t[0] for t in times), {
            "compile_ms": round(statistics.median(t[1] for t in times) * 1000, 2),
            kernel_key: round(statistics.median(t[0] - t[1] for t in times) * 1000, 2),
            "cpu_ms": round(statistics.median(t[2] for t in times) * 1000, 2),
            "commands": getattr(last, "commands", 0) or getattr(last, "written", 0) + getattr(last, "deleted", 0),
            "full": bool(last and last.full)}

    def nft_apply(state, inputs):
        return pp.applier.apply(state)

    # one policy change: the first policy gets another peer namespace, back and forth
    def policy_change(k: int):
        old = pols[0]
        spec = old.spec.model_dump(by_alias=True, exclude_none=True)
        spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"] = f"app{(k + 7) % APPS}"
        pols[0] = NetworkPolicy.model_validate({"metadata": {"name": old.name, "namespace": old.namespace},
                                                "spec": spec})
        return pods, nss, pols, local

    t_pol, pol_info = timed(policy_change, pp, nft_apply, "nft_ms")

    # one label change of a local pod: it leaves its app (selector sets, dispatch) and comes back
    def label_change(k: int):
        p = pods[3]
        labels = {**p.labels, "app": f"app{(3 + (k % 2) * 11) % APPS}"}
        pods[3] = p.with_meta(labels=labels)
        return pods, nss, pols, local

    t_lab, lab_info = timed(label_change, pp, nft_apply, "nft_ms")
    listing = subprocess.run(["nft", "list", "table", "ip", "podnet-policy"], capture_output=True, text=True).stdout

    # the same changes on the eBPF backend's maps (in a bpffs of this process's own mount
    # namespace, which `ip netns exec` gave it; no interfaces to attach to)
    from podnet.ebpf.bpffs import PinDir
    from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer

    pins = tempfile.mkdtemp(prefix="pnbpf")
    sh("mount", "-t", "bpf", "bpf", pins)
    try:
        epp = EbpfPolicyProgrammer(PinDir.for_instance("bench", bpffs=pins), interfaces=dict)
        t = time.perf_counter()
        ech = epp.sync(pods, nss, pols, local)
        e_full = time.perf_counter() - t

        def maps_apply(state, inputs):
            return epp.apply(state, inputs.local_ips)

        e_pol, e_pol_info = timed(policy_change, epp, maps_apply, "maps_ms")
        e_lab, e_lab_info = timed(label_change, epp, maps_apply, "maps_ms")
        ebpf = {"apply_from_empty_ms": round(e_full * 1000, 1), "map_entries": epp.desired.entry_count(),
                "full_writes": ech.written, "policy_change_ms": round(e_pol * 1000, 2), "policy_change": e_pol_info,
                "label_change_ms": round(e_lab * 1000, 2), "label_change": e_lab_info}
        epp.maps.close()
    finally:
        subprocess.run(["umount", pins], capture_output=True)
        os.rmdir(pins)
    return {
        "pods": n_pods, "policies": n_policies, "local_pods": len(local),
        "apply_from_empty_ms": round(t_full * 1000, 1),
        "policy_change_ms": round(t_pol * 1000, 2), "policy_change": pol_info,
        "label_change_ms": round(t_lab * 1000, 2), "label_change": lab_info,
        "kernel_elements": st.element_count(), "sets": len(st.sets), "chains": st.chain_count(),
        "rules": st.rule_count(), "listing_bytes": len(listing), "full_commands": ch.commands,
        "ebpf": ebpf,
    }


# ------------------------------------------------------------------ connect latency

CLIENT = r"""
import socket, sys, time, json
host, n = sys.argv[1], int(sys.argv[2])
lat = []
for i in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, 80), timeout=2)
    lat.append(time.perf_counter() - t)
    s.close()
lat.sort()
print(json.dumps({"mean_us": sum(lat) / n * 1e6, "p50_us": lat[n // 2] * 1e6, "p99_us": lat[int(n * .99)] * 1e6}))
"""

SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


BACKENDS = ("nftables", "ebpf")


def _programmer_code(backend: str, pins: str) -> str:
    """The lines that make `pp`, the programmer of `backend` (in the node's namespace)."""
    if backend == "nftables":
        return "from podnet.policy.applier import PolicyProgrammer\npp = PolicyProgrammer()\n"
    return ("from podnet.ebpf.bpffs import PinDir\n"
            "from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer\n"
            f"pp = EbpfPolicyProgrammer(PinDir.for_instance('bench', bpffs={pins!r}))\n")


def _node(tag: str, made: list[str], servers: list[subprocess.Popen]) -> tuple[str, str]:
    """A node namespace with a client pod (10.64.0.1) and a server pod (10.64.0.2): (node, client)."""
    node, cli, srv = f"{tag}-node", f"{tag}-cli", f"{tag}-srv"
    for n in (node, cli, srv):
        sh("ip", "netns", "add", n)
        made.append(n)
        sh("ip", "netns", "exec", n, "ip", "link", "set", "lo", "up")
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # client = pod 0, server = pod 1 of the synthetic cluster (app0 in ns0, app1 in ns1)
    code = f"""
from podnet.dataplane.pods import PodDataplane
PodDataplane(1500).add("cli", "eth0", "/run/netns/{cli}", "10.64.0.1")
PodDataplane(1500).add("srv", "eth0", "/run/netns/{srv}", "10.64.0.2")
"""
    sh("ip", "netns", "exec", node, PY, "-c", code)
    server = subprocess.Popen(["ip", "netns", "exec", srv, PY, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    servers.append(server)
    assert server.stdout and server.stdout.readline().strip() == "ready"
    return node, cli


def _program_runs(pins: str, programs: str = "podnet_pol_*_pod") -> tuple[int, int]:
    """Run time (ns) and runs of the policy programs pinned under `pins` (those named like
    `programs`: the two policy programs by default, podnet_pol_guard for the guard), summed."""
    from podnet.ebpf.syscall import obj_get, prog_info

    total = [0, 0]
    for pin in Path(pins).glob(f"podnet/bench/progs/policy-*/{programs}"):
        fd = obj_get(str(pin))
        try:
            info = prog_info(fd)
        finally:
            os.close(fd)
        total[0] += info.run_time_ns
        total[1] += info.run_cnt
    return total[0], total[1]


def connect_latency(n_policies: int, n_pods: int, connects: int, rounds: int,
                    backends: tuple[str, ...] = BACKENDS) -> dict[str, list[dict]]:
    """Client and server pods behind one node per backend; rounds alternate between the
    backends and between no policy and `n_policies` (so load drift on a shared machine
    hits all alike); median of rounds. backend -> [row with 0 policies, row with n]."""
    from podnet.ebpf.syscall import enable_stats

    tag = f"pnb{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    made: list[str] = []
    servers: list[subprocess.Popen] = []
    pins = tempfile.mkdtemp(prefix="pnbpf")
    mounted = False
    stats: int | None = None
    try:
        if "ebpf" in backends:
            sh("mount", "-t", "bpf", "bpf", pins)
            mounted = True
        nodes = {b: _node(f"{tag}{b[0]}", made, servers) for b in backends}

        def program(backend: str, n: int) -> dict:
            prog = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'bench')!r})
from bench_policy import synthetic
from podnet.model.objects import NetworkPolicy
{_programmer_code(backend, pins)}
pods, nss, pols, local = synthetic({n_pods}, {n})
if pols:
    # the server is selected by every policy for app1 in ns1; the one admitting the client comes last
    pols.append(NetworkPolicy.model_validate({{"metadata": {{"name": "zz-allow", "namespace": "ns1"}},
        "spec": {{"podSelector": {{"matchLabels": {{"app": "app1"}}}},
                 "ingress": [{{"from": [{{"namespaceSelector": {{}}, "podSelector": {{"matchLabels": {{"app": "app0"}}}}}}]}}]}}}}))
    # and the client's own egress policies end with one that lets it out
    pols.append(NetworkPolicy.model_validate({{"metadata": {{"name": "zz-out", "namespace": "ns0"}},
        "spec": {{"podSelector": {{"matchLabels": {{"app": "app0"}}}}, "policyTypes": ["Egress"], "egress": [{{}}]}}}}))
pp.sync(pods, nss, pols, ["10.64.0.1", "10.64.0.2"])
d = pp.state.dispatch
g = pp.state.groups
print(json.dumps({{"elements": pp.state.element_count(),
                  "server_chains": len(g[d["ingress"]["10.64.0.2"]].policy_chains) if "10.64.0.2" in d["ingress"] else 0,
                  "client_chains": len(g[d["egress"]["10.64.0.1"]].policy_chains) if "10.64.0.1" in d["egress"] else 0}}))
"""
            return json.loads(sh("ip", "netns", "exec", nodes[backend][0], PY, "-c", prog).stdout)

        samples: dict[tuple[str, int], list[dict]] = {(b, n): [] for b in backends for n in (0, n_policies)}
        info: dict[tuple[str, int], dict] = {}
        if "ebpf" in backends:
            stats = enable_stats()  # the programs' run time is counted while this is open
        for _ in range(rounds):
            for b in backends:
                for n in (0, n_policies):
                    info[(b, n)] = program(b, n)
                    before = _program_runs(pins) if b == "ebpf" else None
                    guard_before = _program_runs(pins, "podnet_pol_guard") if b == "ebpf" else None
                    out = json.loads(sh("ip", "netns", "exec", nodes[b][1], PY, "-c", CLIENT, "10.64.0.2",
                                        str(connects)).stdout)
                    if before is not None and guard_before is not None:
                        after = _program_runs(pins)
                        out["prog_ns"] = (after[0] - before[0]) / max(1, after[1] - before[1])
                        out["prog_runs_per_connect"] = (after[1] - before[1]) / connects
                        guard_after = _program_runs(pins, "podnet_pol_guard")
                        out["guard_ns_per_connect"] = (guard_after[0] - guard_before[0]) / connects
                    samples[(b, n)].append(out)
        keys = ("mean_us", "p50_us", "p99_us", "prog_ns", "prog_runs_per_connect", "guard_ns_per_connect")
        return {b: [{"backend": b, "policies": n, "pods": n_pods, "connects": connects, "rounds": rounds,
                     **info[(b, n)], **{k: round(statistics.median(r[k] for r in samples[(b, n)]), 1)
                                        for k in keys if k in samples[(b, n)][0]}}
                    for n in (0, n_policies)] for b in backends}
    finally:
        if stats is not None:
            os.close(stats)
        for server in servers:
            server.terminate()
            server.wait(timeout=5)
        for n in reversed(made):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        if mounted:
            subprocess.run(["umount", pins], capture_output=True)
        os.rmdir(pins)


def run_shape(n_pods: int, n_policies: int) -> dict:
    name = f"pnb{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    sh("ip", "netns", "add", name)
    try:
        out = sh("ip", "netns", "exec", name, PY, str(Path(__file__).resolve()), "--inner",
                 str(n_pods), str(n_policies), timeout=1200).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three shapes and fewer connects")
    ap.add_argument("--connect-only", action="store_true", help="only the connect latency (no program shapes)")
    ap.add_argument("--inner", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "policy.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.inner:
        print(json.dumps(inner_shape(*args.inner)))
        return 0
    if os.geteuid() != 0:
        print("bench_policy needs root (network namespaces)", file=sys.stderr)
        return 1
    shapes = ([] if args.connect_only else [(100, 10), (1000, 100), (5000, 1000)] if args.quick
              else [(p, q) for p in (100, 1000, 5000) for q in (10, 100, 1000)])
    rows = []
    print(f"{'pods':>5} {'policies':>8} {'apply':>9} {'policy chg (cpu)':>17} {'label chg (cpu)':>16} "
          f"{'elements':>8} {'sets':>5} {'chains':>6} {'rules':>6} | ebpf: {'apply':>7} {'policy chg':>10} "
          f"{'label chg':>9} {'entries':>7} {'writes':>6}")
    for n_pods, n_pol in shapes:
        r = run_shape(n_pods, n_pol)
        rows.append(r)
        pc, lc, e = r["policy_change"], r["label_change"], r["ebpf"]
        print(f"{n_pods:>5} {n_pol:>8} {r['apply_from_empty_ms']:>7.0f}ms "
              f"{r['policy_change_ms']:>7.1f}ms ({pc['cpu_ms']:>4.0f}ms) "
              f"{r['label_change_ms']:>6.1f}ms ({lc['cpu_ms']:>4.0f}ms) "
              f"{r['kernel_elements']:>8} {r['sets']:>5} {r['chains']:>6} {r['rules']:>6} | "
              f"{e['apply_from_empty_ms']:>11.0f}ms {e['policy_change_ms']:>8.1f}ms {e['label_change_ms']:>7.1f}ms "
              f"{e['map_entries']:>7} {e['policy_change']['commands']:>3}/{e['label_change']['commands']:<3}", flush=True)
    connects, rounds = (1000, 3) if args.quick else (2000, 5)
    by_backend = connect_latency(1000, 5000, connects, rounds)
    print(f"\nTCP connect, client and server pods on one node ({connects} sequential connects, "
          f"median of {rounds} rounds alternating between backends and policy counts):")
    print(f"  {'policies':>8} {'nftables p50':>13} {'nftables mean':>14} {'ebpf p50':>9} {'ebpf mean':>10}  "
          f"(policies selecting: server, client)")
    for i in (0, 1):
        nf, eb = by_backend["nftables"][i], by_backend["ebpf"][i]
        print(f"  {nf['policies']:>8} {nf['p50_us']:>10.0f} us {nf['mean_us']:>11.0f} us {eb['p50_us']:>6.0f} us "
              f"{eb['mean_us']:>7.0f} us  ({nf['server_chains']}, {nf['client_chains']})")
    ratios = {b: pair[1]["p50_us"] / pair[0]["p50_us"] for b, pair in by_backend.items()}
    for b, pair in by_backend.items():
        print(f"  {b}: 1000 vs 0 policies {100 * (ratios[b] - 1):+.1f}% at p50, "
              f"{100 * (pair[1]['mean_us'] / pair[0]['mean_us'] - 1):+.1f}% mean (target < 5%)")
    e0, e1 = by_backend["ebpf"]
    print(f"  ebpf programs: {e0['prog_ns']:.0f} -> {e1['prog_ns']:.0f} ns per run, "
          f"{e1['prog_runs_per_connect']:.1f} runs per connect: "
          f"+{(e1['prog_ns'] - e0['prog_ns']) * e1['prog_runs_per_connect'] / 1000:.2f} us per connect, "
          f"{100 * (e1['prog_ns'] - e0['prog_ns']) * e1['prog_runs_per_connect'] / 1000 / e0['p50_us']:+.1f}% "
          f"of the p50 connect")
    alone = (e0["prog_ns"] * e0["prog_runs_per_connect"] + e0["guard_ns_per_connect"]) / 1000
    print(f"  ebpf with 0 policies against no programs at all: policy {e0['prog_ns'] * e0['prog_runs_per_connect'] / 1000:.2f}"
          f" us + guard {e0['guard_ns_per_connect'] / 1000:.2f} us per connect ({100 * alone / e0['p50_us']:.1f}% of the"
          f" p50; in-program time, the tc hook's own call not counted)")
    lat = by_backend["nftables"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "bench/bench_policy.py" + (" --quick" if args.quick else "")
              + (" --connect-only" if args.connect_only else ""), "shapes": rows,
              "load_average": os.getloadavg(),
              "connect_latency": lat, "connect_p50_ratio": round(ratios["nftables"], 3),
              "connect_latency_ebpf": by_backend["ebpf"], "connect_p50_ratio_ebpf": round(ratios["ebpf"], 3),
              "machine": {"cpus": os.cpu_count(), "nft": sh("nft", "--version").stdout.strip()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
