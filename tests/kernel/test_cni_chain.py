"""podnet-cni in a chain with the reference portmap, bandwidth and tuning plugins, on the real kernel.

A node namespace hosts an agent (CNIServer + CNIHandler + the real PodDataplane, in its
own process, as the agent daemon runs it); an "ext" namespace is a client on the node's
network. The chain runs through podnet.lab.runtime (libcni's behaviour: prevResult from
plugin to plugin, capability arguments, DEL in reverse). Checked: every plugin takes
podnet-cni's result, a hostPort carries TCP traffic into the pod, bandwidth limits real
throughput, tuning's sysctl lands in the pod, and DEL removes everything.

Debian's plugins 1.1.1 speak CNI up to 1.0.0, so the conflist is 1.0.0; their portmap fails
CHECK on IPv4-only results and bandwidth crashes on CHECK without limits, so CHECK is run on
podnet-cni alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
pytest.importorskip("podnet.dataplane.pods")

from podnet.cni.attachments import ATTACHMENTS_PREFIX  # noqa: E402
from podnet.cni.install import install_plugin  # noqa: E402
from podnet.ipam import IPAM  # noqa: E402
from podnet.lab.runtime import CniRuntime, RuntimeConf, k8s_args  # noqa: E402
from podnet.model.objects import IPPool  # noqa: E402
from podnet.store import open_store  # noqa: E402
from podnet.store.objects import ObjectStore  # noqa: E402
from tests.kernel.nsutil import in_ns, namespaces, stop  # noqa: E402

REFERENCE = "/usr/lib/cni"
NODE = "node-1"
NETWORK = "podnet-chain"
NODE_IP, EXT_IP = "10.77.0.1", "10.77.0.2"
HOST_PORT, POD_PORT = 30080, 8080
RATE = 4_000_000  # bits per second
BURST = 160_000  # bits: a small bucket, so a 2 s transfer is shaped almost from the start


TOKEN_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("pod-says-hello from " + peer[0] + "\n").encode()); c.close()
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
data = b""
while chunk := c.recv(4096):
    data += chunk
print(data.decode().strip())
"""


