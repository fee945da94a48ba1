"""A small podnet lab: two nodes, an agent each, podnet-cni; traffic over VXLAN and direct routes."""

import importlib.util
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from podnet.lab import topology
from podnet.lab.cluster import agent_status, down_by_name, node_runtime, pod_runtime_conf, up
from podnet.lab.connectivity import Lab, format_table, probe_all
from podnet.lab.spec import parse_lab
from podnet.model.objects import EndpointSlice, Pod
from tests.kernel.labs import running_lab

HAVE_PODNET = all(importlib.util.find_spec(m) is not None for m in ("podnet.agent", "podnet.cni"))

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
    pytest.mark.skipif(not HAVE_PODNET, reason="the node agent (podnet.agent) and podnet-cni (podnet.cni) "
                                               "are not in this tree yet"),
]

POOLS = [
    {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "vx"},
     "spec": {"cidr": "10.244.0.0/16", "encapsulation": "VXLAN", "natOutgoing": True,
              "nodeSelector": {"matchLabels": {"routing": "vxlan"}}}},
    {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "direct"},
     "spec": {"cidr": "10.245.0.0/16", "encapsulation": "None", "natOutgoing": False,
              "nodeSelector": {"matchLabels": {"routing": "direct"}}}},
]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"}, "external": {"address": "10.98.0.10/24"},
            "nodes": [{"name": "node-1", "labels": {"routing": "vxlan"}},
                      {"name": "node-2", "labels": {"routing": "direct"}}],
            "pods": [{"name": "a-1", "node": "node-1", "ports": [{"containerPort": 8080}]},
                     {"name": "a-2", "node": "node-1", "ports": [{"containerPort": 8080}]},
                     {"name": "b-1", "node": "node-2", "ports": [{"containerPort": 8080},
                                                                 {"containerPort": 53, "protocol": "UDP"}]}],
            "manifests": POOLS}
    with running_lab(spec, "pn", timeout=60) as lab:
        yield lab


def test_agents_answer_and_pods_get_pool_addresses(lab):
    for n in lab.nodes:
        assert agent_status(lab.state, n) is None
    ips = {p["name"]: p["ips"][0] for p in lab.pods}
    assert ips["a-1"].startswith("10.244.") and ips["a-2"].startswith("10.244.")
    assert ips["b-1"].startswith("10.245.")
    pods = {p.name: p for p in lab.store().list(Pod)}
    assert all(pods[n].status.phase == "Running" and pods[n].status.pod_ip == ip for n, ip in ips.items())


def test_cross_node_traffic_over_vxlan_and_direct_routes(lab):
    rows = probe_all(lab, all_ports=True, timeout=5)
    assert all(r.ok for r in rows), format_table(rows)
    kinds = {(r.src, r.dst): r.kind for r in rows if r.target.startswith("tcp/")}
    assert kinds[("default/a-1", "default/b-1")] == "cross-node/direct"
    assert kinds[("default/b-1", "default/a-1")] == "cross-node/vxlan"
    assert kinds[("default/a-1", "default/a-2")] == "same-node"
    # natOutgoing only for the VXLAN pool: b-1 (direct, no NAT) cannot reach the external host.
    ext = {r.src: r for r in rows if r.kind == "external"}
    assert ext["default/a-1"].expected and "saw source 10.99.0.11" in ext["default/a-1"].detail
    assert not ext["default/b-1"].expected
    # Cross-node pod traffic keeps its source address.
    a1 = lab.pod("a-1")["ips"][0]
    assert any(r.src == "default/a-1" and r.dst == "default/b-1" and f"saw source {a1}" in r.detail for r in rows)


def test_cni_check_through_podnet_cni(lab):
    for entry in lab.pods:
        node_runtime(lab.state, lab.node(entry["node"])).check(pod_runtime_conf(entry))


