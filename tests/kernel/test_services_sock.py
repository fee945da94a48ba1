"""The eBPF Service backend for the node's own processes (native/bpf/sock.c, cgroup
socket programs on the cgroup2 root), with real sockets on the topology of
test_services_dataplane.py: a process of the node reaches a ClusterIP's backends and
reads the Service's address as its peer (TCP getpeername, UDP recvfrom), a Service
without endpoints refuses at once and an unused Service address times out, as with
nftables; a network namespace that is not the node's is left alone (the programs see
every socket of the machine); kill -9 and a restart keep the same links; a link
detached, a link unpinned and the namespace's cookie deleted behind the agent are
found by verify() and repaired by a resync; removing the pins detaches the programs.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest

from podnet.ebpf.bpffs import ensure_shared_bpffs
from podnet.ebpf.build import object_path
from podnet.services.ebpf.sock import NETNS, PROGRAMS
from tests.kernel.nsutil import PYTHON, in_ns, namespaces, py_in, sh
from tests.kernel.test_services_dataplane import Node, Topology, endpoint, service, slice_

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf(2) and network namespaces")

# A process of the node: connects (TCP) or sends unconnected (UDP) and reports what it
# got, with the peer address the kernel gives it.
NODE_CLIENT = r"""
import json, socket, sys
target, port, proto, count, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
out = []
for _ in range(count):
    try:
        if proto == "tcp":
            s = socket.create_connection((target, port), timeout=timeout)
            peer = s.getpeername()
            data = s.makefile().readline().strip()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.sendto(b"hi", (target, port))
            data, peer = s.recvfrom(256)
            data = data.decode()
        s.close()
        out.append([data, f"{peer[0]}:{peer[1]}"])
    except ConnectionRefusedError:
        out.append(["refused", ""])
    except (TimeoutError, socket.timeout):
        out.append(["timeout", ""])
    except OSError as e:
        out.append([f"error {e.errno}", ""])
print(json.dumps(out))
"""

SINK_SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"sink\n"); c.close()
"""

CIP, EMPTY, UNUSED = "10.96.7.1", "10.96.7.2", "10.96.7.250"


def run_client(ns: str, target: str, port: int, proto: str = "tcp", count: int = 1,
               timeout: float = 2.0) -> list[tuple[str, str]]:
    args = f"{target!r}, {port}, {proto!r}, {count}, {timeout}"
    code = NODE_CLIENT.replace("sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])", args)
    return [tuple(x) for x in json.loads(py_in(ns, code, timeout=count * timeout + 30).stdout)]


def from_node(topo, target: str, port: int, proto: str = "tcp", count: int = 1, timeout: float = 2.0):
    return run_client(topo.node, target, port, proto, count, timeout)


@pytest.fixture(scope="module")
def topo():
    with namespaces() as ns:
        t = Topology(ns, "ebpf")
        try:
            t.driver.apply(OBJECTS)
            yield t
        finally:
            t.close()


OBJECTS = [
    service("own", CIP, [{"name": "t", "port": 80, "targetPort": 8080},
                         {"name": "u", "port": 53, "protocol": "UDP", "targetPort": 5353}]),
    slice_("own", [endpoint("b1"), endpoint("b2")],
           ports=[{"name": "t", "port": 8080}, {"name": "u", "port": 5353, "protocol": "UDP"}]),
    service("empty", EMPTY, [{"port": 80}]),
]


def link_path(topo, prog: str) -> str:
    return f"{topo.pin_root}/podnet/{topo.pins}/links/{prog}"


def link_ids(topo) -> dict[str, int]:
    """program -> id of its pinned link (bpftool)."""
    out = {}
    for prog in PROGRAMS:
        if os.path.exists(link_path(topo, prog)):
            out[prog] = json.loads(sh("bpftool", "-j", "link", "show", "pinned", link_path(topo, prog)).stdout)["id"]
    return out


def reaches_backends(topo) -> bool:
    got = from_node(topo, CIP, 80, timeout=1.0)
    return got[0][0].split()[0] in ("b1", "b2") and got[0][1] == f"{CIP}:80"


def test_node_processes_reach_backends_and_see_the_service_address(topo):
    seen: set[str] = set()
    for _ in range(10):  # random choice: until both backends answered (bounded)
        got = from_node(topo, CIP, 80, count=8)
        for data, peer in got:
            name, src = data.split()
            assert name in ("b1", "b2") and peer == f"{CIP}:80", got  # getpeername: the ClusterIP
            assert src == "10.20.0.1", got  # the node's own address towards the pods, no masquerade
            seen.add(name)
        if seen == {"b1", "b2"}:
            break
    assert seen == {"b1", "b2"}
    udp = from_node(topo, CIP, 53, "udp", count=4)  # unconnected: sendto, recvfrom
    assert all(d.split()[0] in ("b1", "b2") and p == f"{CIP}:53" for d, p in udp), udp


