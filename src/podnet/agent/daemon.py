"""`podnet agent`: one per node, running in the node's network namespace.

    store --one watch--> local cache --dirty flags per dataplane--> sync (coalesced)
    sync = cache -> desired state (pure compilers) -> reconcile kernel (diff only)

Dataplanes: cross-node routing and NAT, Services (nftables maps), NetworkPolicy
(nftables sets), and a DNS server fed straight from the watch. Services and
EndpointSlices are not kept in the cache: the Service compiler and the DNS index
take them from the watch events, each in its own compact form. A change marks only
the dataplanes it can affect. The CNI socket is served from the start; STATUS
reports not-ready until the first sync has programmed the node. The agent never
flushes on start or stop: it reconciles, so restarting it leaves established
connections alone.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from podnet.agent.cache import ObjectCache, kind_of_key
from podnet.agent.view import routing_inputs
from podnet.dataplane.localdns import DnsAddresses
from podnet.dataplane.nat import NatProgrammer
from podnet.dataplane.pods import PodDataplane
from podnet.dataplane.routes import RouteProgrammer
from podnet.dataplane.routing import VXLAN_OVERHEAD, desired_routing
from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.errors import PodnetError
from podnet.ipam.keys import BLOCKS
from podnet.model.objects import IPPool, Namespace, NetworkPolicy, Node, Pod
from podnet.services.conntrack import ConntrackSizing
from podnet.store import open_store
from podnet.store.base import Compacted, KeyValueStore
from podnet.store.objects import ObjectEvent, ObjectStore

log = logging.getLogger("podnet.agent")

DEFAULT_SOCKET = "/run/podnet/cni.sock"

# Which dataplanes a change of each kind can affect.
AFFECTS: dict[str, tuple[str, ...]] = {
    "Node": ("routing", "services"),
    "IPPool": ("routing",),
    "Service": ("services",),
    "EndpointSlice": ("services",),
    "Pod": ("policy",),
    "Namespace": ("policy",),
    "NetworkPolicy": ("policy",),
}
DATAPLANES = ("routing", "services", "policy")
# Kinds the cache does not keep: event-fed indexes hold them (Service compiler, DNS index).
EVENT_FED = ("Service", "EndpointSlice")


@dataclass
class AgentConfig:
    node: str
    store_url: str | None = None
    socket: str = DEFAULT_SOCKET
    node_ip: str | None = None
    service_cidrs: tuple[str, ...] = ("10.96.0.0/12",)
    service_proxy: str = "nftables"  # or "iptables" (kube-proxy's layout)
    conntrack: ConntrackSizing = field(default_factory=lambda: ConntrackSizing(max_per_core=0))  # 0: leave alone
    dns_address: str | None = NODE_DNS_ADDRESS  # None: no node DNS server
    cluster_dns_ips: tuple[str, ...] = ()  # also answered here, e.g. the kube-dns ClusterIP
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    cluster_domain: str = "cluster.local"
    metrics_port: int | None = None
    min_sync_interval: float = 0.05  # coalesce bursts of changes, like kube-proxy's minSyncPeriod
    resync_interval: float = 60.0  # full reconcile even without changes: heals drift
    node_wait: float = 30.0


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.kv: KeyValueStore = open_store(cfg.store_url)
        self.objects = ObjectStore(self.kv)
        self.cache = ObjectCache(unkept=EVENT_FED)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._dirty: set[str] = set(DATAPLANES)
        self._dirty_lock = threading.Lock()
        self.synced = threading.Event()
        self.seen_rev = 0
        self.errors: dict[str, str] = {}
        self.mtu = 1500
        self.node_ip = cfg.node_ip
        self.routes: RouteProgrammer | None = None
        self.nat = NatProgrammer()
        self.dataplane = PodDataplane(lambda: self.mtu)
        self.server = None
        self.services = None
        self.policy = None
        self.dns = None
        self.dns_index = None
        self.metrics_server = None

    # -- lifecycle

    def run(self) -> None:
        self._enable_forwarding()
        self.node_ip = self.node_ip or self._wait_for_node_ip()
        self.routes = RouteProgrammer(self.cfg.node, self.node_ip)
        records, rev = self.kv.list("/podnet/")
        self._start_services()
        self._make_dns_index()
        self.cache.load(records, self._feed)  # each object goes to its indexes as it is decoded
        del records
        self._start_policy()
        self._start_dns()
        self._start_cni_server()
        self._start_metrics()
        self.seen_rev = rev  # the newest store revision applied to the cache
        self.sync(set(DATAPLANES), full=True)
        self._record_synced(rev)
        # What the first sync built lives as long as the agent and holds no cycles: keep the
        # cyclic collector from walking it all again on every full collection (at 50k
        # Services, ~0.3 s each).
        gc.freeze()
        watcher = threading.Thread(target=self._watch, args=(rev + 1,), name="watch", daemon=True)
        watcher.start()
        last_full = time.monotonic()
        while not self.stopping.is_set():
            woke = self.wake.wait(timeout=max(0.0, self.cfg.resync_interval - (time.monotonic() - last_full)))
            if self.stopping.is_set():
                break
            if woke:
                time.sleep(self.cfg.min_sync_interval)  # let a burst of changes land first
            self.wake.clear()
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
                seen = self.seen_rev
            full = time.monotonic() - last_full >= self.cfg.resync_interval
            if full:
                dirty, last_full = set(DATAPLANES), time.monotonic()
            self.sync(dirty, full=full)
            if not self.errors:
                self._record_synced(seen)
        self.shutdown()

    def stop(self, *_: object) -> None:
        self.stopping.set()
        self.wake.set()

    def _record_synced(self, rev: int) -> None:
        """Say, next to the CNI socket, up to which store revision this node is programmed,
        so that tools (the lab, tests) can wait for a change to reach every node."""
        path = self.cfg.socket + ".synced"
        try:
            with open(path + ".tmp", "w") as f:
                f.write(f"{rev}\n")
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.debug("cannot write %s: %s", path, e)

    def mark(self, *dataplanes: str) -> None:
        with self._dirty_lock:
            self._dirty.update(dataplanes)
        self.wake.set()

    def shutdown(self) -> None:
        for closer in (self.server and self.server.stop, self.dns and self.dns.stop_thread,
                       self.metrics_server and self.metrics_server.shutdown):
            if closer:
                try:
                    closer()
                except Exception as e:  # shutting down: report, carry on
                    log.warning("shutdown: %s", e)
        if self.services is not None:
            self.services.close()
        self.dataplane.close()
        if self.routes is not None:
            self.routes.close()
        self.kv.close()

    def _enable_forwarding(self) -> None:
        for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/all/forwarding"):
            with open(path, "w") as f:
                f.write("1")

    def _wait_for_node_ip(self) -> str:
        deadline = time.monotonic() + self.cfg.node_wait
        while True:
            node = self.objects.get(Node, self.cfg.node)
            if node is not None and node.internal_ip:
                return node.internal_ip
            if time.monotonic() > deadline:
                raise PodnetError(
                    f"Node {self.cfg.node!r} has no InternalIP address in the store "
                    f"({self.kv.url}): apply a Node object or pass --node-ip"
                )
            time.sleep(0.2)

    def _start_cni_server(self) -> None:
        from podnet.cni.handler import CNIHandler
        from podnet.cni.server import CNIServer

        handler = CNIHandler(open_store(self.cfg.store_url), self.cfg.node, self.dataplane, ready=self.ready)
        self.server = CNIServer(self.cfg.socket, handler)
        self.server.start()
        log.info("serving CNI on %s", self.cfg.socket)

    def _start_services(self) -> None:
        from podnet.agent.services import ServiceDataplane, size_conntrack

        local_dns = self.dns_addresses()
        size_conntrack(self.cfg.conntrack)
        self.services = ServiceDataplane(self.cfg.node, self.node_ip, self.cfg.service_cidrs, tuple(local_dns),
                                         proxy=self.cfg.service_proxy)

    def _start_policy(self) -> None:
        from podnet.policy.applier import PolicyProgrammer

        self.policy = PolicyProgrammer()

    def dns_addresses(self) -> list[str]:
        if not self.cfg.dns_address:
            return []
        return [self.cfg.dns_address, *self.cfg.cluster_dns_ips]

    def _make_dns_index(self) -> None:
        if not self.dns_addresses():
            return
        from podnet.dns.index import ClusterIndex

        self.dns_index = ClusterIndex(zone=self.cfg.cluster_domain, node_name=self.cfg.node)

    def _start_dns(self) -> None:
        addresses = self.dns_addresses()
        if not addresses or self.dns_index is None:
            return
        from podnet.dns import resolvconf
        from podnet.dns.server import DNSServer

        DnsAddresses(addresses).ensure()
        self.dns = DNSServer(self.dns_index, listen=[(a, 53) for a in addresses], upstreams=self.cfg.dns_upstreams,
                             host_search=resolvconf.host_search_domains())
        self.dns.start_thread()
        log.info("serving DNS for %s on %s port 53", self.cfg.cluster_domain, ", ".join(addresses))

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port is None or self.services is None:
            return
        from podnet.agent.metrics import serve_metrics

        self.metrics_server = serve_metrics(self.cfg.metrics_port, self.services.metrics.render)

    def ready(self) -> tuple[int, str] | None:
        if not self.synced.is_set():
            return 50, f"podnet agent on {self.cfg.node} has not programmed the node yet"
        if self.errors:
            return 51, f"podnet agent on {self.cfg.node}: last sync failed: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(self.errors.items()))
        return None

    # -- watch and sync

    def _watch(self, start_rev: int) -> None:
        kv = open_store(self.cfg.store_url)  # a watch blocks: its own connection
        rev = start_rev
        while not self.stopping.is_set():
            try:
                for ev in kv.watch("/podnet/", rev):
                    rev = ev.revision + 1
                    typed = self.cache.apply(ev)
                    if typed is not None:
                        self._feed(typed)  # before marking: the sync that follows must see it
                    with self._dirty_lock:
                        self.seen_rev = ev.revision
                    self.wake.set()  # even a change no dataplane cares about advances the synced revision
                    if ev.key.startswith(BLOCKS):
                        self.mark("routing")
                    elif typed is not None:
                        self.mark(*AFFECTS.get(kind_of_key(ev.key) or "", ()))
                    if self.stopping.is_set():
                        break
            except Compacted:
                log.warning("watch history compacted; reloading the cache")
                records, head = kv.list("/podnet/")
                if self.services is not None:
                    self.services.start_reload()  # what the list does not name is deleted after it
                self.cache = self._reloaded(records)
                del records
                if self.services is not None:
                    self.services.finish_reload()
                rev = head + 1
                with self._dirty_lock:
                    self.seen_rev = head
                self.mark(*DATAPLANES)
            except Exception as e:  # the store went away: retry, then catch up by resync
                log.warning("watch failed (%s); retrying", e)
                time.sleep(1)
                self.mark(*DATAPLANES)

    def _reloaded(self, records: list) -> ObjectCache:
        cache = ObjectCache(unkept=EVENT_FED)
        cache.load(records, self._feed)
        return cache

    def _feed(self, ev: ObjectEvent) -> None:
        """One object event to the indexes fed by events (the Service compiler, DNS); one
        failing does not keep the event from the other."""
        for index in (self.services and self.services.on_event, self.dns_index and self.dns_index.apply_event):
            if not index:
                continue
            try:
                index(ev)
            except Exception as e:  # a bug or an odd object: report it, keep the watch going
                log.error("%s: %s failed: %s", ev.key, getattr(index, "__qualname__", index), e)

    def sync(self, dirty: set[str], full: bool = False) -> None:
        for name in DATAPLANES:
            if name not in dirty:
                continue
            started = time.monotonic()
            try:
                summary = getattr(self, f"_sync_{name}")(full)
            except Exception as e:
                self.errors[name] = str(e)
                log.error("%s sync failed: %s (will retry)", name, e)
                threading.Timer(1.0, self.mark, args=(name,)).start()
                continue
            self.errors.pop(name, None)
            if summary:
                log.info("%s: %s in %.1f ms", name, summary, (time.monotonic() - started) * 1000)
        self.synced.set()

    def _sync_routing(self, full: bool) -> str:
        assert self.routes is not None
        view = routing_inputs(self.cache.blocks(), self.cache.list(IPPool), self.cache.list(Node))
        _, underlay_mtu = self.routes.underlay()
        self.mtu = underlay_mtu - VXLAN_OVERHEAD if view.vxlan_in_use else underlay_mtu
        desired = desired_routing(self.cfg.node, view.blocks, view.borrowed, view.node_ips, view.vxlan_in_use)
        changes = self.routes.apply(desired)
        nat_changed = self.nat.apply(view.nat)
        if changes.errors:
            raise PodnetError("; ".join(changes.errors))
        for line in changes.added:
            log.debug("added %s", line)
        for line in changes.removed:
            log.debug("removed %s", line)
        if changes.count or nat_changed:
            return f"+{len(changes.added)} -{len(changes.removed)} routing entries" + (
                ", NAT updated" if nat_changed else "")
        return ""

    def _sync_services(self, full: bool) -> str:
        assert self.services is not None
        return self.services.sync(full)

    def _sync_policy(self, full: bool) -> str:
        assert self.policy is not None
        pods = self.cache.list(Pod)
        local = [p.status.pod_ip for p in pods
                 if p.spec.node_name == self.cfg.node and p.status.pod_ip and not p.spec.host_network]
        ch = self.policy.sync(pods, self.cache.list(Namespace), self.cache.list(NetworkPolicy), local)
        if ch.errors:
            raise PodnetError("; ".join(ch.errors))
        if ch.empty:
            return ""
        return (f"table {'rebuilt' if ch.full else 'updated'}: +{ch.elements_added} -{ch.elements_removed} "
                f"elements, {ch.chains_added + ch.chains_rewritten + ch.chains_removed} chains changed")


def run_agent(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 0
