"""Lab topology on the real kernel: node namespaces on an underlay bridge, gone after down."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from podnet.errors import PodnetError
from podnet.lab import topology
from podnet.lab.cluster import down_by_name, up
from podnet.lab.spec import parse_lab
from podnet.lab.state import LabState

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2"),
]


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="pnlt-"))  # short: agent socket paths must fit a sockaddr
    yield d
    for name in os.listdir(d):
        down_by_name(name, d)
    shutil.rmtree(d, ignore_errors=True)


def spec_for(name: str, nodes: int = 2):
    return parse_lab(yaml.safe_dump({
        "apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
        "spec": {"underlay": {"cidr": "10.99.0.0/24"}, "external": {"address": "10.98.0.10/24"},
                 "nodes": [{"name": f"node-{i + 1}"} for i in range(nodes)], "cni": {"plugin": "bridge"}},
    }), f"{name}.yaml")


def ns_exec(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20)


def test_topology_up_and_down_leaves_nothing_behind(root):
    name = f"topo-{secrets.token_hex(3)}"
    links_before = root_links()
    st = up(spec_for(name), root=root)
    prefix = f"pnl-{st.id}-"
    try:
        assert topology.netns_list(prefix) == sorted([f"{prefix}ul", f"{prefix}1", f"{prefix}2"])
        n1, n2 = (n["netns"] for n in st.data["nodes"])
        addr = ns_exec(n1, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert "10.99.0.11/24" in addr
        assert "default via 10.99.0.1" in ns_exec(n1, "ip", "route").stdout
        assert ns_exec(n1, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
        # node -> gateway, node -> node on the bridge, node -> external via the default route
        for target in ("10.99.0.1", "10.99.0.12", "10.98.0.10"):
            assert ns_exec(n1, "ping", "-c1", "-W5", target).returncode == 0, target
        probe = ns_exec(n2, sys.executable, "-m", "podnet.lab.probe", "tcp:10.98.0.10:8080")
        assert '"name": "external"' in probe.stdout and '"peer": "10.99.0.12"' in probe.stdout
        ext = st.process("external")
        assert st.process_pid(ext) is not None
        # Nothing in the root namespace: every link lives in the lab's namespaces.
        assert root_links() == links_before
    finally:
        assert down_by_name(name, root) == [name]
    assert topology.netns_list(prefix) == []
    assert st.process_pid(ext) is None
    assert not (root / name).exists()
    assert root_links() == links_before
    assert down_by_name(name, root) == []  # nothing left: a no-op success


def test_a_second_up_of_the_same_lab_is_refused_and_names_differ(root):
    name = f"twice-{secrets.token_hex(3)}"
    a = up(spec_for(name, nodes=1), root=root)
    try:
        with pytest.raises(Exception, match="already exists"):
            up(spec_for(name, nodes=1), root=root)
        b = up(spec_for(name + "-b", nodes=1), root=root)
        assert a.id != b.id
        assert not set(a.data["netns"]) & set(b.data["netns"])
    finally:
        down_by_name(name, root)
        down_by_name(name + "-b", root)
    assert topology.netns_list(f"pnl-{a.id}-") == [] and topology.netns_list(f"pnl-{b.id}-") == []


def test_failed_up_cleans_up_by_itself(root):
    name = f"fail-{secrets.token_hex(3)}"
    spec = spec_for(name, nodes=1)
    spec = spec.__class__(**{**spec.__dict__, "underlay": spec.underlay, "gateway": "10.99.0.300"})
    said: list[str] = []
    with pytest.raises(PodnetError, match=f"lab {name}: "):
        up(spec, root=root, say=said.append)
    lab_id = said[0].split("(id ")[1].split(")")[0]
    assert LabState.open(name, root) is None
    assert topology.netns_list(f"pnl-{lab_id}-") == []
