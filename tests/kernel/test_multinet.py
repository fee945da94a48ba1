"""Additional networks with the reference plugins on the real kernel, real packets.

Two node namespaces each run a CNI server (the agent's handler, `python -m podnet.cni.serve`);
their data0 links and an external host hang on one underlay segment (a bridge in a segment
namespace). Pods get podnet's eth0 and, by the annotation k8s.v1.cni.cncf.io/networks, a
macvlan net1 on data0 with a podnet-ipam address from an Attachment pool, a bridge network
with host-local between pods of one node, and macvlan + static IPAM with ips and mac asked
by the pod. The runtime is podnet.lab.runtime (libcni's behaviour).

Also vlan (VLAN 42 on data0, when the kernel has 802.1Q links) and host-device (a veth of the
node moved into the pod and back) delegates, with podnet-ipam addresses.

Checked: net1 reaches the external host from the pool address with no NAT while eth0 still
carries pod-to-pod traffic; the network-status annotation; addresses unique across nodes
under 20 concurrent ADDs; bad input fails the ADD naming the pod and the network and leaves
nothing (interfaces, addresses, host-local leases, records); DEL also when the netns is gone
or a delegate's DEL fails; GC of pods the runtime lost (namespace kept or gone); kill -9 of the
server in the middle of an ADD, then a retry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
pytest.importorskip("podnet.dataplane.pods")

from podnet.cni.attachments import ATTACHMENTS_PREFIX  # noqa: E402
from podnet.cni.errors import CNIError  # noqa: E402
from podnet.cni.install import install_plugin  # noqa: E402
from podnet.ipam import keys as ipam_keys  # noqa: E402
from podnet.lab.runtime import CniRuntime, RuntimeConf, k8s_args  # noqa: E402
from podnet.model.objects import IPPool, NetworkAttachmentDefinition, Pod  # noqa: E402
from podnet.multinet import ANNOTATION_NETWORKS, ANNOTATION_STATUS  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from tests.kernel.nsutil import data_segment, in_ns, join_segment, namespaces, start_cni_server, stop  # noqa: E402

REFERENCE = "/usr/lib/cni"
NETWORK = "podnet"
EXT_IP = "10.99.0.1"
SUBNET = "10.99.0.0/24"

ONE_SHOT_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("listening", flush=True)
c, peer = s.accept()
c.sendall((peer[0] + "\n").encode()); c.close()
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(100).decode().strip(), c.getsockname()[0])
"""

# A plugin that, while its block file exists, tells the test it runs (one line on a FIFO) and
# then waits for good: the test kills the server under it.
BLOCKER = r"""#!PYTHON
import json, os, sys, time
conf = json.load(sys.stdin)
if os.environ["CNI_COMMAND"] == "ADD" and os.path.exists(conf["blockFile"]):
    with open(conf["fifo"], "w") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


# A plugin chained after macvlan whose DEL fails while its fail file exists (a delegate that
# errors on DEL, e.g. a device still busy); ADD and CHECK pass the previous result on.
FAILING_DEL = r"""#!PYTHON
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
failed = cmd == "DEL" and os.path.exists(conf["failFile"])
with open(conf["log"], "a") as f:
    f.write(cmd + (":failed" if failed else "") + "\n")
if failed:
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": 999, "msg": "device busy"}))
    sys.exit(1)
if cmd == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


