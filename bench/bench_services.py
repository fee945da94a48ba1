"""Service dataplane benchmark: podnet's nftables maps and eBPF programs vs kube-proxy's layouts.

For N Services (5 endpoints each) and each backend

    nft-maps       podnet: fixed chains, Services as map elements, element deltas
    ebpf           podnet: tc programs on the pods' interfaces, Services as BPF map
                   entries written with the batch syscalls (kernel time: not split out);
                   with the fast path on (no NetworkPolicy on the bench's node): the
                   client's and the endpoints' veths are local pods, their flows go veth
                   to veth, past the node's netfilter and conntrack
    ebpf-nofast    the same with the fast path off (every packet through the node's stack)
    ebpf-base      ebpf with the Services object given by --base-object (another build: a
                   program change's before, in the same run)
    ebpf-tcx       ebpf with its programs moved from clsact filters onto tcx links after
                   the first sync (an experiment: the agent attaches with clsact)
    ebpf-pol       ebpf with the eBPF policy programs on both veths too, no policy isolating
                   either pod: the node the agent runs with --policy-dataplane ebpf (the
                   fast path is on only there), every packet judged by policy as well
    nft-pol        nft-maps with podnet's nftables policy table for the same pods: the
                   nftables node with policy, ebpf-pol's counterpart
    iptables       kube-proxy iptables layout, iptables-restore full rewrite per sync
    kp-nft         kube-proxy nftables layout: a chain per Service and per endpoint,
                   partial syncs with a table listing each sync (as upstream)

it measures, inside a fresh set of network namespaces:

    apply_all   programming all N Services into an empty node
    add/change/delete one Service on top of them (median of --reps)
    connect latency (TCP handshake through DNAT, p50/p99) to the first and the
                last Service, and optionally iperf3 throughput through them and the
                rate of small (64-byte) UDP datagrams through the first one.

Sync times are split into the Python side (compile + diff/render, the same
compiler for every backend) and the kernel transaction (nft / iptables-restore
process). Prints a table and writes bench/results/services.json.

    .venv/bin/python bench/bench_services.py --sizes 1,1000,5000,10000,20000
    .venv/bin/python bench/bench_services.py --quick
    .venv/bin/python bench/bench_services.py --backends nft-maps,ebpf --sizes 1,1000,10000 --large
    .venv/bin/python bench/bench_services.py --backends nft-maps,ebpf --sizes 1000 --alternate 8
    .venv/bin/python bench/bench_services.py --backends nft-maps,ebpf --sizes 1000 --udp-rounds 30
    .venv/bin/python bench/bench_services.py --backends nft-maps,nft-pol,ebpf,ebpf-pol --sizes 1000 --udp-rounds 60
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import ipaddress
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

from path_cpu import ksoftirqd_pid, runtime_ns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(1, ROOT)  # tests.support

BACKENDS = ("nft-maps", "ebpf", "iptables", "kp-nft")  # the default set (ebpf-nofast: on request)
DEFAULT_CAPS = {"nft-maps": 10**9, "nft-pol": 10**9, "ebpf": 10**9, "ebpf-nofast": 10**9, "ebpf-base": 10**9, "ebpf-pol": 10**9,
                "ebpf-tcx": 10**9, "iptables": 5000, "kp-nft": 10000}
REAL_EPS = [f"10.20.0.{11 + i}" for i in range(5)]
CLUSTER_BASE = int(ipaddress.IPv4Address("10.96.0.10"))
FAKE_EP_BASE = int(ipaddress.IPv4Address("10.128.0.1"))
SERVICE_CIDR = "10.96.0.0/12"
PYTHON = sys.executable
UDP_TABLE = "pnbench_udp"  # the endpoint namespace's counter of the small-datagram test
UDP_RUNS = 3
# ebpf-base: the ebpf column with another build of the Services programs (--base-object),
# a program change's before and after in one run
BASE_OBJECT_ENV = "PODNET_BENCH_BASE_OBJECT"


# ---------------------------------------------------------------- worker (runs inside the node namespace)


def _objects(n: int):
    from podnet.model.objects import EndpointSlice, Service

    def svc(i: int, name: str, ip: str, eps: list[str], iperf: bool) -> tuple:
        ports = [{"name": "http", "port": 80, "targetPort": 8080}]
        slice_ports = [{"name": "http", "port": 8080}]
        if iperf:
            ports.append({"name": "iperf", "port": 5201, "targetPort": 5201})
            ports.append({"name": "iperf-udp", "port": 5201, "protocol": "UDP", "targetPort": 5201})
            slice_ports.append({"name": "iperf", "port": 5201})
        s = Service.model_validate({"metadata": {"name": name, "namespace": "bench", "resourceVersion": "1"},
                                    "spec": {"clusterIP": ip, "ports": ports}})
        sl = EndpointSlice.model_validate({
            "metadata": {"name": f"{name}-1", "namespace": "bench", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": slice_ports,
            "endpoints": [{"addresses": [a], "nodeName": "n2"} for a in eps]})
        return s, sl

    def udp_slice(name: str):
        """The UDP port's own slice, one endpoint: iperf3's UDP test needs its datagrams at
        the address its control connection reached (its server answers from there)."""
        return EndpointSlice.model_validate({
            "metadata": {"name": f"{name}-udp", "namespace": "bench", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "iperf-udp", "port": 5201, "protocol": "UDP"}],
            "endpoints": [{"addresses": [REAL_EPS[0]], "nodeName": "n2"}]})

    svc.udp_slice = udp_slice  # type: ignore[attr-defined]

    def fake(i: int) -> list[str]:
        return [str(ipaddress.IPv4Address(FAKE_EP_BASE + i * 5 + j)) for j in range(5)]

    services, slices = [], []
    for i in range(n):
        real = i in (0, n - 1)
        s, sl = svc(i, f"s{i:06d}", str(ipaddress.IPv4Address(CLUSTER_BASE + i)), REAL_EPS if real else fake(i), real)
        services.append(s)
        slices.append(sl)
    return services, slices, svc, fake


def worker(backend: str, n: int, reps: int, pins: str = "") -> None:
    """Reads commands on stdin, answers JSON lines; keeps the applier between them."""
    from podnet.services.compiler import ServiceCompiler
    from podnet.services.model import ServiceConfig

    rss_start = _rss_bytes()
    _, _, make, fake = _objects(0)
    compiler = ServiceCompiler("n1", ["10.10.0.1", "10.20.0.1"], ServiceConfig(service_cidrs=(SERVICE_CIDR,)))
    # The objects arrive as watch events would, and as in the agent each is fed to the
    # compiler (which keeps a compact record) and dropped; each sync compiles what changed.
    # Kept: the one slice the "change" measurement restores.
    mid = n // 2
    original_mid = s = sl = None
    for i in range(n):
        real = i in (0, n - 1)
        s, sl = make(i, f"s{i:06d}", str(ipaddress.IPv4Address(CLUSTER_BASE + i)), REAL_EPS if real else fake(i),
                     real)
        compiler.set_service(s)
        compiler.set_slice(sl)
        if real:
            compiler.set_slice(make.udp_slice(s.metadata.name))
        if i == mid:
            original_mid = sl
    del s, sl
    rss_objects = _rss_bytes()  # the compiler's records of every object
    if backend in ("nft-maps", "nft-pol"):
        from podnet.services.applier import NftServiceApplier

        applier = NftServiceApplier(conntrack=None)
    elif backend in ("ebpf", "ebpf-nofast", "ebpf-base", "ebpf-tcx", "ebpf-pol"):
        from podnet.ebpf.bpffs import PinDir
        from podnet.services.ebpf.applier import EbpfServiceApplier

        # the client's and the endpoints' veths are the node's pods; no NetworkPolicy runs
        # here, so the fast path may be on (as the agent has it with --policy-dataplane ebpf)
        applier = EbpfServiceApplier("bench", pins=PinDir.for_instance(pins),
                                     interfaces=lambda ipr: {"vcl": _ifindex("vcl"), "vsrv": _ifindex("vsrv")},
                                     fast_path=backend != "ebpf-nofast",
                                     object_file=os.environ[BASE_OBJECT_ENV] if backend == "ebpf-base" else None)
    elif backend == "iptables":
        from podnet.services.iptables import IptablesServiceApplier

        applier = IptablesServiceApplier(binary="iptables-legacy", conntrack=None)
    else:
        from tests.support.kubeproxy_nft import KubeProxyNftApplier

        applier = KubeProxyNftApplier()

    kernel_time = [0.0]
    _wrap_kernel_timer(applier, kernel_time)

    def sync() -> dict:
        kernel_time[0] = 0.0
        t0 = time.monotonic()
        state = compiler.state()
        t1 = time.monotonic()
        r = applier.apply(state)
        t2 = time.monotonic()
        out = {"compile_s": t1 - t0, "apply_s": t2 - t1, "kernel_s": kernel_time[0], "total_s": t2 - t0,
               "lines": r.lines, "full": r.full, "recompiled": compiler.recompiled}
        if hasattr(applier, "last_list_seconds"):
            out["list_s"] = applier.last_list_seconds
        return out

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "all":
            out = sync()
            # memory of the process holding the objects, the compiled state and the applied index
            out["rss_start_bytes"] = rss_start
            out["rss_objects_bytes"] = rss_objects
            out["rss_bytes"] = _rss_bytes()
            out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            gc.freeze()  # as the agent does after its first sync: routine collections skip this state
            out["fast_path"] = getattr(applier, "fast_path", None)
            if backend == "ebpf-tcx":
                tcx_links = _move_to_tcx(pins)  # noqa: F841 (the links live while their fds are open)
            if backend in ("ebpf-pol", "nft-pol"):
                policy = _attach_policy(pins, backend)  # noqa: F841 (its maps stay open with it)
        elif op == "ops":
            results: dict[str, list[dict]] = {"add": [], "delete": [], "change": []}
            for rep in range(reps):
                extra, extra_sl = make(10**6 + rep, f"zz{rep:03d}",
                                       str(ipaddress.IPv4Address(CLUSTER_BASE + n + 100 + rep)),
                                       fake(n + 100 + rep), False)
                compiler.set_service(extra)
                compiler.set_slice(extra_sl)
                results["add"].append(sync())
                compiler.delete_service(extra.namespace, extra.name)
                compiler.delete_slice(extra_sl.namespace, extra_sl.name)
                results["delete"].append(sync())
                if n > 2:
                    eps = fake(mid)
                    eps[0] = str(ipaddress.IPv4Address(FAKE_EP_BASE + (n + 200 + rep) * 5))
                    _, changed = make(mid, f"s{mid:06d}", "", eps, False)
                    compiler.set_slice(changed)
                    results["change"].append(sync())
                    compiler.set_slice(original_mid)  # back to the original, not measured
                    sync()
            out = results
        elif op == "remove":
            applier.remove()
            out = {}
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)


# the Services programs a client's datagram meets on the fast path, the first at its veth's ingress
PROGRAMS = ("podnet_svc_from_pod", "podnet_svc_redirect", "podnet_svc_to_pod")

# the kernel's enum bpf_attach_type (6.6+): tcx links, the multi-program tc hooks without qdisc
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47


def _attach_policy(pins: str, backend: str):
    """ebpf-pol: the eBPF policy programs on both veths, the client and the endpoints as this
    node's pods in one namespace, no NetworkPolicy: every packet passes policy's programs and
    its guard, as on a node with --policy-dataplane ebpf and nothing isolated. nft-pol: the
    nftables policy table for the same pods."""
    from podnet.ebpf.bpffs import PinDir
    from podnet.model.objects import Namespace, Pod
    from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer

    def pod(name: str, ip: str) -> Pod:
        return Pod.model_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "bench"},
                                   "spec": {"nodeName": "n1"}, "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})

    pods = [pod("client", "10.10.0.2"), *(pod(f"ep{i}", ip) for i, ip in enumerate(REAL_EPS))]
    if backend == "nft-pol":
        from podnet.policy.applier import PolicyProgrammer

        programmer = PolicyProgrammer()
    else:
        programmer = EbpfPolicyProgrammer(PinDir.for_instance(pins),
                                          interfaces=lambda: {"vcl": _ifindex("vcl"), "vsrv": _ifindex("vsrv")},
                                          service_cidrs=(SERVICE_CIDR,))
    programmer.sync(pods, [Namespace.model_validate({"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": "bench"}})], [],
                    [p.status.pod_ip for p in pods])
    return programmer


def _move_to_tcx(pins: str) -> list[int]:
    """ebpf-tcx: the Services programs of both veths moved from their clsact filters onto
    tcx links, in the same order (from_pod then redirect at ingress, to_pod at egress), and
    the filters removed: what tcx instead of clsact and cls_bpf would save per packet, with
    the same programs (the agent attaches with clsact). The links' fds, kept open."""
    from pyroute2 import IPRoute

    from podnet.ebpf import attach
    from podnet.ebpf.bpffs import pin_root
    from podnet.ebpf.syscall import link_create, obj_get

    def prog(name: str) -> int:
        return obj_get(glob.glob(os.path.join(pin_root(), "podnet", pins, "progs", "services-*", name))[0])

    links = []
    with IPRoute() as ipr:
        for dev in ("vcl", "vsrv"):
            index = _ifindex(dev)
            for attach_type, name in ((BPF_TCX_INGRESS, "podnet_svc_from_pod"), (BPF_TCX_INGRESS, "podnet_svc_redirect"),
                                      (BPF_TCX_EGRESS, "podnet_svc_to_pod")):
                links.append(link_create(prog(name), index, attach_type, f"{name} on {dev} (tcx)"))  # appended last
            for owner, direction in (("services", "ingress"), ("services-redirect", "ingress"),
                                     ("services", "egress")):
                attach.detach(ipr, index, owner, direction)
    return links


