"""Additional networks per pod: what podnet adds per attachment.

One pod at a time (sequential), then bursts of 30 pods started at once on one node, each
with 0, 1 or 3 additional networks
(macvlan on the node's data0 link, host-local IPAM), through podnet-cni: the agent's CNI
handler makes eth0, then runs the reference macvlan plugin for every network named by the
pod's annotation k8s.v1.cni.cncf.io/networks, writes the records and the network-status
annotation. The baseline, in the same run on the same node: podnet-cni for eth0 alone, then
the same macvlan plugin with the same configurations invoked directly, once per network, as a
runtime would chain them (no NAD lookup, no records, no status). The difference divided by
the number of networks is podnet's overhead per attachment (the target: under 5 ms).

Then the IPAM plugin alone: macvlan invoked directly (no podnet-cni, as any runtime or Multus
runs a network) with `"ipam": {"type": "podnet-ipam"}`, which executes podnet-ipam (the static
podnet-cni executable under that name) and asks the agent, against the same macvlan with
host-local, in turn, one pod at a time and in bursts of 30; every podnet-ipam address in a
burst must be different.

Not a test: prints a table and writes bench/results/multinet.json. Needs root (network
namespaces); nothing outside the namespaces it creates is touched.

    sudo .venv/bin/python bench/bench_multinet.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
EXTRA = (0, 1, 3)
RESULTS = os.path.join(HERE, "results", "multinet.json")
NAMESPACE = "bench"


def quartiles(xs: list[float]) -> dict[str, float]:
    """Median and quartiles of a sorted list (one value: all three are it)."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"q1": round(q[0], 2), "median": round(q[1], 2), "q3": round(q[2], 2)}


