"""`podnet dns serve`: the node's DNS server as a process of its own, beside the agent.

What NodeLocal DNSCache users expect: pods' DNS on the node's addresses (169.254.20.10,
the kube-dns ClusterIP) keeps answering while the node agent restarts, is upgraded or
crashed. The agent (`podnet agent --dns-server separate`) keeps the addresses on `lo`
and the NOTRACK table; this process only answers, in the node's network namespace (as
a second container of the agent's DaemonSet would):

- it follows the store itself (the agent's informer, agent/follow.py, into its own
  cluster index), so a Service created while the agent is down resolves, and a
  restarted process starts from a fresh list, never from a stale cache;
- it lists the store before it binds: it never answers from an empty index;
- its sockets are bound with IP_FREEBIND, so it may start before the agent has put the
  addresses on `lo` (it answers once they are there), and with SO_REUSEPORT, so a new
  process can take over before the old one stops;
- `--ready-file` is written once it listens (JSON: pid, addresses, store revision);
  `--synced-file` holds the store revision its index has reached, after every change;
- `--metrics-port`: /metrics (podnet_dns_*, process_*), /healthz and /readyz (200 once it
  answers) on 127.0.0.1, or `--metrics-address`;
- SIGTERM or SIGINT: it stops listening, ends its watch and closes its store connections.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane
from podnet.agent.dataplanes import DnsDataplane
from podnet.agent.follow import StoreFollower
from podnet.dns.index import ClusterIndex
from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.dns.server.fastpath import DNSServer
from podnet.errors import PodnetError
from podnet.model.objects import KINDS
from podnet.store import open_store, reopen
from podnet.store.base import KeyValueStore
from podnet.store.credentials import EtcdCredentials
from podnet.store.layout import SHARED

log = logging.getLogger("podnet.dns.node")

RETRY_SECONDS = 1.0


@dataclass
class NodeDnsConfig:
    node: str
    store_url: str | None = None
    store_credentials: EtcdCredentials | None = None
    addresses: tuple[str, ...] = (NODE_DNS_ADDRESS,)
    port: int = 53
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    cluster_domain: str | None = None  # None: the cluster's, from the store
    host_search: list[str] = field(default_factory=list)
    cache_size: int = 10_000
    ready_file: str | None = None
    synced_file: str | None = None
    metrics_port: int | None = None  # /metrics, /healthz and /readyz (None: no listener)
    metrics_address: str | None = None  # None: 127.0.0.1


class NodeDns:
    def __init__(self, cfg: NodeDnsConfig, stopping: threading.Event | None = None):
        self.cfg = cfg
        self.stopping = stopping or threading.Event()
        self.index: ClusterIndex | None = None
        self.server: DNSServer | None = None
        self.follower: StoreFollower | None = None
        self.kv: KeyValueStore | None = None
        self._watcher: threading.Thread | None = None
        self._synced_lock = threading.Lock()
        self._synced = -1
        self.metrics_server = None
        self._collector = None

    def run(self) -> None:
        """Serve until stop(); whatever was started is stopped again, also on an error."""
        try:
            self._start_metrics()
            rev = self._first_list()
            if rev is None:
                return  # stopped before the store answered
            self._listen(rev)
            self.stopping.wait()
        finally:
            self.shutdown()

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def not_ready(self) -> str | None:
        """None once it answers (/readyz 200), else why not."""
        if self.server is None:
            return "listing the store before answering"
        if self.stopping.is_set():
            return "stopping"
        return None

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port is None:
            return
        from podnet import metrics

        self.metrics_server = metrics.MetricsServer(metrics.listen_address(self.cfg.metrics_address, None),
                                                    self.cfg.metrics_port, ready=self.not_ready).start()

    # -- start

    def _first_list(self) -> int | None:
        """Open the store, read the cluster's domain, list into a new index; retried (a
        warning each time) until the store answers or stop()."""
        while not self.stopping.is_set():
            kv = None
            try:
                kv = open_store(self.cfg.store_url, create=False, credentials=self.cfg.store_credentials)
                return self._load(kv)
            except PodnetError as e:  # store errors included: a DaemonSet container waits for its store
                if kv is not None:
                    kv.close()
                self.kv = None
                log.warning("cannot list the store yet (%s); retrying in %gs", e, RETRY_SECONDS)
                self.stopping.wait(RETRY_SECONDS)
        return None

    def _load(self, kv: KeyValueStore) -> int:
        from podnet.cluster import agent_settings

        self.kv = kv
        _, domain = agent_settings(kv, None, self.cfg.cluster_domain, log.warning)
        self.index = ClusterIndex(zone=domain, node_name=self.cfg.node)
        dns = DnsDataplane(self.index)  # the index only: the agent owns the addresses and NOTRACK
        # Nothing is kept in the cache: the index holds what DNS needs, in its own form. The
        # agent's prefix: the synced revision advances as the agent's does (IPAM blocks too).
        self.follower = StoreFollower(ObjectCache(unkept=KINDS, records=True), [dns], self._on_change,
                                      prefix=SHARED)
        rev = self.follower.relist(kv)
        log.info("listed the store at revision %d: zone %s, node %s", rev, domain, self.cfg.node)
        return rev

    def _listen(self, rev: int) -> None:
        assert self.index is not None and self.follower is not None and self.kv is not None
        self.server = DNSServer(self.index, [(a, self.cfg.port) for a in self.cfg.addresses],
                                upstreams=self.cfg.upstreams, host_search=self.cfg.host_search,
                                cache_size=self.cfg.cache_size, freebind=True, reuse_port=True)
        self.server.start_thread()
        if self.metrics_server is not None:
            from podnet import metrics
            from podnet.dns.server.metrics import DnsMetrics

            self._collector = DnsMetrics(self.server)
            metrics.register(self._collector)
        log.info("serving DNS for %s on %s port %d", self.index.zone, ", ".join(self.cfg.addresses), self.cfg.port)
        kv = self.kv
        self._watcher = threading.Thread(target=self.follower.watch, args=(lambda: reopen(kv), rev + 1),
                                         name="watch", daemon=True)
        self._watcher.start()
        self._write_synced(rev)
        if self.cfg.ready_file:
            _write_atomically(self.cfg.ready_file, json.dumps(
                {"pid": os.getpid(), "addresses": self.server.addresses, "revision": rev}) + "\n")

    # -- following

    def _on_change(self, rev: int, _dirty: list[Dataplane]) -> None:
        if self.server is not None:  # not during the first list: run() writes that revision
            self._write_synced(rev)

    def _write_synced(self, rev: int) -> None:
        if not self.cfg.synced_file:
            return
        with self._synced_lock:
            if rev <= self._synced:
                return
            try:
                _write_atomically(self.cfg.synced_file, f"{rev}\n")
                self._synced = rev
            except OSError as e:
                log.debug("cannot write %s: %s", self.cfg.synced_file, e)

    # -- stop

    def shutdown(self) -> None:
        self.stopping.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._collector is not None:
            from podnet import metrics

            metrics.unregister(self._collector)
            self._collector = None
        if self.server is not None:
            self.server.stop_thread()
        if self.follower is not None:
            self.follower.stop()
        if self._watcher is not None:
            self._watcher.join(10)
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        log.info("node DNS on %s stopped", self.cfg.node)


def _write_atomically(path: str, text: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
