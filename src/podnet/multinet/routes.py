"""The pod's default route moved to an additional network (the `default-route` key).

As Multus does: for each address family a network asks a gateway of, every default route
of that family in the pod's main table is removed (eth0's too) and one is added via the
gateway on that network's interface. eth0 then still carries the cluster's traffic only
by its own connected routes; docs/multinetwork.md says what that means for Services.
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


def set_default_route(netns: str, ifname: str, gateways: tuple[str, ...]) -> None:
    """Default routes of the gateways' families via ifname only. Raises OSError/NetlinkError."""
    with netlink_in(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise OSError(f"interface {ifname} is not in the pod")
        index = found[0]
        for gw in gateways:
            ip = ipaddress.ip_address(gw)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                if route["dst_len"] != 0 or route.get_attr("RTA_DST") is not None:
                    continue
                try:
                    ipr.route("del", family=family, dst="default", table=RT_TABLE_MAIN,
                              oif=route.get_attr("RTA_OIF"), gateway=route.get_attr("RTA_GATEWAY"),
                              priority=route.get_attr("RTA_PRIORITY"))
                except NetlinkError as e:
                    if e.code != 3:  # ESRCH: gone already
                        raise
            ipr.route("replace", family=family, dst="default", gateway=str(ip), oif=index, table=RT_TABLE_MAIN)
