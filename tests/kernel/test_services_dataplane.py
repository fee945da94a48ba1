r"""Service load balancing with real packets.

Topology (built once for the module, every name unique, all removed at the end):

    client (10.10.0.2)  --\                         /-- routed veth -- b1..b4 (10.20.0.11..14)
                          cbr -- node (10.10.0.1, 10.20.0.1)
    client2 (10.10.0.3) --/                         \-- veth -- wan (default route)

The node runs the podnet Service applier in a long-lived process (as the agent
would, so the applier keeps its state between syncs). Backends answer every TCP
connection / UDP datagram with "<their name> <the source address they saw>".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from podnet.ebpf.bpffs import ensure_shared_bpffs
from tests.kernel.nsutil import PYTHON, NsDriver, in_ns, namespaces, py_in, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NODE_IPS = ["10.10.0.1", "10.20.0.1"]
CLIENT, CLIENT2 = "10.10.0.2", "10.10.0.3"
BACKENDS = {f"b{i}": f"10.20.0.{10 + i}" for i in range(1, 5)}
SERVICE_CIDR = "10.96.0.0/16"
TCP_PORTS = (8080, 9090)
UDP_PORT = 5353

BACKEND_SERVER = r"""
import selectors, socket, sys
name = sys.argv[1]
sel = selectors.DefaultSelector()
for port in (8080, 9090):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, "tcp")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
sel.register(u, selectors.EVENT_READ, "udp")
try:  # SCTP: the packets only need to arrive (the test kernel may lack SCTP sockets)
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
    sel.register(r, selectors.EVENT_READ, "sctp")
except OSError:
    pass
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "tcp":
            c, peer = s.accept()
            try:
                c.sendall(f"{name} {peer[0]}\n".encode())
            except OSError:
                pass
            c.close()
        elif key.data == "udp":
            data, peer = s.recvfrom(2048)
            s.sendto(f"{name} {peer[0]}".encode(), peer)
        else:
            data, peer = s.recvfrom(2048)
            ihl = (data[0] & 15) * 4
            dport = int.from_bytes(data[ihl + 2:ihl + 4], "big")
            dst = socket.inet_ntoa(data[16:20])
            sctp = data[ihl:ihl + 8] + bytes(4) + data[ihl + 12:]  # its CRC32c, computed with the field 0
            crc = 0xFFFFFFFF
            for b in sctp:
                crc ^= b
                for _ in range(8):
                    crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
            good = (crc ^ 0xFFFFFFFF).to_bytes(4, "little") == data[ihl + 8:ihl + 12]
            with open(f"/tmp/{sys.argv[2]}-sctp", "a") as f:
                f.write(f"{name} {peer[0]} {dst} {dport} {'crc-ok' if good else 'crc-bad'}\n")
            if sctp[12] == 1:  # an INIT: answer with an INIT ACK (to the initiate tag) for the reverse path
                reply = sctp[2:4] + sctp[0:2] + sctp[16:20] + bytes(4) + bytes((2, 0, 0, 20)) + sctp[20:32]
                crc = 0xFFFFFFFF
                for b in reply:
                    crc ^= b
                    for _ in range(8):
                        crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
                s.sendto(reply[:8] + (crc ^ 0xFFFFFFFF).to_bytes(4, "little") + reply[12:], (peer[0], 0))
"""

# Runs inside the node namespace: reads one JSON command per line, answers one JSON line.
DRIVER = r"""
import json, sys
from podnet.model.objects import EndpointSlice, Pod, Service
from podnet.services.applier import NftServiceApplier
from podnet.services.compiler import compile_services
from podnet.services.health import HealthCheckServer
from podnet.services.iptables import IptablesServiceApplier
from podnet.services.model import ServiceConfig
from podnet.services.nftables import describe_delta

backend = sys.argv[1] if len(sys.argv) > 1 else "nft"
if backend == "ebpf":
    from podnet.ebpf.bpffs import PinDir
    from podnet.services.ebpf.applier import EbpfServiceApplier
    pins = PinDir.for_instance(sys.argv[2])

    def veths(ipr):  # the pods' veths: the backends' and pnpod0
        links = [(l.get_attr("IFLA_IFNAME"), l["index"], l.get_attr("IFLA_LINKINFO")) for l in ipr.get_links()]
        return {n: i for n, i, info in links if n not in ("wan0", "c0", "c1") and info
                and info.get_attr("IFLA_INFO_KIND") == "veth"}

    def outside(ipr, node_ips):  # the clients' veths on the bridge: their packets meet the programs
        # there, before the bridge's own netfilter hooks (br_netfilter) see them as the node's
        return {n: ipr.link_lookup(ifname=n)[0] for n in ("c0", "c1")}

    if len(sys.argv) > 3 and sys.argv[3]:  # an object of the test's: the agent's eBPF with its nftables floor
        from podnet.services.ebpf.fallback import EbpfWithNftablesFloor
        make = lambda: EbpfWithNftablesFloor(
            EbpfServiceApplier("node", pins=pins, interfaces=veths, underlay=outside, object_file=sys.argv[3]),
            NftServiceApplier())
    else:
        make = lambda: EbpfServiceApplier("node", pins=pins, interfaces=veths, underlay=outside)