def ipam_confs(data_dir: str, sock: str) -> list[dict]:
    """The same macvlan network with host-local (the baseline) and with podnet-ipam."""
    base = {"cniVersion": "1.0.0", "name": "underlay", "type": "macvlan", "master": "data0", "mode": "bridge"}
    return [{**base, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.70.0.0/16"}]], "dataDir": data_dir}},
            {**base, "ipam": {"type": "podnet-ipam", "pools": ["attach"], "subnet": "10.70.0.0/16",
                              "agentSocket": sock}}]


def network_conf(j: int, data_dir: str) -> dict:
    """Network j's CNI configuration: the NAD's spec.config and what the baseline runs."""
    return {"cniVersion": "1.0.0", "name": f"net-{j}", "type": "macvlan", "master": "data0", "mode": "bridge",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.{60 + j}.0.0/16"}]], "dataDir": data_dir}}


# ---------------------------------------------------------------- driver (runs inside the node namespace)


def invoke(plugin: str, conf: bytes, command: str, cid: str, netns: str, ifname: str, pod: str,
           cni_path: str) -> tuple[float, bytes, int]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_PATH": cni_path, "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod}",
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    start = time.perf_counter()
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True)
    return time.perf_counter() - start, proc.stdout, proc.returncode


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (utime, stime, cutime,
    cstime): the agent's own threads plus every delegate it ran."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def runtime_cpu() -> float:
    """CPU seconds of this driver (the runtime: it starts podnet-cni, and macvlan itself in the
    direct case) and of the plugin executables it ran and waited for (with their IPAM)."""
    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def burst(fn, n: int) -> tuple[float, list]:
    barrier = threading.Barrier(n + 1)
    results: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def driver(args: argparse.Namespace) -> None:
    podnet_conf = args.podnet_conf.encode()
    pods = args.pods.split(",")
    nets = [json.dumps(c).encode() for c in json.loads(args.networks)]
    macvlan = os.path.join(REFERENCE, "macvlan")
    out: dict = {"failures": []}

    def check(what: str, rc: int, stdout: bytes) -> None:
        if rc != 0:
            out["failures"].append(f"{what}: {stdout.decode(errors='replace')[:300]}")

    # Warm-up: IPAM blocks, the host-local directories.
    _, so, rc = invoke(args.plugin, podnet_conf, "ADD", "warmup", f"/run/netns/{pods[0]}", "eth0", "warmup",
                       args.cni_path)
    check("warm-up", rc, so)
    invoke(args.plugin, podnet_conf, "DEL", "warmup", f"/run/netns/{pods[0]}", "eth0", "warmup", args.cni_path)

    for k in EXTRA:
        row = out.setdefault(str(k), {"podnet_add": [], "podnet_del": [], "direct_add": [], "direct_del": [],
                                      "podnet_wall": [], "direct_wall": [], "seq_podnet_add": [],
                                      "seq_direct_add": [], "rounds": []})
        for r in range(args.rounds):  # one pod at a time, podnet and direct in turn
            netns = f"/run/netns/{pods[0]}"
            cid = f"s{k}r{r}-{uuid.uuid4().hex[:8]}"
            dt, so, rc = invoke(args.plugin, podnet_conf, "ADD", cid, netns, "eth0", f"k{k}-0", args.cni_path)
            check(f"sequential podnet ADD k={k}", rc, so)
            row["seq_podnet_add"].append(dt)
            invoke(args.plugin, podnet_conf, "DEL", cid, netns, "eth0", f"k{k}-0", args.cni_path)
            steps = [(f"net{j}", nets[j - 1]) for j in range(1, k + 1)]
            dt, so, rc = invoke(args.plugin, podnet_conf, "ADD", "d" + cid, netns, "eth0", "direct-0", args.cni_path)
            check(f"sequential direct ADD k={k}", rc, so)
            for ifname, conf in steps:
                t, so, rc = invoke(macvlan, conf, "ADD", "d" + cid, netns, ifname, "direct-0", args.cni_path)
                check(f"sequential direct ADD {ifname}", rc, so)
                dt += t
            row["seq_direct_add"].append(dt)
            for ifname, conf in reversed(steps):
                invoke(macvlan, conf, "DEL", "d" + cid, netns, ifname, "direct-0", args.cni_path)
            invoke(args.plugin, podnet_conf, "DEL", "d" + cid, netns, "eth0", "direct-0", args.cni_path)
    # Bursts: in rounds, each round one burst per side and scenario, the side that goes first
    # alternating, so that the load of the moment weighs on both alike; the difference is
    # taken per round (podnet's burst against the direct burst next to it).
    def cpu_now() -> float:
        return process_cpu(args.agent_pid) + runtime_cpu()

    for r in range(args.bursts):
        for k in EXTRA:
            row = out[str(k)]
            cids = [f"k{k}r{r}p{i}-{uuid.uuid4().hex[:8]}" for i in range(len(pods))]
            dcids = [f"d{c}" for c in cids]

            def podnet(command: str, i: int, k=k, cids=cids):
                dt, so, rc = invoke(args.plugin, podnet_conf, command, cids[i], f"/run/netns/{pods[i]}", "eth0",
                                    f"k{k}-{i}", args.cni_path)
                check(f"podnet {command} k={k}", rc, so)
                if command == "ADD" and rc == 0:
                    got = json.loads(so)
                    names = [x["name"] for x in got["interfaces"] if x.get("sandbox")]
                    if names != ["eth0", *[f"net{j}" for j in range(1, k + 1)]]:
                        out["failures"].append(f"podnet ADD k={k}: interfaces {names}")
                return dt

            def direct(command: str, i: int, k=k, dcids=dcids):
                netns = f"/run/netns/{pods[i]}"
                total = 0.0
                steps = [("eth0", None)] + [(f"net{j}", nets[j - 1]) for j in range(1, k + 1)]
                for ifname, conf in (steps if command == "ADD" else list(reversed(steps))):
                    if conf is None:
                        dt, so, rc = invoke(args.plugin, podnet_conf, command, dcids[i], netns, "eth0",
                                            f"direct-{i}", args.cni_path)
                    else:
                        dt, so, rc = invoke(macvlan, conf, command, dcids[i], netns, ifname, f"direct-{i}",
                                            args.cni_path)
                    check(f"direct {command} {ifname}", rc, so)
                    total += dt
                return total

            this_round = {}
            sides = (("podnet", podnet), ("direct", direct))
            for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                cpu = cpu_now()
                wall, dts = burst(lambda i, fn=fn: fn("ADD", i), len(pods))
                add_cpu = cpu_now() - cpu
                row[f"{side}_add"] += dts
                row[f"{side}_wall"].append(wall)
                _, del_dts = burst(lambda i, fn=fn: fn("DEL", i), len(pods))
                row[f"{side}_del"] += del_dts
                this_round[side] = {"add_p50": statistics.median(dts), "add_cpu": add_cpu}
            row["rounds"].append(this_round)

    # The IPAM plugin alone: macvlan with host-local, then with podnet-ipam, in turn.
    ipam = out["ipam"] = {name: {"seq_add": [], "seq_del": [], "add": [], "del": [], "wall": []}
                          for name in ("host-local", "podnet-ipam")}
    confs = dict(zip(ipam, [json.dumps(c).encode() for c in json.loads(args.ipam_networks)], strict=True))
    for r in range(args.rounds):
        for name, conf in confs.items():
            cid = f"i{r}-{uuid.uuid4().hex[:8]}"
            for command in ("ADD", "DEL"):
                dt, so, rc = invoke(macvlan, conf, command, cid, f"/run/netns/{pods[0]}", "net1", "ipam-0",
                                    args.cni_path)
                check(f"sequential macvlan {command} with {name}", rc, so)
                ipam[name][f"seq_{command.lower()}"].append(dt)
    for r in range(args.bursts):
        for name, conf in confs.items():
            cids = [f"b{r}p{i}-{uuid.uuid4().hex[:8]}" for i in range(len(pods))]
            addresses: list[str] = []

            def one(command: str, i: int, conf=conf, cids=cids, addresses=addresses, name=name):
                dt, so, rc = invoke(macvlan, conf, command, cids[i], f"/run/netns/{pods[i]}", "net1", f"ipam-{i}",
                                    args.cni_path)
                check(f"macvlan {command} with {name}", rc, so)
                if command == "ADD" and rc == 0:
                    addresses.append(json.loads(so)["ips"][0]["address"])
                return dt

            wall, dts = burst(lambda i: one("ADD", i), len(pods))
            ipam[name]["add"] += dts
            ipam[name]["wall"].append(wall)
            if len(set(addresses)) != len(pods):
                out["failures"].append(f"{name}: {len(set(addresses))} different addresses for {len(pods)} pods")
            _, dts = burst(lambda i: one("DEL", i), len(pods))
            ipam[name]["del"] += dts
    links = []
    for p in pods:
        got = subprocess.run(["ip", "netns", "exec", p, "ip", "-o", "link", "show"], capture_output=True, text=True)
        links += [ln.split(":")[1].strip() for ln in got.stdout.splitlines() if "lo:" not in ln]
    out["leftover_links"] = links
    print(json.dumps(out))


