"""`podnet agent`: one per node, running in the node's network namespace.

    store --one watch--> local cache + event-fed indexes --dirty--> one worker per dataplane
    worker: sync (coalesced) = cache -> desired state (pure compilers) -> reconcile kernel
            every resync period: verify() against the kernel, then a full sync

Dataplanes (agent/contract.py): cross-node routes, NAT, Services (nftables maps or
iptables), NetworkPolicy (nftables sets), node DNS and BGP (BIRD, on a Node with
spec.bgp: the agent renders its configuration and keeps it running, agent/bgp.py).
Services and EndpointSlices are not kept in the cache: the Service compiler and the
DNS index take them from the watch events, each in its own compact form. A change
marks only the dataplanes it concerns, and each dataplane syncs on its own thread, so
a slow one never delays another. The CNI socket is served from the start; STATUS reports not-ready until the
first sync has programmed the node. The agent never flushes on start or stop: it
reconciles, so restarting it leaves established connections alone.

Node DNS (`--dns-server`): `inprocess`, the agent answers on the node's DNS addresses
itself; `separate`, it only keeps the addresses on `lo` and the NOTRACK table, and a
`podnet dns serve` process of its own (following the store itself) answers, so pods
keep resolving while the agent restarts or after it crashed.

Metrics (`--metrics-port`): /metrics (one prometheus_client registry: process, every
dataplane's syncs, Services, CNI, IPAM, conntrack, BGP and DNS; docs/metrics.md), /healthz
and /readyz (200 once the node is programmed, no dataplane's last sync failed and BGP
sessions are Established; 503 with the reason before) on the node's address, or
`--metrics-address` (0.0.0.0 only when asked). The listener starts as soon as its address
is known, before the first sync.

Stopping (SIGTERM, SIGINT): the watch ends and every store connection the agent opened
is closed (the last SQLite connection out checkpoints and removes the WAL), the workers,
the CNI and DNS servers and the health-check listeners stop, and the kernel state stays.
The agent holds `<socket>.lock` (flock) while it runs: a second agent with the same
socket refuses to start, and `podnet node cleanup` refuses to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from podnet.agent import snapshot
from podnet.agent.bgp import BgpDataplane
from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane, DataplaneMetrics
from podnet.agent.dataplanes import DnsDataplane, NatDataplane, PolicyDataplane, RoutesDataplane
from podnet.agent.follow import StoreFollower
from podnet.agent.readiness import report_ready
from podnet.agent.worker import DataplaneWorker, SyncProgress
from podnet.bgp.bird import Bird
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
    service_proxy: str = "nftables"  # or "iptables" (kube-proxy's layout), "ebpf" (tc programs)
    cgroup_root: str | None = None  # ebpf: where the socket programs attach (None: the cgroup2 mount)
    policy_dataplane: str = "nftables"  # or "ebpf" (tc programs at the pods' veths, maps from the same compiler)
    conntrack: ConntrackSizing = field(default_factory=lambda: ConntrackSizing(max_per_core=0))  # 0: leave alone
    dns_address: str | None = NODE_DNS_ADDRESS  # None: no node DNS server
    dns_server: str = "inprocess"  # or "separate": addresses and NOTRACK only, `podnet dns serve` answers
    cluster_dns_ips: tuple[str, ...] = ()  # also answered here, e.g. the kube-dns ClusterIP
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    cluster_domain: str = "cluster.local"
    metrics_port: int | None = None  # /metrics, /healthz and /readyz (None: no listener)
    metrics_address: str | None = None  # None: the node's address; 0.0.0.0 only when asked for
    metrics_kube_proxy_names: bool = False  # the Service proxy's sync metrics under kube-proxy's names
    min_sync_interval: float = 0.01  # at most one sync per dataplane per interval: a burst coalesces
    resync_interval: float = 60.0  # full reconcile even without changes: heals drift
    node_wait: float = 30.0
    pod_wait: float = 0.0  # a CNI ADD waits this long for a Pod the store does not know yet (cni/podwait.py)
    cloud_instance_id: str | None = None  # ENI pools: this node's instance (default: the Node's providerID)
    cloud_endpoint: str | None = None  # ENI pools: the EC2 endpoint (default: the CloudNetwork's, else AWS's)
    bgp_dir: str | None = None  # BIRD's files (default: `<socket>.bird`)
    snapshot: bool = True  # a clean stop writes `<socket>.snapshot`, the next start begins from it


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
        self.eni = None  # podnet.eni.agent.EniAgent on a node a CloudNetwork selects
        self.bgp: BgpDataplane | None = None
        self.dns_index = None
        self.pods = PodDataplane(lambda: self.routes.mtu if self.routes is not None else 1500,
                                 node_ip=lambda: self.node_ip)
        self.server = None
        self.dns = None
        self.metrics = None
        self.metrics_server = None
        self.metrics_collector = None
        self.watcher: threading.Thread | None = None
        self.cni_kv: KeyValueStore | None = None
        self._lock_fd: int | None = None
        self._shut = False
        self._synced_written = -1
        self._synced_lock = threading.Lock()

    # -- lifecycle

    def run(self) -> None:
        """Run until stop(); whatever was started is stopped again, also on an error."""
        try:
            self._take_lock()
            self._run()
        finally:
            gc.enable()  # a start that failed half-way leaves the collector as it found it
            self.shutdown()

    def _run(self) -> None:
        self._enable_forwarding()
        if self.cfg.metrics_address or self.node_ip:
            self._start_metrics()  # where it binds is known: /readyz says why not ready meanwhile
        self.node_ip = self.node_ip or self._wait_for_node_ip()
        self._start_metrics()
        self.build_dataplanes()
        self.follower = StoreFollower(self.cache, self.dataplanes, self._on_change)
        # The start allocates the records of the whole cluster, which hold no cycles: with the
        # cyclic collector on, each of its passes walks all that was decoded so far (at 50 000
        # Services, 3 of 5 s of decoding). It stays off until the first sync is done.
        gc.disable()
        rev = self._start_from_snapshot()  # after a clean restart: what this node held then
        if rev is None:
            rev = self.follower.relist(self.kv)  # each object goes to its dataplanes as it is decoded
        self._start_dns()
        self._start_cni_server()
        for worker in self.workers.values():  # the first sync: full, one dataplane after another
            worker.run_once(full=True)
        self.synced.set()
        self._record_synced()
        report_ready(self.kv, self.cfg.node, self.progress.synced_rev())  # kube-sync: NetworkUnavailable=False
        # What the first sync built lives as long as the agent and holds no cycles: keep the
        # cyclic collector from walking it all again on every full collection (at 50k
        # Services, ~0.3 s each). The few cycles the start left are kept with it.
        gc.freeze()
        gc.enable()
        self.watcher = threading.Thread(target=self.follower.watch, args=(self._open_kv, rev + 1), name="watch",
                                        daemon=True)
        self.watcher.start()
        for worker in self.workers.values():
            worker.start()
        self.stopping.wait()

    def build_dataplanes(self) -> None:
        """Every dataplane of this node, in the order of the first sync."""
        from podnet.agent.services import ServiceDataplane, size_conntrack

        self.routes = RoutesDataplane(self.cfg.node, self.cache, RouteProgrammer(self.cfg.node, self.node_ip))
        size_conntrack(self.cfg.conntrack)
        self._retire_unused_dataplanes()
        self.services = ServiceDataplane(self.cfg.node, self.node_ip, self.cfg.service_cidrs,
                                         tuple(self.dns_addresses()), proxy=self.cfg.service_proxy,
                                         cgroup_root=self.cfg.cgroup_root,
                                         # pod-to-local-pod flows may skip netfilter only where
                                         # no nftables NetworkPolicy would judge them
                                         fast_path=self.cfg.policy_dataplane == "ebpf")
        self.bgp = BgpDataplane(self.cfg.node, self.cache, Bird(self.cfg.bgp_dir or self.cfg.socket + ".bird"))
        policy = PolicyDataplane(self.cfg.node, self._policy_programmer())
        self.dataplanes = [self.routes, NatDataplane(self.cache), self.services, policy, self.bgp]
        if self.dns_addresses():
            if self.cfg.dns_server == "inprocess":
                from podnet.dns.index import ClusterIndex

                self.dns_index = ClusterIndex(zone=self.cfg.cluster_domain, node_name=self.cfg.node)
            # separate: no index here, the node's DNS process keeps its own
            self.dataplanes.append(DnsDataplane(self.dns_index, self.dns_addresses()))
        self.eni = self._eni_agent()
        if self.eni is not None:  # pod addresses from the cloud: ENI links, tables and pod rules
            self.dataplanes.append(self.eni.dataplane)
        self.metrics = DataplaneMetrics(dp.name for dp in self.dataplanes)
        self.workers = {dp.name: DataplaneWorker(dp, self.progress, self.metrics,
                                                 min_interval=self.cfg.min_sync_interval,
                                                 resync_interval=self.cfg.resync_interval,
                                                 on_synced=self._record_synced)
                        for dp in self.dataplanes}
        if self.eni is not None:
            self.eni.dataplane.on_mark(self.workers[self.eni.dataplane.name].mark)
            self.eni.start()  # on a thread: a cloud that fails keeps no other dataplane waiting
        self.bgp.supervise(self.workers[self.bgp.name].mark)  # a crashed BIRD is started again at once
        policy.supervise(self.workers[policy.name].mark)  # eBPF: a filter deleted is put back at once

    def _retire_unused_dataplanes(self) -> None:
        """A Service proxy or eBPF dataplane this node ran before and runs no more would go
        on acting on the node's traffic with what it last knew (the other proxy's DNAT to old
        endpoints; eBPF programs reading maps nobody writes: ebpf/retire.py), so it goes
        before the first sync."""
        from podnet.ebpf.retire import retire_quietly

        if self.cfg.service_proxy != "iptables":
            from podnet.services.iptables import retire_left_behind as retire_iptables

            retire_quietly("iptables Service proxy", retire_iptables)
        else:
            from podnet.services.applier import retire_left_behind as retire_nftables

            retire_quietly("nftables Service proxy", retire_nftables)
        if self.cfg.service_proxy != "ebpf":
            from podnet.services.ebpf.applier import retire_left_behind as retire_services

            retire_quietly("eBPF Services dataplane", lambda: retire_services(self.cfg.node))
        if self.cfg.policy_dataplane != "ebpf":
            from podnet.policy.ebpf.kernel import retire_left_behind as retire_policy

            retire_quietly("eBPF policy dataplane", lambda: retire_policy(self.cfg.node))

    def _policy_programmer(self):
        """NetworkPolicy's backend: None for nftables (PolicyDataplane's own), else the eBPF
        programs at the pods' veths with their maps pinned in this agent's bpffs directory."""
        if self.cfg.policy_dataplane != "ebpf":
            return None
        from podnet.ebpf.bpffs import PinDir, instance_name
        from podnet.policy.ebpf import combination_error
        from podnet.policy.ebpf.programmer import EbpfPolicyProgrammer

        error = combination_error(self.cfg.service_proxy, "--policy-dataplane", "--service-proxy")
        if error:
            raise PodnetError(error)
        from podnet.services.compiler import balanced_cidrs
        from podnet.services.model import ServiceConfig

        # the Service CIDRs: an isolated pod's egress to an address there that policy sees
        # untranslated (the eBPF Services fell back to nftables) is dropped; less the
        # addresses the node's DNS answers itself, never translated (a pod reaches its node)
        cidrs = balanced_cidrs(ServiceConfig(tuple(self.cfg.service_cidrs), local_dns=tuple(self.dns_addresses())))
        return EbpfPolicyProgrammer(PinDir.for_instance(instance_name(self.cfg.node)), service_cidrs=cidrs)

    def _eni_agent(self):
        """The node's ENI part if a CloudNetwork selects it (podnet.eni.agent), else None."""
        from podnet.eni.agent import EniAgent
        from podnet.eni.setup import PoolOptions

        options = PoolOptions(instance_id=self.cfg.cloud_instance_id, endpoint=self.cfg.cloud_endpoint)
        return EniAgent.for_node(self.objects, self.cfg.node, self._open_kv, options)

    # -- the restart snapshot (agent/snapshot.py)

    def _snapshot_identity(self) -> tuple[str, str]:
        """(the agent's settings, the store) a snapshot must have been written with: the
        settings and dataplanes that shaped the records, and the store with this node's Node
        as created there (a store made again and filled anew differs in it)."""
        from dataclasses import asdict

        from podnet.store.objects import object_key

        config = snapshot.fingerprint({**asdict(self.cfg), "node_ip": self.node_ip,
                                       "dataplanes": [dp.name for dp in self.dataplanes]})
        node = self.kv.get(object_key(Node, self.cfg.node))
        return config, f"{self.kv.identity()} node {node.create_revision if node else 0}"

    def _start_from_snapshot(self) -> int | None:
        """Restore the snapshot a clean stop left (None: none fits; list the store)."""
        path = self.cfg.socket + snapshot.SUFFIX
        if not os.path.exists(path):
            return None
        if not self.cfg.snapshot:  # (one an earlier run left would be stale by the next)
            snapshot.remove(path)
            return None
        started = time.monotonic()
        try:
            config, store = self._snapshot_identity()
            snap = snapshot.take(path, config, store, self.kv.revision())
        except Exception as e:  # the store failed to answer: list it as without a snapshot
            log.warning("not starting from %s: %s", path, e)
            snapshot.remove(path)  # used once: after this run it would be older than the kernel
            return None
        if snap is None:
            return None
        rev = self.follower.restore(snap)
        log.info("started from %s at revision %d (%.2f s); watching the store from there", path, rev,
                 time.monotonic() - started)
        return rev

    def _write_snapshot(self) -> None:
        """At a clean stop, once the watch has ended: what the dataplanes hold, for the next start."""
        if self.follower is None or not self.synced.is_set() or not self.cfg.snapshot:
            return
        busy = [w.name for w in self.workers.values() if w.alive()]
        if (self.watcher is not None and self.watcher.is_alive()) or busy:
            log.warning("not writing a snapshot: %s did not stop", ", ".join(busy) or "the watch")
            return
        snap = self.follower.snapshot()
        if snap is None:
            return
        path = self.cfg.socket + snapshot.SUFFIX
        try:
            started = time.monotonic()
            config, store = self._snapshot_identity()
            size = snapshot.write(path, snap, config, store)
            log.info("wrote %s: revision %d, %.1f MiB in %.2f s", path, snap.revision, size / 2**20,
                     time.monotonic() - started)
        except Exception as e:  # the next start lists the store instead
            log.warning("cannot write %s: %s", path, e)

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
        """Stop what run() started and close every store connection (once; the kernel state
        stays as it is: a restarted agent adopts it)."""
        if self._shut:
            return
        self._shut = True
        self.stopping.set()
        if self.follower is not None:
            self.follower.stop()  # closes the watch's connection: the watch thread returns
        if self.watcher is not None:
            self.watcher.join(10)
        for worker in self.workers.values():
            worker.stop()
        self._write_snapshot()
        handler = self.server.handler if self.server is not None else None
        for closer in (self.server and self.server.stop, handler and handler.close,
                       self.cni_kv and self.cni_kv.close, self.dns and self.dns.stop_thread,
                       self.metrics_server and self.metrics_server.stop, self._stop_metrics, self.eni and self.eni.stop,
                       *(dp.close for dp in self.dataplanes), self.pods.close, self.kv.close):
            if closer:
                try:
                    closer()
                except Exception as e:  # shutting down: report, carry on
                    log.warning("shutdown: %s", e)
        self._release_lock()
        log.info("agent on %s stopped", self.cfg.node)

    def _take_lock(self) -> None:
        """Hold `<socket>.lock` while running (the kernel drops it when the process dies, even
        by SIGKILL): one agent per socket, and `podnet node cleanup` knows one runs."""
        path = self.cfg.socket + ".lock"
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise PodnetError(f"cannot open the agent's lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise PodnetError(f"another podnet agent{f' (pid {holder})' if holder else ''} runs with socket "
                              f"{self.cfg.socket} (it holds {path}): stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the file stays: removing it could race a starting agent
            self._lock_fd = None

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

        self.cni_kv = self._open_kv()
        pods = self.eni.pod_dataplane(self.pods) if self.eni is not None else self.pods
        ipam = self.eni.ipam_factory if self.eni is not None else None  # else podnet's own IPAM
        handler = CNIHandler(self.cni_kv, self.cfg.node, pods, ready=self.ready, ipam_factory=ipam)
        handler.pod_wait = self.cfg.pod_wait
        self.server = CNIServer(self.cfg.socket, handler)
        self.server.start()
        log.info("serving CNI on %s", self.cfg.socket)

    def dns_addresses(self) -> list[str]:
        if not self.cfg.dns_address:
            return []
        return [self.cfg.dns_address, *self.cfg.cluster_dns_ips]

    def _start_dns(self) -> None:
        addresses = self.dns_addresses()
        if not addresses or self.dns_index is None:  # none, or a separate process answers
            if addresses:
                log.info("node DNS on %s is answered by a separate process (`podnet dns serve`); this agent keeps "
                         "the addresses on lo and the NOTRACK table", ", ".join(addresses))
            return
        from podnet.dns import resolvconf
        from podnet.dns.server import DNSServer

        DnsAddresses(addresses).ensure()  # the server binds to them
        self.dns = DNSServer(self.dns_index, listen=[(a, 53) for a in addresses], upstreams=self.cfg.dns_upstreams,
                             host_search=resolvconf.host_search_domains())
        self.dns.start_thread()
        log.info("serving DNS for %s on %s port 53", self.cfg.cluster_domain, ", ".join(addresses))

    def _start_metrics(self) -> None:
        """The metrics listener (/metrics, /healthz, /readyz) on the metrics address, else the
        node's, else 127.0.0.1; once."""
        if self.cfg.metrics_port is None or self.metrics_server is not None:
            return
        from podnet import metrics
        from podnet.agent.metrics import AgentMetrics
        from podnet.cni import metrics as cni_metrics
        from podnet.ipam import metrics as ipam_metrics
        from podnet.services import conntrack

        address = metrics.listen_address(self.cfg.metrics_address, self.node_ip)
        for collector in (*cni_metrics.COLLECTORS, *ipam_metrics.COLLECTORS, *conntrack.COLLECTORS):
            metrics.register(collector)  # process-wide: moved by the CNI handler, IPAM and conntrack cleanup
        self.metrics_collector = AgentMetrics(self)
        metrics.register(self.metrics_collector)
        self.metrics_server = metrics.MetricsServer(address, self.cfg.metrics_port, ready=self.not_ready).start()

    def _stop_metrics(self) -> None:
        if self.metrics_collector is not None:
            from podnet import metrics

            metrics.unregister(self.metrics_collector)
            self.metrics_collector = None

    def not_ready(self) -> str | None:
        """None when ready (/readyz answers 200), else why not."""
        why = self.ready()
        return why[1] if why else None

    def ready(self) -> tuple[int, str] | None:
        if not self.synced.is_set():
            if self.node_ip is None:
                return 50, f"podnet agent on {self.cfg.node} waits for Node {self.cfg.node} and its InternalIP"
            return 50, f"podnet agent on {self.cfg.node} has not programmed the node yet"
        errors = {name: w.error for name, w in self.workers.items() if w.error}
        if errors:
            return 51, f"podnet agent on {self.cfg.node}: last sync failed: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(errors.items()))
        bgp = self.bgp.health() if self.bgp is not None else None
        if bgp:  # as Calico's readiness: every BGP session must be Established
            return 50, f"podnet agent on {self.cfg.node}: {bgp}"
        return None


def run_agent(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 0
