"""The eBPF Service backend's own behaviour, with real packets on the topology of
test_services_dataplane.py: a held-open connection survives the agent killed with -9
and restarted (programs and maps stay pinned and attached; the new applier adopts
them and sends nothing), map entries, pins and filters changed behind the agent are
found by verify() and repaired by a resync, and programs that do not load leave the
node's Services on nftables with the error reported, until a loadable build takes over."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from podnet.ebpf.build import build_objects, object_path
from tests.kernel.nsutil import PYTHON, in_ns, namespaces, sh
from tests.kernel.test_ebpf_foundation import BAD_PROGRAM
from tests.kernel.test_services_dataplane import Node, Topology, endpoint, names, service, slice_

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf(2) and network namespaces")

ECHO_PORT = 7000
ECHO_SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(64)
print("ready", flush=True)
def serve(c):
    f = c.makefile("rwb", buffering=0)
    for line in f:
        f.write(f"{name} {line.decode().strip()}\n".encode())
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
# one TCP connection held open: a line on stdin is sent, the answer printed
HELD_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
f = s.makefile("rwb", buffering=0)
for line in sys.stdin:
    f.write(line.encode())
    try:
        print(f.readline().decode().strip() or "closed", flush=True)
    except OSError as e:
        print(f"error {e}", flush=True)
"""


@pytest.fixture(scope="module")
def topo():
    with namespaces() as ns:
        t = Topology(ns, "ebpf")
        try:
            yield t
        finally:
            t.close()