def nad(name: str, config: dict) -> NetworkAttachmentDefinition:
    return NetworkAttachmentDefinition.model_validate({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": "default"}, "spec": {"config": json.dumps(config)}})


def macvlan_then(name: str, plugin: dict) -> NetworkAttachmentDefinition:
    """A network of macvlan on data0 with a podnet-ipam address, then `plugin` chained after it."""
    return nad(name, {"cniVersion": "1.0.0", "name": name, "plugins": [
        {"type": "macvlan", "master": "data0", "mode": "bridge",
         "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": SUBNET}}, plugin]})


@pytest.fixture
def lab(tmp_path):
    procs: list[subprocess.Popen] = []
    with namespaces() as ns:
        seg, ext = data_segment(ns, EXT_IP)
        url = "sqlite://" + str(tmp_path / "podnet.db")
        kv = open_store(url)
        objects = ObjectStore(kv)
        hl_dir = tmp_path / "host-local"
        objects.apply([
            IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                                   "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}}),
            IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "global"},
                                   "spec": {"cidr": "10.99.0.64/26", "blockSize": 29,
                                            "allowedUses": ["Attachment"]}}),
            nad("underlay", {"cniVersion": "1.0.0", "type": "macvlan", "master": "data0", "mode": "bridge",
                             "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": SUBNET}}),
            nad("pod-bridge", {"cniVersion": "1.0.0", "name": "pod-bridge", "plugins": [
                {"type": "bridge", "bridge": "pnbr-test", "ipam": {
                    "type": "host-local", "subnet": "192.168.50.0/24", "dataDir": str(hl_dir)}}]}),
            nad("fixed", {"cniVersion": "1.0.0", "name": "fixed", "plugins": [
                {"type": "macvlan", "master": "data0", "mode": "bridge", "capabilities": {"mac": True, "ips": True},
                 "ipam": {"type": "static"}},
                ]}),
            nad("broken", {"cniVersion": "1.0.0", "type": "macvlan", "master": "no-such-link",
                           "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": SUBNET}}),
        ])
        bindir = tmp_path / "bin"
        install_plugin(str(bindir))
        blocker = bindir / "blocker"
        blocker.write_text(BLOCKER.replace("PYTHON", sys.executable))
        blocker.chmod(0o755)
        failing_del = bindir / "failing-del"
        failing_del.write_text(FAILING_DEL.replace("PYTHON", sys.executable))
        failing_del.chmod(0o755)
        nodes = {}
        for i in (1, 2):
            node = ns.new(f"n{i}")
            join_segment(seg, node, f"p-n{i}")
            in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sock = str(tmp_path / f"n{i}.sock")
            start_cni_server(node, sock, url, f"node-{i}", procs)
            conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{"type": "podnet-cni",
                                                                            "agentSocket": sock}]}
            nodes[i] = {"ns": node, "sock": sock, "name": f"node-{i}",
                        "runtime": CniRuntime(conflist, cni_path=[str(bindir), REFERENCE],
                                              cache_dir=tmp_path / f"cache{i}", host_netns=node, timeout=60)}
        lab = {"ns": ns, "seg": seg, "ext": ext, "kv": kv, "objects": objects, "nodes": nodes, "procs": procs,
               "url": url, "tmp": tmp_path, "hl_dir": hl_dir, "bindir": bindir}
        try:
            yield lab
        finally:
            stop(procs)
            kv.close()


def new_pod(lab, name: str, networks: str | None) -> tuple[str, RuntimeConf]:
    ns = lab["ns"].new(name)
    cid = f"{name}-{os.urandom(8).hex()}"
    ann = {ANNOTATION_NETWORKS: networks} if networks is not None else {}
    lab["objects"].apply([Pod.model_validate({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                                                        "annotations": ann},
        "spec": {"containers": [{"name": "c"}]}})])
    return ns, RuntimeConf(container_id=cid, netns=f"/run/netns/{ns}", ifname="eth0",
                           args=k8s_args("default", name, cid, f"uid-{name}"))


def links(ns: str) -> list[str]:
    return sorted(x["ifname"] for x in json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout))


def addr_of(ns: str, ifname: str) -> str:
    data = json.loads(in_ns(ns, "ip", "-j", "-4", "addr", "show", "dev", ifname).stdout)
    return data[0]["addr_info"][0]["local"]


def handles(kv) -> list[str]:
    return sorted(ipam_keys.handle_of_key(r.key) for r in kv.list(ipam_keys.HANDLES)[0])


def leases(lab) -> list[str]:
    d = lab["hl_dir"] / "pod-bridge"
    return sorted(f.name for f in d.iterdir() if f.name[0].isdigit()) if d.is_dir() else []