@pytest.mark.etcd
@pytest.mark.skipif(not shutil.which("etcd"), reason="needs the etcd binary")
def test_lab_on_an_etcd_store_on_the_host_loopback():
    from podnet.store import open_store
    from podnet.store.objects import ObjectStore
    from tests.support.etcd import EtcdCluster

    root = Path(tempfile.mkdtemp(prefix="pnle-"))
    name = f"pe-{secrets.token_hex(3)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
           "spec": {"underlay": {"cidr": "10.99.0.0/24"}, "nodes": [{"name": "node-1"}, {"name": "node-2"}],
                    "pods": [{"name": "a", "node": "node-1", "labels": {"app": "a"}, "ports": [{"containerPort": 8080}]},
                             {"name": "b", "node": "node-2", "ports": [{"containerPort": 8080}]}],
                    "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
                                   "spec": {"selector": {"app": "a"}, "ports": [{"port": 8080}]}}]}}
    try:
        with EtcdCluster(1) as etcd:
            st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, store_url=etcd.url, timeout=60)
            try:
                lab = Lab(st)
                assert st.data["agent_store"].startswith("etcd://10.99.0.1:")
                rows = probe_all(lab, timeout=5)
                assert rows and all(r.ok for r in rows), format_table(rows)
                assert {p.name for p in ObjectStore(open_store(etcd.url)).list(Pod)} == {"a", "b"}
                assert [e.target_ref.name for s in ObjectStore(open_store(etcd.url)).list(EndpointSlice)
                        if s.service_name == "a" for e in s.endpoints] == ["a"]
            finally:
                down_by_name(name, root)
            assert topology.netns_list(f"pnl-{st.id}-") == []
            # The lab's objects leave the shared store with it, and so do the slices of its Services.
            assert ObjectStore(open_store(etcd.url)).list(Pod) == []
            assert ObjectStore(open_store(etcd.url)).list(EndpointSlice) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("etcd"), reason="needs the etcd binary")
def test_lab_on_an_etcd_store_with_auth():
    """User and password in the store URL: the lab's controller and agents (and their CNI
    sessions) authenticate; the password is in no command line and not in state.json, only in
    a root-only file of the lab's."""
    import json
    import stat
    from urllib.parse import quote

    from podnet.lab.state import STORE_CREDENTIALS
    from podnet.store import open_store
    from podnet.store.objects import ObjectStore
    from tests.support.etcd import PODNET_PASSWORD, EtcdCluster

    root = Path(tempfile.mkdtemp(prefix="pnla-"))
    name = f"pa-{secrets.token_hex(3)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
           "spec": {"underlay": {"cidr": "10.98.0.0/24"}, "nodes": [{"name": "node-1"}, {"name": "node-2"}],
                    "pods": [{"name": "a", "node": "node-1", "labels": {"app": "a"}, "ports": [{"containerPort": 8080}]},
                             {"name": "b", "node": "node-2", "ports": [{"containerPort": 8080}]}],
                    "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
                                   "spec": {"selector": {"app": "a"}, "ports": [{"port": 8080}]}}]}}
    try:
        with EtcdCluster(1, auth=True, auth_prefix="/podnet") as etcd:
            url = f"etcd://podnet:{quote(PODNET_PASSWORD, safe='')}@{etcd.endpoints[0]}"
            st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, store_url=url, timeout=60)
            try:
                assert st.data["store"] == etcd.url
                assert quote(PODNET_PASSWORD, safe="") not in (st.dir / "state.json").read_text()
                for p in st.data["processes"]:
                    pid = st.process_pid(p)
                    if pid is not None:
                        assert PODNET_PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), p["key"]
                secret = st.dir / STORE_CREDENTIALS
                assert stat.S_IMODE(secret.stat().st_mode) == 0o600
                assert json.loads(secret.read_text())["PODNET_ETCD_PASSWORD"] == PODNET_PASSWORD
                rows = probe_all(Lab(st), timeout=5)
                assert rows and all(r.ok for r in rows), format_table(rows)
                assert [e.target_ref.name for s in ObjectStore(open_store(etcd.url, credentials=etcd.credentials))
                        .list(EndpointSlice) if s.service_name == "a" for e in s.endpoints] == ["a"]
            finally:
                down_by_name(name, root)
            assert ObjectStore(open_store(etcd.url, credentials=etcd.credentials)).list(Pod) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
