"""podnet-ipam as a standalone IPAM plugin: the reference macvlan plugin, run as a runtime runs
it (podnet.lab.runtime, libcni's behaviour) in a node namespace, executes podnet-ipam from
CNI_PATH, which asks that node's agent (`python -m podnet.cni.serve`) for an address.

Two node namespaces with their data0 links and an external host on one underlay segment (a
bridge in a segment namespace); pods are namespaces the test made; no podnet-cni involved.

Checked: 20 concurrent ADDs over both nodes get 20 different addresses from the Attachment
pool, and packets flow between the pods' net1 and the external host; DEL frees them, also
with the pod's namespace gone; an ADD retried gets the same address; the executable's
VERSION, CHECK, STATUS and GC; an unknown pool, a pool not for attachments, a missing pools
field and a killed (-9) agent each fail the ADD with a CNI error naming the network and the
pool (or the socket), and leave no interface and no address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

from podnet.cni.errors import CNIError  # noqa: E402
from podnet.cni.install import IPAM_NAME, install_plugin  # noqa: E402
from podnet.ipam import keys as ipam_keys  # noqa: E402
from podnet.lab.runtime import CniRuntime, RuntimeConf, k8s_args  # noqa: E402
from podnet.model.objects import IPPool  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from tests.kernel.nsutil import data_segment, in_ns, join_segment, namespaces, start_cni_server, stop  # noqa: E402

REFERENCE = "/usr/lib/cni"
EXT_IP = "10.99.0.1"
SUBNET = "10.99.0.0/24"
POOL_CIDR = "10.99.0.64/26"


def macvlan_conflist(sock: str, **ipam) -> dict:
    section = {"type": "podnet-ipam", "pools": ["global"], "subnet": SUBNET, "gateway": EXT_IP,
               "routes": [{"dst": "198.51.100.0/24"}], "agentSocket": sock, **ipam}
    return {"cniVersion": "1.0.0", "name": "underlay",
            "plugins": [{"type": "macvlan", "master": "data0", "mode": "bridge", "ipam": section}]}


@pytest.fixture
def lab(tmp_path):
    procs: list[subprocess.Popen] = []
    with namespaces() as ns:
        seg, ext = data_segment(ns, EXT_IP)
        url = "sqlite://" + str(tmp_path / "podnet.db")
        kv = open_store(url)
        ObjectStore(kv).apply([
            IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                                   "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}}),
            IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "global"},
                                   "spec": {"cidr": POOL_CIDR, "blockSize": 29, "allowedUses": ["Attachment"]}}),
        ])
        bindir = tmp_path / "bin"
        install_plugin(str(bindir))
        nodes = {}
        for i in (1, 2):
            node = ns.new(f"n{i}")
            join_segment(seg, node, f"p-n{i}")
            sock = str(tmp_path / f"n{i}.sock")
            start_cni_server(node, sock, url, f"node-{i}", procs)
            nodes[i] = {"ns": node, "sock": sock, "cache": tmp_path / f"cache{i}"}
        lab = {"ns": ns, "ext": ext, "kv": kv, "nodes": nodes, "procs": procs, "url": url, "bindir": bindir}
        try:
            yield lab
        finally:
            stop(procs)
            kv.close()


def runtime(lab, node: int, **ipam) -> CniRuntime:
    n = lab["nodes"][node]
    return CniRuntime(macvlan_conflist(n["sock"], **ipam), cni_path=[str(lab["bindir"]), REFERENCE],
                      cache_dir=n["cache"], host_netns=n["ns"], timeout=60)


def new_pod(lab, name: str) -> tuple[str, RuntimeConf]:
    ns = lab["ns"].new(name)
    cid = f"{name}-{os.urandom(8).hex()}"
    return ns, RuntimeConf(container_id=cid, netns=f"/run/netns/{ns}", ifname="net1",
                           args=k8s_args("default", name, cid, f"uid-{name}"))


def links(ns: str) -> list[str]:
    return sorted(x["ifname"] for x in json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout))


def net1_address(ns: str) -> str:
    data = json.loads(in_ns(ns, "ip", "-j", "-4", "addr", "show", "dev", "net1").stdout)
    info = data[0]["addr_info"][0]
    return f"{info['local']}/{info['prefixlen']}"


def handles(kv) -> list[str]:
    return sorted(ipam_keys.handle_of_key(r.key) for r in kv.list(ipam_keys.HANDLES)[0])


def run_ipam(lab, command: str, conf: dict, container_id: str = "", ifname: str = "net1") -> tuple[int, dict | None]:
    """podnet-ipam executed directly, as a main plugin executes its IPAM: (exit status, stdout JSON)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_PATH": str(lab["bindir"])}
    if container_id:
        env |= {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname, "CNI_NETNS": "/run/netns/none"}
    proc = subprocess.run([str(lab["bindir"] / IPAM_NAME)], input=json.dumps(conf), env=env, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def ipam_conf(lab, version: str = "1.1.0", **extra) -> dict:
    conf = macvlan_conflist(lab["nodes"][1]["sock"])
    return {"cniVersion": version, "name": conf["name"], **conf["plugins"][0], **extra}


def test_addresses_are_unique_across_nodes_under_20_concurrent_adds_and_carry_packets(lab):
    runtimes = {1: runtime(lab, 1), 2: runtime(lab, 2)}
    pods = [(i % 2 + 1, *new_pod(lab, f"u{i}")) for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda p: runtimes[p[0]].add(p[2]), pods))
    addresses = [net1_address(ns) for _, ns, _ in pods]
    assert len(set(addresses)) == 20, addresses
    assert all(a.endswith("/24") and a.startswith("10.99.0.") and 64 <= int(a.split("/")[0].rsplit(".", 1)[1]) < 128
               for a in addresses), addresses
    # The IPAM result macvlan got (gateway, routes) is the one it configured and reported.
    assert [r["ips"][0]["address"] for r in results] == addresses
    assert results[0]["ips"][0]["gateway"] == EXT_IP
    assert "198.51.100.0/24 via 10.99.0.1 dev net1" in in_ns(pods[0][1], "ip", "route").stdout
    # Real packets both ways between pods of both nodes and the external host.
    for _, ns, _ in (pods[0], pods[1]):
        in_ns(ns, "ping", "-c1", "-W2", EXT_IP)
    in_ns(lab["ext"], "ping", "-c1", "-W2", addresses[2].split("/")[0])
    in_ns(pods[3][1], "ping", "-c1", "-W2", addresses[5].split("/")[0])  # node 2's pod to node 2's pod
    assert len(handles(lab["kv"])) == 20 and all(h.startswith("podnet-ipam:underlay:") for h in handles(lab["kv"]))

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda p: runtimes[p[0]].delete(p[2]), pods))
    assert handles(lab["kv"]) == []
    assert all(links(ns) == ["lo"] for _, ns, _ in pods)


