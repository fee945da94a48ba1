"""Applying DesiredRouting to the kernel of the current network namespace.

Reconciles instead of flushing: it reads the routes podnet owns (marked with
RTPROT_PODNET), the VXLAN device, its neighbour and FDB entries, and changes only
what differs, so a restart with everything already right changes nothing. A route
is compared whole (kind, gateway, device and source): one that differs in any of
them, such as a route written before routes carried a source, is replaced in place
(RTM_NEWROUTE with NLM_F_REPLACE), never deleted first.

That full reconcile runs at start, on each periodic resync and after an error;
between them an apply sends only the difference from the previous one, so a new
block on another node is one route (and its VTEP's neighbour and FDB entry). All
requests of one apply go in one batch over the minimal rtnetlink client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyroute2 import IPRoute

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
from podnet.dataplane.rtnl import (
    AF_BRIDGE,
    NUD_PERMANENT,
    RTN_BLACKHOLE,
    KernelRoute,
    Request,
    Rtnl,
    fdb_request,
    neighbour_request,
    route_request,
)
from podnet.errors import PodnetError

log = logging.getLogger(__name__)



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
        self.ipr = ipr or IPRoute()  # the VXLAN device and the underlay (rare, and many attributes)
        self.rtnl = Rtnl()  # routes, neighbours, FDB: dumps and batches (thousands at a time)
        self.applied: DesiredRouting | None = None  # what the kernel holds, as far as podnet knows
        self._vx: int | None = None  # the VXLAN device's index when it was last ensured

    def close(self) -> None:
        self.ipr.close()
        self.rtnl.close()

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

    def current_routes(self, vxlan_index: int | None) -> dict[Route, KernelRoute]:
        out = {}
        for r in self.rtnl.routes(RTPROT_PODNET):
            if r.type == RTN_BLACKHOLE:
                route = Route(r.dst, "blackhole", None, r.prefsrc)
            elif vxlan_index is not None and r.oif == vxlan_index:
                route = Route(r.dst, "vxlan", r.gateway, r.prefsrc)
            else:
                route = Route(r.dst, "direct", r.gateway, r.prefsrc)
            out[route] = r
        return out

    def current_vteps(self, vx: int) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """(permanent neighbour entries, FDB entries) of the VXLAN device, as (IP, MAC)."""
        neighbours = {(ip, mac) for ip, mac, state in self.rtnl.neighbours(vx) if state & NUD_PERMANENT}
        fdb = {(ip, mac) for ip, mac, _ in self.rtnl.neighbours(vx, AF_BRIDGE)}
        return neighbours, fdb

    def apply(self, desired: DesiredRouting, full: bool = True) -> RoutingChanges:
        """Make the kernel hold `desired`. `full`: read podnet's routes, neighbours and FDB
        entries back and change what differs (start, resync, after an error); otherwise
        send only the difference from what the last apply left (a new block: one route)."""
        applied = self.applied
        self.applied = None  # unknown until this apply has gone through
        if full or applied is None or applied.vxlan != desired.vxlan or (desired.vxlan and self._vx is None):
            changes = self._reconcile(desired)
        else:
            changes = self._delta(applied, desired)
        if not changes.errors:
            self.applied = desired
        return changes

    def _reconcile(self, desired: DesiredRouting) -> RoutingChanges:
        changes = RoutingChanges()
        vx = self._vx = self.ensure_vxlan() if desired.vxlan else None
        if not desired.vxlan and (old := self.vxlan_index()) is not None:
            self.ipr.link("del", index=old)
            changes.removed.append(f"link {VXLAN_IFNAME}")
        requests: list[Request] = []
        if vx is not None:
            neighbours, fdb = self.current_vteps(vx)
            requests += self._vtep_requests(vx, neighbours, fdb, desired.vteps, changes)
        current = self.current_routes(vx)
        wanted = {r.dst for r in desired.routes}
        # A route whose destination stays but whose kind, gateway or source differs is
        # replaced, in place: deleting it first would cut its traffic meanwhile.
        for route in sorted(r for r in set(current) - desired.routes if r.dst not in wanted):
            requests.append(route_request(route.dst, protocol=RTPROT_PODNET, delete=True))
            changes.removed.append(_describe(route))
        stale = {r.dst: r for r in set(current) - desired.routes}
        for route in sorted(desired.routes - set(current)):
            requests.append(self._route_request(route, vx))
            changes.added.append(_describe(route))
            if route.dst in stale:
                changes.removed.append(_describe(stale[route.dst]))
        changes.errors += self.rtnl.batch(requests)
        return changes

    def _delta(self, old: DesiredRouting, new: DesiredRouting) -> RoutingChanges:
        changes = RoutingChanges()
        vx = self._vx
        requests: list[Request] = []
        if vx is not None and old.vteps != new.vteps:
            requests += self._vtep_requests(vx, set(old.vteps), set(old.vteps), new.vteps, changes)
        wanted = {r.dst for r in new.routes}
        for route in sorted(r for r in old.routes - new.routes if r.dst not in wanted):
            requests.append(route_request(route.dst, protocol=RTPROT_PODNET, delete=True))
            changes.removed.append(_describe(route))
        for route in sorted(new.routes - old.routes):
            requests.append(self._route_request(route, vx))
            changes.added.append(_describe(route))
        changes.errors += self.rtnl.batch(requests)
        return changes

    def drift(self) -> list[str]:
        """What differs between the kernel and the last apply (nothing applied: nothing)."""
        applied = self.applied
        if applied is None:
            return []
        vx = self.vxlan_index()
        if applied.vxlan and (vx is None or vx != self._vx):
            return [f"the VXLAN device {VXLAN_IFNAME} is missing or was recreated"]
        out = []
        current = set(self.current_routes(vx))
        out += [f"route {_describe(r)} missing" for r in sorted(applied.routes - current)]
        out += [f"route {_describe(r)} not podnet's" for r in sorted(current - applied.routes)]
        if vx is not None:
            neighbours, fdb = self.current_vteps(vx)
            out += [f"neighbour {ip} {mac} missing" for ip, mac in sorted(applied.vteps - neighbours)]
            out += [f"fdb {mac} {ip} missing" for ip, mac in sorted(applied.vteps - fdb)]
            out += [f"neighbour {ip} {mac} not podnet's" for ip, mac in sorted(neighbours - applied.vteps)]
        return out

    def _route_request(self, route: Route, vx: int | None) -> Request:
        if route.kind == "blackhole":
            return route_request(route.dst, RTN_BLACKHOLE, protocol=RTPROT_PODNET, prefsrc=route.src)
        if route.kind == "vxlan":
            return route_request(route.dst, gateway=route.gateway, oif=vx, onlink=True, prefsrc=route.src,
                                 protocol=RTPROT_PODNET)
        return route_request(route.dst, gateway=route.gateway, prefsrc=route.src, protocol=RTPROT_PODNET)

    @staticmethod
    def _vtep_requests(vx: int, neighbours: set[tuple[str, str]], fdb: set[tuple[str, str]],
                       vteps: frozenset[tuple[str, str]], changes: RoutingChanges) -> list[Request]:
        requests = []
        for ip, mac in sorted(neighbours - vteps):
            requests.append(neighbour_request(vx, ip, mac, delete=True))
            changes.removed.append(f"neigh {ip} {mac}")
        for ip, mac in sorted(fdb - vteps):
            requests.append(fdb_request(vx, mac, ip, delete=True))
            changes.removed.append(f"fdb {mac} {ip}")
        for ip, mac in sorted(vteps - neighbours):
            requests.append(neighbour_request(vx, ip, mac))
            changes.added.append(f"neigh {ip} {mac}")
        for ip, mac in sorted(vteps - fdb):
            requests.append(fdb_request(vx, mac, ip))
            changes.added.append(f"fdb {mac} {ip}")
        return requests


def _describe(route: Route) -> str:
    if route.kind == "blackhole":
        return f"blackhole {route.dst}"
    via = f"{route.dst} via {route.gateway}"
    via = f"{via} dev {VXLAN_IFNAME} onlink" if route.kind == "vxlan" else via
    return f"{via} src {route.src}" if route.src else via