def _ifindex(name: str) -> int:
    with open(f"/sys/class/net/{name}/ifindex") as f:
        return int(f.read())


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _wrap_kernel_timer(applier, acc: list[float]) -> None:
    """Time the kernel side: the nft / iptables-restore process each applier starts, and
    the netlink transactions (send and the kernel's answer)."""
    for attr in ("nft", "commit"):
        if hasattr(applier, attr):
            setattr(applier, attr, _timed(getattr(applier, attr), acc))
    if hasattr(applier, "run"):
        inner_run = applier.run

        def timed_run(cmd, *a, **kw):
            t = time.monotonic()
            try:
                return inner_run(cmd, *a, **kw)
            finally:
                if cmd and str(cmd[0]).endswith("-restore"):
                    acc[0] += time.monotonic() - t

        applier.run = timed_run


def _timed(inner, acc: list[float]):
    def timed(arg) -> None:
        t = time.monotonic()
        try:
            inner(arg)
        finally:
            acc[0] += time.monotonic() - t

    return timed


# ---------------------------------------------------------------- namespaces and traffic


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

PROBE = r"""
import json, socket, sys, time
first, last, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"first": [], "last": [], "errors": 0}
for i in range(count * 2 + 20):
    which = "first" if i % 2 == 0 else "last"
    ip = first if which == "first" else last
    t0 = time.perf_counter()
    try:
        s = socket.create_connection((ip, 80), timeout=2)
        dt = time.perf_counter() - t0
        s.close()
    except OSError:
        out["errors"] += 1
        continue
    if i >= 20:  # warm-up
        out[which].append(dt)
print(json.dumps(out))
"""