def test_del_frees_the_address_also_when_the_pod_namespace_is_gone(lab):
    rt = runtime(lab, 1)
    pod, conf = new_pod(lab, "gone")
    first = rt.add(conf)["ips"][0]["address"]
    # A runtime's retried ADD of the same attachment gets the same address back.
    code, again = run_ipam(lab, "ADD", ipam_conf(lab), conf.container_id)
    assert code == 0 and again["ips"][0]["address"] == first
    subprocess.run(["ip", "netns", "del", pod], check=True)
    lab["ns"].created.remove(pod)
    rt.delete(conf)
    assert handles(lab["kv"]) == []
    rt.delete(conf)  # DEL twice: nothing to free, still a success


def test_version_check_status_and_gc_of_the_executable(lab):
    code, out = run_ipam(lab, "VERSION", {"cniVersion": "1.0.0"})
    assert code == 0 and out["cniVersion"] == "1.0.0" and "1.1.0" in out["supportedVersions"]
    code, out = run_ipam(lab, "ADD", ipam_conf(lab), "keep-1")
    assert code == 0, out
    kept = out["ips"][0]["address"]
    assert out == {"cniVersion": "1.1.0", "ips": [{"address": kept, "gateway": EXT_IP}],
                   "routes": [{"dst": "198.51.100.0/24"}], "dns": {}}
    code, old = run_ipam(lab, "ADD", ipam_conf(lab, "0.4.0"), "drop-1")
    assert code == 0 and old["ips"][0]["version"] == "4"
    # CHECK: the address the main plugin reports is the one podnet-ipam holds.
    prev = {"cniVersion": "1.1.0", "interfaces": [{"name": "net1", "sandbox": "/run/netns/x"}],
            "ips": [{"address": kept, "interface": 0}]}
    assert run_ipam(lab, "CHECK", ipam_conf(lab, prevResult=prev), "keep-1")[0] == 0
    wrong = {**prev, "ips": [{"address": "10.99.0.250/24", "interface": 0}]}
    code, out = run_ipam(lab, "CHECK", ipam_conf(lab, prevResult=wrong), "keep-1")
    assert code == 1 and out["code"] == 103 and kept.split("/")[0] in out["msg"] and "underlay" in out["msg"]
    code, out = run_ipam(lab, "STATUS", ipam_conf(lab))
    assert code == 0, out
    # GC: the attachments the runtime lists keep their addresses, the others of the network go;
    # another network's (a name that only starts the same) are not GC's of this one.
    assert run_ipam(lab, "ADD", ipam_conf(lab, name="underlay.b"), "other-1")[0] == 0
    valid = [{"containerID": "keep-1", "ifname": "net1"}]
    assert run_ipam(lab, "GC", ipam_conf(lab, **{"cni.dev/valid-attachments": valid}))[0] == 0
    assert handles(lab["kv"]) == ["podnet-ipam:underlay.b:other-1:net1", "podnet-ipam:underlay:keep-1:net1"]
    assert run_ipam(lab, "DEL", ipam_conf(lab), "keep-1")[0] == 0
    assert run_ipam(lab, "DEL", ipam_conf(lab, name="underlay.b"), "other-1")[0] == 0
    assert handles(lab["kv"]) == []


