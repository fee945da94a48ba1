"""The lab's cloud fabric: a stand-in for the VPC network that carries ENI traffic.

    VPC ns (pnl-<id>-vpc): a router, programmed from the cloud's state (DescribeNetworkInterfaces)
      f<hash> ---- veth ---- eni<d> in the node ns: one link per ENI attached at device d >= 1
                             (MAC = the ENI's; the agent finds it by that, as on EC2)
        <subnet gateway>/32 on every ENI link: the node's next hop answers ARP
        <ENI primary>/32 dev f<hash>               the ENI's own address
        <secondary>/32 via <ENI primary> dev f<hash>  each pod address: to the node that holds it
      vh0 <host gateway>/24 ---- veth ---- eth0 <host address>/24 in the VPC host ns
      ul0 ---- veth ---- vpc0 on the underlay's bridge: the nodes' own subnet (the instances'
                          primary ENIs); each node routes the VPC through it, as an instance's
                          subnet router routes the VPC

EC2 routes a secondary address to the ENI holding it without the instance answering ARP for
it; the fabric does the same with a route via the ENI's primary address. No encapsulation
and no NAT anywhere: a pod's packets reach another node's pod or the VPC host with the
pod's address as their source.

apply() is called by the EC2 server (tests/support/fake_ec2.py, --fabric) after every call
that changed an ENI and before the caller hears back, so an agent that was told its ENI is
attached finds the link. A link whose node end went with a pod's namespace (exclusive
mode) is made again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("podnet.lab.cloudfabric")

VPC_HOST_IF = "vh0"
UNDERLAY_IF = "ul0"  # in the VPC ns, towards the underlay
UNDERLAY_PEER = "vpc0"  # in the underlay ns


def NetNS(name: str):  # noqa: N802 - pyroute2 takes a second to import
    from pyroute2 import NetNS as _NetNS

    return _NetNS(name)


def fabric_ifname(eni_id: str) -> str:
    return "f" + hashlib.sha1(eni_id.encode()).hexdigest()[:12]


@dataclass
class FabricConfig:
    vpc_netns: str
    instances: dict[str, str]  # instance ID -> node namespace
    subnets: dict[str, str]  # subnet ID -> CIDR

    @classmethod
    def read(cls, path: str | Path) -> FabricConfig | None:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        return cls(doc["vpc_netns"], doc["instances"], doc["subnets"])

    def write(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps({"vpc_netns": self.vpc_netns, "instances": self.instances,
                                   "subnets": self.subnets}))
        tmp.replace(path)


class CloudFabric:
    def __init__(self, config: FabricConfig):
        self.config = config
        self._lock = threading.Lock()

    def apply(self, enis: list[dict[str, Any]]) -> list[str]:
        """Make the VPC namespace and the nodes' ENI links match the ENIs; what changed."""
        with self._lock:
            return self._apply(enis)

    def _apply(self, enis: list[dict[str, Any]]) -> list[str]:
        cfg = self.config
        changes: list[str] = []
        wanted: dict[str, dict[str, Any]] = {}
        for n in enis:
            att = n.get("Attachment") or {}
            if att.get("InstanceId") in cfg.instances and att.get("DeviceIndex", 0) >= 1 \
                    and n.get("SubnetId") in cfg.subnets:
                wanted[fabric_ifname(n["NetworkInterfaceId"])] = n
        with NetNS(cfg.vpc_netns) as vpc:
            have = {link.get_attr("IFLA_IFNAME"): link["index"] for link in vpc.get_links()
                    if (link.get_attr("IFLA_IFNAME") or "").startswith("f")}
            for name, idx in have.items():
                if name not in wanted:
                    vpc.link("del", index=idx)
                    changes.append(f"link {name} removed")
            routes: dict[str, tuple[str | None, int]] = {}
            for name, n in wanted.items():
                idx = have.get(name)
                if idx is None:
                    idx = self._make_link(vpc, name, n)
                    changes.append(f"link {name} for {n['NetworkInterfaceId']}")
                cidr = cfg.subnets[n["SubnetId"]]
                gateway = str(ipaddress.ip_network(cidr).network_address + 1)
                addrs = {a.get_attr("IFA_ADDRESS") for a in vpc.get_addr(index=idx, family=2)}
                if gateway not in addrs:
                    vpc.addr("add", index=idx, address=gateway, prefixlen=32)
                primary = n["PrivateIpAddress"]
                routes[primary] = (None, idx)
                for p in n.get("PrivateIpAddresses", ()):
                    if p["PrivateIpAddress"] != primary:
                        routes[p["PrivateIpAddress"]] = (primary, idx)
            current = {}
            for r in vpc.get_routes(family=2, table=254):
                if r["dst_len"] == 32 and r.get_attr("RTA_OIF") in set(have.values()) | {
                        idx for idx in (vpc.link_lookup(ifname=n) for n in wanted) for idx in idx}:
                    current[r.get_attr("RTA_DST")] = (r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF"))
            for dst, (via, idx) in routes.items():
                if current.get(dst) != (via, idx):
                    kwargs: dict[str, Any] = {"dst": f"{dst}/32", "oif": idx}
                    if via:
                        kwargs.update(gateway=via, flags=4)  # onlink
                    else:
                        kwargs.update(scope=253)
                    vpc.route("replace", **kwargs)
                    changes.append(f"route {dst}")
            for dst, (_, idx) in current.items():
                if dst not in routes:
                    try:
                        vpc.route("del", dst=f"{dst}/32", oif=idx)
                    except Exception:  # noqa: BLE001 - gone with its link
                        pass
                    changes.append(f"route {dst} removed")
        return changes

    def _make_link(self, vpc: Any, name: str, n: dict[str, Any]) -> int:
        """veth f<hash> (VPC ns) <-> eni<d> (node ns, the ENI's MAC)."""
        cfg = self.config
        node_ns = cfg.instances[n["Attachment"]["InstanceId"]]
        node_if = f"eni{n['Attachment']['DeviceIndex']}"
        with NetNS(node_ns) as node:
            for stale in node.link_lookup(ifname=node_if):
                node.link("del", index=stale)
        vpc.link("add", ifname=name, kind="veth",
                 peer={"ifname": node_if, "address": n["MacAddress"], "net_ns_fd": node_ns})
        idx = vpc.link_lookup(ifname=name)[0]
        vpc.link("set", index=idx, state="up")
        return idx


def build_vpc(underlay_netns: str, vpc_netns: str, host_netns: str, host_address: str, vpc_cidr: str,
              underlay_cidr: str, underlay_address: str) -> None:
    """The VPC namespace's fixed links: the VPC host and the way to the nodes' own subnet.
    underlay_address: the VPC end's address in the underlay subnet (the underlay's route to
    the VPC goes through it)."""
    from podnet.lab import topology

    for ns in (vpc_netns, host_netns):
        topology.sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
    topology.sysctl(vpc_netns, "net.ipv4.ip_forward", "1")
    host = ipaddress.ip_interface(host_address)
    gateway = str(host.network.network_address + 1)
    with NetNS(vpc_netns) as vpc:
        vpc.link("add", ifname=VPC_HOST_IF, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host_netns})
        idx = vpc.link_lookup(ifname=VPC_HOST_IF)[0]
        vpc.addr("add", index=idx, address=gateway, prefixlen=host.network.prefixlen)
        vpc.link("set", index=idx, state="up")
        vpc.link("add", ifname=UNDERLAY_IF, kind="veth", peer={"ifname": UNDERLAY_PEER, "net_ns_fd": underlay_netns})
        ul = vpc.link_lookup(ifname=UNDERLAY_IF)[0]
        ul_net = ipaddress.ip_network(underlay_cidr)
        vpc.addr("add", index=ul, address=underlay_address, prefixlen=ul_net.prefixlen)
        vpc.link("set", index=ul, state="up")
    with NetNS(host_netns) as h:
        eth0 = h.link_lookup(ifname="eth0")[0]
        h.addr("add", index=eth0, address=str(host.ip), prefixlen=host.network.prefixlen)
        h.link("set", index=eth0, state="up")
        h.route("add", dst="0.0.0.0/0", gateway=gateway)
    with NetNS(underlay_netns) as u:
        from podnet.lab.topology import BRIDGE

        br = u.link_lookup(ifname=BRIDGE)[0]
        p = u.link_lookup(ifname=UNDERLAY_PEER)[0]
        u.link("set", index=p, master=br, state="up")