def connect_from(lab, client_ns: str, server_ns: str, server_ip: str, port: int) -> tuple[str, str]:
    """(the peer the server saw, the client's own address) of one TCP connection."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", ONE_SHOT_SERVER, server_ip,
                               str(port)], stdout=subprocess.PIPE, text=True)
    lab["procs"].append(server)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    out = in_ns(client_ns, sys.executable, "-c", CLIENT, server_ip, str(port)).stdout.split()
    server.wait(10)
    return out[0], out[1]


def test_net1_reaches_the_external_host_directly_while_eth0_is_unchanged(lab):
    rt1 = lab["nodes"][1]["runtime"]
    pod_a, conf_a = new_pod(lab, "ma", "underlay, pod-bridge")
    pod_b, conf_b = new_pod(lab, "mb", json.dumps([
        {"name": "underlay"}, {"name": "pod-bridge"},
        {"name": "fixed", "interface": "fix0", "ips": ["10.99.0.200/24"], "mac": "02:00:0a:63:00:c8"}]))
    res_a = rt1.add(conf_a)
    res_b = rt1.add(conf_b)
    assert links(pod_a) == ["eth0", "lo", "net1", "net2"] and links(pod_b) == ["eth0", "fix0", "lo", "net1", "net2"]
    eth0_a, eth0_b = addr_of(pod_a, "eth0"), addr_of(pod_b, "eth0")
    net1_a, net1_b = addr_of(pod_a, "net1"), addr_of(pod_b, "net1")
    assert net1_a != net1_b and all(a.startswith("10.99.0.") and 64 <= int(a.rsplit(".", 1)[1]) < 128
                                    for a in (net1_a, net1_b))
    # The runtime's result: eth0 first (the pod IP), then every network's interface and address.
    assert res_a["ips"][0]["address"].startswith(eth0_a + "/")
    assert {ip["address"].split("/")[0] for ip in res_b["ips"]} >= {eth0_b, net1_b, "10.99.0.200"}

    # net1 -> external host, from the pool address, no NAT (the server sees the pod's address).
    seen, own = connect_from(lab, pod_a, lab["ext"], EXT_IP, 7001)
    assert seen == own == net1_a
    # external host -> net1, directly on the segment.
    seen, own = connect_from(lab, lab["ext"], pod_b, net1_b, 7002)
    assert seen == EXT_IP and own == EXT_IP
    # static IPAM with the pod's ips and mac: on fix0.
    assert addr_of(pod_b, "fix0") == "10.99.0.200"
    fix0 = json.loads(in_ns(pod_b, "ip", "-j", "link", "show", "fix0").stdout)[0]
    assert fix0["address"] == "02:00:0a:63:00:c8"
    in_ns(lab["ext"], "ping", "-c1", "-W2", "10.99.0.200")
    # eth0 still carries pod-to-pod (routed by the node), and its default route is podnet's.
    seen, own = connect_from(lab, pod_a, pod_b, eth0_b, 7003)
    assert seen == own == eth0_a
    assert "169.254.1.1 dev eth0" in in_ns(pod_a, "ip", "route", "show", "default").stdout
    # The bridge network between the pods of one node.
    in_ns(pod_a, "ping", "-c1", "-W2", addr_of(pod_b, "net2"))

    status = json.loads(lab["objects"].get(Pod, "mb", "default").metadata.annotations[ANNOTATION_STATUS])
    assert [(s["name"], s["interface"], s["ips"]) for s in status] == [
        (NETWORK, "eth0", [eth0_b]), ("default/underlay", "net1", [net1_b]),
        ("default/pod-bridge", "net2", [addr_of(pod_b, "net2")]), ("default/fixed", "fix0", ["10.99.0.200"])]
    assert status[0]["default"] is True and status[3]["mac"] == "02:00:0a:63:00:c8"
    # `podnet get pod -o wide` lists every interface of the pod with its network.
    wide = subprocess.run([sys.executable, "-m", "podnet.cli.main", "get", "pod", "mb", "-o", "wide"],
                          env={**os.environ, "PODNET_STORE": lab["url"]}, capture_output=True, text=True, timeout=60)
    assert (f"eth0={eth0_b},net1={net1_b}(default/underlay),net2={addr_of(pod_b, 'net2')}(default/pod-bridge),"
            "fix0=10.99.0.200(default/fixed)") in wide.stdout, wide

    # CHECK through every network's plugins, then DEL: nothing left.
    rt1.check(conf_b)
    rt1.delete(conf_a)
    rt1.delete(conf_b)
    rt1.delete(conf_b)
    assert links(pod_a) == ["lo"] and links(pod_b) == ["lo"]
    assert handles(lab["kv"]) == [] and leases(lab) == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    assert not [ln for ln in links(lab["nodes"][1]["ns"]) if ln.startswith(("pn", "veth")) and ln != "pnbr-test"]


def test_addresses_are_unique_across_nodes_under_20_concurrent_adds(lab):
    pods = [(i % 2 + 1, *new_pod(lab, f"c{i}", "underlay")) for i in range(20)]

    def add(item):
        node, ns, conf = item
        return lab["nodes"][node]["runtime"].add(conf)

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(add, pods))
    addresses = [addr_of(ns, "net1") for _, ns, _ in pods]
    assert len(set(addresses)) == 20, addresses
    for _, ns, _ in pods[:4]:
        in_ns(ns, "ping", "-c1", "-W2", EXT_IP)
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda it: lab["nodes"][it[0]]["runtime"].delete(it[2]), pods))
    assert handles(lab["kv"]) == []


@pytest.mark.parametrize("networks, code, words", [
    ("pod-bridge, missing", 7, "pod default/bad: network default/missing: NetworkAttachmentDefinition "
                               "default/missing does not exist"),
    ('[{"name": "underlay"', 7, "annotation k8s.v1.cni.cncf.io/networks: not valid JSON"),
    ("pod-bridge, underlay@net1", 7, "interface net1 is already default/pod-bridge's"),
    ("pod-bridge, underlay, broken", 104, "pod default/bad: network default/broken (interface net3): CNI ADD "
                                          "failed in plugin macvlan"),
])
def test_bad_input_fails_the_add_and_leaves_nothing(lab, networks, code, words):
    node = lab["nodes"][1]
    before = links(node["ns"])
    pod, conf = new_pod(lab, "bad", networks)
    with pytest.raises(CNIError) as err:
        node["runtime"].add(conf)
    assert err.value.code == code and words in err.value.msg, err.value
    assert err.value.msg.startswith("pod default/bad: "), err.value  # the pod, then what is wrong with which network
    assert links(pod) == ["lo"]
    # The bridge plugin makes the node's bridge once and never removes it (as with any runtime).
    assert [ln for ln in links(node["ns"]) if ln != "pnbr-test"] == before
    assert handles(lab["kv"]) == [] and leases(lab) == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    bridge = in_ns(node["ns"], "ip", "-j", "link", "show", "master", "pnbr-test", check=False)
    assert bridge.returncode != 0 or json.loads(bridge.stdout or "[]") == []


def test_del_removes_every_attachment_when_the_netns_is_gone(lab):
    node = lab["nodes"][1]
    pod, conf = new_pod(lab, "gone", "underlay, pod-bridge")
    node["runtime"].add(conf)
    assert len(leases(lab)) == 1 and len(handles(lab["kv"])) == 2
    in_ns(pod, "true")
    subprocess.run(["ip", "netns", "del", pod], check=True)
    lab["ns"].created.remove(pod)
    node["runtime"].delete(conf)
    assert handles(lab["kv"]) == [] and leases(lab) == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    assert not [ln for ln in links(node["ns"]) if ln.startswith(("pn", "veth")) and ln != "pnbr-test"]


def test_del_removes_every_attachment_past_a_delegate_that_errors(lab):
    """DEL in reverse: net2's list fails in its chained plugin, and its macvlan, its podnet-ipam
    address, net1 (bridge + host-local run after it) and eth0 go all the same. Nothing of net2
    is left in the pod, so there is nothing for a repeated DEL to do (when the interface stays,
    the DEL answers 104 and keeps that network: tests/unit/test_multinet_handler.py)."""
    node = lab["nodes"][1]
    fail, log = lab["tmp"] / "fail-del", lab["tmp"] / "failing-del.log"
    fail.write_text("")
    lab["objects"].apply([macvlan_then("sticky", {"type": "failing-del", "failFile": str(fail), "log": str(log)})])
    pod, conf = new_pod(lab, "sticky", "pod-bridge, sticky")
    node["runtime"].add(conf)
    assert links(pod) == ["eth0", "lo", "net1", "net2"] and len(leases(lab)) == 1 and len(handles(lab["kv"])) == 2
    node["runtime"].delete(conf)
    assert log.read_text().split() == ["ADD", "DEL:failed"]  # the delegate did fail
    assert links(pod) == ["lo"] and handles(lab["kv"]) == [] and leases(lab) == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    assert not [ln for ln in links(node["ns"]) if ln.startswith(("pn", "veth")) and ln != "pnbr-test"]


def test_gc_frees_the_attachments_of_vanished_pods_and_keeps_the_listed_ones(lab):
    """The runtime lost two pods (no cached result; one pod's namespace is gone too): GC with
    the list of live attachments removes their networks, addresses, leases and records, and
    the listed pod keeps its own and its traffic."""
    node = lab["nodes"][2]
    rt = CniRuntime({"cniVersion": "1.1.0", "name": NETWORK,
                     "plugins": [{"type": "podnet-cni", "agentSocket": node["sock"]}]},
                    cni_path=[str(lab["bindir"]), REFERENCE], cache_dir=lab["tmp"] / "cache-gc",
                    host_netns=node["ns"], timeout=60)
    keep_ns, keep = new_pod(lab, "gk", "underlay, pod-bridge")
    lost_ns, lost = new_pod(lab, "gl", "underlay, pod-bridge")
    gone_ns, gone = new_pod(lab, "gg", "underlay, pod-bridge")
    for c in (keep, lost, gone):
        rt.add(c)
    assert len(leases(lab)) == 3 and len(handles(lab["kv"])) == 6  # eth0 and net1 (podnet-ipam) each
    for c in (lost, gone):
        rt._cache_file(c).unlink()  # the runtime forgot them: only GC can clean up
    in_ns(gone_ns, "true")
    subprocess.run(["ip", "netns", "del", gone_ns], check=True)
    lab["ns"].created.remove(gone_ns)
    rt.gc([(keep.container_id, "eth0")])
    assert links(lost_ns) == ["lo"] and links(keep_ns) == ["eth0", "lo", "net1", "net2"]
    assert sorted(h.rsplit(".", 1)[1] for h in handles(lab["kv"])) == ["eth0", "net1"]
    assert all(keep.container_id in h for h in handles(lab["kv"]))
    assert len(leases(lab)) == 1 and len(lab["kv"].list(ATTACHMENTS_PREFIX)[0]) == 1
    in_ns(keep_ns, "ping", "-c1", "-W2", EXT_IP)
    rt.delete(keep)
    assert links(keep_ns) == ["lo"] and handles(lab["kv"]) == [] and leases(lab) == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []


def test_kill_9_in_the_middle_of_an_add_then_a_retry(lab):
    node = lab["nodes"][1]
    fifo = lab["tmp"] / "started.fifo"
    os.mkfifo(fifo)
    block = lab["tmp"] / "block"
    block.write_text("")
    lab["objects"].apply([macvlan_then("slow", {"type": "blocker", "fifo": str(fifo), "blockFile": str(block)})])
    pod, conf = new_pod(lab, "slowpod", "pod-bridge, slow")
    server = next(p for p in lab["procs"] if node["sock"] in p.args)
    failure: list[BaseException] = []

    def add() -> None:
        try:
            node["runtime"].add(conf)
        except BaseException as e:  # the server dies under it: the runtime sees an error
            failure.append(e)

    t = threading.Thread(target=add)
    t.start()
    with open(fifo) as f:  # the blocker runs: net1 and net2 exist, eth0 too
        blocker_pid = int(f.readline())
    assert links(pod) == ["eth0", "lo", "net1", "net2"]
    os.kill(server.pid, signal.SIGKILL)  # `ip netns exec` execs: this is the server itself
    server.wait(10)
    t.join(60)
    assert failure and isinstance(failure[0], CNIError)
    os.kill(blocker_pid, signal.SIGKILL)
    block.unlink()
    start_cni_server(node["ns"], node["sock"], lab["url"], node["name"], lab["procs"])
    result = node["runtime"].add(conf)  # the runtime retries: what the first ADD left goes first
    assert links(pod) == ["eth0", "lo", "net1", "net2"]
    assert len(leases(lab)) == 1 and len([h for h in handles(lab["kv"]) if h.endswith(".net2")]) == 1
    assert addr_of(pod, "net2") in {ip["address"].split("/")[0] for ip in result["ips"]}
    in_ns(pod, "ping", "-c1", "-W2", EXT_IP)
    node["runtime"].delete(conf)
    assert links(pod) == ["lo"] and handles(lab["kv"]) == [] and leases(lab) == []


def test_default_route_moves_the_pods_default_route_to_net1(lab):
    node = lab["nodes"][2]
    pod, conf = new_pod(lab, "gw", '[{"name": "underlay", "default-route": ["10.99.0.1"]}]')
    result = node["runtime"].add(conf)
    assert in_ns(pod, "ip", "route", "show", "default").stdout.split()[:5] == [
        "default", "via", "10.99.0.1", "dev", "net1"]
    assert len(in_ns(pod, "ip", "route", "show", "default").stdout.splitlines()) == 1
    assert [r for r in result["routes"] if r["dst"] == "0.0.0.0/0"] == [{"dst": "0.0.0.0/0", "gw": "10.99.0.1"}]
    # an address off every connected route now leaves by net1: the external host answers for it
    in_ns(lab["ext"], "ip", "addr", "add", "198.51.100.1/32", "dev", "eth0")
    seen, own = connect_from(lab, pod, lab["ext"], "198.51.100.1", 7004)
    assert seen == own == addr_of(pod, "net1")
    # the cluster stays on eth0: pods (and Services, node DNS) through podnet's gateway
    assert "10.244.0.0/16 via 169.254.1.1 dev eth0" in in_ns(pod, "ip", "route").stdout
    other, other_conf = new_pod(lab, "gw2", None)
    node["runtime"].add(other_conf)
    seen, own = connect_from(lab, pod, other, addr_of(other, "eth0"), 7005)
    assert seen == own == addr_of(pod, "eth0")
    node["runtime"].delete(other_conf)
    node["runtime"].delete(conf)
    assert links(pod) == ["lo"] and handles(lab["kv"]) == []


def vlan_of(ns: str, ifname: str) -> int | None:
    link = json.loads(in_ns(ns, "ip", "-d", "-j", "link", "show", ifname).stdout)[0]
    info = link.get("linkinfo") or {}
    return info.get("info_data", {}).get("id") if info.get("info_kind") == "vlan" else None


def kernel_has_vlan(ns: str) -> bool:
    """Whether this kernel makes 802.1Q links (CONFIG_VLAN_8021Q), tried in the test's namespace."""
    made = in_ns(ns, "ip", "link", "add", "link", "lo", "name", "probe.7", "type", "vlan", "id", "7", check=False)
    if made.returncode == 0:
        in_ns(ns, "ip", "link", "del", "probe.7")
    return made.returncode == 0


def add_vlan_network(lab) -> None:
    lab["objects"].apply([
        IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "vlan42"},
                               "spec": {"cidr": "10.98.42.64/26", "blockSize": 29, "allowedUses": ["Attachment"]}}),
        nad("tagged", {"cniVersion": "1.0.0", "type": "vlan", "master": "data0", "vlanId": 42,
                       "ipam": {"type": "podnet-ipam", "pools": ["vlan42"], "subnet": "10.98.42.0/24"}})])