elif backend == "nft":
    make = lambda: NftServiceApplier()
else:
    make = lambda: IptablesServiceApplier(binary=backend)
applier = make()
health = HealthCheckServer()
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("verify"):
        print(json.dumps({"problem": applier.verify()}), flush=True)
        continue
    try:
        services = [Service.model_validate(o) for o in cmd["objects"] if o["kind"] == "Service"]
        slices = [EndpointSlice.model_validate(o) for o in cmd["objects"] if o["kind"] == "EndpointSlice"]
        pods = [Pod.model_validate(o) for o in cmd["objects"] if o["kind"] == "Pod"]
        state = compile_services(services, slices, cmd.get("node", "n1"), cmd["node_ips"],
                                 ServiceConfig(service_cidrs=tuple(cmd["service_cidrs"])), pods)
        if cmd.get("fresh"):
            applier = make()
        r = applier.apply(state, resync=cmd.get("resync", False))
        health.sync(state.health_checks)
        out = {"sent": r.sent, "full": r.full, "reason": r.reason, "added": r.added, "removed": r.removed,
               "lines": r.lines, "stale_flows": r.stale_flows, "affinity_cleared": r.affinity_cleared,
               "read_back": getattr(r, "read_back", None),
               "errors": r.errors, "script": describe_delta(*applier.last_delta) if backend == "nft" and r.sent and not r.full else "",
               "seconds": r.seconds, "health_ports": health.ports()}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""

# Runs inside a client namespace: many probes in one process.
PROBE = r"""
import json, socket, sys, time
target, port, proto, count, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
out = []
for _ in range(count):
    t0 = time.monotonic()
    try:
        if proto == "tcp":
            s = socket.create_connection((target, port), timeout=timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            s.close()
            out.append(data.decode().strip())
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.connect((target, port)); s.send(b"hi")
            out.append(s.recv(256).decode()); s.close()
    except ConnectionRefusedError:
        out.append("refused")
    except (TimeoutError, socket.timeout):
        out.append("timeout")
    except OSError as e:
        out.append(f"error {e.errno}")
    out[-1] = [out[-1], round(time.monotonic() - t0, 4)]
print(json.dumps(out))
"""


class Node(NsDriver):
    """The Service applier, alive in the node namespace between syncs."""

    def __init__(self, ns: str, backend: str = "nft", pins: str = "", object_file: str = ""):
        super().__init__(ns, DRIVER, backend, pins, object_file, close_timeout=5)
        self.backend = backend

    def apply(self, objects: list[dict], **kw) -> dict:
        return self.ask(objects=objects, node_ips=NODE_IPS, service_cidrs=[SERVICE_CIDR], **kw)