@pytest.mark.parametrize("ipam, code, words", [
    ({"pools": ["nope"]}, 7, ["network underlay", "IPPool nope", "does not exist"]),
    ({"pools": ["pods"]}, 7, ["network underlay", "IPPool pods", "does not allow Attachment"]),
    ({"pools": []}, 7, ["network underlay", "ipam.pools", "IPPool names"]),
    ({"subnet": "10.99.1.0/24", "gateway": None}, 7, ["network underlay", "IPPool global", "outside subnet"]),
])
def test_bad_configuration_fails_the_add_and_leaves_nothing(lab, ipam, code, words):
    ipam = {k: v for k, v in ipam.items() if v is not None}
    conflist = macvlan_conflist(lab["nodes"][1]["sock"], **ipam)
    if "gateway" in ipam or "subnet" in ipam:
        conflist["plugins"][0]["ipam"].pop("gateway")
    rt = CniRuntime(conflist, cni_path=[str(lab["bindir"]), REFERENCE], cache_dir=lab["nodes"][1]["cache"],
                    host_netns=lab["nodes"][1]["ns"], timeout=60)
    pod, conf = new_pod(lab, "bad")
    with pytest.raises(CNIError) as err:
        rt.add(conf)
    assert err.value.code == code and all(w in err.value.msg for w in words), err.value
    assert links(pod) == ["lo"] and handles(lab["kv"]) == []
    assert [ln for ln in links(lab["nodes"][1]["ns"]) if ln != "lo"] == ["data0"]


def test_an_agent_killed_with_sigkill_fails_the_add_cleanly_then_a_new_one_serves(lab):
    node = lab["nodes"][1]
    server = next(p for p in lab["procs"] if node["sock"] in p.args)
    os.kill(server.pid, signal.SIGKILL)  # `ip netns exec` execs: this is the server itself
    server.wait(10)
    rt = runtime(lab, 1)
    pod, conf = new_pod(lab, "down")
    with pytest.raises(CNIError) as err:
        rt.add(conf)
    assert err.value.code == 11 and f"podnet agent not reachable at {node['sock']}" in err.value.msg, err.value
    assert handles(lab["kv"]) == []
    # macvlan 1.1.1 keeps its link when its IPAM fails on ADD, and its DEL stops at IPAM's
    # error: the runtime's DEL once the agent is back removes it.
    start_cni_server(node["ns"], node["sock"], lab["url"], "node-1", lab["procs"])
    rt.delete(conf)
    assert links(pod) == ["lo"]
    address = rt.add(conf)["ips"][0]["address"]
    assert net1_address(pod) == address
    in_ns(pod, "ping", "-c1", "-W2", EXT_IP)
    rt.delete(conf)
    assert handles(lab["kv"]) == []
