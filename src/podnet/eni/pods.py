"""Pod interfaces on an ENI node.

Shared mode (EniPods): the pod's veth and host route as on any node (dataplane/pods.py),
then `from <pod> lookup <its ENI's table>` (and the ENI's table itself the first time):
replies leave through the ENI that owns the address, with no SNAT.

Exclusive mode (ExclusivePods): the pod gets a whole ENI: its link (found by the ENI's
MAC) moves into the pod's namespace as the pod's interface, with the ENI's primary
address and a default route via the subnet's gateway. DEL moves it back to the node,
named eni<device index>, for the next pod (or for the pool to give back).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.pods import ALIAS_PREFIX, PodInterfaces
from podnet.eni.pool import EniPool
from podnet.eni.routing import EniLink, gateway_of, table_of

log = logging.getLogger("podnet.eni")


def desired_routing(pool: EniPool) -> tuple[list[EniLink], dict[str, int]]:
    """The ENIs (device >= 1) to set up, and pod address -> table for the pods on them."""
    cidrs = pool.cfg.subnet_cidrs
    with pool._cond:
        st = pool.state
        enis = [EniLink(e.id, e.mac, e.device_index, e.primary_ip, cidrs[e.subnet_id])
                for e in st.enis.values() if e.device_index >= 1 and e.subnet_id in cidrs]
        rules = {}
        for address in st.assigned:
            eni = st.enis.get(st.eni_of.get(address, ""))
            if eni is not None and eni.device_index >= 1:
                rules[address] = table_of(eni.device_index)
    return enis, rules


def pod_handles(pool: EniPool) -> dict[str, str]:
    """Pod address -> its CNI handle, for every address a pod holds."""
    with pool._cond:
        return dict(pool.state.assigned)


class EniPods:
    """Shared mode: the node's pod dataplane, plus each pod's rule."""

    def __init__(self, agent: Any, pods: Any):
        self.agent = agent
        self.pods = pods

    def __getattr__(self, name: str) -> Any:  # setup_problem, close, ...: the pod dataplane's
        return getattr(self.pods, name)

    def _routing(self) -> Any:
        if self.agent.routing is None:
            from podnet.eni.routing import EniRouting

            self.agent.routing = EniRouting()
        return self.agent.routing

    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces:
        ifs = self.pods.add(container_id, ifname, netns, address)
        pool: EniPool | None = self.agent.pool
        if pool is not None:
            enis, rules = desired_routing(pool)
            table = rules.get(address)
            if table is not None:
                routing = self._routing()
                for eni in enis:
                    if table_of(eni.device_index) == table:
                        problem = routing.ensure_eni(eni)
                        if problem:
                            raise RuntimeError(problem)
                routing.set_pod(address, table)
        return ifs

    def delete(self, container_id: str, ifname: str, netns: str | None) -> None:
        self.pods.delete(container_id, ifname, netns)
        self.agent.dataplane.mark()  # the rule goes at the next sync, once the address is released

    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]:
        problems = self.pods.check(container_id, ifname, netns, address)
        pool = self.agent.pool
        if pool is not None:
            _, rules = desired_routing(pool)
            if address in rules and self._routing().pod_rules().get(address) != rules[address]:
                problems.append(f"rule from {address} lookup {rules[address]} is missing")
        return problems

    def attachments(self) -> list[tuple[str, str]]:
        return self.pods.attachments()


class ExclusivePods:
    """Exclusive mode: the pod's interface is its ENI's link."""

    def __init__(self, agent: Any, pods: Any):
        self.agent = agent
        self.pods = pods

    def setup_problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def _slot(self, address: str) -> Any:
        pool: EniPool | None = self.agent.pool
        if pool is None:
            raise RuntimeError(f"the ENI pool of node {self.agent.node.name} is not running")
        with pool._cond:
            eni = pool.state.enis.get(pool.state.eni_of.get(address, ""))
            return eni, pool.cfg.subnet_cidrs.get(eni.subnet_id) if eni else None

    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces:
        eni, cidr = self._slot(address)
        if eni is None or cidr is None:
            raise RuntimeError(f"{address} is no ENI's address on node {self.agent.node.name}")
        prefix = ipaddress.ip_network(cidr).prefixlen
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as ipr:
                idx = _by_mac(ipr, eni.mac)
                if idx is not None:
                    ipr.link("set", index=idx, state="down")
                    ipr.link("set", index=idx, ifalias=f"{ALIAS_PREFIX}{container_id}/{ifname}")
                    ipr.link("set", index=idx, net_ns_fd=fd, ifname=ifname)
        finally:
            os.close(fd)
        with NetNS(netns, flags=0) as pod:
            found = pod.link_lookup(ifname=ifname)
            if not found:
                raise RuntimeError(f"the link of ENI {eni.id} (MAC {eni.mac}) is on neither the node nor the pod")
            pidx = found[0]
            lo = pod.link_lookup(ifname="lo")
            if lo:
                pod.link("set", index=lo[0], state="up")
            pod.link("set", index=pidx, state="up")
            pod.addr("replace", index=pidx, address=address, prefixlen=prefix)
            pod.route("replace", dst="0.0.0.0/0", gateway=gateway_of(cidr), oif=pidx, flags=4)
            mtu = pod.get_links(pidx)[0].get_attr("IFLA_MTU")
        return PodInterfaces(f"eni{eni.device_index}", eni.mac, ifname, eni.mac, netns, mtu, address,
                             gateway=gateway_of(cidr))

    def delete(self, container_id: str, ifname: str, netns: str | None) -> None:
        if not netns or not os.path.exists(netns):
            return  # the namespace went: a lab's veth went with it, a real ENI is back on the node
        alias = f"{ALIAS_PREFIX}{container_id}/{ifname}"
        try:
            with NetNS(netns, flags=0) as pod:
                for link in pod.get_links():
                    if link.get_attr("IFLA_IFALIAS") == alias:
                        mac = link.get_attr("IFLA_ADDRESS")
                        name = self._home_name(mac)
                        pod.link("set", index=link["index"], state="down")
                        with open(f"/proc/{os.getpid()}/ns/net", "rb") as node_ns:
                            pod.link("set", index=link["index"], net_ns_fd=node_ns.fileno(), ifname=name)
        except (OSError, NetlinkError) as e:
            log.warning("moving the ENI of %s back from %s: %s", container_id, netns, e)
            return
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if link.get_attr("IFLA_IFALIAS") == alias:
                    ipr.link("set", index=link["index"], ifalias="")

    def _home_name(self, mac: str) -> str:
        pool = self.agent.pool
        if pool is not None:
            with pool._cond:
                for e in pool.state.enis.values():
                    if e.mac.lower() == (mac or "").lower():
                        return f"eni{e.device_index}"
        return "eni-" + (mac or "").replace(":", "")[-8:]

    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]:
        if not os.path.exists(netns):
            return [f"network namespace {netns} does not exist"]
        with NetNS(netns, flags=0) as pod:
            found = pod.link_lookup(ifname=ifname)
            if not found:
                return [f"pod interface {ifname} (its ENI) is missing"]
            addrs = {a.get_attr("IFA_ADDRESS") for a in pod.get_addr(index=found[0], family=2)}
            return [] if address in addrs else [f"pod interface lacks {address}"]

    def attachments(self) -> list[tuple[str, str]]:
        return []


def _by_mac(ipr: IPRoute, mac: str) -> int | None:
    for link in ipr.get_links():
        if (link.get_attr("IFLA_ADDRESS") or "").lower() == mac.lower():
            return link["index"]
    return None
