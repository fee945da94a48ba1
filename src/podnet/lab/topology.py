"""The lab's wires: an underlay namespace with a bridge, one namespace per node.

    underlay ns (pnl-<id>-ul)                       node ns (pnl-<id>-<n>)
      br0  <gateway>/<len>   <-- veth n<n> ------ eth0 <node address>/<len>
      ext0 <external>/<len>  (dummy)                 default via <gateway>
                                                     ip_forward=1

With racks, a ToR namespace per rack (pnl-<id>-t<r>) sits between its nodes and the
underlay: its uplink `up0` holds an underlay address (.2, .3, ...) on br0 of the
underlay, its own bridge `br0` the rack's gateway; the nodes of the rack hang on that
bridge as they would on the underlay's, and the ToR routes (BIRD: lab/bgp.py).

With a data network (pods' additional networks), a segment namespace (pnl-<id>-d) holds a
bridge `br0` with the data network's external host's address; every node's `data0` hangs
on it without an address (the master of the pods' macvlan links).

Nothing is created in the root namespace: each veth is made inside the node's
namespace with its peer placed directly in the underlay's, so every link goes
away with the namespaces. The external address lives on a dummy in the underlay
namespace, outside the underlay subnet: nodes reach it only through their
default route, and it has no route back to pod addresses (so only NATed pod
traffic gets answers, as from a host on the internet).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from podnet.dataplane.nftables import Chain, Rule, Table, Transaction
from podnet.ebpf.bpffs import remove_netns_pins
from podnet.errors import PodnetError

BRIDGE = "br0"
EXTERNAL_IF = "ext0"
NODE_IF = "eth0"
NETNS_DIR = Path("/run/netns")


def NetNS(name: str):  # noqa: N802 - pyroute2 takes a second to import: only when links are made
    from pyroute2 import NetNS as _NetNS

    return _NetNS(name)


def run(argv: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise PodnetError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def create_netns(name: str) -> None:
    if len(name) > 64:
        raise PodnetError(f"network namespace name {name!r} is too long")
    run(["ip", "netns", "add", name])
    # lo up: every namespace here is a host or a pod and talks to itself.
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


ETC_NETNS = Path("/etc/netns")  # `ip netns exec NAME` binds files here over /etc


def write_netns_file(name: str, filename: str, text: str) -> None:
    """A file `ip netns exec NAME` shows at /etc/FILENAME (e.g. a pod's resolv.conf)."""
    d = ETC_NETNS / name
    d.mkdir(parents=True, exist_ok=True)
    (d / filename).write_text(text)


def delete_netns(name: str) -> bool:
    """Delete a namespace (and its /etc/netns files) if it exists; True if it did."""
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    if not netns_exists(name):
        return False
    with contextlib.suppress(OSError):  # an eBPF dataplane's pins of the namespace's agent
        remove_netns_pins(os.stat(NETNS_DIR / name).st_ino)
    proc = run(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0 and netns_exists(name):
        raise PodnetError(f"cannot delete network namespace {name}: {proc.stderr.strip()}")
    return True


def sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    run(["nsenter", f"--net={NETNS_DIR / netns}", "--", "sh", "-c", f'echo {value} > "$0"', path])


def build_underlay(netns: str, cidr: str, gateway: str, external: str | None = None) -> None:
    """Bridge `br0` with the gateway address; the external address on a dummy."""
    net = ipaddress.ip_network(cidr)
    with NetNS(netns) as ns:
        ns.link("add", ifname=BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=BRIDGE)[0]
        ns.addr("add", index=br, address=gateway, prefixlen=net.prefixlen)
        ns.link("set", index=br, state="up")
        if external:
            iface = ipaddress.ip_interface(external)
            try:
                ns.link("add", ifname=EXTERNAL_IF, kind="dummy")
                ext = ns.link_lookup(ifname=EXTERNAL_IF)[0]
            except Exception as e:  # pyroute2's NetlinkError
                if getattr(e, "code", None) != errno.EOPNOTSUPP:
                    raise
                ext = br  # a kernel without dummy links: the bridge carries it just as well
            ns.addr("add", index=ext, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ns.link("set", index=ext, state="up")


def attach_node(underlay_netns: str, node_netns: str, index: int, address: str, cidr: str, gateway: str) -> None:
    """veth eth0 (node) <-> n<index> (underlay, on the bridge); address, default route, forwarding."""
    net = ipaddress.ip_network(cidr)
    peer = f"n{index}"
    with NetNS(node_netns) as ns:
        ns.link("add", ifname=NODE_IF, kind="veth", peer={"ifname": peer, "net_ns_fd": underlay_netns})
        eth0 = ns.link_lookup(ifname=NODE_IF)[0]
        ns.addr("add", index=eth0, address=address, prefixlen=net.prefixlen)
        ns.link("set", index=eth0, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=gateway)
    with NetNS(underlay_netns) as ns:
        br = ns.link_lookup(ifname=BRIDGE)[0]
        p = ns.link_lookup(ifname=peer)[0]
        ns.link("set", index=p, master=br, state="up")
    sysctl(node_netns, "net.ipv4.ip_forward", "1")


def build_rack(underlay_netns: str, tor_netns: str, index: int, uplink: str, underlay_cidr: str,
               underlay_gateway: str, rack_cidr: str) -> str:
    """A rack's ToR: uplink `up0` <-> t<index> on the underlay's bridge, a bridge `br0` with
    the rack's gateway (.1), default via the underlay's gateway, forwarding. Returns the
    rack's gateway address."""
    ul_net, rack_net = ipaddress.ip_network(underlay_cidr), ipaddress.ip_network(rack_cidr)
    gateway = str(rack_net.network_address + 1)
    peer = f"t{index}"
    with NetNS(tor_netns) as ns:
        ns.link("add", ifname="up0", kind="veth", peer={"ifname": peer, "net_ns_fd": underlay_netns})
        up = ns.link_lookup(ifname="up0")[0]
        ns.addr("add", index=up, address=uplink, prefixlen=ul_net.prefixlen)
        ns.link("set", index=up, state="up")
        ns.link("add", ifname=BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=BRIDGE)[0]
        ns.addr("add", index=br, address=gateway, prefixlen=rack_net.prefixlen)
        ns.link("set", index=br, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=underlay_gateway)
    with NetNS(underlay_netns) as ns:
        br = ns.link_lookup(ifname=BRIDGE)[0]
        p = ns.link_lookup(ifname=peer)[0]
        ns.link("set", index=p, master=br, state="up")
    sysctl(tor_netns, "net.ipv4.ip_forward", "1")
    sysctl(underlay_netns, "net.ipv4.ip_forward", "1")  # the external router, between racks
    return gateway


DATA_IF = "data0"


def build_data_segment(netns: str, external: str | None) -> None:
    """The data network's segment: bridge `br0`, with the external host's address on it (if any)."""
    with NetNS(netns) as ns:
        ns.link("add", ifname=BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=BRIDGE)[0]
        if external:
            iface = ipaddress.ip_interface(external)
            ns.addr("add", index=br, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ns.link("set", index=br, state="up")


def attach_data(segment_netns: str, node_netns: str, index: int) -> None:
    """veth data0 (node, no address: the master of pods' macvlan links) <-> d<index> (segment bridge)."""
    peer = f"d{index}"
    with NetNS(node_netns) as ns:
        ns.link("add", ifname=DATA_IF, kind="veth", peer={"ifname": peer, "net_ns_fd": segment_netns})
        ns.link("set", index=ns.link_lookup(ifname=DATA_IF)[0], state="up")
    with NetNS(segment_netns) as ns:
        br = ns.link_lookup(ifname=BRIDGE)[0]
        ns.link("set", index=ns.link_lookup(ifname=peer)[0], master=br, state="up")


def add_route(netns: str, dst: str, gateway: str) -> None:
    with NetNS(netns) as ns:
        ns.route("replace", dst=dst, gateway=gateway)


LAB_NAT = "podnet-lab"


def masquerade_pods(netns: str, pool: str) -> None:
    """NAT for pods of the reference plugins' lab (no agent to do it): traffic from the pool
    to anywhere outside it leaves the node's underlay interface with the node's address."""
    table = Table(LAB_NAT)
    tx = Transaction(table)
    tx.add(table)
    tx.add(Chain("postrouting", type="nat", hook="postrouting", priority="srcnat", policy="accept"))
    tx.add(Rule("postrouting", f"ip saddr {pool} ip daddr != {pool} oifname {NODE_IF} masquerade"))
    run(["nsenter", f"--net={NETNS_DIR / netns}", "--", "nft", "-f", "-"], input=tx.script())
