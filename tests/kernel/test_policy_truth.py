"""NetworkPolicy truth tables with real packets.

Two node namespaces joined by a veth; nine pod namespaces (x, y, z / a, b, c)
attached by podnet's own PodDataplane in the routed model (pod default via
169.254.1.1, /32 routes on the node, /32 routes to the other node's pods). Each
pod serves TCP and UDP 80 and 81 (SCTP is not in this kernel). Each node runs a
PolicyProgrammer for its own pods, fed the objects of every case step; probes
from all nine pods run in parallel, and every blocked pair must time out (a
drop), never be refused.

Every test runs against both policy backends: nftables (the forward hook) and
ebpf (tc programs on each pod's host-side veth, maps pinned in a bpffs the
fixture mounts in a temporary directory).

Services: the Service dataplane is another table; here each node carries one
stand-in DNAT rule (table `ip pntest-svc`, prerouting) mapping each pod's
Service address 10.96.0.N to the pod, which is all a ClusterIP does to a packet
before the forward hook where policy runs. The eBPF backend sees a pod's packet
at its veth, before prerouting, where podnet's eBPF Services have translated it
already; its stand-in is the same DNAT in each pod's own namespace (output), so
the packet leaves the pod translated, as a connect-time Service would.

Loopback pairs (a pod to itself) are not probed in the tables, as upstream's e2e
ignores them: such traffic never leaves the pod's namespace, so it is always
allowed (one test checks that under deny-all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.nsutil import PYTHON, in_ns, namespaces, py_in
from tests.support.policy_cases import (
    NAMESPACES,
    PODS,
    CaseWorld,
    Matrix,
    Probe,
    load_cases,
    node_of,
    pod_ip,
    service_ip,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NODES = {"n1": "10.99.0.1", "n2": "10.99.0.2"}
TIMEOUT = 1.0
CASES = [c for c in load_cases(Path(__file__).parent.parent / "policy_cases") if c.kernel]
KERNEL_PROTOCOLS = ("TCP", "UDP")

BACKENDS = ("nftables", "ebpf")

RUNNER = r"""
import dataclasses, json, sys
from podnet.dataplane.nft import nft_apply
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.applier import PolicyProgrammer
if sys.argv[1] == "nftables":
    pp = PolicyProgrammer()
else:
    from podnet.ebpf.bpffs import PinDir, instance_name
    from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer
    pp = EbpfPolicyProgrammer(PinDir.for_instance(instance_name("node"), bpffs=sys.argv[2]))
def broken(script):
    nft_apply(script + "add rule ip podnet-policy no-such-chain drop\n")
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "sync":
            ch = pp.sync([Pod.model_validate(x) for x in cmd["pods"]],
                         [Namespace.model_validate(x) for x in cmd["namespaces"]],
                         [NetworkPolicy.model_validate(x) for x in cmd["policies"]], cmd["local"])
            out = {"ok": True, "changes": dataclasses.asdict(ch)}
            if cmd.get("verify"):
                out["verify"] = pp.verify()
        elif cmd["op"] == "break":
            pp.applier.run = broken
            out = {"ok": True}
        elif cmd["op"] == "unbreak":
            pp.applier.run = nft_apply
            out = {"ok": True}
    except Exception as e:
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


