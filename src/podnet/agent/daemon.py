"""`podnet agent`: one per node, running in the node's network namespace.

    store --one watch--> local cache + event-fed indexes --dirty--> one worker per dataplane
    worker: sync (coalesced) = cache -> desired state (pure compilers) -> reconcile kernel
            every resync period: verify() against the kernel, then a full sync

Dataplanes (agent/contract.py): cross-node routes, NAT, Services (nftables maps or
iptables), NetworkPolicy (nftables sets) and node DNS. Services and EndpointSlices
are not kept in the cache: the Service compiler and the DNS index take them from the
watch events, each in its own compact form. A change marks only the dataplanes it
concerns, and each dataplane syncs on its own thread, so a slow one never delays
another. The CNI socket is served from the start; STATUS reports not-ready until the
first sync has programmed the node. The agent never flushes on start or stop: it
reconciles, so restarting it leaves established connections alone.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane, DataplaneMetrics
from podnet.agent.dataplanes import DnsDataplane, NatDataplane, PolicyDataplane, RoutesDataplane
from podnet.agent.follow import StoreFollower
from podnet.agent.worker import DataplaneWorker, SyncProgress
from podnet.cni import DEFAULT_SOCKET
from podnet.dataplane.localdns import DnsAddresses
from podnet.dataplane.pods import PodDataplane
from podnet.dataplane.routes import RouteProgrammer
from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.errors import PodnetError
from podnet.model.objects import Node
from podnet.services.conntrack import ConntrackSizing
from podnet.store import open_store
from podnet.store.base import KeyValueStore
from podnet.store.credentials import EtcdCredentials
from podnet.store.objects import ObjectStore

log = logging.getLogger("podnet.agent")

# Kinds the cache does not keep: event-fed dataplanes hold them, each in its own compact
# form (Services and slices: the Service compiler and DNS; Pods, Namespaces and
# NetworkPolicies: policy and DNS).
EVENT_FED = ("Service", "EndpointSlice", "Pod", "Namespace", "NetworkPolicy")


@dataclass
class AgentConfig:
    node: str
    store_url: str | None = None
    store_credentials: EtcdCredentials | None = None  # etcd TLS files and user (None: the environment's)
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
    min_sync_interval: float = 0.01  # at most one sync per dataplane per interval: a burst coalesces
    resync_interval: float = 60.0  # full reconcile even without changes: heals drift
    node_wait: float = 30.0


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.kv: KeyValueStore = self._open_kv()
        self.objects = ObjectStore(self.kv)
        self.cache = ObjectCache(unkept=EVENT_FED, records=True)
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.progress = SyncProgress()
        self.node_ip = cfg.node_ip
        self.dataplanes: list[Dataplane] = []
        self.workers: dict[str, DataplaneWorker] = {}
        self.follower: StoreFollower | None = None
        self.routes: RoutesDataplane | None = None
        self.services = None
        self.dns_index = None
        self.pods = PodDataplane(lambda: self.routes.mtu if self.routes is not None else 1500,
                                 node_ip=lambda: self.node_ip)
        self.server = None
        self.dns = None
        self.metrics = None
        self.metrics_server = None
        self._synced_written = -1
        self._synced_lock = threading.Lock()

    # -- lifecycle

    def run(self) -> None:
        self._enable_forwarding()
        self.node_ip = self.node_ip or self._wait_for_node_ip()
        self.build_dataplanes()
        self.follower = StoreFollower(self.cache, self.dataplanes, self._on_change)
        rev = self.follower.relist(self.kv)  # each object goes to its dataplanes as it is decoded
        self._start_dns()
        self._start_cni_server()
        self._start_metrics()
        for worker in self.workers.values():  # the first sync: full, one dataplane after another
            worker.run_once(full=True)
        self.synced.set()
        self._record_synced()
        # What the first sync built lives as long as the agent and holds no cycles: keep the
        # cyclic collector from walking it all again on every full collection (at 50k
        # Services, ~0.3 s each).
        gc.freeze()
        watcher = threading.Thread(target=self.follower.watch, args=(self._open_kv, rev + 1), name="watch",
                                   daemon=True)
        watcher.start()
        for worker in self.workers.values():
            worker.start()
        self.stopping.wait()
        self.shutdown()

    def build_dataplanes(self) -> None:
        """Every dataplane of this node, in the order of the first sync."""
        from podnet.agent.services import ServiceDataplane, size_conntrack

        self.routes = RoutesDataplane(self.cfg.node, self.cache, RouteProgrammer(self.cfg.node, self.node_ip))
        size_conntrack(self.cfg.conntrack)
        self.services = ServiceDataplane(self.cfg.node, self.node_ip, self.cfg.service_cidrs,
                                         tuple(self.dns_addresses()), proxy=self.cfg.service_proxy)
        self.dataplanes = [self.routes, NatDataplane(self.cache), self.services,
                           PolicyDataplane(self.cfg.node)]
        if self.dns_addresses():
            from podnet.dns.index import ClusterIndex

            self.dns_index = ClusterIndex(zone=self.cfg.cluster_domain, node_name=self.cfg.node)
            self.dataplanes.append(DnsDataplane(self.dns_index, self.dns_addresses()))
        self.metrics = DataplaneMetrics(dp.name for dp in self.dataplanes)
        self.workers = {dp.name: DataplaneWorker(dp, self.progress, self.metrics,
                                                 min_interval=self.cfg.min_sync_interval,
                                                 resync_interval=self.cfg.resync_interval,
                                                 on_synced=self._record_synced)
                        for dp in self.dataplanes}

    def _open_kv(self) -> KeyValueStore:
        return open_store(self.cfg.store_url, create=False, credentials=self.cfg.store_credentials)

    def _on_change(self, rev: int, dirty: list[Dataplane]) -> None:
        self.progress.saw(rev, [self.workers[dp.name] for dp in dirty if dp.name in self.workers])
        if self.synced.is_set():
            self._record_synced()  # a change no dataplane cares about advances the synced revision

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def _record_synced(self) -> None:
        """Say, next to the CNI socket, up to which store revision this node is programmed,
        so that tools (the lab, tests) can wait for a change to reach every node."""
        if not self.synced.is_set():
            return
        with self._synced_lock:
            rev = self.progress.synced_rev()
            if rev <= self._synced_written:
                return
            path = self.cfg.socket + ".synced"
            try:
                with open(path + ".tmp", "w") as f:
                    f.write(f"{rev}\n")
                os.replace(path + ".tmp", path)
                self._synced_written = rev
            except OSError as e:
                log.debug("cannot write %s: %s", path, e)

    def shutdown(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        for worker in self.workers.values():
            worker.stop()
        for closer in (self.server and self.server.stop, self.dns and self.dns.stop_thread,
                       self.metrics_server and self.metrics_server.shutdown):
            if closer:
                try:
                    closer()
                except Exception as e:  # shutting down: report, carry on
                    log.warning("shutdown: %s", e)
        for dp in self.dataplanes:
            dp.close()
        self.pods.close()
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

        handler = CNIHandler(self._open_kv(), self.cfg.node, self.pods, ready=self.ready)
        self.server = CNIServer(self.cfg.socket, handler)
        self.server.start()
        log.info("serving CNI on %s", self.cfg.socket)

    def dns_addresses(self) -> list[str]:
        if not self.cfg.dns_address:
            return []
        return [self.cfg.dns_address, *self.cfg.cluster_dns_ips]

    def _start_dns(self) -> None:
        addresses = self.dns_addresses()
        if not addresses or self.dns_index is None:
            return
        from podnet.dns import resolvconf
        from podnet.dns.server import DNSServer

        DnsAddresses(addresses).ensure()  # the server binds to them
        self.dns = DNSServer(self.dns_index, listen=[(a, 53) for a in addresses], upstreams=self.cfg.dns_upstreams,
                             host_search=resolvconf.host_search_domains())
        self.dns.start_thread()
        log.info("serving DNS for %s on %s port 53", self.cfg.cluster_domain, ", ".join(addresses))

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port is None or self.metrics is None:
            return
        from podnet.agent.metrics import serve_metrics

        renderers = [self.metrics.render] + ([self.services.metrics.render] if self.services is not None else [])
        self.metrics_server = serve_metrics(self.cfg.metrics_port, lambda: "".join(r() for r in renderers))

    def ready(self) -> tuple[int, str] | None:
        if not self.synced.is_set():
            return 50, f"podnet agent on {self.cfg.node} has not programmed the node yet"
        errors = {name: w.error for name, w in self.workers.items() if w.error}
        if errors:
            return 51, f"podnet agent on {self.cfg.node}: last sync failed: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(errors.items()))
        return None


def run_agent(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 0
