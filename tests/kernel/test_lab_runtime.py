"""The libcni-like runtime with the reference bridge + host-local plugins, across real namespaces."""

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podnet.lab import topology
from podnet.lab.runtime import CNIError, CniRuntime, RuntimeConf, k8s_args, result_ips

CNI_DIR = "/usr/lib/cni"
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(f"{CNI_DIR}/bridge"),
                       reason="needs root and the reference CNI plugins in /usr/lib/cni"),
]


@pytest.fixture
def netns():
    """host, pod-a, pod-b namespaces with a unique prefix; all deleted afterwards."""
    prefix = f"pnrt-{secrets.token_hex(3)}-"
    names = {k: prefix + k for k in ("host", "a", "b")}
    try:
        for n in names.values():
            topology.create_netns(n)
        yield names
    finally:
        for n in names.values():
            topology.delete_netns(n)
        assert topology.netns_list(prefix) == []


def conflist(tmp_path: Path, *extra: dict, version: str = "1.0.0") -> dict:
    return {"cniVersion": version, "name": "labnet", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/24"}]], "dataDir": str(tmp_path / "ipam")}},
        *extra]}


def rt_for(ns: str, cid: str) -> RuntimeConf:
    return RuntimeConf(container_id=cid, netns=f"/run/netns/{ns}", args=k8s_args("default", ns, cid, "uid-" + cid[:8]))


def run_in(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20)


@contextlib.contextmanager
def pod_server(ns: str, name: str, tmp_path: Path):
    ready = tmp_path / f"{name}.ready"
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "podnet.lab.podserver",
                               "--name", name, "--port", "tcp:8080", "--ready-file", str(ready)])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, "pod server did not start"
            time.sleep(0.05)
        yield
    finally:
        server.terminate()
        server.wait(10)


def probe(ns: str, *targets: str) -> list[dict]:
    return json.loads(run_in(ns, sys.executable, "-m", "podnet.lab.probe", *targets).stdout)


def host_links(ns: str) -> list[str]:
    return run_in(ns, "ip", "-o", "link", "show").stdout.splitlines()


def test_add_check_del_gc_with_real_traffic(tmp_path, netns):
    rt = CniRuntime(conflist(tmp_path, {"type": "tuning"}), cni_path=[CNI_DIR], cache_dir=tmp_path / "cache",
                    host_netns=netns["host"])
    ca, cb = secrets.token_hex(32), secrets.token_hex(32)
    a = rt_for(netns["a"], ca)
    ra = rt.add(a)
    rb = rt.add(rt_for(netns["b"], cb))
    ip_a, ip_b = result_ips(ra)[0], result_ips(rb)[0]
    assert ip_a != ip_b and ip_a.startswith("10.250.0.")
    assert any(i.get("sandbox") == f"/run/netns/{netns['a']}" for i in ra["interfaces"])

    # Result cache in libcni's layout.
    cache = json.loads((tmp_path / "cache" / "results" / f"labnet-{ca}-eth0").read_text())
    assert cache["kind"] == "cniCacheV1" and cache["containerId"] == ca and cache["ifName"] == "eth0"
    assert json.loads(base64.b64decode(cache["config"]))["name"] == "labnet"
    assert ["K8S_POD_NAME", netns["a"]] in cache["cniArgs"]
    assert cache["result"] == ra and rt.cached_result(a) == ra

    # Real traffic: a server in pod a, a client in pod b.
    with pod_server(netns["a"], "pod-a", tmp_path):
        (answer,) = probe(netns["b"], f"tcp:{ip_a}:8080")
        assert answer["name"] == "pod-a" and answer["peer"] == ip_b

    # CHECK passes, then fails once the pod's address is gone.
    rt.check(a)
    rt.check(rt_for(netns["b"], cb))
    run_in(netns["b"], "ip", "addr", "flush", "dev", "eth0")
    with pytest.raises(CNIError) as err:
        rt.check(rt_for(netns["b"], cb))
    assert err.value.plugin == "bridge" and err.value.code != 0

    # GC: b is not valid any more -> DEL for b; a stays.
    assert rt.gc([(ca, "eth0")]) == [(cb, "eth0")]
    assert rt.cached_result(rt_for(netns["b"], cb)) is None
    assert not (tmp_path / "ipam" / "labnet" / ip_b).exists()
    assert (tmp_path / "ipam" / "labnet" / ip_a).exists()
    assert "eth0" not in run_in(netns["b"], "ip", "-o", "link").stdout

    # DEL: veth and address released, cache gone, portmap rules gone; a second DEL is fine.
    rt.delete(a)
    assert not (tmp_path / "ipam" / "labnet" / ip_a).exists()
    assert rt.cached_attachments() == []
    assert not [line for line in host_links(netns["host"]) if "veth" in line]
    rt.delete(a)


