"""The agent's dataplanes that read the local cache: routes, NAT, NetworkPolicy, and
node DNS (fed by events). Services live in agent/services.py. Each implements the
contract of agent/contract.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyroute2 import IPRoute

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane, kind_of
from podnet.agent.view import routing_inputs
from podnet.dataplane.localdns import DNS_TABLE, DnsAddresses
from podnet.dataplane.nat import NatProgrammer, read_nat
from podnet.dataplane.nfnetlink import Netlink
from podnet.dataplane.routes import RouteProgrammer
from podnet.dataplane.routing import VXLAN_OVERHEAD, desired_routing
from podnet.errors import PodnetError
from podnet.model.objects import IPPool, Namespace, NetworkPolicy, Node, Pod
from podnet.store.objects import ObjectEvent

log = logging.getLogger("podnet.agent")


class RoutesDataplane(Dataplane):
    """Cross-node routes, the VXLAN device and its neighbour/FDB entries. Every sync
    reconciles against a dump of podnet's routes, so it repairs drift as it goes;
    verify() names what differs for the logs and the drift metric."""

    name = "routes"
    kinds = frozenset({"Node", "IPPool", "Block"})

    def __init__(self, node: str, cache: ObjectCache, programmer: RouteProgrammer):
        self.node = node
        self.cache = cache
        self.programmer = programmer
        self.mtu = 1500
        self._desired = None

    def sync(self, full: bool) -> str:
        view = routing_inputs(self.cache.blocks(), self.cache.list(IPPool), self.cache.list(Node))
        _, underlay_mtu = self.programmer.underlay()
        self.mtu = underlay_mtu - VXLAN_OVERHEAD if view.vxlan_in_use else underlay_mtu
        desired = desired_routing(self.node, view.blocks, view.borrowed, view.node_ips, view.vxlan_in_use,
                                  local_ip=self.programmer.node_ip)
        changes = self.programmer.apply(desired)
        self._desired = desired
        if changes.errors:
            raise PodnetError("; ".join(changes.errors))
        for line in changes.added:
            log.debug("added %s", line)
        for line in changes.removed:
            log.debug("removed %s", line)
        return f"+{len(changes.added)} -{len(changes.removed)} routing entries" if changes.count else ""

    def verify(self) -> list[str]:
        desired = self._desired
        if desired is None:
            return []
        vx = self.programmer.vxlan_index()
        if desired.vxlan and vx is None:
            return ["the VXLAN device is missing"]
        current = set(self.programmer.current_routes(vx))
        return ([f"route {r.dst} missing" for r in sorted(desired.routes - current)]
                + [f"route {r.dst} not podnet's" for r in sorted(current - desired.routes)])


class NatDataplane(Dataplane):
    """natOutgoing: a small table rewritten whole when the pools change or it drifted."""

    name = "nat"
    kinds = frozenset({"IPPool"})

    def __init__(self, cache: ObjectCache, programmer: NatProgrammer | None = None):
        self.cache = cache
        self.programmer = programmer or NatProgrammer()

    def sync(self, full: bool) -> str:
        view = routing_inputs([], self.cache.list(IPPool), [])
        return "table updated" if self.programmer.apply(view.nat) else ""

    def verify(self) -> list[str]:
        applied = self.programmer.applied
        if applied is None or read_nat() == applied:
            return []
        self.programmer.applied = None  # the next apply reads the kernel again and rewrites
        return ["table podnet-nat differs from the pools"]


class PolicyDataplane(Dataplane):
    """NetworkPolicy sets and chains. A drifted table is rewritten whole in one
    transaction (delete + full table), so isolated pods stay isolated."""

    name = "policy"
    kinds = frozenset({"Pod", "Namespace", "NetworkPolicy"})

    def __init__(self, node: str, cache: ObjectCache, programmer=None):
        from podnet.policy.applier import PolicyProgrammer

        self.node = node
        self.cache = cache
        self.programmer = programmer or PolicyProgrammer()

    def sync(self, full: bool) -> str:
        pods = self.cache.list(Pod)
        local = [p.status.pod_ip for p in pods
                 if p.spec.node_name == self.node and p.status.pod_ip and not p.spec.host_network]
        ch = self.programmer.sync(pods, self.cache.list(Namespace), self.cache.list(NetworkPolicy), local)
        if ch.errors and not ch.full:
            raise PodnetError("; ".join(ch.errors))
        if ch.empty:
            return ""
        return (f"table {'rebuilt' if ch.full else 'updated'}: +{ch.elements_added} -{ch.elements_removed} "
                f"elements, {ch.chains_added + ch.chains_rewritten + ch.chains_removed} chains changed")

    def verify(self) -> list[str]:
        diffs = self.programmer.verify()
        return [] if diffs == ["nothing applied yet"] else diffs


class DnsDataplane(Dataplane):
    """Node DNS: the cluster index is fed straight from events (answers change at once,
    no sync needed); the kernel part is the DNS addresses on `lo` and the NOTRACK table,
    which verify() checks and sync() restores."""

    name = "dns"
    kinds = frozenset({"Service", "EndpointSlice", "Pod", "Namespace"})

    def __init__(self, index, addresses: list[str] | None = None,
                 ensure: Callable[[], None] | None = None):
        self.index = index
        self.addresses = addresses or []
        self._ensure = ensure or (DnsAddresses(self.addresses).ensure if self.addresses else None)
        self._reload_seen: set[tuple[str, str | None, str]] | None = None
        self._ensured = False

    def on_event(self, ev: ObjectEvent) -> bool:
        kind = kind_of(ev.key)
        if kind not in self.kinds:
            return False
        if self._reload_seen is not None and ev.object is not None:
            ns = None if kind == "Namespace" else (ev.object.namespace or "default")
            self._reload_seen.add((kind, ns, ev.object.name))
        self.index.apply_event(ev)
        return False  # answered from the index: nothing to program

    def begin_reload(self) -> None:
        self._reload_seen = set()

    def end_reload(self) -> None:
        seen, self._reload_seen = self._reload_seen, None
        if seen is None:
            return
        for kind, ns, name in self.index.keys():
            if (kind, ns, name) not in seen:
                self.index.remove_key(kind, ns, name)

    def sync(self, full: bool) -> str:
        if self._ensure is None or (self._ensured and not full):
            return ""
        if self._ensured and not self._drift():
            return ""
        repair = self._ensured
        self._ensure()
        self._ensured = True
        return "addresses and NOTRACK rules restored" if repair else ""

    def verify(self) -> list[str]:
        return self._drift() if self._ensured else []

    def _drift(self) -> list[str]:
        if not self.addresses:
            return []
        out = []
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
        out += [f"address {a} missing from lo" for a in self.addresses if a not in have]
        nl = Netlink()
        try:
            counts = nl.rule_counts(DNS_TABLE)
        except OSError:
            counts = {}
        finally:
            nl.close()
        if counts.get("prerouting") != 1 or counts.get("output") != 2:
            out.append(f"table {DNS_TABLE} is not as podnet wrote it")
        return out
