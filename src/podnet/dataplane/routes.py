"""Applying DesiredRouting to the kernel of the current network namespace.

Reconciles instead of flushing: it reads the routes podnet owns (marked with
RTPROT_PODNET), the VXLAN device, its neighbour and FDB entries, and changes only
what differs, so a restart with everything already right changes nothing. A route
is compared whole (kind, gateway, device and source): one that differs in any of
them, such as a route written before routes carried a source, is replaced in place
(RTM_NEWROUTE with NLM_F_REPLACE), never deleted first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.routing import (
    RTPROT_PODNET,
    VXLAN_IFNAME,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    VXLAN_VNI,
    DesiredRouting,
    Route,
    vtep_mac,
)
from podnet.errors import PodnetError

log = logging.getLogger(__name__)

RTN_BLACKHOLE = 6
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
MAIN_TABLE = 254


@dataclass
class RoutingChanges:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.added) + len(self.removed)


class RouteProgrammer:
    def __init__(self, node: str, node_ip: str, ipr: IPRoute | None = None):
        self.node = node
        self.node_ip = node_ip
        self.ipr = ipr or IPRoute()

    def close(self) -> None:
        self.ipr.close()

    # -- underlay and VXLAN device

    def underlay(self) -> tuple[int, int]:
        """(ifindex, mtu) of the link that holds the node's address."""
        for a in self.ipr.get_addr(family=2):
            if a.get_attr("IFA_ADDRESS") == self.node_ip:
                link = self.ipr.get_links(a["index"])[0]
                return a["index"], link.get_attr("IFLA_MTU")
        raise PodnetError(f"node address {self.node_ip} is on no interface of this network namespace")

    def vxlan_index(self) -> int | None:
        found = self.ipr.link_lookup(ifname=VXLAN_IFNAME)
        return found[0] if found else None

    def ensure_vxlan(self) -> int:
        under_index, under_mtu = self.underlay()
        mac, mtu = vtep_mac(self.node), under_mtu - VXLAN_OVERHEAD
        idx = self.vxlan_index()
        if idx is not None and not self._vxlan_matches(idx, under_index):
            log.info("recreating %s: its settings differ from this node's", VXLAN_IFNAME)
            self.ipr.link("del", index=idx)
            idx = None
        if idx is None:
            self.ipr.link(
                "add", ifname=VXLAN_IFNAME, kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_port=VXLAN_PORT,
                vxlan_local=self.node_ip, vxlan_link=under_index, vxlan_learning=0, address=mac,
            )
            idx = self.ipr.link_lookup(ifname=VXLAN_IFNAME)[0]
        link = self.ipr.get_links(idx)[0]
        if link.get_attr("IFLA_MTU") != mtu or link.get_attr("IFLA_ADDRESS") != mac or not link["flags"] & 1:
            self.ipr.link("set", index=idx, mtu=mtu, address=mac, state="up")
        return idx

    def _vxlan_matches(self, idx: int, under_index: int) -> bool:
        info = self.ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get_attr("IFLA_INFO_DATA")
        return (
            data.get_attr("IFLA_VXLAN_ID") == VXLAN_VNI
            and data.get_attr("IFLA_VXLAN_LOCAL") == self.node_ip
            and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT
            and data.get_attr("IFLA_VXLAN_LINK") == under_index
            and not data.get_attr("IFLA_VXLAN_LEARNING")
        )

    # -- reconcile

    def current_routes(self, vxlan_index: int | None) -> dict[Route, dict]:
        out = {}
        for r in self.ipr.get_routes(family=2, table=MAIN_TABLE, proto=RTPROT_PODNET):
            dst = f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}"
            src = r.get_attr("RTA_PREFSRC")
            if r["type"] == RTN_BLACKHOLE:
                route = Route(dst, "blackhole", None, src)
            elif vxlan_index is not None and r.get_attr("RTA_OIF") == vxlan_index:
                route = Route(dst, "vxlan", r.get_attr("RTA_GATEWAY"), src)
            else:
                route = Route(dst, "direct", r.get_attr("RTA_GATEWAY"), src)
            out[route] = r
        return out

    def apply(self, desired: DesiredRouting) -> RoutingChanges:
        changes = RoutingChanges()
        vx = self.ensure_vxlan() if desired.vxlan else None
        if not desired.vxlan and (old := self.vxlan_index()) is not None:
            self.ipr.link("del", index=old)
            changes.removed.append(f"link {VXLAN_IFNAME}")
        if vx is not None:
            self._apply_vteps(vx, desired.vteps, changes)

        current = self.current_routes(vx)
        wanted = {r.dst for r in desired.routes}
        # A route whose destination stays but whose kind, gateway or source differs is
        # replaced below, in place: deleting it first would cut its traffic meanwhile.
        for route in sorted(r for r in set(current) - desired.routes if r.dst not in wanted):
            try:
                self.ipr.route("del", dst=route.dst, table=MAIN_TABLE, proto=RTPROT_PODNET,
                               type=current[route]["type"])
                changes.removed.append(_describe(route))
            except NetlinkError as e:
                changes.errors.append(f"remove {_describe(route)}: {e.args[1]}")
        stale = {r.dst: r for r in set(current) - desired.routes}
        for route in sorted(desired.routes - set(current)):
            try:
                self.ipr.route("replace", **self._route_args(route, vx))
                changes.added.append(_describe(route))
                if route.dst in stale:
                    changes.removed.append(_describe(stale[route.dst]))
            except NetlinkError as e:
                changes.errors.append(f"add {_describe(route)}: {e.args[1]}")
        return changes

    def _route_args(self, route: Route, vx: int | None) -> dict:
        args: dict = {"dst": route.dst, "table": MAIN_TABLE, "proto": RTPROT_PODNET}
        if route.kind == "blackhole":
            args["type"] = "blackhole"
        elif route.kind == "vxlan":
            args.update(gateway=route.gateway, oif=vx, flags=RTNH_F_ONLINK)
        else:
            args["gateway"] = route.gateway
        if route.src is not None:
            args["prefsrc"] = route.src
        return args

    def _apply_vteps(self, vx: int, vteps: frozenset[tuple[str, str]], changes: RoutingChanges) -> None:
        neighbours = {
            (n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
            for n in self.ipr.get_neighbours(ifindex=vx, family=2)
            if n["state"] & NUD_PERMANENT
        }
        fdb = {
            (n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
            for n in self.ipr.fdb("dump", ifindex=vx)
            if n.get_attr("NDA_DST")
        }
        for ip, mac in neighbours - vteps:
            self.ipr.neigh("del", dst=ip, lladdr=mac, ifindex=vx)
            changes.removed.append(f"neigh {ip} {mac}")
        for ip, mac in fdb - vteps:
            self.ipr.fdb("del", ifindex=vx, lladdr=mac, dst=ip)
            changes.removed.append(f"fdb {mac} {ip}")
        for ip, mac in vteps - neighbours:
            self.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=vx, state=NUD_PERMANENT)
            changes.added.append(f"neigh {ip} {mac}")
        for ip, mac in vteps - fdb:
            self.ipr.fdb("append", ifindex=vx, lladdr=mac, dst=ip)
            changes.added.append(f"fdb {mac} {ip}")


def _describe(route: Route) -> str:
    if route.kind == "blackhole":
        return f"blackhole {route.dst}"
    via = f"{route.dst} via {route.gateway}"
    via = f"{via} dev {VXLAN_IFNAME} onlink" if route.kind == "vxlan" else via
    return f"{via} src {route.src}" if route.src else via
