"""`podnet agent`: one per node, running in the node's network namespace.

    store --watch--> dirty flag --(coalesced, at most every min_interval)--> sync
    sync = read view -> desired routing/NAT (pure) -> reconcile kernel (diff only)

The CNI socket is served from the start; STATUS reports not-ready until the
first sync has programmed the node. The agent never flushes on start or stop:
it reconciles, so restarting it leaves established connections alone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

from podnet.agent.view import BLOCKS_PREFIX, routing_inputs
from podnet.dataplane.nat import NatProgrammer
from podnet.dataplane.pods import PodDataplane
from podnet.dataplane.routes import RouteProgrammer
from podnet.dataplane.routing import VXLAN_OVERHEAD, desired_routing
from podnet.errors import PodnetError
from podnet.model.objects import IPPool, Node
from podnet.store import open_store
from podnet.store.base import Compacted, KeyValueStore
from podnet.store.objects import OBJECTS_PREFIX, ObjectStore

log = logging.getLogger("podnet.agent")

DEFAULT_SOCKET = "/run/podnet/cni.sock"
# Keys whose changes can change this node's routing.
ROUTING_PREFIXES = (BLOCKS_PREFIX, f"{OBJECTS_PREFIX}Node/", f"{OBJECTS_PREFIX}IPPool/")


@dataclass
class AgentConfig:
    node: str
    store_url: str | None = None
    socket: str = DEFAULT_SOCKET
    node_ip: str | None = None
    min_sync_interval: float = 0.05  # coalesce bursts of changes, like kube-proxy's minSyncPeriod
    resync_interval: float = 60.0  # full reconcile even without changes: heals drift
    node_wait: float = 30.0


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.kv: KeyValueStore = open_store(cfg.store_url)
        self.objects = ObjectStore(self.kv)
        self.stopping = threading.Event()
        self.dirty = threading.Event()
        self.synced = threading.Event()
        self.mtu = 1500
        self.node_ip = cfg.node_ip
        self.routes: RouteProgrammer | None = None
        self.nat = NatProgrammer()
        self.dataplane = PodDataplane(lambda: self.mtu)
        self.server = None
        self.last_sync_error: str | None = None

    # -- lifecycle

    def run(self) -> None:
        self._enable_forwarding()
        self.node_ip = self.node_ip or self._wait_for_node_ip()
        self.routes = RouteProgrammer(self.cfg.node, self.node_ip)
        self._start_cni_server()
        start_rev = self.kv.revision() + 1
        self.sync()
        watcher = threading.Thread(target=self._watch, args=(start_rev,), name="watch", daemon=True)
        watcher.start()
        last = time.monotonic()
        while not self.stopping.is_set():
            woke = self.dirty.wait(timeout=max(0.0, self.cfg.resync_interval - (time.monotonic() - last)))
            if self.stopping.is_set():
                break
            if woke:
                time.sleep(self.cfg.min_sync_interval)  # let a burst of changes land first
            self.dirty.clear()
            self.sync()
            last = time.monotonic()
        self.shutdown()

    def stop(self, *_: object) -> None:
        self.stopping.set()
        self.dirty.set()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
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

    def ready(self) -> tuple[int, str] | None:
        if not self.synced.is_set():
            return 50, f"podnet agent on {self.cfg.node} has not programmed the node yet"
        if self.last_sync_error:
            return 51, f"podnet agent on {self.cfg.node}: last sync failed: {self.last_sync_error}"
        return None

    # -- watch and sync

    def _watch(self, start_rev: int) -> None:
        kv = open_store(self.cfg.store_url)  # a watch blocks: its own connection
        rev = start_rev
        while not self.stopping.is_set():
            try:
                for ev in kv.watch("/podnet/", rev):
                    rev = ev.revision + 1
                    if ev.key.startswith(ROUTING_PREFIXES):
                        self.dirty.set()
                    if self.stopping.is_set():
                        break
            except Compacted:
                log.warning("watch history compacted; resyncing from the current state")
                rev = kv.revision() + 1
                self.dirty.set()
            except Exception as e:  # the store went away: retry, then catch up by resync
                log.warning("watch failed (%s); retrying", e)
                time.sleep(1)
                self.dirty.set()

    def sync(self) -> None:
        assert self.routes is not None
        started = time.monotonic()
        try:
            pools = self.objects.list(IPPool)
            nodes = self.objects.list(Node)
            records, _ = self.kv.list(BLOCKS_PREFIX)
            view = routing_inputs([r.value for r in records], pools, nodes)
            _, underlay_mtu = self.routes.underlay()
            self.mtu = underlay_mtu - VXLAN_OVERHEAD if view.vxlan_in_use else underlay_mtu
            desired = desired_routing(self.cfg.node, view.blocks, view.borrowed, view.node_ips, view.vxlan_in_use)
            changes = self.routes.apply(desired)
            nat_changed = self.nat.apply(view.nat)
        except Exception as e:
            self.last_sync_error = str(e)
            log.error("sync failed: %s (will retry)", e)
            threading.Timer(1.0, self.dirty.set).start()
            return
        self.last_sync_error = "; ".join(changes.errors) or None
        if changes.errors:
            log.error("sync: %s", self.last_sync_error)
            threading.Timer(1.0, self.dirty.set).start()
        if changes.count or nat_changed:
            log.info("sync: +%d -%d routing entries%s in %.1f ms", len(changes.added), len(changes.removed),
                     ", NAT updated" if nat_changed else "", (time.monotonic() - started) * 1000)
            for line in changes.added:
                log.debug("added %s", line)
            for line in changes.removed:
                log.debug("removed %s", line)
        self.synced.set()


def run_agent(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
    return 0
