"""examples/lab/bgp.yaml comes up and every probe behaves as its manifests say: two racks
behind their ToRs (BIRD), an external router, two route reflectors, a global pool the
external host reaches without NAT and a private pool it does not; `podnet bgp status`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from podnet.bgp.status import sessions
from podnet.lab import bgp as lab_bgp
from podnet.lab.connectivity import format_table, probe_all
from tests.kernel.labs import running_lab
from tests.support.bgp import route_to, wait_until

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab" / "bgp.yaml"


@pytest.fixture(scope="module")
def lab():
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    with running_lab(spec, "bgpex", timeout=120) as lab:
        yield lab
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("/usr/sbin/bird") and lab.state.dir.name in line]  # lab down stopped every BIRD


def test_sessions_reflectors_and_tors(lab):
    by_node = {n["name"]: sessions(lab_bgp.node_bird(n).ctl) for n in lab.nodes}
    for name, found in by_node.items():
        assert all(s.established for s in found), (name, found)
        kinds = sorted(s.kind for s in found)
        if name.endswith("-1"):  # a reflector: the other reflector, the 4 clients, its ToR
            assert kinds == ["Node"] * 6
        else:  # a client: one session per reflector and its ToR
            assert kinds == ["Node"] * 3
        tor = "10.99.5.1" if name.startswith("a-") else "10.99.6.1"
        assert any(s.neighbor == tor and s.neighbor_as == (65001 if name.startswith("a-") else 65002) for s in found)


def test_every_probe_as_the_manifests_say(lab):
    rows = probe_all(lab, timeout=3)
    assert rows and all(r.ok for r in rows), format_table(rows)
    kinds = {(r.src, r.dst, r.kind) for r in rows}
    assert ("default/web-a2", "default/web-b2", "cross-node/bgp") in kinds
    ext = {r.dst: r for r in rows if r.kind == "external->pod"}
    assert ext["default/web-a2"].expected and ext["default/web-b2"].expected
    assert "saw source 10.98.4.10" in ext["default/web-a2"].detail  # no NAT on the way in
    assert not ext["private/db-b3"].expected  # disableBGPExport: never announced outside
    out = {r.src: r for r in rows if r.kind == "external"}
    assert out["default/web-a2"].expected and not out["private/db-b3"].expected


def test_external_router_holds_blocks_and_the_service_range(lab):
    ul = lab.state.data["underlay_netns"]
    svc = wait_until(lambda: route_to(ul, "10.96.0.0/16"), "the Service range at the external router")
    assert {h["gateway"] for h in svc.get("nexthops", [])} == {"10.99.4.2", "10.99.4.3"}  # both ToRs
    web = lab.pod("web-a2")["ips"][0]
    assert route_to(ul, str(__import__("ipaddress").ip_network(f"{web}/26", strict=False)))["gateway"] == "10.99.4.2"


def test_bgp_status_command(lab):
    proc = subprocess.run([sys.executable, "-m", "podnet.cli.main", "bgp", "status", "--lab", lab.name, "-o", "json"],
                          capture_output=True, text=True, env={**os.environ, "PODNET_LAB_ROOT": str(lab.state.dir.parent)})
    assert proc.returncode == 0, proc.stderr
    nodes = {n["node"]: n for n in json.loads(proc.stdout)["nodes"]}
    assert set(nodes) == {"a-1", "a-2", "a-3", "b-1", "b-2", "b-3"}
    assert all(s["established"] and s["state"] == "Established" for n in nodes.values() for s in n["sessions"])
    table = subprocess.run([sys.executable, "-m", "podnet.cli.main", "bgp", "status", "--lab", lab.name],
                           capture_output=True, text=True,
                           env={**os.environ, "PODNET_LAB_ROOT": str(lab.state.dir.parent)}).stdout
    assert table.splitlines()[0].split() == ["NODE", "PEER", "AS", "TYPE", "STATE", "SINCE", "IMPORTED", "EXPORTED"]
    assert "Established" in table
