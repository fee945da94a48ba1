"""BGP in the lab: routers (BIRD in their own namespaces) and the nodes' BIRDs.

A router peers with every BGP node of the subnets it serves through BIRD's dynamic
neighbours (`neighbor range <subnet> external`: whichever node connects, in any AS
other than the router's), installs what they announce in its namespace's kernel, so
the external host behind it reaches pod addresses without NAT, and (`upstreams`)
peers with other routers over eBGP, announcing its subnets and what its nodes
announced. The nodes find it through a BGPPeer in the lab's manifests (peerIP: the
router's address, asNumber: its AS), as they would a rack's ToR.

The nodes' BIRDs belong to their agents (agent/bgp.py), which leave BIRD running when
they stop; `lab down` stops them before their namespaces go.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from podnet.bgp.bird import Bird
from podnet.bgp.control import wait_answers
from podnet.bgp.render import address, prefix, quoted
from podnet.errors import PodnetError
from podnet.lab.spec import LabSpec
from podnet.lab.state import LabState

ROUTER_PREFIX = "bgp-router-"


@dataclass(frozen=True)
class Upstream:
    address: str  # the other router's address
    asn: int


def node_bird(node: dict) -> Bird:
    """The BIRD a lab node's agent runs (its files next to the agent's socket)."""
    return Bird(node["socket"] + ".bird")


def stop_node_birds(st: LabState) -> list[str]:
    """Stop every node's BIRD (the agents leave theirs running); the names of the nodes that had one."""
    return [n["name"] for n in st.data.get("nodes", []) if node_bird(n).stop()]


def router_config(router_id: str, asn: int, subnets: list[str], upstreams: list[Upstream] = (),
                  log_file: str | None = None, uplink: str | None = None) -> str:
    """`uplink`: the router's own address towards its upstreams (default: router_id)."""
    lines = [f"router id {address(router_id)};", "timeformat protocol iso long;"]
    if log_file:
        lines.append(f"log {quoted(log_file)} {{ info, remote, warning, error, auth, fatal, bug }};")
    lines += [
        "protocol device { }",
        "protocol direct { ipv4; interface \"*\"; }",
        "protocol kernel {",
        "  ipv4 { import none; export filter { if source = RTS_BGP then accept; reject; }; };",
        "  merge paths on;",
        "}",
        "template bgp podnet_lab_router {",
        f"  local as {int(asn)};",
        "  graceful restart on;",
        "  connect delay time 1;",
        "  connect retry time 2;",
        "  error wait time 1,5;",
        "}",
    ]
    for i, subnet in enumerate(subnets):
        lines += [
            f"protocol bgp nodes_{i} from podnet_lab_router {{",
            f"  local {address(router_id)} as {int(asn)};",
            f"  neighbor range {prefix(subnet)} external;",
            "  dynamic name \"node_\";",
            # Nodes need nothing from the router: their default route goes through it.
            "  ipv4 { import all; export none; add paths rx; };",
            "}",
        ]
    for up in upstreams:
        lines += [
            f"protocol bgp up_{address(up.address).replace('.', '_')} from podnet_lab_router {{",
            f"  local {address(uplink or router_id)} as {int(asn)};",
            f"  neighbor {address(up.address)} as {int(up.asn)};",
            "  ipv4 { import all; export filter { if source = RTS_BGP || source = RTS_DEVICE then accept; reject; }; "
            "next hop self; };",
            "}",
        ]
    return "\n".join(lines) + "\n"


def start_router(st: LabState, name: str, netns: str, router_id: str, asn: int, subnets: list[str],
                 upstreams: list[Upstream] = (), timeout: float = 30.0, uplink: str | None = None) -> dict:
    """BIRD as a lab router in `netns`; returns its process record (stopped by `lab down`)."""
    run = st.dir / f"{ROUTER_PREFIX}{name}"
    run.mkdir(exist_ok=True)
    conf, ctl = run / "bird.conf", run / "bird.ctl"
    conf.write_text(router_config(router_id, asn, subnets, list(upstreams), uplink=uplink))
    bird = shutil.which("bird") or "/usr/sbin/bird"
    entry = st.start_process(f"{ROUTER_PREFIX}{name}", [bird, "-f", "-c", str(conf), "-s", str(ctl)], netns=netns,
                             role="router", control=str(ctl), router=name, asn=asn, address=router_id)
    if not wait_answers(str(ctl), timeout):
        raise PodnetError(f"lab router {name} (BIRD in {netns}) does not answer on {ctl}; log {entry['log']}:\n"
                          + Path(entry["log"]).read_text(errors="replace")[-2000:])
    return entry


def start_lab_routers(st: LabState, spec: LabSpec, underlay_netns: str, say: Callable[[str], None]) -> None:
    """The external router on the gateway (peers: every BGP speaker on the underlay, ToRs or
    nodes) and a ToR per rack (peers: its rack's nodes, and the external router)."""
    if spec.router is None:
        return
    asn = spec.router.as_number
    start_router(st, "external", underlay_netns, spec.gateway, asn, [str(spec.underlay)])
    say(f"router external: BIRD in {underlay_netns} on {spec.gateway}, AS {asn}")
    for rack in spec.racks:
        tor = next(r for r in st.data.get("racks", []) if r["name"] == rack.name)
        start_router(st, rack.name, tor["netns"], tor["gateway"], rack.as_number, [rack.cidr],
                     [Upstream(spec.gateway, asn)], uplink=tor["uplink"])
        say(f"router {rack.name} (ToR): BIRD in {tor['netns']} on {tor['gateway']} and {tor['uplink']}, "
            f"AS {rack.as_number}")


def routers(st: LabState) -> list[dict]:
    return [p for p in st.data.get("processes", []) if p.get("role") == "router"]


def subnet_of(address_with_len: str) -> str:
    return str(ipaddress.ip_interface(address_with_len).network)
