"""The eBPF Services fast path with real packets: a flow from a pod to a Service whose
backend is a pod of the same node goes straight from veth to veth (bpf_redirect_neigh),
so the node's conntrack never sees it; everything else takes the node's path as before.

One node namespace per test with pods a, b, c attached by podnet's PodDataplane (routed
/32s, as in a cluster) and "far", a backend behind a plain veth that is no pod of this
node. The eBPF Service applier and, where a test says, a NetworkPolicy programmer (eBPF
or nftables) run in the node namespace as the agent would, pinned in a bpffs this test
mounts. Policy: b admits a on TCP 8080 and UDP 5353, c on nothing; b may send nothing
itself (its replies pass by policy's flow table only).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest

from tests.kernel.nsutil import PYTHON, NsDriver, in_ns, namespaces, py_in, stop
from tests.kernel.test_policy_ebpf import bpffs
from tests.kernel.test_services_dataplane import BACKEND_SERVER, PROBE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and bpffs")

PODS = {"a": "10.244.7.1", "b": "10.244.7.2", "c": "10.244.7.3"}
FAR = "10.244.9.1"  # behind the node's plain veth far0: a backend that is no local pod
CLUSTER_IP, REMOTE_IP, SELF_IP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
SERVICE_CIDR = "10.96.0.0/16"

SERVICES = r"""
import json, sys
from podnet.ebpf.bpffs import PinDir, instance_name
from podnet.model.objects import EndpointSlice, Service
from podnet.services.compiler import compile_services
from podnet.services.ebpf.applier import EbpfServiceApplier
from podnet.services.model import ServiceConfig
applier = EbpfServiceApplier("node", pins=PinDir.for_instance(instance_name("node"), bpffs=sys.argv[1]),
                             node_sockets=False, fast_path=sys.argv[2] == "on")
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "apply":
            state = compile_services([Service.model_validate(o) for o in cmd["services"]],
                                     [EndpointSlice.model_validate(o) for o in cmd["slices"]], "n1", ["10.0.0.1"],
                                     ServiceConfig(service_cidrs=(sys.argv[3],)), [])
            r = applier.apply(state, resync=cmd.get("resync", False))
            out = {"errors": r.errors}
        else:
            out = {"problem": applier.verify()}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""

POLICY = r"""
import json, sys
from podnet.model.objects import Namespace, NetworkPolicy, Pod
if sys.argv[1] == "ebpf":
    from podnet.ebpf.bpffs import PinDir, instance_name
    from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer
    pp = EbpfPolicyProgrammer(PinDir.for_instance(instance_name("node"), bpffs=sys.argv[2]),
                              service_cidrs=(sys.argv[3],))
else:
    from podnet.policy.applier import PolicyProgrammer
    pp = PolicyProgrammer()
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        pp.sync([Pod.model_validate(x) for x in cmd["pods"]], [Namespace.model_validate(x) for x in cmd["namespaces"]],
                [NetworkPolicy.model_validate(x) for x in cmd["policies"]], cmd["local"])
        out = {}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


def services(cluster_ip: str, name: str, endpoints: list[str]) -> tuple[dict, dict]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "x"},
           "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                                       {"name": "dns", "port": 53, "protocol": "UDP",
                                                        "targetPort": 5353}]}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-x", "namespace": "x", "labels": {"kubernetes.io/service-name": name}},
          "addressType": "IPv4", "endpoints": [{"addresses": [ip], "nodeName": "n1"} for ip in endpoints],
          "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]}
    return svc, sl


def policy_world() -> dict:
    pods = [{"metadata": {"name": p, "namespace": "x", "labels": {"pod": p}}, "spec": {"nodeName": "n1"},
             "status": {"podIP": ip}} for p, ip in PODS.items()]
    policy = {"metadata": {"name": "b", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                                    "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 5353, "protocol": "UDP"}]}],
                       "egress": []}}
    return {"pods": pods, "namespaces": [{"metadata": {"name": "x"}}], "policies": [policy],
            "local": list(PODS.values())}


@dataclass
class Lab:
    node: str
    pods: dict[str, str]  # pod -> netns
    pins: str
    svc: NsDriver

    def apply(self, **kw) -> None:
        objs = [services(CLUSTER_IP, "local", [PODS["b"]]), services(REMOTE_IP, "remote", [FAR]),
                services(SELF_IP, "self", [PODS["b"]])]
        out = self.svc.ask(op="apply", services=[s for s, _ in objs], slices=[sl for _, sl in objs], **kw)
        assert not out["errors"], out

    def probe(self, pod: str, target: str, proto: str = "tcp", timeout: float = 1.5) -> str:
        code = PROBE.replace("sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])",
                             f"{target!r}, {80 if proto == 'tcp' else 53}, {proto!r}, 1, {timeout}")
        return json.loads(py_in(self.pods[pod], code, timeout=30).stdout)[0][0]

    def tracked(self, a: str, b: str) -> bool:
        """The node's conntrack holds a flow between the two addresses (either way)."""
        out = in_ns(self.node, "conntrack", "-L", check=False).stdout
        return any(f"src={a} dst={b}" in line or f"src={b} dst={a}" in line for line in out.splitlines())