# ---------------------------------------------------------------- orchestration (root namespace)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of bursts, 10 sequential pods")
    ap.add_argument("--rounds-of-bursts", type=int, help="rounds of bursts (default 10; --quick 3)")
    ap.add_argument("--agent-log", help="the agent's log (level info: every request's time and CPU) into this file")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    for name in ("plugin", "podnet-conf", "pods", "networks", "ipam-networks", "cni-path"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    ap.add_argument("--bursts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--agent-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return 0
    if os.geteuid() != 0:
        print("bench_multinet: needs root (network namespaces)", file=sys.stderr)
        return 1

    from podnet.cni.install import install_plugin
    from podnet.model.objects import IPPool, NetworkAttachmentDefinition, Pod
    from podnet.multinet import ANNOTATION_NETWORKS
    from podnet.store import open_store
    from podnet.store.objects import ObjectStore

    bursts, rounds = (3, 10) if args.quick else (10, 40)
    bursts = args.rounds_of_bursts or bursts
    tag = f"mnb{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    created: list[str] = []
    agent: subprocess.Popen | None = None

    def netns(name: str) -> str:
        full = f"{tag}-{name}"
        created.append(full)
        sh("ip", "netns", "add", full)
        sh("ip", "netns", "exec", full, "ip", "link", "set", "lo", "up")
        return full

    tmp = tempfile.mkdtemp(prefix="bench-multinet-")
    try:
        node, seg = netns("node"), netns("seg")
        sh("ip", "netns", "exec", node, "ip", "link", "add", "data0", "type", "veth", "peer", "name", "up0",
           "netns", seg)
        sh("ip", "netns", "exec", node, "ip", "link", "set", "data0", "up")
        sh("ip", "netns", "exec", seg, "ip", "link", "set", "up0", "up")
        pods = [netns(f"p{i}") for i in range(BURST)]
        data_dir = os.path.join(tmp, "host-local")
        nets = [network_conf(j, data_dir) for j in range(1, max(EXTRA) + 1)]

        url = "sqlite://" + os.path.join(tmp, "podnet.db")
        kv = open_store(url)
        objects = [IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                                          "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}}),
                   IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool",
                                          "metadata": {"name": "attach"},
                                          "spec": {"cidr": "10.70.0.0/16", "blockSize": 26,
                                                   "allowedUses": ["Attachment"]}})]
        objects += [NetworkAttachmentDefinition.model_validate({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": c["name"], "namespace": NAMESPACE}, "spec": {"config": json.dumps(c)}}) for c in nets]
        for k in EXTRA:
            for i in range(BURST):
                ann = {ANNOTATION_NETWORKS: ", ".join(c["name"] for c in nets[:k])} if k else {}
                objects.append(Pod.model_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": f"k{k}-{i}", "namespace": NAMESPACE, "annotations": ann},
                    "spec": {"containers": [{"name": "c"}]}}))
        # the baseline's pods are in the store too (without the annotation): the agent reads
        # and checks a pod it knows on either side, and only the networks differ
        objects += [Pod.model_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"direct-{i}", "namespace": NAMESPACE}, "spec": {"containers": [{"name": "c"}]}})
            for i in range(BURST)]
        ObjectStore(kv).apply(objects)
        kv.close()
        sock = os.path.join(tmp, "cni.sock")
        agent_log = open(args.agent_log, "w") if args.agent_log else subprocess.DEVNULL  # noqa: SIM115
        # `ip netns exec` execs the command: agent.pid is the agent's own (the driver reads its CPU)
        agent = subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-m", "podnet.cni.serve", sock, url,
                                  "bench-node", "--log-level", "info" if args.agent_log else "warning"],
                                 stdout=subprocess.PIPE, stderr=agent_log, text=True)
        assert agent.stdout is not None
        if agent.stdout.readline().strip() != "ready":
            raise RuntimeError("the CNI server did not start")
        bindir = os.path.join(tmp, "bin")
        plugin = install_plugin(bindir)
        podnet_conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni", "agentSocket": sock}
        load_before = os.getloadavg()
        print(f"{rounds} sequential pods and {bursts} burst(s) of {BURST} pods with {', '.join(map(str, EXTRA))} "
              "additional networks, podnet and direct in turn ...", flush=True)
        proc = subprocess.run(
            ["ip", "netns", "exec", node, sys.executable, os.path.abspath(__file__), "--driver", "--plugin", plugin,
             "--podnet-conf", json.dumps(podnet_conf), "--pods", ",".join(pods), "--networks", json.dumps(nets),
             "--ipam-networks", json.dumps(ipam_confs(os.path.join(tmp, "host-local-ipam"), sock)),
             "--cni-path", f"{bindir}:{REFERENCE}", "--bursts", str(bursts), "--rounds", str(rounds),
             "--agent-pid", str(agent.pid)],
            capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"driver failed: {proc.stderr.strip()[-2000:]}")
        raw = json.loads(proc.stdout)
        load_after = os.getloadavg()
    finally:
        if args.agent_log and agent is not None:
            agent_log.close()
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

    problems = list(raw["failures"])
    if raw["leftover_links"]:
        problems.append(f"interfaces left after DEL: {raw['leftover_links'][:5]}")
    summary: dict = {}
    print(f"\none pod at a time ({rounds} each)")
    print(f"{'networks':>8} {'podnet ADD p50':>15} {'direct ADD p50':>15} {'overhead/attachment':>20}")
    for k in EXTRA:
        row = raw[str(k)]
        a, b = pct(row["seq_podnet_add"], 50), pct(row["seq_direct_add"], 50)
        seq = {"podnet_add_p50_ms": round(a, 2), "direct_add_p50_ms": round(b, 2)}
        if k:
            seq["overhead_per_attachment_ms"] = round((a - b) / k, 2)
        summary.setdefault(str(k), {})["sequential"] = seq
        print(f"{k:>8} {a:13.1f}ms {b:13.1f}ms " + (f"{(a - b) / k:18.1f}ms" if k else f"{'-':>20}"))
    print(f"\nbursts of {BURST} ({bursts} rounds, each one burst per side, the side that goes first alternating)")
    print(f"{'networks':>8} {'podnet ADD':>21} {'direct ADD':>21} {'overhead/attachment':>20} "
          f"{'podnet DEL':>11} {'direct DEL':>11} {'burst wall':>17}")
    print(f"{'':>8} {'p50':>10} {'p99':>10} {'p50':>10} {'p99':>10} {'p50':>10} {'p99':>9} {'p50':>11} {'p50':>11} "
          f"{'podnet':>8} {'direct':>8}")
    for k in EXTRA:
        row = raw[str(k)]
        s = {key: {"p50_ms": round(pct(row[key], 50), 2), "p99_ms": round(pct(row[key], 99), 2), "n": len(row[key])}
             for key in ("podnet_add", "podnet_del", "direct_add", "direct_del")}
        s["podnet_wall_ms"] = round(statistics.median(row["podnet_wall"]) * 1000, 1)
        s["direct_wall_ms"] = round(statistics.median(row["direct_wall"]) * 1000, 1)
        if k:
            s["overhead_per_attachment_ms"] = {
                p: round((s["podnet_add"][f"{p}_ms"] - s["direct_add"][f"{p}_ms"]) / k, 2) for p in ("p50", "p99")}
        s["rounds"] = row["rounds"]
        if k:
            diffs = sorted((rd["podnet"]["add_p50"] - rd["direct"]["add_p50"]) * 1000 / k for rd in row["rounds"])
            s["round_overhead_per_attachment_ms"] = quartiles(diffs)
        s["cpu_per_pod_ms"] = {side: round(statistics.median(rd[side]["add_cpu"] for rd in row["rounds"])
                                           * 1000 / BURST, 1) for side in ("podnet", "direct")}
        if k:
            s["cpu_per_attachment_ms"] = quartiles(sorted(
                (rd["podnet"]["add_cpu"] - rd["direct"]["add_cpu"]) * 1000 / BURST / k for rd in row["rounds"]))
        summary[str(k)]["burst"] = s
        over = s.get("overhead_per_attachment_ms")
        print(f"{k:>8} {s['podnet_add']['p50_ms']:8.1f}ms {s['podnet_add']['p99_ms']:8.1f}ms "
              f"{s['direct_add']['p50_ms']:8.1f}ms {s['direct_add']['p99_ms']:8.1f}ms "
              + (f"{over['p50']:8.1f}ms {over['p99']:7.1f}ms " if over else f"{'-':>10} {'-':>9} ")
              + f"{s['podnet_del']['p50_ms']:9.1f}ms {s['direct_del']['p50_ms']:9.1f}ms "
              f"{s['podnet_wall_ms']:6.0f}ms {s['direct_wall_ms']:6.0f}ms")
    print(f"\nbursts of {BURST}, podnet against the direct burst of the same round ({bursts} rounds), and CPU: "
          "the agent (its threads and the delegates it ran), the runtime and the plugins it ran")
    print(f"{'networks':>8} {'ADD p50 difference/attachment':>30} {'CPU per pod':>19} {'CPU/attachment':>23}")
    print(f"{'':>8} {'median':>10} {'[q1, q3]':>19} {'podnet':>9} {'direct':>9} {'median':>9} {'[q1, q3]':>13}")
    for k in EXTRA:
        s = summary[str(k)]["burst"]
        cpu = s["cpu_per_pod_ms"]
        line = f"{k:>8} "
        if k:
            d, c = s["round_overhead_per_attachment_ms"], s["cpu_per_attachment_ms"]
            line += f"{d['median']:+8.1f}ms {'[' + format(d['q1'], '+.1f') + ', ' + format(d['q3'], '+.1f') + ']':>19} "
        else:
            line += f"{'-':>10} {'':>19} "
        line += f"{cpu['podnet']:7.1f}ms {cpu['direct']:7.1f}ms "
        if k:
            line += f"{c['median']:+7.1f}ms {'[' + format(c['q1'], '+.1f') + ', ' + format(c['q3'], '+.1f') + ']':>13}"
        else:
            line += f"{'-':>9}"
        print(line)
    print(f"\none macvlan network invoked directly, by its IPAM ({rounds} one at a time, {bursts} burst(s) of {BURST})")
    print(f"{'ipam':>12} {'ADD p50':>10} {'DEL p50':>10} {'burst ADD p50':>14} {'p99':>10} {'burst wall':>11}")
    ipam_summary = {}
    for name, row in raw["ipam"].items():
        s = {"seq_add_p50_ms": round(pct(row["seq_add"], 50), 2), "seq_del_p50_ms": round(pct(row["seq_del"], 50), 2),
             "burst_add_p50_ms": round(pct(row["add"], 50), 2), "burst_add_p99_ms": round(pct(row["add"], 99), 2),
             "burst_wall_ms": round(statistics.median(row["wall"]) * 1000, 1)}
        ipam_summary[name] = s
        print(f"{name:>12} {s['seq_add_p50_ms']:8.1f}ms {s['seq_del_p50_ms']:8.1f}ms {s['burst_add_p50_ms']:12.1f}ms "
              f"{s['burst_add_p99_ms']:8.1f}ms {s['burst_wall_ms']:9.0f}ms")
    hl, pi = ipam_summary["host-local"], ipam_summary["podnet-ipam"]
    ipam_summary["podnet_ipam_over_host_local"] = {
        "seq_add_ratio": round(pi["seq_add_p50_ms"] / hl["seq_add_p50_ms"], 2),
        "seq_add_delta_ms": round(pi["seq_add_p50_ms"] - hl["seq_add_p50_ms"], 2),
        "burst_add_ratio": round(pi["burst_add_p50_ms"] / hl["burst_add_p50_ms"], 2)}
    print(f"podnet-ipam / host-local: ADD {ipam_summary['podnet_ipam_over_host_local']['seq_add_ratio']:.2f}x one at a "
          f"time ({ipam_summary['podnet_ipam_over_host_local']['seq_add_delta_ms']:+.1f} ms), "
          f"{ipam_summary['podnet_ipam_over_host_local']['burst_add_ratio']:.2f}x in bursts")
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    print("checks: " + ("every ADD gave eth0 and every network, podnet-ipam addresses unique in every burst; "
                        "nothing left after DEL" if not problems
                        else "FAILED: " + "; ".join(problems[:5])))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"quick": args.quick, "burst": BURST, "bursts": bursts, "rounds": rounds, "cpus": os.cpu_count(),
                   "loadavg": [load_before[0], load_after[0]], "scenarios": summary, "ipam": ipam_summary,
                   "problems": problems,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(RESULTS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