def start(cmd: list[str], ready: str, procs: list[subprocess.Popen]) -> subprocess.Popen:
    """Start a process and wait for its ready line; it is stopped by the fixture, by PID."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    line = p.stdout.readline().strip() if p.stdout else ""
    if line != ready:
        p.kill()
        raise AssertionError(f"{cmd[:6]} did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
    return p


@pytest.fixture
def lab(tmp_path):
    procs: list[subprocess.Popen] = []
    with namespaces() as ns:
        node, ext = ns.new("node"), ns.new("ext")
        in_ns(node, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ext)
        in_ns(node, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        in_ns(node, "ip", "link", "set", "eth0", "up")
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        in_ns(ext, "ip", "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
        in_ns(ext, "ip", "link", "set", "eth0", "up")
        in_ns(ext, "ip", "route", "add", "10.244.0.0/16", "via", NODE_IP)

        url = "sqlite://" + str(tmp_path / "podnet.db")
        kv = open_store(url)
        ObjectStore(kv).apply([IPPool.model_validate({
            "apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
            "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
        sock = str(tmp_path / "run" / "cni.sock")
        start(["ip", "netns", "exec", node, sys.executable, "-m", "podnet.cni.serve", sock, url, NODE, "--log-level", "info"], "ready", procs)

        bindir = tmp_path / "bin"
        install_plugin(str(bindir))
        conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [
            {"type": "podnet-cni", "agentSocket": sock},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}},
        ]}
        runtime = CniRuntime(conflist, cni_path=[str(bindir), REFERENCE], cache_dir=tmp_path / "cache",
                             host_netns=node, timeout=60)
        lab = {"ns": ns, "node": node, "ext": ext, "kv": kv, "runtime": runtime, "procs": procs, "sock": sock,
               "bindir": str(bindir)}
        try:
            yield lab
        finally:
            stop(procs)
            kv.close()


def new_pod(lab, name: str) -> tuple[str, RuntimeConf]:
    ns = lab["ns"].new(name)
    cid = f"{name}-{os.urandom(8).hex()}"
    return ns, RuntimeConf(container_id=cid, netns=f"/run/netns/{ns}", ifname="eth0",
                           args=k8s_args("default", name, cid, f"uid-{name}"))


def iperf_bps(lab, server_ns: str, server_ip: str, reverse: bool) -> float:
    port = "5201"
    server = start(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port, "--forceflush"],
                   "-----------------------------------------------------------", lab["procs"])
    try:
        # iperf3 listens before it prints its banner: the banner's next line says so
        listening = server.stdout.readline() if server.stdout else ""
        assert listening.startswith("Server listening on"), listening
        args = ["iperf3", "-c", server_ip, "-p", port, "-t", "2", "-J", *(["-R"] if reverse else [])]
        out = in_ns(lab["ext"], *args, timeout=30)
    finally:
        server.wait(10)
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]


def node_state(lab) -> dict[str, str]:
    return {
        "links": in_ns(lab["node"], "ip", "-o", "link", "show").stdout,
        "nat": in_ns(lab["node"], "iptables-save", "-t", "nat").stdout,
        "ifb": in_ns(lab["node"], "ip", "-o", "link", "show", "type", "ifb").stdout,
    }


def test_chain_add_hostport_bandwidth_tuning_and_del(lab):
    runtime: CniRuntime = lab["runtime"]
    before = node_state(lab)

    # Pod A: a hostPort and a bandwidth limit in both directions.
    pod_a, rt_a = new_pod(lab, "pa")
    rt_a.capability_args = {
        "portMappings": [{"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": RATE, "ingressBurst": BURST, "egressRate": RATE, "egressBurst": BURST},
    }
    result_a = runtime.add(rt_a)
    assert result_a["cniVersion"] == "1.0.0"
    addr_a = result_a["ips"][0]["address"].split("/")[0]
    host_if = result_a["interfaces"][0]["name"]
    assert addr_a.startswith("10.244.")
    # Every plugin passed podnet-cni's result on: the final result is still ours.
    assert result_a["interfaces"][1] == {"name": "eth0", "mac": result_a["interfaces"][1]["mac"],
                                         "sandbox": rt_a.netns}

    # podnet-cni's own CHECK agrees with what the chain built.
    conf = {"type": "podnet-cni", "agentSocket": lab["sock"], "name": NETWORK, "cniVersion": "1.0.0",
            "prevResult": result_a}
    assert runtime.invoke(conf, "CHECK", rt_a) is None

    # tuning set its sysctl in the pod.
    assert in_ns(pod_a, "sysctl", "-n", "net.core.somaxconn").stdout.strip() == "777"

    # hostPort: ext -> node:30080 -> DNAT -> pod:8080, real TCP.
    start(["ip", "netns", "exec", pod_a, sys.executable, "-c", TOKEN_SERVER, str(POD_PORT)], "listening",
          lab["procs"])
    got = in_ns(lab["ext"], sys.executable, "-c", CLIENT, NODE_IP, str(HOST_PORT)).stdout.strip()
    assert got == f"pod-says-hello from {EXT_IP}"

    # Pod B: same chain, no limits (bandwidth passes its prevResult through).
    pod_b, rt_b = new_pod(lab, "pb")
    result_b = runtime.add(rt_b)
    addr_b = result_b["ips"][0]["address"].split("/")[0]
    assert addr_b != addr_a

    limited_in = iperf_bps(lab, pod_a, addr_a, reverse=False)  # ext -> pod: the pod's ingress limit
    limited_out = iperf_bps(lab, pod_a, addr_a, reverse=True)  # pod -> ext: the pod's egress limit
    free_in = iperf_bps(lab, pod_b, addr_b, reverse=False)
    print(f"throughput: limited in {limited_in / 1e6:.2f} Mbit/s, out {limited_out / 1e6:.2f} Mbit/s "
          f"(limit {RATE / 1e6:g}); unlimited in {free_in / 1e6:.0f} Mbit/s")
    assert limited_in < RATE * 1.5, limited_in
    assert limited_out < RATE * 1.5, limited_out
    assert free_in > 10 * RATE, free_in  # a veth pair moves far more than 40 Mbit/s

    during = node_state(lab)
    assert host_if in during["links"] and during["ifb"].strip()
    assert str(HOST_PORT) in during["nat"]

    # DEL in reverse order; then the node is as it was.
    runtime.delete(rt_a)
    runtime.delete(rt_b)
    runtime.delete(rt_a)  # again: idempotent through the whole chain
    after = node_state(lab)
    assert host_if not in after["links"]
    assert after["ifb"].strip() == before["ifb"].strip() == ""
    assert str(HOST_PORT) not in after["nat"]
    assert [ln for ln in after["links"].splitlines() if ": pn" in ln] == []
    assert in_ns(pod_a, "ip", "-o", "link", "show", "eth0", check=False).returncode != 0
    kv = lab["kv"]
    assert kv.list(ATTACHMENTS_PREFIX)[0] == []
    assert IPAM(kv).lookup(f"{NETWORK}.{rt_a.container_id}.eth0") is None
    assert runtime.cached_attachments() == []


def test_chain_add_failure_rolls_back_everything(lab):
    """A later plugin fails (portmap refuses a bad mapping): the runtime DELs what ran, and podnet
    frees the address and the interfaces."""
    runtime: CniRuntime = lab["runtime"]
    pod, rt = new_pod(lab, "pf")
    rt.capability_args = {"portMappings": [{"hostPort": 70000, "containerPort": POD_PORT, "protocol": "tcp"}]}
    from podnet.lab.runtime import CNIError

    with pytest.raises(CNIError) as err:
        runtime.add(rt)
    assert err.value.plugin == "portmap"
    assert [ln for ln in node_state(lab)["links"].splitlines() if ": pn" in ln] == []
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
    assert IPAM(lab["kv"]).lookup(f"{NETWORK}.{rt.container_id}.eth0") is None


def test_status_and_gc_through_podnet_cni(lab):
    """STATUS and GC (cniVersion 1.1.0) on a list of podnet-cni alone, against the real dataplane."""
    runtime = CniRuntime({"cniVersion": "1.1.0", "name": NETWORK,
                          "plugins": [{"type": "podnet-cni", "agentSocket": lab["sock"]}]},
                         cni_path=[lab["bindir"]], cache_dir=Path(lab["runtime"].cache_dir).parent / "cache11",
                         host_netns=lab["node"], timeout=60)
    runtime.status()
    _, keep = new_pod(lab, "gk")
    _, drop = new_pod(lab, "gd")
    runtime.add(keep)
    drop_result = runtime.add(drop)
    drop_if = drop_result["interfaces"][0]["name"]
    # The runtime forgot the second pod (its cache is gone), so only plugin GC can clean it up.
    runtime._cache_file(drop).unlink()
    runtime.gc([(keep.container_id, "eth0")])
    links = node_state(lab)["links"]
    assert drop_if not in links
    assert IPAM(lab["kv"]).lookup(f"{NETWORK}.{drop.container_id}.eth0") is None
    assert IPAM(lab["kv"]).lookup(f"{NETWORK}.{keep.container_id}.eth0") is not None
    runtime.delete(keep)
    assert lab["kv"].list(ATTACHMENTS_PREFIX)[0] == []