@pytest.fixture
def echo(topo):
    procs = []
    try:
        for name in ("b1", "b2"):
            p = subprocess.Popen(["ip", "netns", "exec", topo.backends[name], PYTHON, "-c", ECHO_SERVER, name],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            assert p.stdout and p.stdout.readline().strip() == "ready"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def held(topo, target: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", topo.client, PYTHON, "-c", HELD_CLIENT, target, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def say(proc: subprocess.Popen, word: str) -> str:
    assert proc.stdin and proc.stdout
    proc.stdin.write(word + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def pin_dir(topo) -> str:
    return f"{topo.pin_root}/podnet/{topo.pins}"


def test_a_held_connection_survives_the_agent_killed_and_restarted(topo, echo):
    objs = [service("echo", "10.96.5.1", [{"port": 70, "targetPort": ECHO_PORT}]),
            slice_("echo", [endpoint("b1"), endpoint("b2")], ports=[{"port": ECHO_PORT}])]
    topo.driver.apply(objs)
    client = held(topo, "10.96.5.1", 70)
    try:
        first = say(client, "one")
        backend = first.split()[0]
        assert first == f"{backend} one" and backend in ("b1", "b2")
        topo.driver.proc.kill()  # the agent killed with -9
        topo.driver.proc.wait()
        assert say(client, "two") == f"{backend} two"  # the programs stay attached meanwhile
        topo.driver = Node(topo.node, "ebpf", topo.pins)  # restarted: adopts pins and entries
        r = topo.driver.apply(objs)
        assert not r["sent"] and r["read_back"] and not r["errors"], r
        assert say(client, "three") == f"{backend} three"
        fresh = held(topo, "10.96.5.1", 70)  # and new connections are balanced as before
        try:
            assert say(fresh, "four").split()[0] in ("b1", "b2")
        finally:
            fresh.kill()
            fresh.wait()
    finally:
        client.kill()
        client.wait()


def test_resync_repairs_entries_pins_and_filters_changed_behind_the_agent(topo):
    objs = [service("heal", "10.96.5.2"), slice_("heal", [endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    assert names(topo.probe("10.96.5.2", 80)) == ["b3"]
    assert topo.driver.ask(verify=True)["problem"] is None
    # the frontend's entry deleted with bpftool: the ClusterIP is still allocated, so rejected
    key = "0a 60 05 02 00 50 06 00"  # 10.96.5.2, port 80, tcp
    sh("bpftool", "map", "delete", "pinned", f"{pin_dir(topo)}/maps/podnet_svc_frontends", "key", "hex",
       *key.split())
    assert topo.probe("10.96.5.2", 80, timeout=0.7) == ["refused"]
    assert "podnet_svc_frontends" in topo.driver.ask(verify=True)["problem"]
    r = topo.driver.apply(objs, resync=True)
    assert r["read_back"] and (r["added"], r["removed"]) == (1, 0), r
    assert names(topo.probe("10.96.5.2", 80)) == ["b3"]
    # a map and the programs unpinned: pinned again (a restart would otherwise make new, empty maps)
    os.unlink(f"{pin_dir(topo)}/maps/podnet_svc_slots")
    services_builds = f"{pin_dir(topo)}/progs/services-*"  # (the socket programs' build is next to it)
    shutil.rmtree(glob.glob(services_builds)[0])
    assert "not pinned" in topo.driver.ask(verify=True)["problem"]
    topo.driver.apply(objs, resync=True)
    assert os.path.exists(f"{pin_dir(topo)}/maps/podnet_svc_slots")
    assert len(glob.glob(services_builds)) == 1
    assert topo.driver.ask(verify=True)["problem"] is None
    # the filter the client's packets meet deleted: they are not balanced (the wan answers them)
    in_ns(topo.node, "tc", "filter", "del", "dev", "c0", "ingress", "prio", "1")
    assert topo.probe("10.96.5.2", 80, timeout=0.7) == ["refused"]
    assert "not attached" in topo.driver.ask(verify=True)["problem"]
    topo.driver.apply(objs, resync=True)
    assert names(topo.probe("10.96.5.2", 80)) == ["b3"]
    assert topo.driver.ask(verify=True)["problem"] is None


def test_programs_that_do_not_load_leave_services_on_nftables(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(object_path("x").parents[2] / "native" / "bpf" / "podnet_bpf.h", src)
    (src / "services.c").write_text(BAD_PROGRAM)
    bad, = build_objects(tmp_path / "out", src)
    objs = [service("floor", "10.96.5.3"), slice_("floor", [endpoint("b4")], ports=[{"port": 8080}])]
    with namespaces() as ns:
        t = Topology(ns, "nft")  # the node on nftables, as before `--service-proxy ebpf`
        try:
            t.driver.apply(objs)
            assert names(t.probe("10.96.5.3", 80)) == ["b4"]
            t.driver.close()
            t.driver = Node(t.node, "ebpf", t.pins, str(bad))
            r = t.driver.apply(objs)
            assert any("not loaded (Services on nftables)" in e and "refused to load" in e for e in r["errors"]), r
            assert names(t.probe("10.96.5.3", 80)) == ["b4"]
            assert in_ns(t.node, "nft", "list", "chain", "ip", "podnet-svc", "services").returncode == 0
            assert "bpf" not in in_ns(t.node, "tc", "filter", "show", "dev", "c0", "ingress").stdout
            # a loadable build: eBPF takes over and the nftables table goes
            t.driver.close()
            t.driver = Node(t.node, "ebpf", t.pins, str(object_path("services")))
            r = t.driver.apply(objs)
            assert not r["errors"], r
            assert names(t.probe("10.96.5.3", 80)) == ["b4"]
            assert in_ns(t.node, "nft", "list", "table", "ip", "podnet-svc", check=False).returncode != 0
            assert "podnet_svc_from_pod" in in_ns(t.node, "tc", "filter", "show", "dev", "c0", "ingress").stdout
        finally:
            t.close()


def annotated(body: dict, **annotations: str) -> dict:
    body["metadata"]["annotations"] = {f"podnet.io/{k}": v for k, v in annotations.items()}
    return body


def test_least_connection_follows_the_connections_held_open(topo, echo):
    objs = [annotated(service("lc", "10.96.5.4", [{"port": 70, "targetPort": ECHO_PORT}]), scheduler="lc"),
            slice_("lc", [endpoint("b1"), endpoint("b2")], ports=[{"port": ECHO_PORT}])]
    topo.driver.apply(objs)
    clients = []
    try:
        # each new connection (one after the other) goes to the backend with the fewest open
        # ones (a tie: the first slot)
        got = []
        for _ in range(4):
            clients.append(held(topo, "10.96.5.4", 70))
            got.append(say(clients[-1], "x").split()[0])
        assert got == ["b1", "b2", "b1", "b2"], got
        for c, b in zip(clients, got, strict=True):  # b1's two connections end (FIN counted)
            if b == "b1":
                c.kill()
                c.wait()
        again = []
        for _ in range(2):
            clients.append(held(topo, "10.96.5.4", 70))
            again.append(say(clients[-1], "y").split()[0])
        assert again == ["b1", "b1"], again
    finally:
        for c in clients:
            c.kill()
            c.wait()


def open_flows(topo, frontend_key: bytes) -> dict[str, tuple[bytes, int]]:
    """The programs' open-flow count of each endpoint of one frontend: address -> (the
    backend id's key in podnet_svc_conns, its count)."""
    from podnet.ebpf.syscall import Map
    from podnet.services.ebpf import maps as m

    maps = {}
    for name in (m.FRONTENDS, m.SLOTS, m.BACKENDS, m.CONNS):
        with Map.pinned(f"{pin_dir(topo)}/maps/{name}") as mp:
            maps[name] = mp.items()
    sid, count, _, _, _ = m.decode_frontend_value(maps[m.FRONTENDS][frontend_key])
    out = {}
    for slot in range(count):
        bid = maps[m.SLOTS][m.slot_key(sid, slot)]
        out[m.decode_backend_value(maps[m.BACKENDS][bid])[0].ip] = (bid, m.decode_conns(maps[m.CONNS][bid]))
    return out


def test_least_connection_looks_past_64_slots_and_a_resync_recounts_the_open_flows(topo, echo):
    from podnet.ebpf.syscall import Map
    from podnet.services.ebpf import maps as m
    from podnet.services.model import Frontend

    # 70 endpoints that answer nothing, in the slots before b1's and b2's (slots are in address order)
    idle = [f"10.19.0.{i}" for i in range(1, 71)]
    eps = [{"addresses": [a], "nodeName": "n1", "conditions": {}} for a in idle] + [endpoint("b1"), endpoint("b2")]
    objs = [annotated(service("lcwide", "10.96.5.8", [{"port": 70, "targetPort": ECHO_PORT}]), scheduler="lc"),
            slice_("lcwide", eps, ports=[{"port": ECHO_PORT}])]
    topo.driver.apply(objs)
    fe = m.frontend_key(Frontend("10.96.5.8", "tcp", 70))
    flows = open_flows(topo, fe)
    assert list(flows)[70:] == ["10.20.0.11", "10.20.0.12"]
    # the 70 look busy: counts drifted up, as when flows end without a FIN the programs see
    with Map.pinned(f"{pin_dir(topo)}/maps/{m.CONNS}") as conns:
        conns.update_many({flows[a][0]: m.conns_value(10) for a in idle})
    clients = []
    try:
        got = []
        for _ in range(4):  # slots 70 and 71 have the fewest: they get every new connection
            clients.append(held(topo, "10.96.5.8", 70))
            got.append(say(clients[-1], "x").split()[0])
        assert got == ["b1", "b2", "b1", "b2"], got
        flows = open_flows(topo, fe)
        assert (flows["10.20.0.11"][1], flows["10.20.0.12"][1]) == (2, 2)
        # a resync counts again from the flow map: the drift is gone, the held flows stay counted
        r = topo.driver.apply(objs, resync=True)
        assert not r.get("error") and not r["errors"], r
        flows = open_flows(topo, fe)
        assert {a: n for a, (_, n) in flows.items()} == {**{a: 0 for a in idle}, "10.20.0.11": 2, "10.20.0.12": 2}
    finally:
        for c in clients:
            c.kill()
            c.wait()


def test_source_hash_and_weights_choose_by_annotation(topo):
    sh_svc = annotated(service("sh", "10.96.5.5"), scheduler="sh")
    objs = [sh_svc, slice_("sh", [endpoint("b1"), endpoint("b2"), endpoint("b3")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    for client in (topo.client, topo.client2):  # one client, one backend, every connection
        got = names(topo.probe("10.96.5.5", 80, count=12, src=client))
        assert len(set(got)) == 1, got
    # wrr: weight 0 takes no new flows, the others share them
    annotated(sh_svc, scheduler="wrr", weights="10.20.0.11=0,10.20.0.12=2")
    topo.driver.apply(objs)
    got = set(names(topo.probe("10.96.5.5", 80, count=40)))
    assert got <= {"b2", "b3"} and "b2" in got, got


def test_a_bad_scheduler_annotation_names_the_field_and_leaves_the_rest(topo):
    objs = [annotated(service("bad", "10.96.5.6"), scheduler="fastest"),
            slice_("bad", [endpoint("b1")], ports=[{"port": 8080}]),
            service("good", "10.96.5.7"), slice_("good", [endpoint("b2")], ports=[{"port": 8080}])]
    from podnet.model.objects import Service
    from podnet.services.compiler import ServiceInfo
    info = ServiceInfo(Service.model_validate(objs[0]))
    assert info.problem == ("metadata.annotations[podnet.io/scheduler]: 'fastest' is not one of "
                            "random, lc, sh, wrr")
    topo.driver.apply(objs)
    assert names(topo.probe("10.96.5.7", 80)) == ["b2"]


def read_view(maps: dict[str, dict[bytes, bytes]]) -> tuple[dict, set, set]:
    """The maps decoded: frontend -> (flags, backends in slot order), cluster IPs, CIDRs;
    fails on a slot or backend entry no frontend reaches (a leak of the incremental path)."""
    from podnet.services.ebpf import maps as m

    backends = {m.decode_u32(k): m.decode_backend_value(v)[0] for k, v in maps[m.BACKENDS].items()}
    slots = {m.decode_slot_key(k): m.decode_u32(v) for k, v in maps[m.SLOTS].items()}
    view, used_slots = {}, set()
    for k, v in maps[m.FRONTENDS].items():
        sid, count, flags, _, _ = m.decode_frontend_value(v)
        view[m.decode_frontend_key(k)] = (flags, tuple(backends[slots[(sid, i)]] for i in range(count)))
        used_slots |= {(sid, i) for i in range(count)}
    assert set(slots) == used_slots, "slot entries no frontend counts"
    assert set(backends) == set(slots.values()), "backend entries no slot points at"
    return view, set(maps[m.CLUSTER_IPS]), set(maps[m.CIDRS])


def test_incremental_changes_leave_the_maps_as_written_from_empty(tmp_path):
    """Random Service and endpoint changes applied one sync each (the compiler's changed
    frontends only) give, after every sync, exactly the maps the state describes."""
    import random
    import socket
    import uuid

    from podnet.ebpf.bpffs import PinDir
    from podnet.model.objects import EndpointSlice, Service
    from podnet.services.compiler import ServiceCompiler
    from podnet.services.ebpf import maps as m
    from podnet.services.ebpf.applier import EbpfServiceApplier
    from podnet.services.model import ServiceConfig

    rnd = random.Random(7)
    pins = PinDir.for_instance(f"test-{uuid.uuid4().hex[:10]}")
    # no interfaces, no nftables and no socket programs (this process is in the root network
    # namespace, which no test may change): only the maps (in this test's own pin directory)
    applier = EbpfServiceApplier("t", pins=pins, interfaces=lambda ipr: {},
                                 nft=lambda script: None, node_sockets=False)
    compiler = ServiceCompiler("n1", ["10.10.0.1"], ServiceConfig(service_cidrs=("10.96.0.0/16",)))
    eps = [f"10.20.{i // 200}.{i % 200 + 1}" for i in range(60)]
    try:
        for step in range(60):
            i = rnd.randrange(12)
            name = f"s{i}"
            action = rnd.random()
            if action < 0.15:
                compiler.delete_service("default", name)
                compiler.delete_slice("default", f"{name}-x")
            else:
                ports = [{"name": "a", "port": 80, "targetPort": 8080}]
                if rnd.random() < 0.5:
                    ports.append({"name": "u", "port": 53, "protocol": "UDP", "targetPort": 5353})
                body = service(name, f"10.96.3.{i + 1}", ports)
                body["metadata"]["resourceVersion"] = str(step)
                if rnd.random() < 0.3:
                    annotated(body, scheduler=rnd.choice(["lc", "sh", "wrr"]))
                compiler.set_service(Service.model_validate(body))
                sl = slice_(name, [{"addresses": [a], "nodeName": "n1", "conditions": {}}
                                   for a in rnd.sample(eps, rnd.randrange(0, 6))],
                            ports=[{"name": "a", "port": 8080}, {"name": "u", "port": 5353, "protocol": "UDP"}])
                sl["metadata"]["resourceVersion"] = str(step)
                compiler.set_slice(EndpointSlice.model_validate(sl))
            state = compiler.state()
            applier.apply(state)
            view, cips, cidrs = read_view({n: applier.maps[n].items() for n in m.DESIRED})
            want = {r.frontend: tuple(r.backends) for r in state.frontends.values()}
            assert {fe: b for fe, (_, b) in view.items()} == want, step
            assert cips == {socket.inet_aton(r.frontend.ip) for r in state.frontends.values() if r.owns_cluster_ip}
            assert cidrs == {m.cidr_key("10.96.0.0/16")}
    finally:
        applier.remove()
        pins.remove()


CLEANUP_PROGRAM = r"""
import json, sys
from pyroute2 import IPRoute
from podnet.model.objects import EndpointSlice, Service
from podnet.services.compiler import compile_services
from podnet.services.ebpf.applier import EbpfServiceApplier
from podnet.services.model import ServiceConfig
objects = json.loads(sys.argv[1])
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname="pntest0")[0]
applier = EbpfServiceApplier("cleanme", interfaces=lambda ipr: {"pntest0": idx})
state = compile_services([Service.model_validate(objects[0])], [EndpointSlice.model_validate(objects[1])],
                         "n1", ["10.66.0.1"], ServiceConfig(service_cidrs=("10.96.0.0/16",)))
r = applier.apply(state)
print(json.dumps({"pins": str(applier.pins.root), "added": r.added}))
"""
CLEANUP = r"""
import json, sys
from podnet.dataplane.cleanup import NodeCleanup
r = NodeCleanup(socket=sys.argv[1]).run()
print(json.dumps({"done": r.done, "errors": r.errors}))
"""


def test_node_cleanup_removes_the_programs_filters_and_pins(tmp_path):
    import json

    from podnet.ebpf.bpffs import ensure_shared_bpffs

    ensure_shared_bpffs()
    objs = [service("c", "10.96.7.1"), slice_("c", [endpoint("b1")], ports=[{"port": 8080}])]
    with namespaces() as ns:
        node, pod = ns.new("node"), ns.new("pod")
        in_ns(node, "ip", "link", "add", "pntest0", "type", "veth", "peer", "name", "eth0", "netns", pod)
        in_ns(node, "ip", "addr", "add", "10.66.0.1/24", "dev", "pntest0")
        in_ns(node, "ip", "link", "set", "pntest0", "up")
        out = json.loads(in_ns(node, PYTHON, "-c", CLEANUP_PROGRAM, json.dumps(objs)).stdout)
        pins = out["pins"]
        try:
            assert out["added"] > 0 and os.path.isdir(pins)
            assert "podnet_svc_from_pod" in in_ns(node, "tc", "filter", "show", "dev", "pntest0", "ingress").stdout
            sock = str(tmp_path / "agent.sock")
            report = json.loads(in_ns(node, PYTHON, "-c", CLEANUP, sock).stdout)
            assert not report["errors"], report
            for what in ("tc filter podnet_svc_from_pod:", "tc filter podnet_svc_to_pod:", f"eBPF pins {pins}",
                         "nft table ip podnet-svc-ebpf"):
                assert any(d.startswith(what) for d in report["done"]), (what, report)
            assert "bpf" not in in_ns(node, "tc", "filter", "show", "dev", "pntest0", "ingress").stdout
            assert "bpf" not in in_ns(node, "tc", "filter", "show", "dev", "pntest0", "egress").stdout
            assert not os.path.exists(pins)
            again = json.loads(in_ns(node, PYTHON, "-c", CLEANUP, sock).stdout)
            assert again == {"done": [], "errors": []}  # nothing left to do
        finally:
            shutil.rmtree(pins, ignore_errors=True)