@dataclasses.dataclass
class Cluster:
    backend: str
    nodes: dict[str, str]  # node -> netns
    pods: dict[str, str]  # pod -> netns
    runners: dict[str, subprocess.Popen]

    def sync(self, world: CaseWorld, verify: bool = True) -> dict[str, dict]:
        pods = [p.to_dict() for p in world.pods()]
        nss = [n.to_dict() for n in world.namespaces()]
        pols = [p.to_dict() for p in world.policy_list()]
        out = {}
        for node in self.runners:
            local = [pod_ip(p) for p in PODS if node_of(p) == node]
            cmd = {"op": "sync", "pods": pods, "namespaces": nss, "policies": pols, "local": local, "verify": verify}
            out[node] = self.call(node, cmd)
        return out

    def call(self, node: str, cmd: dict) -> dict:
        proc = self.runners[node]
        assert proc.stdin and proc.stdout
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"policy runner on {node} exited: {proc.stderr.read() if proc.stderr else ''}")
        return json.loads(line)

    def probe(self, probes: list[Probe], sources: list[str] | None = None) -> dict[tuple[int, str, str], dict]:
        """Results per (probe index, source, destination), all sources at once."""
        sources = sources or list(PODS)
        procs = {}
        for s in sources:
            targets = []
            for i, pr in enumerate(probes):
                for d in PODS:
                    if d != s:
                        host = service_ip(d) if pr.via_service else pod_ip(d)
                        targets.append((i, d, f"{pr.protocol.lower()}:{host}:{pr.port}"))
            procs[s] = (targets, subprocess.Popen(
                ["ip", "netns", "exec", self.pods[s], PYTHON, "-m", "podnet.lab.probe", "--timeout", str(TIMEOUT),
                 *(t[2] for t in targets)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = {}
        for s, (targets, proc) in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            for (i, d, _), r in zip(targets, json.loads(out), strict=True):
                results[(i, s, d)] = r
        return results


def check_probes(cluster: Cluster, probes: list[Probe], where: str) -> None:
    results = cluster.probe(probes)
    problems = []
    for i, pr in enumerate(probes):
        got = Matrix(list(PODS), list(PODS), {s: {} for s in PODS})
        for s in PODS:
            for d in PODS:
                if s == d:
                    got.allowed[s][d] = pr.expect.allowed[s][d]
                    continue
                r = results[(i, s, d)]
                got.allowed[s][d] = bool(r["ok"])
                if r["ok"] and r["name"] != d:
                    problems.append(f"{pr.label} {s} -> {d}: answered by {r['name']}")
                if not r["ok"] and r["error"] != "timeout":
                    problems.append(f"{pr.label} {s} -> {d}: blocked with {r['error']!r}, not a silent drop")
        diff = pr.expect.diff(got, ignore_loopback=True)
        if diff:
            problems.append(f"{where} {pr.label}:\n  " + "\n  ".join(diff) + "\nexpected:\n" + pr.expect.format()
                            + "\nkernel:\n" + got.format())
    assert not problems, "\n".join(problems)


def _start_runner(node_ns: str, backend: str, pin_dir: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", node_ns, PYTHON, "-c", RUNNER, backend, pin_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _svc_dnat(hook: str) -> str:
    svc = ", ".join(f"{service_ip(p)} : {pod_ip(p)}" for p in PODS)
    return f"""table ip pntest-svc {{
  chain svc {{ type nat hook {hook} priority -100; policy accept;
    ip daddr 10.96.0.0/24 dnat to ip daddr map {{ {svc} }}
  }}
}}
"""


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request):
    backend = request.param
    procs: list[subprocess.Popen] = []
    with namespaces() as ns, tempfile.TemporaryDirectory() as tmp, bpffs(backend) as pins:
        try:
            nodes = {n: ns.new(n) for n in NODES}
            in_ns(nodes["n1"], "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
                  "netns", nodes["n2"])
            for n, addr in NODES.items():
                in_ns(nodes[n], "ip", "addr", "add", f"{addr}/30", "dev", "eth1")
                in_ns(nodes[n], "ip", "link", "set", "eth1", "up")
                in_ns(nodes[n], "sysctl", "-qw", "net.ipv4.ip_forward=1")
            pods = {p: ns.new(f"p{i}") for i, p in enumerate(PODS)}
            for n in NODES:
                mine = [(f"c{i}", f"/run/netns/{pods[p]}", pod_ip(p)) for i, p in enumerate(PODS) if node_of(p) == n]
                py_in(nodes[n], f"""
from podnet.dataplane.pods import PodDataplane
for cid, path, ip in {mine!r}:
    PodDataplane(1500).add(cid, "eth0", path, ip)
""")
                other = next(o for o in NODES if o != n)
                for p in PODS:
                    if node_of(p) != n:
                        in_ns(nodes[n], "ip", "route", "add", f"{pod_ip(p)}/32", "via", NODES[other])
                if backend == "nftables":
                    in_ns(nodes[n], "nft", "-f", "-", input=_svc_dnat("prerouting"))
            for p in PODS:
                if backend == "ebpf":
                    in_ns(pods[p], "nft", "-f", "-", input=_svc_dnat("output"))
                ports = [a for proto in ("tcp", "udp") for port in (80, 81) for a in ("--port", f"{proto}:{port}")]
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", pods[p], PYTHON, "-m", "podnet.lab.podserver", "--name", p, *ports,
                     "--ready-file", f"{tmp}/{p.replace('/', '-')}"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
            for n in NODES:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", nodes[n], PYTHON, "-m", "podnet.lab.podserver", "--name", n,
                     "--port", "tcp:8080", "--ready-file", f"{tmp}/{n}"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(os.listdir(tmp)) < len(PODS) + len(NODES):
                time.sleep(0.05)
            assert len(os.listdir(tmp)) == len(PODS) + len(NODES), "pod servers did not start"
            runners = {n: _start_runner(nodes[n], backend, pins) for n in NODES}
            procs.extend(runners.values())
            yield Cluster(backend, nodes, pods, runners)
        finally:
            for p in procs:  # only the processes started here, by PID
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()


@contextlib.contextmanager
def bpffs(backend: str) -> Iterator[str]:
    """A bpffs of the test's own in a temporary directory (the eBPF backend's pins)."""
    with tempfile.TemporaryDirectory(prefix="pnbpf") as d:
        if backend != "ebpf":
            yield d
            return
        subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
        try:
            yield d
        finally:
            subprocess.run(["umount", d], check=True)


def _open(port: int, proto: str, via_service: bool = False) -> Probe:
    m = Matrix(list(PODS), list(PODS), {s: dict.fromkeys(PODS, True) for s in PODS})
    return Probe(port, proto, m, via_service)


def test_without_policy_every_pod_reaches_every_pod(cluster):
    assert all(r["ok"] for r in cluster.sync(CaseWorld(CASES[0])).values())
    check_probes(cluster, [_open(80, "TCP"), _open(81, "UDP"), _open(81, "TCP", via_service=True)], "no policy")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(cluster, case):
    world = CaseWorld(case)
    try:
        for i, step in enumerate(case.steps):
            world.step(step)
            for node, out in cluster.sync(world).items():
                assert out["ok"], f"{node}: {out.get('error')}"
                assert out["verify"] == [], f"{node}: kernel differs from what was applied: {out['verify']}"
            probes = [p for p in step.probes if p.protocol in KERNEL_PROTOCOLS]
            if probes:
                check_probes(cluster, probes, f"{case.name} step {i}")
    finally:
        cluster.sync(CaseWorld(case), verify=False)  # no policies: the next case starts open


def _deny_all_world(egress: bool = True) -> CaseWorld:
    from tests.support.policy_cases import Case, Step, _policy

    spec = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"] if egress else ["Ingress"]}
    pols = [_policy({"metadata": {"name": "deny", "namespace": ns}, "spec": spec}, "test") for ns in NAMESPACES]
    world = CaseWorld(Case("deny", "", [], True, {}))
    world.step(Step(pols, [], []))
    return world


def _tcp(ns: str, host: str, port: int) -> dict:
    out = in_ns(ns, PYTHON, "-m", "podnet.lab.probe", "--timeout", str(TIMEOUT), f"tcp:{host}:{port}").stdout
    return json.loads(out)[0]


def test_a_pod_and_its_own_node_always_reach_each_other(cluster):
    world = _deny_all_world()
    try:
        assert all(r["ok"] for r in cluster.sync(world).values())
        xa = "x/a"
        own = node_of(xa)
        other = next(n for n in NODES if n != own)
        assert _tcp(cluster.nodes[own], pod_ip(xa), 80)["ok"], "the pod's own node must always reach it"
        assert _tcp(cluster.pods[xa], NODES[own], 8080)["ok"], "the pod must always reach its own node"
        # another node is just an address: deny-all ingress applies to it
        assert _tcp(cluster.nodes[other], pod_ip(xa), 80)["error"] == "timeout"
        # and pods are isolated from each other
        assert _tcp(cluster.pods["y/b"], pod_ip(xa), 80)["error"] == "timeout"
    finally:
        cluster.sync(CaseWorld(CASES[0]), verify=False)


def test_a_pod_always_reaches_itself(cluster):
    world = _deny_all_world()
    try:
        assert all(r["ok"] for r in cluster.sync(world).values())
        for p in ("x/a", "y/b"):
            got = _tcp(cluster.pods[p], pod_ip(p), 80)
            assert got["ok"] and got["name"] == p, f"{p} must reach itself under deny-all: {got}"
        assert _tcp(cluster.pods["x/a"], pod_ip("x/b"), 80)["error"] == "timeout"  # others stay isolated
    finally:
        cluster.sync(CaseWorld(CASES[0]), verify=False)


def test_a_refused_change_keeps_the_old_ruleset(cluster):
    if cluster.backend != "nftables":
        pytest.skip("nftables transactions (the eBPF maps' drift: test_policy_ebpf.py)")
    world = _deny_all_world(egress=False)
    open_world = CaseWorld(CASES[0])
    try:
        assert all(r["ok"] for r in cluster.sync(world).values())
        for n in NODES:
            assert cluster.call(n, {"op": "break"})["ok"]
        out = cluster.sync(open_world, verify=False)
        assert all(not r["ok"] and "previous ruleset stays" in r["error"] for r in out.values()), out
        # still isolated: nothing of the refused change landed
        assert _tcp(cluster.pods["y/b"], pod_ip("x/a"), 80)["error"] == "timeout"
        for n in NODES:
            cluster.call(n, {"op": "unbreak"})
        out = cluster.sync(open_world)
        assert all(r["ok"] and r["changes"]["full"] and r["verify"] == [] for r in out.values()), out
        assert _tcp(cluster.pods["y/b"], pod_ip("x/a"), 80)["ok"]
    finally:
        for n in NODES:
            cluster.call(n, {"op": "unbreak"})
        cluster.sync(open_world, verify=False)


def test_a_table_changed_behind_our_back_is_rewritten(cluster):
    if cluster.backend != "nftables":
        pytest.skip("the nftables table (the eBPF maps' drift: test_policy_ebpf.py)")
    world = _deny_all_world(egress=False)
    open_world = CaseWorld(CASES[0])
    node = node_of("x/a")
    try:
        assert all(r["ok"] for r in cluster.sync(world).values())
        # someone deletes the table: the next diff is refused by the kernel and the table is rewritten whole
        in_ns(cluster.nodes[node], "nft", "delete", "table", "ip", "podnet-policy")
        assert _tcp(cluster.pods["y/b"], pod_ip("x/a"), 80)["ok"]
        world.policies.pop("z/deny")
        out = cluster.sync(world)[node]
        assert out["ok"] and out["changes"]["full"] and out["verify"] == [], out
        assert _tcp(cluster.pods["y/b"], pod_ip("x/a"), 80)["error"] == "timeout"
        # someone empties the dispatch map: verify notices, and the next sync rewrites the table
        in_ns(cluster.nodes[node], "nft", "flush", "map", "ip", "podnet-policy", "ingress_dispatch")
        out = cluster.sync(world)[node]
        assert out["verify"], "a flushed dispatch map went unnoticed"
        out = cluster.sync(world)[node]
        assert out["changes"]["full"] and out["verify"] == []
        assert _tcp(cluster.pods["y/b"], pod_ip("x/a"), 80)["error"] == "timeout"
    finally:
        cluster.sync(open_world, verify=False)