def test_vlan_attachment_carries_tagged_frames_on_data0(lab):
    """net1 is a VLAN 42 link on data0: the external host answers on its own VLAN 42 link only
    (its untagged eth0 holds no address of that subnet), and the pods of two nodes reach each
    other over the tagged segment."""
    ext = lab["ext"]
    if not kernel_has_vlan(ext):
        pytest.skip("this kernel has no 802.1Q VLAN links (CONFIG_VLAN_8021Q)")
    in_ns(ext, "ip", "link", "add", "link", "eth0", "name", "eth0.42", "type", "vlan", "id", "42")
    in_ns(ext, "ip", "addr", "add", "10.98.42.1/24", "dev", "eth0.42")
    in_ns(ext, "ip", "link", "set", "eth0.42", "up")
    add_vlan_network(lab)
    pods = []
    for i in (1, 2):
        pod, conf = new_pod(lab, f"vl{i}", "tagged")
        lab["nodes"][i]["runtime"].add(conf)
        pods.append((i, pod, conf))
        assert vlan_of(pod, "net1") == 42 and addr_of(pod, "net1").startswith("10.98.42.")
    for _, pod, _ in pods:
        in_ns(pod, "ping", "-c1", "-W2", "10.98.42.1")
    seen, own = connect_from(lab, pods[0][1], pods[1][1], addr_of(pods[1][1], "net1"), 7006)
    assert seen == own == addr_of(pods[0][1], "net1")
    # Without the external host's VLAN 42 link the address is gone: the frames above carried tag 42.
    in_ns(ext, "ip", "link", "del", "eth0.42")
    assert in_ns(pods[0][1], "ping", "-c1", "-W1", "10.98.42.1", check=False).returncode != 0
    for i, pod, conf in pods:
        lab["nodes"][i]["runtime"].delete(conf)
        assert links(pod) == ["lo"]
        assert [ln for ln in links(lab["nodes"][i]["ns"]) if ln not in ("lo", "data0")] == []
    assert handles(lab["kv"]) == []


