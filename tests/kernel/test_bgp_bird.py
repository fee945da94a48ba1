"""BIRD supervised in a network namespace: checked before use, reloaded only on change, a refused
configuration never loaded, restarted after a crash, adopted by a new supervisor; a node's
rendered filters against a router that announces more than it should take."""

import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from podnet.agent.view import BlockRecord
from podnet.bgp.bird import Bird, ConfigRefused
from podnet.bgp.config import compile_node
from podnet.bgp.control import command
from podnet.bgp.render import render
from tests.kernel.nsutil import in_ns, namespaces
from tests.support.bgp import established, routes, wait_until
from tests.unit.test_bgp_config import POOLS, bgppeer, config, node

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]


def conf(router_id: str, statics: list[str]) -> str:
    routes = "".join(f"  route {r} blackhole;\n" for r in statics)
    return (f"router id {router_id};\nprotocol device {{ }}\n"
            f"protocol static podnet_routes {{\n  ipv4;\n{routes}}}\n")


def prefixes(bird: Bird, show: str) -> set[str]:
    """The prefixes of a `show route ...` answer."""
    reply = command(bird.ctl, show)
    return {text.split()[0] for code, text in reply if code == 1007 and text and text[0].isdigit()}


def static_routes(bird: Bird) -> set[str]:
    return prefixes(bird, "show route protocol podnet_routes")


@pytest.fixture
def bird():
    with namespaces() as ns:
        name = ns.new("bird")
        d = tempfile.mkdtemp(prefix="pnbird-")
        os.chmod(d, 0o755)  # BIRD's user passes through to its own directory
        b = Bird(Path(d) / "run", netns=name)
        try:
            yield b
        finally:
            b.stop()
            shutil.rmtree(d, ignore_errors=True)


def test_start_reload_only_on_change_and_refused_text_never_loaded(bird):
    one = conf("10.0.0.1", ["10.244.1.0/26"])
    assert bird.apply(one) == "started"
    pid = bird.pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid = pwd.getpwnam("bird").pw_uid
    assert bird.user == "bird" and f"Uid:\t{uid}\t{uid}" in status  # dropped to BIRD's user
    cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff")).split()[1], 16)
    assert cap_eff & ~((1 << 10) | (1 << 11) | (1 << 12) | (1 << 13)) == 0  # NET_BIND/BROADCAST/ADMIN/RAW only
    assert static_routes(bird) == {"10.244.1.0/26"}

    assert bird.apply(one) == ""  # same text: no reload
    two = conf("10.0.0.1", ["10.244.1.0/26", "10.244.2.0/26"])
    assert bird.apply(two) == "reloaded"
    assert bird.pid() == pid and static_routes(bird) == {"10.244.1.0/26", "10.244.2.0/26"}

    with pytest.raises(ConfigRefused, match="syntax error") as err:
        bird.apply(two + "protocol bgp broken {\n")
    assert "kept the running one" in str(err.value)
    assert bird.pid() == pid and static_routes(bird) == {"10.244.1.0/26", "10.244.2.0/26"}
    assert bird.conf.read_text() == two  # the refused text went aside, not over the running one
    assert "broken" in bird.refused.read_text()
    # a reload by hand (as SIGHUP would) still finds the good text
    assert command(bird.ctl, "configure")[-1][1] == "Reconfigured"


def test_restart_after_kill_and_adoption(bird):
    text = conf("10.0.0.2", ["10.244.3.0/26"])
    bird.apply(text)
    pid = bird.pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: bird.pid() is None, "BIRD gone after SIGKILL", timeout=10)
    assert not bird.running()
    assert bird.apply(text) == "started"  # a dead BIRD is started again, on the same text
    new_pid = bird.pid()
    assert new_pid and new_pid != pid

    adopter = Bird(bird.dir, netns=bird.netns)  # e.g. a restarted agent
    assert adopter.running() and adopter.apply(text) == ""
    assert adopter.pid() == new_pid
    assert adopter.stop() and bird.pid() is None


def learnt(bird: Bird, protocol: str) -> set[str]:
    """The prefixes BIRD holds from `protocol` (what passed its import filter)."""
    return prefixes(bird, f"show route protocol {protocol}")


def exported(bird: Bird, protocol: str) -> set[str]:
    """The prefixes BIRD's export filter to `protocol` passes now, over its whole table."""
    return prefixes(bird, f"show route export {protocol}")