def test_no_endpoints_refuses_and_unused_addresses_time_out_from_the_node(topo):
    assert from_node(topo, EMPTY, 80)[0][0] == "refused"
    assert from_node(topo, CIP, 81)[0][0] == "refused"  # a port the ClusterIP does not have
    # the wan namespace answers the whole Service CIDR with resets: a timeout is the drop
    assert from_node(topo, UNUSED, 80, timeout=0.7)[0][0] == "timeout"
    assert from_node(topo, UNUSED, 53, "udp", timeout=0.7)[0][0] == "error 1"  # EPERM, as nftables' drop


def test_another_network_namespace_is_not_redirected(topo):
    """The programs run for every socket of the machine: only the node's are translated."""
    other, sink = topo.nsm.new("oth"), topo.nsm.new("snk")
    in_ns(other, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", sink)
    for ns, ip in ((other, "10.77.0.1/24"), (sink, "10.77.0.2/24")):
        in_ns(ns, "ip", "addr", "add", ip, "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(other, "ip", "route", "add", "default", "via", "10.77.0.2")
    in_ns(sink, "ip", "route", "add", "local", "10.96.0.0/16", "dev", "lo")
    server = subprocess.Popen(["ip", "netns", "exec", sink, PYTHON, "-c", SINK_SERVER],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout and server.stdout.readline().strip() == "ready"
        assert reaches_backends(topo)  # the node's processes are translated meanwhile
        got = run_client(other, CIP, 80, count=4)
        assert got == [("sink", f"{CIP}:80")] * 4, got  # the ClusterIP itself answered
        assert run_client(other, EMPTY, 80)[0] == ("sink", f"{EMPTY}:80")  # no reject either
    finally:
        server.kill()
        server.wait()


def test_killed_agent_keeps_its_links_and_a_restart_adopts_them(topo):
    before = link_ids(topo)
    assert set(before) == set(PROGRAMS)
    topo.driver.proc.kill()  # the agent killed with -9
    topo.driver.proc.wait()
    assert reaches_backends(topo)  # pinned links stay attached
    topo.driver = Node(topo.node, "ebpf", topo.pins)
    r = topo.driver.apply(OBJECTS)
    assert not r["sent"] and not r["errors"], r
    assert link_ids(topo) == before  # adopted: the same links, no gap
    assert topo.driver.ask(verify=True)["problem"] is None
    assert reaches_backends(topo)


def test_resync_repairs_links_and_the_namespace_cookie_changed_behind_the_agent(topo):
    connect = "podnet_sock_connect4"
    # a link detached (bpftool link detach): the node's connects go out untranslated
    sh("bpftool", "link", "detach", "id", str(link_ids(topo)[connect]))
    assert "detached" in topo.driver.ask(verify=True)["problem"]
    assert from_node(topo, CIP, 80)[0][0] == "refused"  # the wan's reset for the ClusterIP itself
    topo.driver.apply(OBJECTS, resync=True)
    assert topo.driver.ask(verify=True)["problem"] is None and reaches_backends(topo)
    # a link unpinned: held by the agent, pinned again
    os.unlink(link_path(topo, connect))
    assert "not pinned" in topo.driver.ask(verify=True)["problem"]
    topo.driver.apply(OBJECTS, resync=True)
    assert os.path.exists(link_path(topo, connect)) and topo.driver.ask(verify=True)["problem"] is None
    # the socket programs' pins and the namespace map's pin deleted: pinned again from what the agent holds
    sh("rm", "-rf", *glob.glob(f"{topo.pin_root}/podnet/{topo.pins}/progs/sock-*"),
       f"{topo.pin_root}/podnet/{topo.pins}/maps/{NETNS}")
    assert "not pinned" in topo.driver.ask(verify=True)["problem"]
    topo.driver.apply(OBJECTS, resync=True)
    assert topo.driver.ask(verify=True)["problem"] is None and reaches_backends(topo)
    assert glob.glob(f"{topo.pin_root}/podnet/{topo.pins}/progs/sock-*/podnet_sock_connect4")
    # the namespace's cookie zeroed: the programs act for no namespace
    sh("bpftool", "map", "update", "pinned", f"{topo.pin_root}/podnet/{topo.pins}/maps/{NETNS}",
       "key", "0", "0", "0", "0", "value", *["0"] * 8)
    assert "cookie" in topo.driver.ask(verify=True)["problem"]
    assert from_node(topo, CIP, 80)[0][0] == "refused"
    topo.driver.apply(OBJECTS, resync=True)
    assert topo.driver.ask(verify=True)["problem"] is None and reaches_backends(topo)


def test_removing_the_pins_detaches_the_programs(topo):
    ids = set(link_ids(topo).values())
    assert len(ids) == len(PROGRAMS)
    topo.driver.proc.kill()
    topo.driver.proc.wait()
    sh("rm", "-rf", f"{topo.pin_root}/podnet/{topo.pins}")  # as the lab's node removal and test cleanups do
    links = {x["id"] for x in json.loads(sh("bpftool", "-j", "link", "show").stdout)}
    assert not ids & links
    assert from_node(topo, CIP, 80)[0][0] == "refused"  # untranslated: the wan's reset
    topo.driver = Node(topo.node, "ebpf", topo.pins)  # (for the fixture's cleanup)


WITHOUT_SOCKETS = r"""
import io, json, logging
from podnet.ebpf.bpffs import PinDir
from podnet.model.objects import Service
from podnet.services.compiler import compile_services
from podnet.services.ebpf.applier import EbpfServiceApplier
from podnet.services.model import ServiceConfig
logs = io.StringIO()
logging.basicConfig(stream=logs, level=logging.WARNING)
svc = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "d"},
                              "spec": {"clusterIP": "10.96.9.1", "ports": [{"port": 80}]}})
state = compile_services([svc], [], "n1", ["10.10.0.1"], ServiceConfig(service_cidrs=("10.96.0.0/16",)), [])
a = EbpfServiceApplier("n", pins=PinDir.for_instance(PINS), interfaces=lambda ipr: {},
                       underlay=lambda ipr, ips: {}, cgroup_root=CGROUP)
try:
    r = a.apply(state)
    again = a.apply(state, resync=True)
    print(json.dumps({"errors": r.errors, "frontends": len(a.maps["podnet_svc_frontends"].items()),
                      "problem": a.verify(), "sent_again": again.sent, "log": logs.getvalue()}))
finally:
    a.remove()
"""


def test_without_a_cgroup2_hierarchy_the_tc_dataplane_goes_on_with_a_warning(tmp_path):
    pin_root = ensure_shared_bpffs()  # (the process started by ip netns exec pins there)
    with namespaces() as ns:
        node = ns.new("nocg")
        pins = f"test-{ns.tag}-nocg"
        code = WITHOUT_SOCKETS.replace("PINS", repr(pins)).replace("CGROUP", repr(str(tmp_path)))
        try:
            out = json.loads(py_in(node, code).stdout)
        finally:
            sh("rm", "-rf", f"{pin_root}/podnet/{pins}", check=False)
    assert not out["errors"] and out["frontends"] == 1 and out["problem"] is None and not out["sent_again"], out
    warnings = [ln for ln in out["log"].splitlines() if "socket programs" in ln]
    assert len(warnings) == 1, out["log"]  # once, not at every resync
    assert f"--cgroup-root {tmp_path}: not a cgroup2 directory" in warnings[0]
    assert "untranslated" in warnings[0]


HOOKS = r"""
import json
from podnet.ebpf.bpffs import PinDir
from podnet.services.ebpf.sock import NodeSocketHooks
from podnet.ebpf.syscall import link_info
h = NodeSocketHooks(PinDir.for_instance(PINS), object_file=OBJECT)
done = h.ensure()
print(json.dumps({"done": done, "links": {p: [link_info(fd).id, link_info(fd).prog_id] for p, fd in h.links.items()},
                  "builds": sorted(d.name for d in h.pins.progs.iterdir()), "problem": h.verify()}))
"""


def test_a_new_build_takes_over_the_pinned_links_in_place(tmp_path):
    """An agent started with another build of sock.o moves each link to it (BPF_LINK_UPDATE:
    no moment without a program) and unpins the old build."""
    pin_root = ensure_shared_bpffs()
    new_build = tmp_path / "sock.o"
    new_build.write_bytes(object_path("sock").read_bytes() + b"\0")  # another digest, the same programs
    with namespaces() as ns:
        node = ns.new("upg")
        pins = f"test-{ns.tag}-upg"

        def run(obj) -> dict:
            return json.loads(py_in(node, HOOKS.replace("PINS", repr(pins)).replace("OBJECT", repr(str(obj)))).stdout)

        try:
            first = run(object_path("sock"))
            second = run(new_build)
            third = run(new_build)
        finally:
            sh("rm", "-rf", f"{pin_root}/podnet/{pins}", check=False)
    assert first["problem"] is None and all(d.endswith("linked") for d in first["done"][1:]), first
    assert {p: v[0] for p, v in second["links"].items()} == {p: v[0] for p, v in first["links"].items()}
    assert all(second["links"][p][1] != first["links"][p][1] for p in PROGRAMS)  # the same links, new programs
    assert sorted(second["done"]) == sorted(f"{p}: moved to this build" for p in PROGRAMS), second
    assert len(second["builds"]) == 1 and second["builds"] != first["builds"] and second["problem"] is None
    assert third["done"] == [] and third["links"] == second["links"]  # adopted as it is