def test_vlan_attachment_on_a_kernel_without_vlans_fails_the_add_and_leaves_nothing(lab):
    node = lab["nodes"][1]
    if kernel_has_vlan(node["ns"]):
        pytest.skip("this kernel makes VLAN links: the packet test above runs instead")
    add_vlan_network(lab)
    before = links(node["ns"])
    pod, conf = new_pod(lab, "vl0", "underlay, tagged")
    with pytest.raises(CNIError) as err:
        node["runtime"].add(conf)
    assert err.value.code == 104, err.value
    assert "pod default/vl0: network default/tagged (interface net2): CNI ADD failed in plugin vlan" in err.value.msg
    assert links(pod) == ["lo"] and links(node["ns"]) == before
    assert handles(lab["kv"]) == [] and lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []


def test_host_device_moves_a_link_into_the_pod_and_back(lab):
    """host-device moves node-1's hd0 (a veth to the external host) into the pod as net1 with a
    podnet-ipam address; DEL gives it back to the node under its own name. With the pod's
    namespace deleted first, the kernel removes the virtual link with it (a physical one
    returns to the root namespace) and DEL still frees the address and the record."""
    node = lab["nodes"][1]
    ext = lab["ext"]

    def make_device() -> None:
        in_ns(node["ns"], "ip", "link", "add", "hd0", "type", "veth", "peer", "name", "hdx", "netns", ext)
        in_ns(ext, "ip", "addr", "add", "10.96.0.1/24", "dev", "hdx")
        in_ns(ext, "ip", "link", "set", "hdx", "up")

    make_device()
    lab["objects"].apply([
        IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "devices"},
                               "spec": {"cidr": "10.96.0.64/26", "blockSize": 29, "allowedUses": ["Attachment"]}}),
        nad("device", {"cniVersion": "1.0.0", "type": "host-device", "device": "hd0",
                       "ipam": {"type": "podnet-ipam", "pools": ["devices"], "subnet": "10.96.0.0/24"}})])
    pod, conf = new_pod(lab, "hd1", "device")
    node["runtime"].add(conf)
    assert "hd0" not in links(node["ns"]) and links(pod) == ["eth0", "lo", "net1"]
    net1 = addr_of(pod, "net1")
    assert net1.startswith("10.96.0.")
    seen, own = connect_from(lab, ext, pod, net1, 7007)
    assert seen == "10.96.0.1" and own == "10.96.0.1"
    node["runtime"].delete(conf)
    assert links(pod) == ["lo"] and "hd0" in links(node["ns"])
    assert handles(lab["kv"]) == []

    # Again, and this time the pod's namespace goes before the DEL.
    pod, conf = new_pod(lab, "hd2", "device")
    node["runtime"].add(conf)
    in_ns(pod, "ping", "-c1", "-W2", "10.96.0.1")
    subprocess.run(["ip", "netns", "del", pod], check=True)
    lab["ns"].created.remove(pod)
    node["runtime"].delete(conf)
    assert handles(lab["kv"]) == [] and lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    # The veth went with the namespace; a new device of the same name serves the next pod.
    assert "hd0" not in links(node["ns"])
    make_device()
    pod, conf = new_pod(lab, "hd3", "device")
    node["runtime"].add(conf)
    in_ns(pod, "ping", "-c1", "-W2", "10.96.0.1")
    node["runtime"].delete(conf)
    assert "hd0" in links(node["ns"]) and handles(lab["kv"]) == []