@contextmanager
def lab(fast: bool, policy: str | None = None) -> Iterator[Lab]:
    procs: list[subprocess.Popen] = []
    with namespaces() as ns, bpffs() as pins, ExitStack() as drivers:
        try:
            node = ns.new("node")
            in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            pods = {p: ns.new(p) for p in PODS}
            py_in(node, f"""
from podnet.dataplane.pods import PodDataplane
for p, ip in {PODS!r}.items():
    PodDataplane(1500).add("c-" + p, "eth0", "/run/netns/{ns.tag}-" + p, ip)
""")
            far = ns.new("far")
            in_ns(node, "ip", "link", "add", "far0", "type", "veth", "peer", "name", "eth0", "netns", far)
            in_ns(node, "ip", "addr", "add", "10.244.9.254/24", "dev", "far0")
            in_ns(node, "ip", "link", "set", "far0", "up")
            in_ns(far, "ip", "addr", "add", f"{FAR}/24", "dev", "eth0")
            in_ns(far, "ip", "link", "set", "eth0", "up")
            in_ns(far, "ip", "route", "add", "default", "via", "10.244.9.254")
            for name, where in (("b", pods["b"]), ("far", far)):
                p = subprocess.Popen(["ip", "netns", "exec", where, PYTHON, "-c", BACKEND_SERVER, name, ns.tag],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                procs.append(p)
                assert p.stdout and p.stdout.readline().strip() == "ready"
            svc = drivers.enter_context(closing(NsDriver(node, SERVICES, pins, "on" if fast else "off", SERVICE_CIDR)))
            if policy:
                pol = drivers.enter_context(closing(NsDriver(node, POLICY, policy, pins, SERVICE_CIDR)))
                pol.ask(**policy_world())
            lab_ = Lab(node, pods, pins, svc)
            lab_.apply()
            yield lab_
        finally:
            stop(procs)
            subprocess.run(["rm", "-f", f"/tmp/{ns.tag}-sctp"], check=False)


@contextmanager
def closing(driver: NsDriver) -> Iterator[NsDriver]:
    try:
        yield driver
    finally:
        if driver.proc.poll() is None:
            driver.close()


def test_a_local_backend_is_reached_veth_to_veth_without_the_nodes_conntrack():
    with lab(fast=True) as t:
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"  # the client's own address: no masquerade
        assert t.probe("a", CLUSTER_IP, "udp") == f"b {PODS['a']}"
        assert not t.tracked(PODS["a"], PODS["b"]), "a fast-path flow is not in the node's conntrack"
        # the same node's path still serves what the fast path does not take
        assert t.probe("a", REMOTE_IP) == f"far {PODS['a']}"
        assert t.probe("a", REMOTE_IP, "udp") == f"far {PODS['a']}"
        assert t.tracked(PODS["a"], FAR), "a remote backend goes through the node's stack"
        # hairpin: b through its own Service is masqueraded to the node (the node's path)
        assert t.probe("b", SELF_IP).split()[0] == "b"
        assert t.probe("b", SELF_IP).split()[1] != PODS["b"]


def test_the_fast_path_is_off_by_default_and_the_node_tracks_the_flow():
    with lab(fast=False) as t:
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
        assert t.tracked(PODS["a"], PODS["b"])


def test_the_fast_path_survives_the_applier_killed_and_a_config_changed_behind_it_is_restored():
    with lab(fast=True) as t:
        t.svc.proc.kill()  # -9: programs and maps stay pinned and attached
        t.svc.proc.wait()
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
        assert not t.tracked(PODS["a"], PODS["b"])
        t.svc = NsDriver(t.node, SERVICES, t.pins, "on", SERVICE_CIDR)
        try:
            t.apply()
            assert t.svc.ask(op="verify")["problem"] is None
            config = f"{t.pins}/podnet/{_instance(t)}/maps/podnet_svc_config"
            in_ns(t.node, "bpftool", "map", "update", "pinned", config, "key", "hex", "00", "00", "00", "00",
                  "value", "hex", "00", "00", "00", "00")  # switched off behind the agent's back
            assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
            assert t.tracked(PODS["a"], PODS["b"]), "off: the node's path"
            assert "fast path" in t.svc.ask(op="verify")["problem"]
            t.apply(resync=True)
            assert t.svc.ask(op="verify")["problem"] is None
            in_ns(t.node, "conntrack", "-F", check=False)
            assert t.probe("a", CLUSTER_IP, "udp") == f"b {PODS['a']}"
            assert not t.tracked(PODS["a"], PODS["b"])
        finally:
            t.svc.close()


def _instance(t: Lab) -> str:
    return py_in(t.node, "from podnet.ebpf.bpffs import instance_name; print(instance_name('node'))").stdout.strip()


def test_with_ebpf_policy_the_fast_path_still_denies_and_admits():
    with lab(fast=True, policy="ebpf") as t:
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
        assert t.probe("a", CLUSTER_IP, "udp") == f"b {PODS['a']}"
        assert not t.tracked(PODS["a"], PODS["b"]), "admitted, and on the fast path"
        assert t.probe("c", CLUSTER_IP, timeout=0.7) == "timeout"
        assert t.probe("c", CLUSTER_IP, "udp", timeout=0.7) == "timeout"


def test_with_nftables_policy_the_fast_path_is_off_and_policy_denies():
    # the agent switches the fast path off with nftables policy (daemon.py); so does this node
    with lab(fast=False, policy="nftables") as t:
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
        assert t.tracked(PODS["a"], PODS["b"]), "the node's path, where nftables policy judges"
        assert t.probe("c", CLUSTER_IP, timeout=0.7) == "timeout"



UDP_WITH_TTL = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(sys.argv[2]))
s.settimeout(1.0)
s.connect((sys.argv[1], 53))
s.send(b"hi")
try:
    print(s.recv(256).decode())