def test_capability_args_reach_portmap_as_runtime_config(tmp_path, netns):
    rt = CniRuntime(conflist(tmp_path, {"type": "portmap", "capabilities": {"portMappings": True}}),
                    cni_path=[CNI_DIR], cache_dir=tmp_path / "cache", host_netns=netns["host"])
    a = rt_for(netns["a"], secrets.token_hex(32))
    a.capability_args = {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}],
                         "bandwidth": {"ingressRate": 1}}  # not declared by any plugin: not passed
    assert rt._conf(rt.plugins[1], None, a)["runtimeConfig"] == {"portMappings": a.capability_args["portMappings"]}
    assert "runtimeConfig" not in rt._conf(rt.plugins[0], None, a)
    rt.add(a)
    with pod_server(netns["a"], "pod-a", tmp_path):
        (answer,) = probe(netns["host"], "tcp:10.250.0.1:18080")  # the bridge's address in the host
        assert answer["name"] == "pod-a"
    assert "18080" in run_in(netns["host"], "iptables-save", "-t", "nat").stdout
    rt.delete(a)
    assert "18080" not in run_in(netns["host"], "iptables-save", "-t", "nat").stdout


def test_failed_add_reports_the_cni_error_and_undoes_earlier_plugins(tmp_path, netns):
    bad = {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.no_such_knob": "1"}}
    rt = CniRuntime(conflist(tmp_path, bad), cni_path=[CNI_DIR], cache_dir=tmp_path / "cache",
                    host_netns=netns["host"])
    a = rt_for(netns["a"], secrets.token_hex(32))
    with pytest.raises(CNIError) as err:
        rt.add(a)
    e = err.value
    assert e.plugin == "tuning" and e.command == "ADD" and e.code != 0 and "no_such_knob" in str(e)
    # bridge's DEL ran: no address held, no veth in the host, nothing cached.
    held = [f for f in (tmp_path / "ipam" / "labnet").iterdir() if f.name.startswith("10.")]
    assert held == []
    assert not [line for line in host_links(netns["host"]) if "veth" in line]
    assert rt.cached(a) is None


def test_missing_plugin_status_and_versions(tmp_path, netns):
    rt = CniRuntime(conflist(tmp_path, {"type": "no-such-plugin"}), cni_path=[CNI_DIR],
                    cache_dir=tmp_path / "cache", host_netns=netns["host"])
    with pytest.raises(CNIError, match="failed to find plugin 'no-such-plugin'"):
        rt.add(rt_for(netns["a"], secrets.token_hex(32)))
    assert not (tmp_path / "cache" / "results").exists() or rt.cached_attachments() == []
    rt.status()  # a 1.0.0 list has no STATUS: ready by definition
    assert "1.0.0" in rt.plugin_versions("bridge")
    with pytest.raises(CNIError) as err:  # the reference plugins (1.1.1) predate STATUS
        CniRuntime(conflist(tmp_path, version="1.1.0"), cni_path=[CNI_DIR], cache_dir=tmp_path / "c2",
                   host_netns=netns["host"]).status()
    assert err.value.command == "STATUS" and err.value.plugin == "bridge" and err.value.code != 0
