"""ENI routing on the node, as AWS VPC CNI's networkutils programs it (shared mode).

    ENI at device index d >= 1 (its link found by the ENI's MAC address):
        the link up, the ENI's primary address on it (subnet prefix)
        table 100 + d:  <subnet> dev <link> scope link
                        default via <subnet gateway> dev <link> onlink
    each pod address A on that ENI:
        ip rule priority 512   to A lookup main            (traffic to the pod: its veth)
        ip rule priority 1536  from A lookup 100 + d       (the pod's replies leave by its ENI)

A pod on the primary ENI (device 0) needs no rule: the main table's default route is the
primary ENI's. The pod's veth and host route are the pod dataplane's (dataplane/pods.py).
Rules carry protocol `podnet-eni` so a full sync finds and removes only its own.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("podnet.eni")

TABLE_BASE = 100
PRIORITY_TO_POD = 512
PRIORITY_FROM_POD = 1536
RULE_PROTOCOL = 0xE1  # rtnetlink protocol of podnet's ENI rules (any value above RTPROT_STATIC's 4)
ROUTE_PROTOCOL = 0xE1


def table_of(device_index: int) -> int:
    return TABLE_BASE + device_index


def gateway_of(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr).network_address + 1)  # EC2's: the subnet's first host address


@dataclass(frozen=True)
class EniLink:
    eni: str
    mac: str
    device_index: int
    primary_ip: str
    cidr: str  # the ENI's subnet


class EniRouting:
    """Programs the node's ENI links, tables and pod rules (in the namespace it runs in)."""

    def __init__(self, ipr_factory: Callable[[], IPRoute] = IPRoute):
        self._ipr = ipr_factory()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._ipr.close()

    def link_index(self, mac: str) -> int | None:
        mac = mac.lower()
        for link in self._ipr.get_links():
            if (link.get_attr("IFLA_ADDRESS") or "").lower() == mac:
                return link["index"]
        return None

    def ensure_eni(self, eni: EniLink) -> str | None:
        """The ENI's link, address and table; a problem (e.g. the link is not there yet) or None."""
        if eni.device_index == 0:
            return None
        with self._lock:
            idx = self.link_index(eni.mac)
            if idx is None:
                return f"no link with the MAC {eni.mac} of ENI {eni.eni} (device {eni.device_index})"
            net = ipaddress.ip_network(eni.cidr)
            name = self._ipr.get_links(idx)[0].get_attr("IFLA_IFNAME")
            try:  # loose reverse-path filtering, as AWS VPC CNI sets it: replies come back by other links
                with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "w") as f:
                    f.write("2")
            except OSError as e:
                log.debug("rp_filter of %s: %s", name, e)
            self._ipr.link("set", index=idx, state="up")
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in self._ipr.get_addr(index=idx, family=2)}
            if (eni.primary_ip, net.prefixlen) not in have:
                self._ipr.addr("replace", index=idx, address=eni.primary_ip, prefixlen=net.prefixlen)
            table = table_of(eni.device_index)
            # the kernel adds the subnet's route to main for the address above; the ENI's table gets its own
            self._ipr.route("replace", dst=str(net), oif=idx, table=table, scope=253, proto=ROUTE_PROTOCOL)
            self._ipr.route("replace", dst="0.0.0.0/0", gateway=gateway_of(eni.cidr), oif=idx, table=table,
                            flags=4, proto=ROUTE_PROTOCOL)  # RTNH_F_ONLINK
            # the subnet's route in main would send replies to VPC hosts out of the wrong ENI
            for r in self._ipr.get_routes(family=2, table=254, dst=str(net)):
                if r.get_attr("RTA_OIF") == idx and r["dst_len"] == net.prefixlen:
                    try:
                        self._ipr.route("del", dst=str(net), oif=idx, table=254)
                    except NetlinkError:
                        pass
            return None

    def pod_rules(self) -> dict[str, int]:
        """Pod address -> table, from the kernel's `from` rules of podnet's protocol."""
        out = {}
        with self._lock:
            for r in self._ipr.get_rules(family=2):
                if r.get_attr("FRA_PRIORITY") == PRIORITY_FROM_POD and r.get_attr("FRA_PROTOCOL") == RULE_PROTOCOL:
                    src = r.get_attr("FRA_SRC")
                    if src and r["src_len"] == 32:
                        out[src] = r.get_attr("FRA_TABLE") or r["table"]
        return out

    def set_pod(self, address: str, table: int) -> None:
        with self._lock:
            for kwargs in ({"dst": address, "dst_len": 32, "priority": PRIORITY_TO_POD, "table": 254},
                           {"src": address, "src_len": 32, "priority": PRIORITY_FROM_POD, "table": table}):
                try:
                    self._ipr.rule("add", family=2, protocol=RULE_PROTOCOL, **kwargs)
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: already there
                        raise

    def clear_pod(self, address: str) -> None:
        with self._lock:
            for r in self._ipr.get_rules(family=2):
                if r.get_attr("FRA_PROTOCOL") != RULE_PROTOCOL:
                    continue
                if address in (r.get_attr("FRA_SRC"), r.get_attr("FRA_DST")):
                    try:
                        self._ipr.rule("del", family=2, priority=r.get_attr("FRA_PRIORITY"),
                                       table=r.get_attr("FRA_TABLE") or r["table"],
                                       src=r.get_attr("FRA_SRC"), src_len=r["src_len"],
                                       dst=r.get_attr("FRA_DST"), dst_len=r["dst_len"])
                    except NetlinkError as e:
                        if e.code != 2:  # ENOENT: gone meanwhile
                            raise

    def sync(self, enis: list[EniLink], pods: dict[str, int]) -> list[str]:
        """Make the kernel hold exactly these ENIs' set-up and pod rules; what changed."""
        changes = []
        for eni in enis:
            problem = self.ensure_eni(eni)
            if problem:
                changes.append(f"waiting: {problem}")
        have = self.pod_rules()
        for address, table in pods.items():
            if have.get(address) != table:
                if address in have:
                    self.clear_pod(address)
                self.set_pod(address, table)
                changes.append(f"rule from {address} lookup {table}")
        for address in have:
            if address not in pods:
                self.clear_pod(address)
                changes.append(f"rule from {address} removed")
        return changes