class Lab:
    """node (routes) + client + srv (the 5 real endpoints), unique names, always removed."""

    def __init__(self) -> None:
        tag = f"pnb{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.node, self.client, self.srv = f"{tag}-node", f"{tag}-cl", f"{tag}-srv"
        self.procs: list[subprocess.Popen] = []
        self.pins = f"bench-{tag}"  # the ebpf backend's pin directory (removed on exit)

    def __enter__(self) -> Lab:
        try:
            for ns in (self.node, self.client, self.srv):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "-n", self.node, "link", "add", "vcl", "type", "veth", "peer", "name", "eth0", "netns", self.client)
            sh("ip", "-n", self.node, "addr", "add", "10.10.0.1/24", "dev", "vcl")
            sh("ip", "-n", self.node, "link", "set", "vcl", "up")
            sh("ip", "-n", self.client, "addr", "add", "10.10.0.2/24", "dev", "eth0")
            sh("ip", "-n", self.client, "link", "set", "eth0", "up")
            sh("ip", "-n", self.client, "route", "add", "default", "via", "10.10.0.1")
            sh("ip", "-n", self.node, "link", "add", "vsrv", "type", "veth", "peer", "name", "eth0", "netns", self.srv)
            sh("ip", "-n", self.node, "addr", "add", "10.20.0.1/32", "dev", "vsrv")
            sh("ip", "-n", self.node, "link", "set", "vsrv", "up")
            sh("ip", "-n", self.node, "route", "add", "10.20.0.0/24", "dev", "vsrv")
            # routed as podnet's pods are: a /32 per pod address to its veth (the eBPF
            # fast path knows the node's pods by these routes)
            sh("ip", "-n", self.node, "route", "add", "10.10.0.2/32", "dev", "vcl")
            for ip in REAL_EPS:
                sh("ip", "-n", self.node, "route", "add", f"{ip}/32", "dev", "vsrv")
                sh("ip", "-n", self.srv, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", self.srv, "link", "set", "eth0", "up")
            sh("ip", "-n", self.srv, "route", "add", "default", "via", "10.20.0.1")
            srv = subprocess.Popen(["ip", "netns", "exec", self.srv, PYTHON, "-c", SERVER], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            self.procs.append(srv)
            assert srv.stdout and srv.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in (self.node, self.client, self.srv):
            sh("ip", "netns", "del", ns, check=False)
        from podnet.ebpf.bpffs import pin_root

        shutil.rmtree(os.path.join(pin_root(), "podnet", self.pins), ignore_errors=True)

    def start_worker(self, backend: str, n: int, reps: int) -> subprocess.Popen:
        from podnet.ebpf.bpffs import ensure_shared_bpffs

        ensure_shared_bpffs()  # the worker (ip netns exec) pins there
        p = subprocess.Popen(["ip", "netns", "exec", self.node, PYTHON, os.path.abspath(__file__), "--worker",
                              "--backend", backend, "--size", str(n), "--reps", str(reps), "--pins", self.pins],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def probe(self, first: str, last: str, count: int) -> dict:
        out = sh("ip", "netns", "exec", self.client, PYTHON, "-c", PROBE, first, last, str(count), timeout=600)
        return json.loads(out.stdout)

    def iperf(self, target: str, seconds: int) -> float | None:
        if not shutil.which("iperf3"):
            return None
        server = subprocess.Popen(["ip", "netns", "exec", self.srv, "iperf3", "-s", "-p", "5201", "-1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            out = sh("ip", "netns", "exec", self.client, "iperf3", "-c", target, "-p", "5201", "-t", str(seconds),
                     "-J", check=False, timeout=seconds + 30)
            data = json.loads(out.stdout or "{}")
            return data.get("end", {}).get("sum_received", {}).get("bits_per_second")
        except (json.JSONDecodeError, subprocess.TimeoutExpired):
            return None
        finally:
            server.kill()
            server.wait()

    def udp_rate(self, target: str, seconds: int) -> dict | None:
        """64-byte UDP datagrams per second through the Service, counted where they arrive:
        an nftables counter in the endpoint's namespace drops them before any socket, so the
        receiving process is not the bottleneck (it was, at 200-300 kpps, for every
        backend alike). The sender (iperf3 -u -b 0, one flow) then is: its CPU carries the
        whole path (veth, the node's forwarding and the Service dataplane, veth again) in
        its own context, so the rate is the inverse of the path's per-packet cost. For the
        ebpf column, the program's own run time per packet (kernel statistics) too."""
        if not shutil.which("iperf3"):
            return None
        self.udp_sink_up()
        try:
            measured = self._udp_send(target, seconds)
            if measured is None:
                return None
            counted, s, cpu = measured
            row = {"udp64_first_kpps": counted / s["seconds"] / 1e3,
                   "udp64_sent_kpps": s.get("packets", 0) / s["seconds"] / 1e3}
            # Per sender CPU second (its user + system time, which holds the softirq work
            # done in its context): steadier than the rate when other work takes the CPU.
            if cpu:
                row["udp64_us_per_packet"] = s["seconds"] * cpu / 100 / counted * 1e6
            program_ns = self.udp_program_ns(target).get(PROGRAMS[0])
            if program_ns is not None:
                row["udp64_program_ns"] = program_ns
            return row
        except (json.JSONDecodeError, subprocess.TimeoutExpired, KeyError, ZeroDivisionError):
            return None
        finally:
            self.udp_sink_down()

    def udp_sink_up(self) -> None:
        """The endpoint's side of the small-datagram test: the counter that drops the
        64-byte datagrams and an iperf3 server (it answers iperf3's control connection and
        4-byte UDP start, which are not counted: only UDP length 72 is)."""
        sh("ip", "netns", "exec", self.srv, "nft", "-f", "-", input=f"""table inet {UDP_TABLE} {{
  chain pre {{ type filter hook prerouting priority -300; udp dport 5201 udp length 72 counter drop; }}
}}""")
        self.udp_server = subprocess.Popen(["ip", "netns", "exec", self.srv, "iperf3", "-s", "-p", "5201"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(self.udp_server)
        time.sleep(0.3)  # iperf3 prints nothing to wait on; a client retrying too early just fails a round

    def udp_sink_down(self) -> None:
        server = getattr(self, "udp_server", None)
        if server is not None:
            server.kill()
            server.wait()
            self.procs.remove(server)
            self.udp_server = None
        sh("ip", "netns", "exec", self.srv, "nft", "delete", "table", "inet", UDP_TABLE, check=False)

    def udp_program_ns(self, target: str) -> dict[str, float]:
        """The Service programs' own time per run (ns), by program, in a one-second run of
        its own: the kernel's run-time statistics add two clock reads to every program run,
        which the measured rate must not pay (nftables has nothing alike switched on). In
        this test every run is one datagram of the client: podnet_svc_from_pod and the
        redirect at the client's veth, podnet_svc_to_pod at the endpoint's. {} without the
        ebpf backend's pins."""
        if self._program_runs(PROGRAMS[0]) is None:
            return {}
        from podnet.ebpf.syscall import enable_stats

        stats = enable_stats()
        try:
            runs0 = {p: self._program_runs(p) for p in PROGRAMS}
            self._udp_send(target, 1)
            runs1 = {p: self._program_runs(p) for p in PROGRAMS}
        finally:
            os.close(stats)
        return {p: (runs1[p][0] - runs0[p][0]) / (runs1[p][1] - runs0[p][1]) for p in PROGRAMS
                if runs0[p] is not None and runs1[p] is not None and runs1[p][1] > runs0[p][1]}

    def udp_path_cost(self, target: str, seconds: int, cpu: int) -> dict | None:
        """One run of the small-datagram test with the sender pinned to `cpu`: the CPU the
        whole path took per datagram counted at the endpoint (the sender's own time plus
        that CPU's ksoftirqd, bench/path_cpu.py), and the rate. Needs udp_sink_up()."""
        softirqd = ksoftirqd_pid(cpu)
        soft0 = runtime_ns(softirqd)
        measured = self._udp_send(target, seconds, cpu=cpu)
        soft_s = (runtime_ns(softirqd) - soft0) / 1e9
        if measured is None:
            return None
        counted, s, cpu_percent = measured
        if not cpu_percent:
            return None
        sender_s = s["seconds"] * cpu_percent / 100
        return {"udp64_first_kpps": counted / s["seconds"] / 1e3,
                "udp64_path_us_per_packet": (sender_s + soft_s) / counted * 1e6,
                "udp64_us_per_packet": sender_s / counted * 1e6,
                "ksoftirqd_share": soft_s / (sender_s + soft_s)}

    def _udp_send(self, target: str, seconds: int, cpu: int | None = None) -> tuple[int, dict, float | None] | None:
        """One iperf3 run of 64-byte datagrams: (datagrams counted at the endpoint, iperf3's
        sum, the sender's CPU percent); the sender pinned to `cpu` if given."""
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        counted0 = self._udp_counted()
        out = sh("ip", "netns", "exec", self.client, *pin, "iperf3", "-c", target, "-p", "5201", "-u", "-b", "0",
                 "-l", "64", "-t", str(seconds), "-J", check=False, timeout=seconds + 30)
        counted = self._udp_counted() - counted0
        end = json.loads(out.stdout or "{}").get("end", {})
        s = end.get("sum", {})
        if not counted or not s.get("seconds"):
            return None
        return counted, s, end.get("cpu_utilization_percent", {}).get("host_total")

    def _udp_counted(self) -> int:
        out = json.loads(sh("ip", "netns", "exec", self.srv, "nft", "-j", "list", "table", "inet",
                            UDP_TABLE).stdout)
        return sum(e["counter"]["packets"] for item in out["nftables"] for e in item.get("rule", {}).get("expr", [])
                   if "counter" in e)

    def _program_runs(self, program: str) -> tuple[int, int] | None:
        """Run time (ns) and runs of a Service program (all its attachments), None without
        the ebpf backend's pins."""
        from podnet.ebpf.bpffs import pin_root
        from podnet.ebpf.syscall import obj_get, prog_info

        pins = sorted(glob.glob(os.path.join(pin_root(), "podnet", self.pins, "progs", "services-*",
                                             program)))
        if not pins:
            return None
        fd = obj_get(pins[0])
        try:
            info = prog_info(fd)
        finally:
            os.close(fd)
        return info.run_time_ns, info.run_cnt


def ask(p: subprocess.Popen, cmd: dict, timeout_hint: str = "") -> dict:
    assert p.stdin and p.stdout
    p.stdin.write(json.dumps(cmd) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"worker died {timeout_hint}: {p.stderr.read()[-3000:] if p.stderr else ''}")
    return json.loads(line)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def run_case(backend: str, n: int, reps: int, probes: int, iperf_seconds: int) -> dict:
    with Lab() as lab:
        w = lab.start_worker(backend, n, reps)
        t0 = time.monotonic()
        full = ask(w, {"op": "all"}, f"({backend}, {n} Services)")
        wall_all = time.monotonic() - t0
        if full.get("fast_path") is not None:
            print(f"# {backend}: eBPF Services fast path {'on' if full['fast_path'] else 'off'}", flush=True)
        first = str(ipaddress.IPv4Address(CLUSTER_BASE))
        last = str(ipaddress.IPv4Address(CLUSTER_BASE + n - 1))
        lat = lab.probe(first, last, probes) if probes else {"first": [], "last": [], "errors": 0}
        ops = ask(w, {"op": "ops"})
        row: dict = {
            "backend": backend, "services": n, "endpoints_per_service": 5,
            "apply_all_s": full["total_s"], "apply_all_kernel_s": full["kernel_s"],
            "apply_all_compile_s": full["compile_s"], "apply_all_lines": full["lines"], "apply_all_wall_s": wall_all,
            "rss_start_mb": full["rss_start_bytes"] / 2**20, "rss_objects_mb": full["rss_objects_bytes"] / 2**20,
            "rss_mb": full["rss_bytes"] / 2**20, "maxrss_mb": full["maxrss_bytes"] / 2**20,
            "fast_path": full.get("fast_path"),
        }
        for op in ("add", "change", "delete"):
            runs = ops.get(op) or []
            if runs:
                row[f"{op}_one_s"] = statistics.median(r["total_s"] for r in runs)
                row[f"{op}_one_kernel_s"] = statistics.median(r["kernel_s"] for r in runs)
                row[f"{op}_one_python_s"] = statistics.median(r["compile_s"] + r["apply_s"] - r["kernel_s"]
                                                              for r in runs)
                row[f"{op}_one_lines"] = statistics.median(r["lines"] for r in runs)
                if "list_s" in runs[0]:
                    row[f"{op}_one_list_s"] = statistics.median(r.get("list_s", 0.0) for r in runs)
        for which in ("first", "last"):
            vals = lat[which]
            row[f"connect_{which}_p50_us"] = pct(vals, 0.5) * 1e6 if vals else None
            row[f"connect_{which}_p99_us"] = pct(vals, 0.99) * 1e6 if vals else None
        row["connect_errors"] = lat["errors"]
        if iperf_seconds:
            for which, ip in (("first", first), ("last", last)):
                bps = lab.iperf(ip, iperf_seconds)
                row[f"iperf_{which}_gbps"] = bps / 1e9 if bps else None
            # the best of a few runs: on a shared machine other work only ever slows the sender
            runs = [r for r in (lab.udp_rate(first, iperf_seconds) for _ in range(UDP_RUNS)) if r]
            row.update(min(runs, key=lambda r: r.get("udp64_us_per_packet", 1 / r["udp64_first_kpps"]))
                       if runs else {"udp64_first_kpps": None})
            row["udp64_runs"] = runs
        ask(w, {"op": "remove"})
        if w.stdin:
            w.stdin.close()
        w.wait(timeout=60)
        return row


@contextlib.contextmanager
def nodes_alive(backends: list[str], n: int, out: dict) -> Iterator[dict[str, Lab]]:
    """Every backend's node set up with n Services at once (for measurements taken in
    turns), the fast path's state noted in `out`; all removed again at the end."""
    labs: dict[str, Lab] = {}
    workers: dict[str, subprocess.Popen] = {}
    try:
        for b in backends:
            labs[b] = Lab().__enter__()
            workers[b] = labs[b].start_worker(b, n, 1)
            full = ask(workers[b], {"op": "all"}, f"({b}, {n} Services)")
            if full.get("fast_path") is not None:
                out.setdefault("fast_path", {})[b] = full["fast_path"]
                print(f"# {b}: eBPF Services fast path {'on' if full['fast_path'] else 'off'}", flush=True)
        yield labs
    finally:
        for w in workers.values():
            try:
                ask(w, {"op": "remove"})
            except (RuntimeError, BrokenPipeError):
                pass
        for lab in labs.values():
            lab.__exit__()


def alternate(backends: list[str], n: int, rounds: int, probes: int, seconds: int) -> dict:
    """Every backend's node alive at once, the traffic measurements taken in rounds that
    go through the backends in turn: load from other work on a shared machine then
    falls on all alike, and each round gives a ratio to the first backend (the cases
    of run_case are minutes apart, so their ratios carry the load's drift)."""
    out: dict = {"services": n, "rounds": [], "backends": backends}
    with nodes_alive(backends, n, out) as labs:
        first = str(ipaddress.IPv4Address(CLUSTER_BASE))
        last = str(ipaddress.IPv4Address(CLUSTER_BASE + n - 1))
        for _ in range(rounds):
            row = {}
            for b in backends:
                lat = labs[b].probe(first, last, probes)
                udp = labs[b].udp_rate(first, seconds) or {}
                row[b] = {"connect_last_p50_us": pct(lat["last"], 0.5) * 1e6 if lat["last"] else None,
                          **{k: udp.get(k) for k in ("udp64_first_kpps", "udp64_us_per_packet", "udp64_program_ns")}}
            out["rounds"].append(row)
    base = backends[0]
    out["ratios"] = {}
    for b in backends[1:]:
        for key in ("connect_last_p50_us", "udp64_us_per_packet", "udp64_first_kpps"):
            rs = [r[b][key] / r[base][key] for r in out["rounds"] if r[b].get(key) and r[base].get(key)]
            if rs:
                out["ratios"][f"{b}/{base} {key}"] = {"median": round(statistics.median(rs), 2),
                                                      "min": round(min(rs), 2), "max": round(max(rs), 2)}
    return out


def udp_rounds(backends: list[str], n: int, rounds: int, seconds: int, cpu: int) -> dict:
    """The small-datagram path cost, interleaved: every backend's node alive at once, each
    round one short run per backend (the order reversed every other round, so a drift
    within a round falls on both ends), the sender pinned to one CPU and the cost counted
    as the sender's CPU plus that CPU's ksoftirqd per datagram (bench/path_cpu.py). The
    ratio of each round to the first backend is the figure: the same measurement for
    every column, seconds apart."""
    out: dict = {"services": n, "rounds": [], "backends": backends, "seconds": seconds, "cpu": cpu}
    first = str(ipaddress.IPv4Address(CLUSTER_BASE))
    with nodes_alive(backends, n, out) as labs:
        try:
            for b in backends:
                labs[b].udp_sink_up()
            for i in range(rounds):
                row = {}
                for b in (backends if i % 2 == 0 else backends[::-1]):
                    row[b] = labs[b].udp_path_cost(first, seconds, cpu) or {}
                out["rounds"].append(row)
                print(f"round {i + 1}: " + "; ".join(
                    f"{b} {fmt(row[b].get('udp64_path_us_per_packet'), 'f2')} us/pkt "
                    f"({fmt(row[b].get('udp64_first_kpps'), 'k')}pps, ksoftirqd "
                    f"{fmt((row[b].get('ksoftirqd_share') or 0) * 100, 'ns')}%)" for b in backends), flush=True)
            for b in backends:
                program_ns = labs[b].udp_program_ns(first)
                if program_ns:
                    out.setdefault("program_ns", {})[b] = {p: round(v) for p, v in program_ns.items()}
        finally:
            for lab in labs.values():
                lab.udp_sink_down()
    out["ratios"] = {}
    out["costs"] = {}
    for b in backends:
        for key in ("udp64_path_us_per_packet", "udp64_us_per_packet"):
            vals = [r[b][key] for r in out["rounds"] if r[b].get(key)]
            if vals:
                out["costs"][f"{b} {key}"] = _spread(vals)
    # to the first column, and the ebpf variants to ebpf itself (a change's before and after)
    pairs = [(b, backends[0]) for b in backends[1:]]
    if "ebpf" in backends[1:]:
        pairs += [(b, "ebpf") for b in backends if b.startswith("ebpf-")]
    if "ebpf-pol" in backends and "nft-pol" in backends:  # both nodes with their policy dataplane
        pairs.append(("ebpf-pol", "nft-pol"))
    for b, base in pairs:
        for key in ("udp64_path_us_per_packet", "udp64_us_per_packet", "udp64_first_kpps"):
            rs = [r[b][key] / r[base][key] for r in out["rounds"] if r[b].get(key) and r[base].get(key)]
            if rs:
                out["ratios"][f"{b}/{base} {key}"] = _spread(rs)
    return out


def _spread(values: list[float]) -> dict:
    """Median, quartiles and range of a list (quartiles by statistics.quantiles, n >= 2)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values)}


def fmt(v, unit: str = "s") -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"
    if unit == "us":
        return f"{v:.0f}us"
    if unit == "mb":
        return f"{v:.0f}"
    if unit == "g":
        return f"{v:.1f}G"
    if unit == "k":
        return f"{v:.0f}k"
    if unit == "ns":
        return f"{v:.0f}"
    if unit == "f2":
        return f"{v:.2f}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    cols = [("backend", "backend", None), ("N", "services", None), ("apply all", "apply_all_s", "s"),
            ("(kernel)", "apply_all_kernel_s", "s"), ("add one", "add_one_s", "s"), ("(kernel)", "add_one_kernel_s", "s"),
            ("change", "change_one_s", "s"), ("delete", "delete_one_s", "s"), ("RSS MiB", "rss_mb", "mb"),
            ("conn first p50/p99", None, None), ("conn last p50/p99", None, None), ("iperf f/l", None, None),
            ("udp64 kpps", "udp64_first_kpps", "k"), ("(us/pkt)", "udp64_us_per_packet", "f2"),
            ("(prog ns)", "udp64_program_ns", "ns")]
    table = []
    for r in rows:
        line = []
        for title, key, unit in cols:
            if title.startswith("conn"):
                w = "first" if "first" in title else "last"
                line.append(f"{fmt(r.get(f'connect_{w}_p50_us'), 'us')}/{fmt(r.get(f'connect_{w}_p99_us'), 'us')}")
            elif title.startswith("iperf"):
                line.append(f"{fmt(r.get('iperf_first_gbps'), 'g')}/{fmt(r.get('iperf_last_gbps'), 'g')}")
            else:
                line.append(fmt(r.get(key), unit) if unit else str(r.get(key)))
        table.append(line)
    widths = [max(len(c[0]), *(len(t[i]) for t in table)) for i, c in enumerate(cols)] if table else []
    print("  ".join(c[0].ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths, strict=True)))


def ratios(rows: list[dict]) -> list[dict]:
    """Other backends relative to nft-maps at the same size (>1: nft-maps is faster / better)."""
    base = {r["services"]: r for r in rows if r["backend"] == "nft-maps"}
    out = []
    for r in rows:
        b = base.get(r["services"])
        if r["backend"] == "nft-maps" or b is None:
            continue
        entry = {"backend": r["backend"], "services": r["services"]}
        for key in ("apply_all_s", "add_one_s", "change_one_s", "delete_one_s", "add_one_kernel_s",
                    "connect_last_p50_us", "connect_last_p99_us", "udp64_first_kpps", "udp64_us_per_packet"):
            if r.get(key) and b.get(key):
                entry[key] = round(r[key] / b[key], 2)
        out.append(entry)
    return out


PLOTS = (
    ("services-apply-all.png", "time to apply all Services", "apply_all_s", "seconds"),
    ("services-add-one.png", "time to add one Service on top of N", "add_one_s", "seconds"),
    ("services-per-backend.png", "apply all: time per backend (endpoint)", "per_backend", "seconds per backend"),
    ("services-rss.png", "worker RSS (objects + compiled state + applied index)", "rss_mb", "MiB"),
)


def plot(rows: list[dict], outdir: str) -> list[str]:
    """Log-log plots against the number of Services, one line per backend. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    for fname, title, key, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for backend in BACKENDS:
            pts = []
            for r in rows:
                if r["backend"] != backend:
                    continue
                v = r.get("apply_all_s") / (r["services"] * r["endpoints_per_service"]) if key == "per_backend" \
                    else r.get(key)
                if v:
                    pts.append((r["services"], v))
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Services (5 endpoints each)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,1000,5000,10000,20000")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--caps", default="", help="per-backend size caps, e.g. iptables=5000,kp-nft=10000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probes", type=int, default=300, help="connections per target for the latency probe")
    ap.add_argument("--iperf", type=int, default=2, help="seconds of iperf3 per target (0: skip)")
    ap.add_argument("--quick", action="store_true", help="sizes 1,1000; one rep; 100 probes; no iperf")
    ap.add_argument("--large", action="store_true", help="also 50 000 Services")
    ap.add_argument("--alternate", type=int, metavar="ROUNDS",
                    help="only the traffic measurements (connect latency, small UDP), every backend's node at "
                         "once, in ROUNDS rounds through the backends in turn, at the first size; ratios per round")
    ap.add_argument("--udp-rounds", type=int, metavar="ROUNDS",
                    help="only the small-datagram path cost (sender + its CPU's ksoftirqd per datagram), every "
                         "backend's node at once, ROUNDS interleaved rounds of --udp-seconds each, at the first size")
    ap.add_argument("--udp-seconds", type=int, default=1, help="seconds per run of --udp-rounds")
    ap.add_argument("--cpu", type=int, default=min(1, (os.cpu_count() or 1) - 1),
                    help="the CPU --udp-rounds pins the sender to")
    ap.add_argument("--base-object", help="the services.o the ebpf-base column loads (e.g. built from an "
                                          "earlier commit with python -m podnet.ebpf.build --build-dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "services.json"))
    ap.add_argument("--plots", default=os.path.join(ROOT, "docs", "img"),
                    help="directory for the PNG plots (needs matplotlib; empty: no plots)")
    ap.add_argument("--plot-only", metavar="JSON", help="only draw the plots from an earlier result file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pins", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.backend, args.size, args.reps, args.pins)
        return 0
    if args.plot_only:
        with open(args.plot_only) as f:
            for path in plot(json.load(f)["rows"], args.plots):
                print(f"wrote {os.path.relpath(path, ROOT)}")
        return 0
    if args.base_object:
        os.environ[BASE_OBJECT_ENV] = os.path.abspath(args.base_object)  # the workers inherit it
    elif "ebpf-base" in args.backends.split(","):
        print("the ebpf-base column needs --base-object", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bench_services needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.udp_rounds:
        n = int(args.sizes.split(",")[0])
        backends = [b for b in args.backends.split(",") if b]
        load_start = os.getloadavg()
        result = udp_rounds(backends, n, args.udp_rounds, args.udp_seconds, args.cpu)
        for k, v in {**result["costs"], **result["ratios"]}.items():
            print(f"{k}: median {v['median']} (quartiles {v['q1']}-{v['q3']}, range {v['min']}-{v['max']}, "
                  f"{v['n']} rounds)")
        if result.get("program_ns"):
            print("program ns per run (run-time statistics, a run of its own): " +
                  "; ".join(f"{b} " + ", ".join(f"{p.removeprefix('podnet_svc_')} {ns}" for p, ns in v.items())
                            for b, v in result["program_ns"].items()))
        result["command"] = " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        result["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                          "loadavg_end": os.getloadavg()}
        print(f"load average at the start {load_start[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.relpath(args.out, ROOT)}")
        return 0
    if args.alternate:
        n = int(args.sizes.split(",")[0])
        backends = [b for b in args.backends.split(",") if b]
        result = alternate(backends, n, args.alternate, args.probes, args.iperf or 1)
        for i, r in enumerate(result["rounds"]):
            print(f"round {i + 1}: " + "; ".join(
                f"{b} connect p50 {fmt(v['connect_last_p50_us'], 'us')}, udp {fmt(v['udp64_first_kpps'], 'k')}pps "
                f"{fmt(v['udp64_us_per_packet'], 'f2')} us/pkt" for b, v in r.items()))
        for k, v in result["ratios"].items():
            print(f"{k}: median {v['median']} ({v['min']}-{v['max']})")
        result["command"] = " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        result["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.relpath(args.out, ROOT)}")
        return 0
    if args.quick:
        args.sizes, args.reps, args.probes, args.iperf = "1,1000", 1, 100, 0
    caps = dict(DEFAULT_CAPS)
    for item in filter(None, args.caps.split(",")):
        k, _, v = item.partition("=")
        caps[k] = int(v)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.large and 50000 not in sizes:
        sizes.append(50000)
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    started = time.time()
    for n in sizes:
        for backend in backends:
            if n > caps.get(backend, 10**9):
                print(f"# {backend}: skipping {n} Services (cap {caps[backend]})", flush=True)
                continue
            t0 = time.monotonic()
            row = run_case(backend, n, args.reps, args.probes, args.iperf)
            row["case_wall_s"] = time.monotonic() - t0
            row["loadavg_after"] = os.getloadavg()[0]
            rows.append(row)
            print(f"# {backend} N={n}: all {fmt(row['apply_all_s'])}, add {fmt(row.get('add_one_s'))}, "
                  f"delete {fmt(row.get('delete_one_s'))}, rss {row['rss_mb']:.0f} MiB, connect last p50 "
                  f"{fmt(row.get('connect_last_p50_us'), 'us')} ({row['case_wall_s']:.0f}s)", flush=True)
    print()
    print_table(rows)
    rel = ratios(rows)
    if rel:
        print("\nrelative to nft-maps (x times slower/longer):")
        for r in rel:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "nft": sh("nft", "--version", check=False).stdout.strip(),
                 "iptables": sh("iptables-legacy", "--version", check=False).stdout.strip(),
                 "loadavg_start": os.getloadavg()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "ratios_vs_nft_maps": rel,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")
    if args.plots:
        try:
            for path in plot(rows, args.plots):
                print(f"wrote {os.path.relpath(path, ROOT)}")
        except ImportError:
            print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
