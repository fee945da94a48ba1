"""Pod interfaces in Calico's routed model.

Each pod gets a veth pair: the pod end (eth0) holds the pod's /32 and a default
route via the link-local gateway 169.254.1.1; the host end has no address,
answers ARP for everything by proxy ARP, and the node routes the pod's /32 to
it. No bridge: the node routes every packet, so policy and Services see it.

Host interface names are derived from (containerID, ifname) and the pair is kept
in the link's alias, so the agent can list what it owns after a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.netns import NotANetns, netlink_in
from podnet.dataplane.routing import RTPROT_PODNET_POD
from podnet.dataplane.rtnl import RT_SCOPE_LINK, rtnl_in
from podnet.errors import PodnetError

log = logging.getLogger(__name__)

GATEWAY = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host-side veth: the pod only ever talks to its gateway
HOST_PREFIX = "pn"
HOST_SOCKETS = 4  # concurrent CNI requests overlap their kernel waits (a veth delete waits ~20 ms)
NUD_PERMANENT = 0x80
LOOPBACK_IFINDEX = 1  # the kernel gives every namespace's loopback this index
MIN_MTU = 68  # IPv4's minimum
MAX_VETH_MTU = 65535  # ETH_MAX_MTU: a veth refuses more (lo has 65536)
ALIAS_PREFIX = "podnet:"


def host_ifname(container_id: str, ifname: str) -> str:
    return HOST_PREFIX + hashlib.sha1(f"{container_id}.{ifname}".encode()).hexdigest()[:11]


@dataclass(frozen=True)
class PodInterfaces:
    host_ifname: str
    host_mac: str
    pod_ifname: str
    pod_mac: str
    sandbox: str
    mtu: int
    address: str
    gateway: str = GATEWAY


def _sysctl(path: str, value: str) -> None:
    # /proc/sys/net is per network namespace: this writes the agent's own (the node's).
    with open(path, "w") as f:
        f.write(value)


class PodSetupError(PodnetError):
    """The node cannot set up any pod (the message says why and what to change)."""


class PodDataplane:
    """Creates, checks and removes pod interfaces in the current (node) namespace.

    mtu: the pods' MTU (or how to get it: the underlay's, less VXLAN's overhead if used);
    node_ip: the node's underlay address, to name the interface an MTU came from.
    """

    def __init__(self, mtu: int | Callable[[], int] = 1500, *, node_ip: Callable[[], str | None] | None = None):
        self._mtu = mtu
        self._node_ip = node_ip
        # Node-side netlink sockets, opened once (~5 ms each) and lent to one request at a
        # time: the CNI server calls in from many threads, and a socket is not for sharing.
        self._idle: queue.LifoQueue[IPRoute | None] = queue.LifoQueue()
        for _ in range(HOST_SOCKETS):
            self._idle.put(None)  # a slot; the socket is opened on first use

    @contextmanager
    def _host_netlink(self) -> Iterator[IPRoute]:
        ipr = self._idle.get()
        try:
            if ipr is None:
                ipr = IPRoute()
            yield ipr
        except BaseException:
            ipr.close() if ipr is not None else None  # a failed request may leave the socket mid-reply
            ipr = None
            raise
        finally:
            self._idle.put(ipr)

    def close(self) -> None:
        for _ in range(HOST_SOCKETS):
            ipr = self._idle.get()
            if ipr is not None:
                ipr.close()

    @property
    def mtu(self) -> int:
        return self._mtu() if callable(self._mtu) else self._mtu

    def setup_problem(self) -> str | None:
        """Why no pod can be set up on this node, or None (checked by ADD and STATUS)."""
        mtu = self.mtu
        if MIN_MTU <= mtu <= MAX_VETH_MTU:
            return None
        node_ip = self._node_ip() if self._node_ip is not None else None
        ifname = self._interface_holding(node_ip) if node_ip else None
        source = (f"the MTU of {ifname}, the interface holding the node address {node_ip}" if ifname
                  else "the MTU of the node's underlay interface")
        fix = (": put the node's address on its network interface, not on the loopback device" if ifname == "lo"
               else ": set that interface's MTU within the range")
        return f"pod MTU {mtu} is outside what a veth takes ({MIN_MTU}-{MAX_VETH_MTU}); it comes from {source}{fix}"

    def _interface_holding(self, address: str) -> str | None:
        with self._host_netlink() as ipr:
            for a in ipr.get_addr(family=2):
                if a.get_attr("IFA_ADDRESS") == address:
                    links = ipr.get_links(a["index"])
                    return links[0].get_attr("IFLA_IFNAME") if links else None
        return None

    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces:
        problem = self.setup_problem()
        if problem:
            raise PodSetupError(problem)
        if not os.path.exists(netns):
            raise NotANetns(f"network namespace {netns} does not exist")
        host = host_ifname(container_id, ifname)
        mtu = self.mtu
        # The common path with raw rtnetlink (rtnl.py): about a dozen requests per pod,
        # each ~30 us of Python instead of pyroute2's ~0.7 ms.
        with rtnl_in() as node, rtnl_in(netns) as pod:
            existing = node.link_index(host)
            if existing is not None:
                with self._host_netlink() as ipr, netlink_in(netns) as pod_ipr:
                    if not self._check(ipr, pod_ipr, host, ifname, address, mtu):
                        return self._describe(pod_ipr, host, ifname, netns, mtu, address)  # ADD again: a no-op
                    ipr.link("del", index=existing)
                    for stale in pod_ipr.link_lookup(ifname=ifname):
                        pod_ipr.link("del", index=stale)
            else:
                stale = pod.link_index(ifname)
                if stale is not None:
                    with netlink_in(netns) as pod_ipr:
                        pod_ipr.link("del", index=stale)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                node.add_veth(host, HOST_MAC, mtu, ifname, fd)
            finally:
                os.close(fd)
            hidx = node.link_index(host)
            if hidx is None:
                raise NetlinkError(19, f"{host} vanished right after it was created")
            _sysctl(f"/proc/sys/net/ipv4/conf/{host}/proxy_arp", "1")
            _sysctl(f"/proc/sys/net/ipv4/neigh/{host}/proxy_delay", "0")
            _sysctl(f"/proc/sys/net/ipv4/conf/{host}/forwarding", "1")
            # (the kernel ignores an alias given at creation, so it goes with "up")
            node.set_link(hidx, up=True, alias=f"{ALIAS_PREFIX}{container_id}/{ifname}")

            pod.set_link(LOOPBACK_IFINDEX, up=True)
            found = pod.link(ifname)  # its index and MAC in one request
            if found is None:
                raise NetlinkError(19, f"{ifname} did not arrive in {netns}")
            pidx, pod_mac = found
            pod.set_link(pidx, up=True, mtu=mtu)
            pod.replace_address(pidx, address, 32)
            pod.replace_route(GATEWAY, 32, pidx, scope=RT_SCOPE_LINK)
            # The gateway's MAC is fixed, so the pod never needs to ARP for it (proxy ARP
            # stays on for anything else, but would only answer if the node routes 169.254.1.1).
            pod.replace_neighbour(pidx, GATEWAY, HOST_MAC, NUD_PERMANENT)
            pod.replace_route("0.0.0.0", 0, pidx, gateway=GATEWAY)
            node.replace_route(address, 32, hidx, scope=RT_SCOPE_LINK, protocol=RTPROT_PODNET_POD)
            return PodInterfaces(host, HOST_MAC, ifname, pod_mac, netns, mtu, address)

    def _describe(self, pod: IPRoute, host: str, ifname: str, netns: str, mtu: int, address: str) -> PodInterfaces:
        (plink,) = pod.link("get", ifname=ifname)
        return PodInterfaces(host, HOST_MAC, ifname, plink.get_attr("IFLA_ADDRESS"), netns, mtu, address)

    def delete(self, container_id: str, ifname: str, netns: str | None) -> None:
        host = host_ifname(container_id, ifname)
        with rtnl_in() as node:
            found = node.link_index(host)
            if found is not None:
                try:
                    node.delete_link(found)  # takes the peer and the /32 route with it
                except NetlinkError as e:
                    if e.code != 19:  # ENODEV: gone meanwhile
                        raise
        if found is None and netns and os.path.exists(netns):  # a pod end whose host end is gone
            try:
                with rtnl_in(netns) as pod:
                    idx = pod.link_index(ifname)
                    if idx is not None:
                        pod.delete_link(idx)
            except (OSError, NetlinkError, NotANetns) as e:
                log.debug("pod side of %s in %s: %s", host, netns, e)

    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]:
        if not os.path.exists(netns):
            return [f"network namespace {netns} does not exist"]
        host = host_ifname(container_id, ifname)
        with self._host_netlink() as ipr, netlink_in(netns) as pod:
            return self._check(ipr, pod, host, ifname, address, self.mtu)

    def _check(self, ipr: IPRoute, pod: IPRoute, host: str, ifname: str, address: str, mtu: int) -> list[str]:
        problems = []
        hidx = ipr.link_lookup(ifname=host)
        if not hidx:
            return [f"host interface {host} is missing"]
        hlink = ipr.get_links(hidx[0])[0]
        if not hlink["flags"] & 1:
            problems.append(f"host interface {host} is down")
        routes = ipr.get_routes(family=2, dst=f"{address}/32", table=254)
        if not any(r.get_attr("RTA_OIF") == hidx[0] and r["dst_len"] == 32 for r in routes):
            problems.append(f"host route {address}/32 dev {host} is missing")
        pidx = pod.link_lookup(ifname=ifname)
        if not pidx:
            return [*problems, f"pod interface {ifname} is missing"]
        plink = pod.get_links(pidx[0])[0]
        if hlink.get_attr("IFLA_LINK") != pidx[0] or plink.get_attr("IFLA_LINK") != hidx[0]:
            problems.append(f"pod interface {ifname} is not the peer of {host}")
        if plink.get_attr("IFLA_MTU") != mtu:
            problems.append(f"pod interface MTU is {plink.get_attr('IFLA_MTU')}, expected {mtu}")
        addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in pod.get_addr(index=pidx[0], family=2)}
        if (address, 32) not in addrs:
            problems.append(f"pod interface lacks {address}/32")
        defaults = [r for r in pod.get_routes(family=2, table=254) if r["dst_len"] == 0]
        if not any(r.get_attr("RTA_GATEWAY") == GATEWAY for r in defaults):
            problems.append(f"pod has no default route via {GATEWAY}")
        return problems

    def attachments(self) -> list[tuple[str, str]]:
        out = []
        with self._host_netlink() as ipr:
            for link in ipr.get_links():
                alias = link.get_attr("IFLA_IFALIAS") or ""
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(HOST_PREFIX) and alias.startswith(ALIAS_PREFIX):
                    cid, _, ifname = alias[len(ALIAS_PREFIX):].rpartition("/")
                    out.append((cid, ifname))
        return out