class Topology:
    def __init__(self, ns, backend: str = "nft"):
        self.nsm = ns
        self.node = ns.new("node")
        self.client = ns.new("cl")
        self.client2 = ns.new("cl2")
        self.backends: dict[str, str] = {}
        self.procs: list[subprocess.Popen] = []
        node = self.node
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(node, "ip", "link", "add", "cbr", "type", "bridge")
        in_ns(node, "ip", "addr", "add", "10.10.0.1/24", "dev", "cbr")
        in_ns(node, "ip", "link", "set", "cbr", "up")
        for i, (client, ip) in enumerate(((self.client, CLIENT), (self.client2, CLIENT2))):
            self._veth(client, f"c{i}", "cbr", ip, "10.10.0.1", 24)
        # "wan": the node's default route. It owns the service CIDR and the external
        # addresses, so anything podnet fails to catch is answered (RST, port
        # unreachable) rather than silently lost: a drop by podnet shows as a timeout.
        self.wan = ns.new("wan")
        in_ns(node, "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", self.wan)
        in_ns(node, "ip", "addr", "add", "10.30.0.1/24", "dev", "wan0")
        in_ns(node, "ip", "link", "set", "wan0", "up")
        in_ns(node, "ip", "route", "add", "default", "via", "10.30.0.2")
        in_ns(self.wan, "ip", "addr", "add", "10.30.0.2/24", "dev", "eth0")
        in_ns(self.wan, "ip", "link", "set", "eth0", "up")
        in_ns(self.wan, "ip", "route", "add", "10.0.0.0/8", "via", "10.30.0.1")
        for cidr in (SERVICE_CIDR, "198.51.100.0/24", "203.0.113.0/24"):
            in_ns(self.wan, "ip", "route", "add", "local", cidr, "dev", "lo")
        for name, ip in BACKENDS.items():
            bns = ns.new(name)
            self.backends[name] = bns
            # routed, as podnet's pod interfaces: a /32 route per backend, no bridge
            in_ns(node, "ip", "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns", bns)
            in_ns(node, "ip", "addr", "add", "10.20.0.1/32", "dev", f"v{name}")
            in_ns(node, "ip", "link", "set", f"v{name}", "up")
            in_ns(node, "ip", "route", "add", f"{ip}/32", "dev", f"v{name}")
            in_ns(bns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            in_ns(bns, "ip", "link", "set", "eth0", "up")
            in_ns(bns, "ip", "route", "add", "default", "via", "10.20.0.1")
            p = subprocess.Popen(["ip", "netns", "exec", bns, PYTHON, "-c", BACKEND_SERVER, name, ns.tag],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.procs.append(p)
        for p in self.procs:
            assert p.stdout and p.stdout.readline().strip() == "ready"
        self.backend = backend
        self.pins = f"test-{ns.tag}"  # the eBPF backend's pin directory, removed by close()
        self.pin_root = ensure_shared_bpffs()  # the drivers (ip netns exec) pin there
        self.driver = Node(node, backend, self.pins)

    def _veth(self, ns: str, host_if: str, bridge: str, ip: str, gw: str, plen: int) -> None:
        in_ns(self.node, "ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        in_ns(self.node, "ip", "link", "set", host_if, "master", bridge, "up")
        in_ns(ns, "ip", "addr", "add", f"{ip}/{plen}", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "ip", "route", "add", "default", "via", gw)

    def close(self) -> None:
        try:
            self.driver.close()
        finally:  # a driver that failed to remove its programs must not leave their pins (links)
            for p in self.procs:
                p.kill()
                p.wait()
            sh("rm", "-f", f"/tmp/{self.nsm.tag}-sctp", check=False)
            sh("rm", "-rf", f"{self.pin_root}/podnet/{self.pins}", check=False)

    # -- probing

    def probe(self, target: str, port: int, proto: str = "tcp", count: int = 1, timeout: float = 2.0,
              src: str | None = None) -> list[str]:
        return [r for r, _ in self.probe_timed(target, port, proto, count, timeout, src)]

    def probe_timed(self, target, port, proto="tcp", count=1, timeout=2.0, src=None) -> list[tuple[str, float]]:
        ns = src or self.client
        out = py_in(ns, PROBE.replace("sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), "
                                      "float(sys.argv[5])",
                                      f"{target!r}, {port}, {proto!r}, {count}, {timeout}"),
                    timeout=count * timeout + 30)
        return [tuple(x) for x in json.loads(out.stdout)]

    def flush_conntrack(self) -> None:
        in_ns(self.node, "conntrack", "-F", check=False)


@pytest.fixture(scope="module", params=["nft", "ebpf"])
def topo(request):
    with namespaces() as ns:
        t = Topology(ns, request.param)
        try:
            yield t
        finally:
            t.close()


# ---------------------------------------------------------------- manifests


def service(name, cluster_ip, ports=None, ns="default", **spec) -> dict:
    status = spec.pop("status", None)
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": cluster_ip, "ports": ports or [{"port": 80, "targetPort": 8080}], **spec}}
    if status:
        body["status"] = status
    return body


def endpoint(backend, node="n1", **conditions) -> dict:
    return {"addresses": [BACKENDS[backend]], "nodeName": node, "conditions": conditions}


def slice_(svc_name, endpoints, ports=None, name=None, ns="default") -> dict:
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc_name}-x", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": "IPv4", "endpoints": endpoints}
    if ports is not None:
        body["ports"] = ports
    return body


def names(results: list[str]) -> list[str]:
    return [r.split()[0] for r in results]


def nft_only(topo, why: str) -> None:
    if topo.backend != "nft":
        pytest.skip(f"nftables internals: {why}")


# ---------------------------------------------------------------- tests


def test_clusterip_tcp_spreads_evenly_and_udp_works(topo):
    objs = [service("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 8080},
                                          {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]),
            slice_("web", [endpoint("b1"), endpoint("b2"), endpoint("b3")],
                   ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": UDP_PORT, "protocol": "UDP"}])]
    r = topo.driver.apply(objs)
    assert r["sent"] and r["full"] and r["reason"] == ("table missing" if topo.backend == "nft" else "maps empty")
    results = names(topo.probe("10.96.0.10", 80, count=300))
    counts = {b: results.count(b) for b in ("b1", "b2", "b3")}
    assert sum(counts.values()) == 300, results[:5]
    for n in counts.values():
        assert 0.20 * 300 <= n <= 0.47 * 300, counts
    udp = topo.probe("10.96.0.10", 53, "udp", count=30)
    assert set(names(udp)) <= {"b1", "b2", "b3"} and len(set(names(udp))) >= 2
    # the client's own address reaches the backend: ClusterIP traffic is not masqueraded
    assert all(x.split()[1] == CLIENT for x in udp)
    again = topo.driver.apply(objs)
    assert not again["sent"] and again["lines"] == 0


def test_multiple_ports_and_named_target_ports(topo):
    objs = [service("multi", "10.96.0.11", [{"name": "a", "port": 80, "targetPort": "web"},
                                            {"name": "b", "port": 81, "targetPort": 9090}]),
            # two pods expose "web" on different container ports: one slice each
            slice_("multi", [endpoint("b1")], ports=[{"name": "a", "port": 8080}, {"name": "b", "port": 9090}],
                   name="multi-1"),
            slice_("multi", [endpoint("b2")], ports=[{"name": "a", "port": 9090}, {"name": "b", "port": 9090}],
                   name="multi-2")]
    topo.driver.apply(objs)
    assert set(names(topo.probe("10.96.0.11", 80, count=40))) == {"b1", "b2"}
    assert set(names(topo.probe("10.96.0.11", 81, count=40))) == {"b1", "b2"}
    assert topo.probe("10.96.0.11", 82, timeout=0.5) == ["refused"]  # not a port of the Service: rejected


def test_sctp_is_dnated_to_a_backend(topo):
    objs = [service("sig", "10.96.0.12", [{"port": 9000, "protocol": "SCTP", "targetPort": 7777}]),
            slice_("sig", [endpoint("b4")], ports=[{"port": 7777, "protocol": "SCTP"}])]
    topo.driver.apply(objs)
    log = f"/tmp/{topo.nsm.tag}-sctp"
    sh("rm", "-f", log)
    # No SCTP socket support is needed: a raw INIT chunk with a valid CRC32c is enough
    # for conntrack and NAT; the backend records what arrived on a raw socket.
    reply = py_in(topo.client, SCTP_INIT_SENDER.replace("TARGET", "10.96.0.12").replace("PORT", "9000")).stdout.split()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not os.path.exists(log):
        time.sleep(0.05)
    assert os.path.exists(log), "no SCTP packet reached a backend"
    name, src, dst, dport, crc = open(log).read().split("\n")[0].split()
    assert (name, src, dst, int(dport), crc) == ("b4", CLIENT, BACKENDS["b4"], 7777, "crc-ok")
    if topo.backend == "ebpf":  # reverse NAT (conntrack leaves this bare INIT ACK [UNREPLIED]: nftables
        # translates the replies of associations it tracked, which this exchange is too short to be)
        assert reply == ["10.96.0.12", "9000", "crc-ok"]


SCTP_INIT_SENDER = r"""
import os, socket, struct
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x11223344, 65535, 1, 1, 0x01020304)
pkt = struct.pack("!HHII", 40000, PORT, 0, 0) + init
pkt = pkt[:8] + struct.pack("<I", crc32c(pkt)) + pkt[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
s.settimeout(3)
s.sendto(pkt, ("TARGET", 0))
try:  # the INIT ACK, as the client sees it: from the Service's address and port, checksum right
    while True:
        data, peer = s.recvfrom(2048)
        ihl = (data[0] & 15) * 4
        sctp = data[ihl:]
        if int.from_bytes(sctp[2:4], "big") == 40000:
            good = crc32c(sctp[:8] + bytes(4) + sctp[12:]).to_bytes(4, "little") == sctp[8:12]
            print(peer[0], int.from_bytes(sctp[0:2], "big"), "crc-ok" if good else "crc-bad")
            break
except TimeoutError:
    print("no reply")
"""


def test_no_endpoints_is_refused_fast_and_unused_service_ips_time_out(topo):
    objs = [service("empty", "10.96.0.13", [{"name": "t", "port": 80}, {"name": "u", "port": 53, "protocol": "UDP"}])]
    topo.driver.apply(objs)
    (tcp, t_tcp), = topo.probe_timed("10.96.0.13", 80, timeout=3)
    (udp, t_udp), = topo.probe_timed("10.96.0.13", 53, "udp", timeout=3)
    assert tcp == "refused" and t_tcp < 0.5
    assert udp == "refused" and t_udp < 0.5
    (unused, t_unused), = topo.probe_timed("10.96.0.250", 80, timeout=0.7)
    assert unused == "timeout" and t_unused >= 0.6
    # from the node itself, too
    res = json.loads(py_in(topo.node, PROBE.replace(
        "sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])",
        "'10.96.0.13', 80, 'tcp', 1, 2.0")).stdout)
    assert res[0][0] == "refused"


def test_nodeport_from_outside_and_from_the_node_is_masqueraded(topo):
    objs = [service("np", "10.96.0.14", type="NodePort",
                    ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080},
                           {"name": "u", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT, "nodePort": 30053}]),
            slice_("np", [endpoint("b1"), endpoint("b2", node="n2")],
                   ports=[{"port": 8080}, {"name": "u", "port": UDP_PORT, "protocol": "UDP"}])]
    objs[0]["spec"]["ports"][0]["name"] = ""
    topo.driver.apply(objs)
    outside = topo.probe("10.10.0.1", 30080, count=20)
    assert set(names(outside)) == {"b1", "b2"}
    assert {x.split()[1] for x in outside} == {"10.20.0.1"}  # masqueraded to the node
    assert set(names(topo.probe("10.10.0.1", 30053, "udp", count=10))) <= {"b1", "b2"}
    for addr in NODE_IPS:  # from the node itself, on each of its addresses (output hook)
        res = json.loads(py_in(topo.node, PROBE.replace(
            "sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])",
            f"{addr!r}, 30080, 'tcp', 6, 2.0")).stdout)
        assert set(names([r for r, _ in res])) <= {"b1", "b2"} and res[0][0] != "refused", res


def test_external_ips_and_load_balancer_source_ranges(topo):
    lb = service("lb", "10.96.0.15", type="LoadBalancer", externalIPs=["198.51.100.5"],
                 loadBalancerSourceRanges=[f"{CLIENT}/32"],
                 ports=[{"port": 80, "targetPort": 8080, "nodePort": 30081}],
                 status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})
    objs = [lb, slice_("lb", [endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    assert names(topo.probe("198.51.100.5", 80)) == ["b3"]
    assert names(topo.probe("203.0.113.7", 80)) == ["b3"]
    assert topo.probe("203.0.113.7", 80, src=topo.client2, timeout=0.7) == ["timeout"]  # not in the ranges
    assert names(topo.probe("198.51.100.5", 80, src=topo.client2)) == ["b3"]  # ranges are for LB IPs only
    lb["spec"]["loadBalancerSourceRanges"] = ["10.10.0.0/24"]
    r = topo.driver.apply(objs)
    assert not r["full"] and (0 < len(r["script"].splitlines()) < 10 if topo.backend == "nft" else r["sent"]), r
    assert names(topo.probe("203.0.113.7", 80, src=topo.client2)) == ["b3"]


def test_session_affinity_sticks_to_one_backend(topo):
    objs = [service("sticky", "10.96.0.16", sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            slice_("sticky", [endpoint("b1"), endpoint("b2"), endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    first = names(topo.probe("10.96.0.16", 80, count=30))
    assert len(set(first)) == 1, first
    other = names(topo.probe("10.96.0.16", 80, count=30, src=topo.client2))
    assert len(set(other)) == 1, other
    # the chosen backend goes away: its affinity entries are cleared, the client moves on
    chosen = first[0]
    objs[1] = slice_("sticky", [endpoint(b) for b in ("b1", "b2", "b3") if b != chosen], ports=[{"port": 8080}])
    r = topo.driver.apply(objs)
    assert r["affinity_cleared"] >= 1, r["errors"]
    moved = names(topo.probe("10.96.0.16", 80, count=20))
    assert len(set(moved)) == 1 and moved[0] != chosen


def test_external_traffic_policy_local_keeps_the_client_address(topo):
    svc = service("local", "10.96.0.17", type="NodePort", externalTrafficPolicy="Local",
                  healthCheckNodePort=31999, ports=[{"port": 80, "targetPort": 8080, "nodePort": 30082}])
    objs = [svc, slice_("local", [endpoint("b1"), endpoint("b2", node="n2")], ports=[{"port": 8080}])]
    r = topo.driver.apply(objs)
    assert r["health_ports"] == [31999]
    res = topo.probe("10.10.0.1", 30082, count=10)
    assert res == [f"b1 {CLIENT}"] * 10  # only the local endpoint, source kept
    code, body = http_get(topo.client, "10.10.0.1", 31999)
    assert code == 200 and body["localEndpoints"] == 1 and body["service"] == {"namespace": "default", "name": "local"}
    objs[1] = slice_("local", [endpoint("b2", node="n2")], ports=[{"port": 8080}])
    topo.driver.apply(objs)
    assert topo.probe("10.10.0.1", 30082, timeout=0.7) == ["timeout"]  # no local endpoint: dropped
    code, body = http_get(topo.client, "10.10.0.1", 31999)
    assert code == 503 and body["localEndpoints"] == 0
    assert names(topo.probe("10.96.0.17", 80, count=3)) == ["b2"] * 3  # ClusterIP still uses every endpoint
    objs[0] = service("local", "10.96.0.17")
    assert topo.driver.apply(objs)["health_ports"] == []


def test_internal_traffic_policy_local(topo):
    objs = [service("itp", "10.96.0.18", internalTrafficPolicy="Local"),
            slice_("itp", [endpoint("b1"), endpoint("b2", node="n2")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    assert set(names(topo.probe("10.96.0.18", 80, count=10))) == {"b1"}
    objs[1] = slice_("itp", [endpoint("b2", node="n2")], ports=[{"port": 8080}])
    topo.driver.apply(objs)
    assert topo.probe("10.96.0.18", 80, timeout=0.7) == ["timeout"]


def test_hairpin_a_pod_reaches_itself_through_its_service(topo):
    objs = [service("self", "10.96.0.19"), slice_("self", [endpoint("b4")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    res = topo.probe("10.96.0.19", 80, src=topo.backends["b4"], count=3)
    assert res == ["b4 10.20.0.1"] * 3  # masqueraded to the node, or the reply would never be accepted


def test_terminating_endpoints_are_a_fallback(topo):
    objs = [service("term", "10.96.0.20"),
            slice_("term", [endpoint("b1", ready=False, serving=True, terminating=True), endpoint("b2")],
                   ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    assert set(names(topo.probe("10.96.0.20", 80, count=10))) == {"b2"}
    objs[1] = slice_("term", [endpoint("b1", ready=False, serving=True, terminating=True),
                              endpoint("b2", ready=False, serving=False, terminating=True)], ports=[{"port": 8080}])
    topo.driver.apply(objs)
    assert set(names(topo.probe("10.96.0.20", 80, count=10))) == {"b1"}


def test_udp_client_keeps_working_after_its_backend_is_removed(topo):
    objs = [service("dns", "10.96.0.21", [{"port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]),
            slice_("dns", [endpoint("b1")], ports=[{"port": UDP_PORT, "protocol": "UDP"}])]
    topo.driver.apply(objs)
    client = subprocess.Popen(["ip", "netns", "exec", topo.client, PYTHON, "-c", UDP_CLIENT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert ask(client) == "b1"
        # b1 keeps running, but is no longer an endpoint; without the cleanup the
        # client's conntrack entry would keep sending it to b1
        objs[1] = slice_("dns", [endpoint("b2")], ports=[{"port": UDP_PORT, "protocol": "UDP"}])
        r = topo.driver.apply(objs)
        assert r["stale_flows"] >= 1
        assert ask(client) == "b2"
    finally:
        client.kill()
        client.wait()


UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.connect(("10.96.0.21", 53))
for _ in sys.stdin:
    s.send(b"q")
    try:
        print(s.recv(100).decode().split()[0], flush=True)
    except OSError as e:
        print(f"error {e}", flush=True)
"""


def ask(proc: subprocess.Popen) -> str:
    assert proc.stdin and proc.stdout
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def http_get(ns: str, host: str, port: int) -> tuple[int, dict]:
    out = py_in(ns, f"""
import json, urllib.request, urllib.error
try:
    r = urllib.request.urlopen("http://{host}:{port}/healthz", timeout=3); code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print(json.dumps([code, json.loads(body)]))
""")
    code, body = json.loads(out.stdout)
    return code, body


def test_incremental_apply_sends_only_the_new_service(topo):
    base = []
    for i in range(40):
        base.append(service(f"bulk{i}", f"10.96.1.{i + 1}"))
        base.append(slice_(f"bulk{i}", [endpoint("b1"), endpoint("b2")], ports=[{"port": 8080}]))
    topo.driver.apply(base)
    one = [service("extra", "10.96.2.1"), slice_("extra", [endpoint("b3"), endpoint("b4")], ports=[{"port": 8080}])]
    r = topo.driver.apply(base + one)
    assert r["sent"] and not r["full"]
    if topo.backend == "ebpf":
        # one frontend, two slots, two backends, the address in cluster_ips
        assert (r["added"], r["removed"]) == (6, 0), r
        assert set(names(topo.probe("10.96.2.1", 80, count=10))) == {"b3", "b4"}
        assert (topo.driver.apply(base)["added"], topo.driver.apply(base + one)["removed"]) == (0, 0)
        assert topo.driver.apply(base)["removed"] == 6
        return
    script = r["script"]
    assert "10.96.1." not in script and "delete" not in script
    # one service_ips element, one tier bit (2 endpoints: N-1 = 0b1), two slots, the address in cluster_ips
    assert (r["added"], r["removed"]) == (5, 0)
    assert len(script.splitlines()) <= 10, script
    assert set(names(topo.probe("10.96.2.1", 80, count=10))) == {"b3", "b4"}
    assert set(names(topo.probe("10.96.1.40", 80, count=10))) == {"b1", "b2"}
    r = topo.driver.apply(base)
    assert (r["added"], r["removed"]) == (0, 5)


def test_restart_adopts_the_kernel_and_garbled_tables_are_rebuilt(topo):
    nft_only(topo, "the table's digest and chains (the eBPF backend's own: test_services_ebpf.py)")
    objs = [service("keep", "10.96.0.22"), slice_("keep", [endpoint("b1")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    r = topo.driver.apply(objs, fresh=True)  # a new applier, as after an agent restart
    assert not r["sent"] and not r["full"] and not r["read_back"], r  # the digest vouched for the elements
    # a Service added while the agent was down: the digest differs, the elements are read, the diff sent
    more = [*objs, service("late", "10.96.0.24"), slice_("late", [endpoint("b2")], ports=[{"port": 8080}])]
    r = topo.driver.apply(more, fresh=True)
    assert r["sent"] and not r["full"] and r["read_back"] and r["added"] == 3, r  # slot, service_ips, cluster_ips
    assert names(topo.probe("10.96.0.24", 80)) == ["b2"]
    # an element deleted behind podnet's back: a restart trusts the digest, a resync reads and repairs
    in_ns(topo.node, "nft", "delete", "element", "ip", "podnet-svc", "backends_1", "{ 10.96.0.24 . tcp . 80 . 0 }")
    assert topo.probe("10.96.0.24", 80, timeout=0.5) == ["refused"]  # not DNATed: a ClusterIP without that port
    r = topo.driver.apply(more, resync=True)
    assert r["sent"] and not r["full"] and r["read_back"] and (r["added"], r["removed"]) == (1, 0), r
    assert names(topo.probe("10.96.0.24", 80)) == ["b2"]
    in_ns(topo.node, "nft", "flush", "chain", "ip", "podnet-svc", "services")
    assert topo.probe("10.96.0.22", 80, timeout=0.5) == ["refused"]  # nothing DNATs: the ClusterIP rejects
    r = topo.driver.apply(objs, resync=True)
    assert r["full"] and "services" in r["reason"]
    assert names(topo.probe("10.96.0.22", 80)) == ["b1"]
    in_ns(topo.node, "nft", "delete", "table", "ip", "podnet-svc")
    r = topo.driver.apply(objs, resync=True)
    assert r["full"] and r["reason"] == "table missing"
    assert names(topo.probe("10.96.0.22", 80)) == ["b1"]


def test_established_connections_survive_a_rebuild(topo):
    nft_only(topo, "a deleted table rebuilt (the eBPF backend's restarts: test_services_ebpf.py)")
    objs = [service("long", "10.96.0.23", [{"port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]),
            slice_("long", [endpoint("b2")], ports=[{"port": UDP_PORT, "protocol": "UDP"}])]
    topo.driver.apply(objs)
    assert socket  # (the UDP client below holds one conntrack entry across the rebuild)
    client = subprocess.Popen(["ip", "netns", "exec", topo.client, PYTHON, "-c",
                               UDP_CLIENT.replace("10.96.0.21", "10.96.0.23")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert ask(client) == "b2"
        in_ns(topo.node, "nft", "delete", "table", "ip", "podnet-svc")
        topo.driver.apply(objs, resync=True)
        assert ask(client) == "b2"
    finally:
        client.kill()
        client.wait()


# ---------------------------------------------------------------- kube-proxy parity (shared with the iptables tests)


POD = "10.21.0.50"  # a pod of this node that is not an endpoint of the Services below (off the backends' /24)


def pod_ns(topo) -> str:
    """A pod on the node: routed veth whose host side has podnet's pod interface prefix."""
    if getattr(topo, "pod", None) is None:
        pod = topo.nsm.new("pod")
        in_ns(topo.node, "ip", "link", "add", "pnpod0", "type", "veth", "peer", "name", "eth0", "netns", pod)
        in_ns(topo.node, "ip", "addr", "add", "10.20.0.1/32", "dev", "pnpod0")
        in_ns(topo.node, "ip", "link", "set", "pnpod0", "up")
        in_ns(topo.node, "ip", "route", "add", f"{POD}/32", "dev", "pnpod0")
        in_ns(pod, "ip", "addr", "add", f"{POD}/32", "dev", "eth0")
        in_ns(pod, "ip", "link", "set", "eth0", "up")
        in_ns(pod, "ip", "route", "add", "10.20.0.1", "dev", "eth0")
        in_ns(pod, "ip", "route", "add", "default", "via", "10.20.0.1")
        topo.pod = pod
    return topo.pod


def from_node(topo, target: str, port: int, count: int = 1, timeout: float = 2.0) -> list[str]:
    res = json.loads(py_in(topo.node, PROBE.replace(
        "sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])",
        f"{target!r}, {port}, 'tcp', {count}, {timeout}")).stdout)
    return [r for r, _ in res]


def check_invalid_clusterip_ports_are_rejected(topo) -> None:
    svc = service("ports", "10.96.0.30", [{"name": "a", "port": 80, "targetPort": 8080},
                                          {"name": "b", "port": 81, "targetPort": 9090}])
    objs = [svc, slice_("ports", [endpoint("b1")], ports=[{"name": "a", "port": 8080}, {"name": "b", "port": 9090}])]
    topo.driver.apply(objs)
    assert names(topo.probe("10.96.0.30", 81)) == ["b1"]
    assert topo.probe("10.96.0.30", 82) == ["refused"]  # a real ClusterIP, a port it does not have
    assert topo.probe("10.96.0.30", 82, "udp") == ["refused"]
    assert from_node(topo, "10.96.0.30", 82) == ["refused"]
    assert topo.probe("10.96.0.31", 82, timeout=0.7) == ["timeout"]  # an unallocated address: dropped
    # the port that carried the address goes; the address stays rejected while a port needs it
    svc["spec"]["ports"] = svc["spec"]["ports"][1:]
    topo.driver.apply(objs)
    assert names(topo.probe("10.96.0.30", 81)) == ["b1"]
    assert topo.probe("10.96.0.30", 80) == ["refused"]
    topo.driver.apply(objs[1:])  # the Service goes: its address is unallocated again
    assert topo.probe("10.96.0.30", 80, timeout=0.7) == ["timeout"]


def check_affinity_is_shared_by_the_frontends_of_a_port(topo) -> None:
    objs = [service("share", "10.96.0.32", type="NodePort", externalIPs=["198.51.100.32"],
                    sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                    ports=[{"port": 80, "targetPort": 8080, "nodePort": 30032}]),
            slice_("share", [endpoint("b1"), endpoint("b2"), endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    for client in (topo.client, topo.client2):
        first = names(topo.probe("10.96.0.32", 80, src=client))
        # the same endpoint through the NodePort and the externalIP, as through the ClusterIP
        assert names(topo.probe("10.10.0.1", 30032, count=12, src=client)) == first * 12
        assert names(topo.probe("198.51.100.32", 80, count=12, src=client)) == first * 12
        assert names(topo.probe("10.96.0.32", 80, count=6, src=client)) == first * 6


def check_external_local_short_circuit(topo) -> None:
    """externalTrafficPolicy Local, no endpoint on this node: external clients are dropped,
    this node's pods (and the node) reach an endpoint through the LB IP, externalIP, NodePort."""
    objs = [service("sc", "10.96.0.33", type="LoadBalancer", externalTrafficPolicy="Local",
                    externalIPs=["198.51.100.33"], healthCheckNodePort=31033,
                    ports=[{"port": 80, "targetPort": 8080, "nodePort": 30033}],
                    status={"loadBalancer": {"ingress": [{"ip": "203.0.113.33"}]}}),
            slice_("sc", [endpoint("b1", node="n2"), endpoint("b2", node="n2")], ports=[{"port": 8080}])]
    pod = pod_ns(topo)  # (before the sync: the eBPF backend attaches to the pods there at each sync)
    topo.driver.apply(objs)
    for target, port in (("203.0.113.33", 80), ("198.51.100.33", 80), ("10.10.0.1", 30033)):
        assert topo.probe(target, port, timeout=0.7) == ["timeout"], target  # external client: dropped
        got = topo.probe(target, port, count=8, src=pod)
        assert set(names(got)) <= {"b1", "b2"} and all(x.split()[1] == POD for x in got), (target, got)
    assert set(names(from_node(topo, "203.0.113.33", 80, count=4))) <= {"b1", "b2"}
    # with a local endpoint, pods too use the Service's endpoints everywhere; external clients the local one
    objs[1] = slice_("sc", [endpoint("b1", node="n2"), endpoint("b2", node="n2"), endpoint("b3")],
                     ports=[{"port": 8080}])
    topo.driver.apply(objs)
    assert names(topo.probe("203.0.113.33", 80, count=6)) == ["b3"] * 6
    assert set(names(topo.probe("203.0.113.33", 80, count=30, src=pod))) == {"b1", "b2", "b3"}


def test_a_clusterip_rejects_ports_it_does_not_have(topo):
    check_invalid_clusterip_ports_are_rejected(topo)


def test_session_affinity_is_shared_by_clusterip_nodeport_and_external_ips(topo):
    check_affinity_is_shared_by_the_frontends_of_a_port(topo)


def test_pods_reach_external_addresses_of_local_policy_services_without_a_local_endpoint(topo):
    check_external_local_short_circuit(topo)
