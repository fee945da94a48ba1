"""ENI routing on the node, as AWS VPC CNI's networkutils programs it (shared mode).

    ENI at device index d >= 1 (its link found by the ENI's MAC address):
        the link up, the ENI's primary address on it (subnet prefix), and the route the
        kernel adds to main for that prefix deleted (it would send the node's packets to
        the subnet out of this ENI, by ARP)
        table 100 + d:  <subnet gateway>/32 dev <link> scope link
                        default via <subnet gateway> dev <link>
    each pod address A on that ENI:
        ip rule priority 512   to A lookup main            (traffic to the pod: its veth)
        ip rule priority 1536  from A lookup 100 + d       (the pod's replies leave by its ENI)

Everything a pod sends out of its ENI goes to the subnet's gateway, also to another node's
pod in the same subnet: the ENI's table has no on-link route for the subnet. EC2 delivers a
secondary address to the ENI holding it by its own mapping, not by that ENI answering ARP,
so an on-link route would depend on the fabric answering ARP for every address of the
subnet; the gateway is the one neighbour an ENI may count on.

A pod on the primary ENI (device 0) needs no rule: the main table's default route is the
primary ENI's. The pod's veth is the pod dataplane's (dataplane/pods.py); its host route is
that dataplane's too, and restored here on a resync when it went (host_routes()).
Rules and the tables' routes carry protocol `podnet-eni` so a full sync finds and removes
only its own.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.pods import ALIAS_PREFIX, HOST_PREFIX
from podnet.dataplane.routing import RTPROT_PODNET_POD
from podnet.dataplane.rtnl import RT_SCOPE_LINK

log = logging.getLogger("podnet.eni")

TABLE_BASE = 100
PRIORITY_TO_POD = 512
PRIORITY_FROM_POD = 1536
RULE_PROTOCOL = 0xE1  # rtnetlink protocol of podnet's ENI rules (any value above RTPROT_STATIC's 4)
ROUTE_PROTOCOL = 0xE1
MAIN_TABLE = 254


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
            table, gateway = table_of(eni.device_index), gateway_of(eni.cidr)
            self._ipr.route("replace", dst=gateway, dst_len=32, oif=idx, table=table, scope=RT_SCOPE_LINK,
                            proto=ROUTE_PROTOCOL)
            self._ipr.route("replace", dst="0.0.0.0", dst_len=0, gateway=gateway, oif=idx, table=table,
                            proto=ROUTE_PROTOCOL)
            wanted = {(gateway, 32), (None, 0)}
            for r in self._ipr.get_routes(family=2, table=table):
                if r.get_attr("RTA_TABLE") == table and (r.get_attr("RTA_DST"), r["dst_len"]) not in wanted:
                    self._del_route(r, table)  # e.g. the subnet's on-link route of an older agent
            # the kernel's route for the address's prefix: delete it from main (see the module's doc)
            for r in self._ipr.get_routes(family=2, table=MAIN_TABLE):
                if (r.get_attr("RTA_TABLE") == MAIN_TABLE and r.get_attr("RTA_OIF") == idx
                        and (r.get_attr("RTA_DST"), r["dst_len"]) == (str(net.network_address), net.prefixlen)):
                    self._del_route(r, MAIN_TABLE)
            return None

    def _del_route(self, r, table: int) -> None:
        # dst and dst_len apart, and the route's own scope: pyroute2 reads "a.b.c.d/n" as a /32
        # in a delete, and the kernel matches a delete's scope
        try:
            self._ipr.route("del", dst=r.get_attr("RTA_DST") or "0.0.0.0", dst_len=r["dst_len"], table=table,
                            oif=r.get_attr("RTA_OIF"), scope=r["scope"], proto=r["proto"])
        except NetlinkError as e:
            if e.code not in (3, 2):  # ESRCH, ENOENT: gone meanwhile
                raise

    def table_problems(self, eni: EniLink) -> list[str]:
        """What the ENI's table lacks (a resync's verify())."""
        if eni.device_index == 0:
            return []
        table, gateway = table_of(eni.device_index), gateway_of(eni.cidr)
        with self._lock:
            have = {(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                    for r in self._ipr.get_routes(family=2, table=table) if r.get_attr("RTA_TABLE") == table}
        problems = []
        if (gateway, 32, None) not in have:
            problems.append(f"route {gateway} dev eni{eni.device_index} table {table} is missing")
        if (None, 0, gateway) not in have:
            problems.append(f"route default via {gateway} table {table} is missing")
        return problems

    def host_routes(self, handles: dict[str, str], repair: bool) -> list[str]:
        """Each pod's /32 to its veth in main (pod address -> CNI handle); what was missing,
        put back when `repair`. The veth is found by the attachment in its alias."""
        by_attachment = {}  # ".<containerID>.<ifname>", the end of its handle -> (link index, name)
        with self._lock:
            for link in self._ipr.get_links():
                alias, name = link.get_attr("IFLA_IFALIAS") or "", link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(HOST_PREFIX) and alias.startswith(ALIAS_PREFIX):
                    cid, _, ifname = alias[len(ALIAS_PREFIX):].rpartition("/")
                    by_attachment[f".{cid}.{ifname}"] = (link["index"], name)
            have = {(r.get_attr("RTA_DST"), r.get_attr("RTA_OIF")) for r in self._ipr.get_routes(family=2, table=254)
                    if r["dst_len"] == 32 and r.get_attr("RTA_TABLE") == MAIN_TABLE}
            missing = []
            for address, handle in handles.items():
                found = next((v for k, v in by_attachment.items() if handle.endswith(k)), None)
                if found is None or (address, found[0]) in have:
                    continue  # no veth (an ADD or DEL under way): the pod dataplane's own business
                missing.append(f"host route {address}/32 dev {found[1]}")
                if repair:
                    try:
                        self._ipr.route("replace", dst=address, dst_len=32, oif=found[0], table=MAIN_TABLE,
                                        scope=RT_SCOPE_LINK, proto=RTPROT_PODNET_POD)
                    except NetlinkError as e:
                        if e.code != 19:  # ENODEV: the veth went with its pod meanwhile
                            raise
            return missing

    def pod_rules(self) -> dict[str, int]:
        """Pod address -> table, from the kernel's rules of podnet's protocol; an address with
        one of its two rules only maps to 0 (a sync puts the other back)."""
        from_pod, to_pod = {}, set()
        with self._lock:
            for r in self._ipr.get_rules(family=2):
                if r.get_attr("FRA_PROTOCOL") != RULE_PROTOCOL:
                    continue
                if r.get_attr("FRA_PRIORITY") == PRIORITY_FROM_POD and r["src_len"] == 32 and r.get_attr("FRA_SRC"):
                    from_pod[r.get_attr("FRA_SRC")] = r.get_attr("FRA_TABLE") or r["table"]
                elif r.get_attr("FRA_PRIORITY") == PRIORITY_TO_POD and r["dst_len"] == 32 and r.get_attr("FRA_DST"):
                    to_pod.add(r.get_attr("FRA_DST"))
        return {a: (from_pod.get(a, 0) if a in to_pod else 0) for a in from_pod.keys() | to_pod}

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
