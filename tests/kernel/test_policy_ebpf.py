"""The eBPF policy backend against the kernel behind its back, and killed with -9.

One node namespace with three pods (x/a, x/b, x/c) attached by podnet's PodDataplane;
x/b runs an echo server on TCP 90. Policy: x/b admits x/a on TCP 90 and may send
nothing itself (egress isolated, no rule), so every reply it sends passes only
through the program's flow table. The programmer runs in the node namespace as the
agent would, its maps pinned in a bpffs this test mounts in a temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.kernel.nsutil import PYTHON, NsDriver, in_ns, namespaces, py_in, stop

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and bpffs")

PODS = {"a": "10.244.7.1", "b": "10.244.7.2", "c": "10.244.7.3"}
PORT = 90

PROGRAMMER = r"""
import dataclasses, json, sys, threading
from podnet.ebpf.bpffs import PinDir, instance_name
from podnet.model.objects import Namespace, NetworkPolicy, Pod
from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer
from podnet.policy.ebpf.watch import AttachmentWatch
pp = EbpfPolicyProgrammer(PinDir.for_instance(instance_name("node"), bpffs=sys.argv[1]),
                          service_cidrs=tuple(sys.argv[2:]))
woken = threading.Event()  # the watch's wake-up: what marks the agent's policy worker
named = []  # the interfaces every wake-up named
def changed(ifindexes):
    pp.in_doubt(ifindexes)
    named.append(sorted(ifindexes))
    woken.set()
world = None
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "sync":
            world = cmd
            ch = pp.sync([Pod.model_validate(x) for x in cmd["pods"]],
                         [Namespace.model_validate(x) for x in cmd["namespaces"]],
                         [NetworkPolicy.model_validate(x) for x in cmd["policies"]], cmd["local"])
            out = {"changes": dataclasses.asdict(ch)}
        elif cmd["op"] == "watch":
            AttachmentWatch(pp.attached_indexes, changed).start()
            out = {}
        elif cmd["op"] == "sync-when-woken":  # as the agent's worker: a sync once the watch wakes it
            if not woken.wait(cmd["within"]):
                out = {"error": "the watch did not wake"}
            else:
                woken.clear()
                ch = pp.sync([Pod.model_validate(x) for x in world["pods"]],
                             [Namespace.model_validate(x) for x in world["namespaces"]],
                             [NetworkPolicy.model_validate(x) for x in world["policies"]], world["local"])
                out = {"changes": dataclasses.asdict(ch)}
        elif cmd["op"] == "named":
            out = {"named": named}
        elif cmd["op"] == "verify":
            out = {"drift": pp.verify()}
        elif cmd["op"] == "pins":
            out = {"maps": str(pp.maps.pins.maps)}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""

# a client in a pod: holds one connection across the test, or tries a new one
CLIENT = r"""
import json, socket, sys
held = None
def echo(conn):
    conn.sendall(b"ping\n")
    return conn.recv(100) == b"ping\n"
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "hold":
            held = socket.create_connection((cmd["host"], cmd["port"]), timeout=1.5)
            out = {"ok": echo(held)}
        elif cmd["op"] == "echo":
            out = {"ok": echo(held)}
        elif cmd["op"] == "try":
            with socket.create_connection((cmd["host"], cmd["port"]), timeout=1.5) as c:
                out = {"ok": echo(c)}
    except OSError as e:
        out = {"ok": False, "reason": type(e).__name__}
    print(json.dumps(out), flush=True)
"""

SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(100):
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def objects() -> dict:
    pods = [{"metadata": {"name": p, "namespace": "x", "labels": {"pod": p}}, "spec": {"nodeName": "node"},
             "status": {"podIP": ip}} for p, ip in PODS.items()]
    policy = {"metadata": {"name": "b", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                                    "ports": [{"port": PORT, "protocol": "TCP"}]}],
                       "egress": []}}
    return {"pods": pods, "namespaces": [{"metadata": {"name": "x"}}], "policies": [policy],
            "local": list(PODS.values())}


@dataclass
class Node:
    ns: str
    pods: dict[str, str]  # pod -> netns
    bpffs: str
    programmer: NsDriver
    clients: dict[str, NsDriver]

    def start_programmer(self, *service_cidrs: str) -> None:
        self.programmer = NsDriver(self.ns, PROGRAMMER, self.bpffs, *service_cidrs)

    def sync(self) -> dict:
        return self.programmer.ask(op="sync", **objects())["changes"]

    def maps(self) -> str:
        return self.programmer.ask(op="pins")["maps"]

    def reaches_b(self, pod: str) -> bool:
        """A new connection from `pod` to x/b's echo server works (else: it timed out)."""
        out = self.clients[pod].ask(op="try", host=PODS["b"], port=PORT)
        assert out["ok"] or out["reason"] in ("TimeoutError", "timeout"), out  # a drop, never a reset
        return out["ok"]

    def bpftool(self, *args: str) -> None:
        in_ns(self.ns, "bpftool", *args)


def _hex(ip: str) -> list[str]:
    return [f"{int(b):02x}" for b in ip.split(".")]