except OSError as e:
    print(type(e).__name__)
"""


def test_the_fast_path_decrements_the_ttl_as_routing_would():
    with lab(fast=True) as t:
        def answer(ttl: int) -> str:
            return subprocess.run(["ip", "netns", "exec", t.pods["a"], PYTHON, "-c", UDP_WITH_TTL, CLUSTER_IP,
                                   str(ttl)], capture_output=True, text=True, timeout=30).stdout.strip()

        assert answer(2) == f"b {PODS['a']}"
        assert not t.tracked(PODS["a"], PODS["b"]), "TTL 2: on the fast path"
        # TTL 1 would reach the pod if the redirect kept it; the node's path drops it
        # (ICMP time exceeded), as a routed hop does
        assert answer(1) != f"b {PODS['a']}"


def test_without_the_redirect_filter_marked_packets_take_the_nodes_path_both_ways():
    """The redirect filter deleted behind the agent's back: the client's packets still carry
    the fast path's marks (podnet_svc_from_pod set them) and take the node's path to the
    backend, whose replies get their reverse NAT at the client's veth; a resync attaches
    the filter again."""
    from podnet.dataplane.pods import host_ifname

    with lab(fast=True) as t:
        veth = host_ifname("c-a", "eth0")
        in_ns(t.node, "tc", "filter", "del", "dev", veth, "ingress", "prio", "4")
        assert "podnet_svc_redirect" not in in_ns(t.node, "tc", "filter", "show", "dev", veth, "ingress").stdout
        assert t.probe("a", CLUSTER_IP) == f"b {PODS['a']}"
        assert t.probe("a", CLUSTER_IP, "udp") == f"b {PODS['a']}"
        assert t.tracked(PODS["a"], PODS["b"]), "without the redirect: the node's path"
        t.apply(resync=True)
        assert "podnet_svc_redirect" in in_ns(t.node, "tc", "filter", "show", "dev", veth, "ingress").stdout
        in_ns(t.node, "conntrack", "-F", check=False)
        assert t.probe("a", CLUSTER_IP, "udp") == f"b {PODS['a']}"
        assert not t.tracked(PODS["a"], PODS["b"]), "the filter back: veth to veth again"