def router_conf(address: str, asn: int, announced: list[str]) -> str:
    """A plain BIRD router peering with node a (10.0.0.11, AS 64512), announcing `announced`."""
    statics = "".join(f"  route {p} blackhole;\n" for p in announced)
    return (f"router id {address};\nprotocol device {{ }}\n"
            f"protocol static announced {{\n  ipv4;\n{statics}}}\n"
            f"protocol bgp node_a {{\n  local {address} as {asn};\n  neighbor 10.0.0.11 as 64512;\n"
            "  ipv4 { import all; export all; };\n}\n")


def test_routers_get_blocks_and_service_ranges_and_the_kernel_only_pool_routes():
    """A node (as the agent renders it, without the agent) and two routers on its segment,
    eBGP. A router hears one route per announced block and the Service range; not the block
    of a disableBGPExport pool, not a pod's /32 or other kernel routes of the node. The first
    router announces a pool block, a VXLAN pool's block, a prefix outside every pool and the
    node's own block: the node takes neither its own block nor a route outside the pools into
    its kernel, nor one of a pool BGP does not route. The second announces the same pool block:
    the node's kernel route has both routers as next hops (ECMP)."""
    with namespaces() as ns:
        fabric, a, r1, r2 = ns.new("fabric"), ns.new("node"), ns.new("r1"), ns.new("r2")
        in_ns(fabric, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(fabric, "ip", "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(((a, "10.0.0.11/24"), (r1, "10.0.0.1/24"), (r2, "10.0.0.2/24"))):
            in_ns(fabric, "ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            in_ns(fabric, "ip", "link", "set", f"p{i}", "master", "br0", "up")
            in_ns(name, "ip", "addr", "add", addr, "dev", "eth0")
            in_ns(name, "ip", "link", "set", "eth0", "up")
        in_ns(a, "ip", "route", "add", "10.244.1.5/32", "dev", "eth0")  # as a pod's route
        in_ns(a, "ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.1")  # the node's own business
        d = Path(tempfile.mkdtemp(prefix="pnbird-"))
        os.chmod(d, 0o755)
        birds = [Bird(d / "node", netns=a), Bird(d / "r1", netns=r1), Bird(d / "r2", netns=r2)]
        try:
            blocks = [BlockRecord("10.244.1.0/26", "global", "a", ()),  # global: exported
                      BlockRecord("10.245.0.0/26", "private", "a", ()),  # disableBGPExport
                      BlockRecord("10.246.0.0/26", "overlay", "a", ())]  # VXLAN, exported
            cfg = compile_node("a", [node("a", "10.0.0.11")], config(serviceClusterIPs=[{"cidr": "10.96.0.0/16"}]),
                               [bgppeer("edge-1", peerIP="10.0.0.1", asNumber=65000),
                                bgppeer("edge-2", peerIP="10.0.0.2", asNumber=65001)], POOLS, blocks)
            birds[0].apply(render(cfg, birds[0].log_file))
            birds[1].apply(router_conf("10.0.0.1", 65000,
                                       ["10.244.7.0/26", "10.246.7.0/26", "198.51.100.0/24", "10.244.1.0/26"]))
            birds[2].apply(router_conf("10.0.0.2", 65001, ["10.244.7.0/26"]))
            wait_until(lambda: established(birds[0].ctl, peers=2), "the node's sessions with the routers", 60)
            expected = {"10.244.1.0/26", "10.246.0.0/26", "10.96.0.0/16"}
            wait_until(lambda: learnt(birds[1], "node_a") >= expected, "the router heard the node's routes")
            assert exported(birds[0], "Global_10_0_0_1") == expected  # the filter on the node's whole table
            assert learnt(birds[1], "node_a") == expected

            from_router = {"10.244.7.0/26", "10.246.7.0/26", "198.51.100.0/24"}  # not the node's own block
            wait_until(lambda: learnt(birds[0], "Global_10_0_0_1") == from_router, "the node took the router's routes")
            route = wait_until(lambda: next((x for x in routes(a) if x["dst"] == "10.244.7.0/26"
                                             and len(x.get("nexthops", [])) == 2), None),
                               "the pool route in the node's kernel, through both routers")
            assert route["protocol"] == "bird" and {h["gateway"] for h in route["nexthops"]} == {"10.0.0.1", "10.0.0.2"}
            assert exported(birds[0], "podnet_kernel") == {"10.244.7.0/26"}
            assert {x["dst"] for x in routes(a) if x.get("protocol") == "bird"} == {"10.244.7.0/26"}
        finally:
            for b in birds:
                b.stop()
            shutil.rmtree(d, ignore_errors=True)