@contextmanager
def bpffs() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pnbpf") as d:
        subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
        try:
            yield d
        finally:
            subprocess.run(["umount", d], check=True)


@pytest.fixture
def node():
    procs: list[subprocess.Popen] = []
    drivers: list[NsDriver] = []
    made: list[Node] = []
    with namespaces() as ns, bpffs() as pins:
        try:
            node_ns = ns.new("node")
            in_ns(node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            pods = {p: ns.new(p) for p in PODS}
            py_in(node_ns, f"""
from podnet.dataplane.pods import PodDataplane
for p, ip in {PODS!r}.items():
    PodDataplane(1500).add("c-" + p, "eth0", "/run/netns/{ns.tag}-" + p, ip)
""")
            server = subprocess.Popen(["ip", "netns", "exec", pods["b"], PYTHON, "-c", SERVER, str(PORT)],
                                      stdout=subprocess.PIPE, text=True)
            procs.append(server)
            assert server.stdout and server.stdout.readline().strip() == "ready"
            clients = {p: NsDriver(pods[p], CLIENT) for p in ("a", "c")}
            drivers.extend(clients.values())
            made.append(Node(node_ns, pods, pins, NsDriver(node_ns, PROGRAMMER, pins), clients))
            yield made[0]
        finally:
            for d in [*drivers, *(n.programmer for n in made)]:  # the programmer of the end, if restarted
                if d.proc.poll() is None:
                    d.close()
            stop(procs)


def _isolated_as_written(node: Node) -> None:
    assert node.reaches_b("a"), "x/a is admitted to x/b's port 90 (and the replies come back)"
    assert not node.reaches_b("c"), "x/c is not admitted"


def test_replies_of_admitted_connections_pass_and_the_rest_is_dropped(node):
    assert node.reaches_b("a") and node.reaches_b("c")  # before any sync: nothing attached, all open
    ch = node.sync()
    assert ch["loaded"] and ch["attached"] == 3
    _isolated_as_written(node)
    assert node.programmer.ask(op="verify")["drift"] == []
    again = node.sync()  # nothing to do the second time
    assert (again["loaded"], again["written"], again["deleted"], again["attached"]) == (False, 0, 0, 0), again


def test_kill_9_and_restart_keep_connections_and_open_nothing(node):
    node.sync()
    assert node.clients["a"].ask(op="hold", host=PODS["b"], port=PORT)["ok"]
    node.programmer.proc.send_signal(signal.SIGKILL)
    node.programmer.proc.wait(timeout=10)
    # while no programmer runs: the pinned programs and maps keep enforcing
    assert node.clients["a"].ask(op="echo")["ok"]
    assert not node.reaches_b("c")
    node.start_programmer()
    ch = node.sync()
    assert not ch["loaded"] and (ch["written"], ch["deleted"], ch["attached"]) == (0, 0, 0), ch
    assert node.clients["a"].ask(op="echo")["ok"], "the connection held across the restart"
    _isolated_as_written(node)


def test_a_deleted_pod_entry_fails_closed_and_is_restored(node):
    node.sync()
    maps = node.maps()
    node.bpftool("map", "delete", "pinned", f"{maps}/podnet_pol_pods", "key", "hex", *_hex(PODS["b"]))
    assert not node.reaches_b("a"), "a local pod without its entry must drop, not open"
    drift = node.programmer.ask(op="verify")["drift"]
    assert any("podnet_pol_pods" in d for d in drift), drift
    ch = node.sync()
    assert ch["full"] and ch["written"] == 1, ch
    _isolated_as_written(node)


def test_an_entry_rewritten_to_open_is_found_and_closed(node):
    node.sync()
    maps = node.maps()
    node.bpftool("map", "update", "pinned", f"{maps}/podnet_pol_pods", "key", "hex", *_hex(PODS["b"]),
                 "value", "hex", *["00"] * 16)
    assert node.reaches_b("c")  # someone opened x/b ...
    assert node.programmer.ask(op="verify")["drift"]
    node.sync()
    _isolated_as_written(node)  # ... and the next sync closes it


def test_an_unpinned_map_and_a_detached_program_are_restored(node):
    node.sync()
    maps = node.maps()
    os.unlink(f"{maps}/podnet_pol_rules")
    drift = node.programmer.ask(op="verify")["drift"]
    assert "map podnet_pol_rules missing" in drift, drift
    ch = node.sync()
    assert ch["loaded"] and ch["attached"] == 3, ch  # programs loaded again with the new map
    _isolated_as_written(node)

    veth = in_ns(node.ns, "ip", "-j", "route", "get", PODS["b"]).stdout
    dev = json.loads(veth)[0]["dev"]
    in_ns(node.ns, "tc", "filter", "del", "dev", dev, "egress", "prio", "1")
    # x/b's ingress program gone: the guard drops what policy did not judge, x/a's too
    assert not node.reaches_b("c") and not node.reaches_b("a")
    in_ns(node.ns, "tc", "filter", "del", "dev", dev, "ingress", "prio", "2")
    assert not node.reaches_b("c")
    for direction in ("ingress", "egress"):  # every policy filter gone: open until put back
        in_ns(node.ns, "tc", "filter", "del", "dev", dev, direction, "prio", "3")
    assert node.reaches_b("c")
    drift = node.programmer.ask(op="verify")["drift"]
    assert any(dev in d and "egress" in d for d in drift), drift
    ch = node.sync()
    assert ch["attached"] >= 1, ch
    _isolated_as_written(node)


def test_a_deleted_filter_wakes_the_programmer_which_puts_it_back_without_a_resync(node):
    node.sync()
    node.programmer.ask(op="watch")
    veth = json.loads(in_ns(node.ns, "ip", "-j", "route", "get", PODS["b"]).stdout)[0]["dev"]
    in_ns(node.ns, "tc", "filter", "del", "dev", veth, "egress", "prio", "1")
    assert not node.reaches_b("c") and not node.reaches_b("a"), "the guard drops while it is gone"
    ch = node.programmer.ask(op="sync-when-woken", within=10)["changes"]
    # no verify() ran: the sync checked the interface netlink named, and put the filter back
    assert not ch["full"] and ch["attached"] == 1 and ch["written"] == 0, ch
    _isolated_as_written(node)
    # its own attach woke it once more; that sync finds everything in place
    ch = node.programmer.ask(op="sync-when-woken", within=10)["changes"]
    assert (ch["attached"], ch["written"]) == (0, 0), ch
    # a filter on another interface is not policy's concern (which prios are: test_policy_watch.py)
    index = int(in_ns(node.ns, "cat", f"/sys/class/net/{veth}/ifindex").stdout)
    in_ns(node.ns, "tc", "qdisc", "add", "dev", "lo", "clsact")
    in_ns(node.ns, "tc", "filter", "add", "dev", "lo", "ingress", "prio", "2", "protocol", "all",
          "bpf", "bytecode", "1,6 0 0 0,")  # classic BPF "no match": the packet goes on
    in_ns(node.ns, "tc", "filter", "del", "dev", "lo", "ingress", "prio", "2")
    in_ns(node.ns, "tc", "qdisc", "del", "dev", "lo", "clsact")
    # ... the guard is; its wake-up comes after the events of lo on the one socket
    in_ns(node.ns, "tc", "filter", "del", "dev", veth, "ingress", "prio", "3")
    ch = node.programmer.ask(op="sync-when-woken", within=10)["changes"]
    assert ch["attached"] == 1, ch
    named = node.programmer.ask(op="named")["named"]
    assert named and all(n == [index] for n in named), named


CLUSTER_IP = "10.96.0.10"
NFT_SERVICE = f"""table ip pntest-svc {{
    chain prerouting {{ type nat hook prerouting priority dstnat; ip daddr {CLUSTER_IP} tcp dport {PORT} dnat to {PODS["b"]}:{PORT}; }}
}}"""


def test_a_service_address_policy_sees_untranslated_is_dropped_for_an_egress_isolated_pod(node):
    """The node's Services on nftables (the eBPF Service programs did not load): the DNAT
    comes after tc, so the policy program sees the ClusterIP. x/a may send anywhere by
    ipBlock 0.0.0.0/0, which covers the ClusterIP but says nothing of its endpoints."""
    in_ns(node.ns, "nft", "-f", "-", input=NFT_SERVICE)
    world = objects()
    world["policies"].append({"metadata": {"name": "a-out", "namespace": "x"},
                              "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                                       "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}})

    def through_the_service() -> bool:
        out = node.clients["a"].ask(op="try", host=CLUSTER_IP, port=PORT)
        assert out["ok"] or out["reason"] in ("TimeoutError", "timeout"), out
        return out["ok"]

    node.programmer.close()
    node.start_programmer()  # without the Service CIDRs: the ipBlock admits the ClusterIP
    node.programmer.ask(op="sync", **world)
    assert node.reaches_b("a") and through_the_service()
    node.programmer.close()
    node.start_programmer("10.96.0.0/12")  # as the agent starts it
    ch = node.programmer.ask(op="sync", **world)["changes"]
    assert ch["written"] == 1, ch  # the Service CIDR, in peer set 0
    assert node.reaches_b("a"), "x/a's egress to x/b's own address is judged as before"
    assert not through_the_service(), "an untranslated Service address is dropped, not admitted by the ipBlock"


def test_a_policy_change_is_a_few_map_updates(node):
    node.sync()
    world = objects()
    world["policies"][0]["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"pod": "c"}}})
    ch = node.programmer.ask(op="sync", **world)["changes"]
    # a new peer set (x/c), the group's rules under a new generation, its header; the old rules go
    assert ch["written"] <= 5 and not ch["loaded"] and ch["attached"] == 0, ch
    assert node.reaches_b("c") and node.reaches_b("a")
    # x/a's verdict is cached by now; a label change takes it out of the selector, and its
    # next connection is judged again (the change retired every cached verdict)
    world["pods"][0]["metadata"]["labels"] = {"pod": "a-moved"}
    ch = node.programmer.ask(op="sync", **world)["changes"]
    assert ch["deleted"] >= 1 and not ch["loaded"], ch
    assert not node.reaches_b("a") and node.reaches_b("c")
