"""The pod's default route moved to an additional network (the `default-route` key).

As Multus does: for each address family a network asks a gateway of, every default route
of that family in the pod's main table is removed (eth0's too) and one is added via the
gateway on that network's interface. Unlike Multus, the cluster's ranges (the Workload
pools, the Service CIDR, the node DNS address) stay on eth0 via its gateway, so the pod
still reaches pods, Services and DNS as before.
Also: the check that an interface name is still free in the pod before a delegate runs.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.netns import netlink_in
from podnet.dataplane.rtnl import rtnl_in

RT_TABLE_MAIN = 254


def present_interfaces(netns: str, names: Sequence[str]) -> set[str]:
    """Which of names are interfaces in the pod (one raw netlink socket, no helper process)."""
    with rtnl_in(netns) as link:
        return {n for n in names if link.link_index(n) is not None}


def set_default_route(netns: str, ifname: str, gateways: tuple[str, ...], keep: Sequence[str] = (),
                      keep_dev: str = "eth0") -> None:
    """Default routes of the gateways' families via ifname only. The ranges in `keep` (the
    cluster's: pools, Services, node DNS) stay on keep_dev (eth0) via the gateway its default
    route had. Raises OSError/NetlinkError."""
    with netlink_in(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(f"interface {ifname} is not in the pod")
        index = found[0]
        primary = (ipr.link_lookup(ifname=keep_dev) or [None])[0]
        for gw in gateways:
            ip = ipaddress.ip_address(gw)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                if route["dst_len"] != 0 or route.get_attr("RTA_DST") is not None:
                    continue
                oif, via = route.get_attr("RTA_OIF"), route.get_attr("RTA_GATEWAY")
                if primary is not None and oif == primary and via:
                    for dst in keep:
                        if ipaddress.ip_network(dst).version == ip.version:
                            ipr.route("replace", family=family, dst=dst, gateway=via, oif=oif,
                                      flags=route["flags"], table=RT_TABLE_MAIN)
                try:
                    ipr.route("del", family=family, dst="default", table=RT_TABLE_MAIN, oif=oif, gateway=via,
                              priority=route.get_attr("RTA_PRIORITY"))
                except NetlinkError as e:
                    if e.code != 3:  # ESRCH: gone already
                        raise
            ipr.route("replace", family=family, dst="default", gateway=str(ip), oif=index, table=RT_TABLE_MAIN)
