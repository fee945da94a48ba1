"""BGP as one of the agent's dataplanes: BIRD's configuration rendered from the store,
and BIRD supervised in the node's network namespace (podnet.bgp).

A sync compiles this node's BGP configuration (its Node's spec.bgp, the cluster's other
BGP nodes, BGPConfiguration `default`, BGPPeers, pools and the IPAM blocks that concern
this node), renders BIRD's text and hands it to BIRD: nothing when BIRD runs that text,
`configure` when it runs another, a start when it does not run (after a crash: verify()
finds it gone, the next sync starts it, with graceful-restart recovery). A text BIRD
refuses (`bird -p`) is never loaded: the sync fails, names BIRD's reason and retries.
A node without spec.bgp runs no BIRD (one still running from before is stopped).

Blocks are event-fed like the routes dataplane's, but only the ones this node owns or
borrowed addresses from matter here: another node's new block changes nothing.

supervise(wake): a thread holds a pidfd of the running BIRD and calls `wake` (the
worker's mark) the moment it exits, so a crashed BIRD is started again at once, not at
the next resync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import ALL_KEYS, AllKeys, Dataplane, HoldsBlocks, kind_of
from podnet.agent.view import BlockRecord, compact_block
from podnet.bgp.bird import Bird, ConfigRefused, digest
from podnet.bgp.config import NodeBgp, compile_node, default_config
from podnet.bgp.control import BirdError
from podnet.bgp.render import render
from podnet.bgp.status import Session, sessions, unhealthy
from podnet.model.objects import BGPConfiguration, BGPPeer, IPPool, Node
from podnet.store.objects import ObjectEvent

log = logging.getLogger("podnet.agent")

STATUS_TTL = 1.0  # seconds a read of BIRD's sessions serves health checks and metrics


class BgpDataplane(HoldsBlocks, Dataplane):
    name = "bgp"
    kinds = frozenset({"Node", "IPPool", "Block", "BGPConfiguration", "BGPPeer"})

    def __init__(self, node: str, cache: ObjectCache, bird: Bird):
        self.node = node
        self.cache = cache
        self.bird = bird
        self.config: NodeBgp | None = None  # what the last sync rendered (None: no BGP here)
        self._lock = threading.Lock()
        self._blocks: dict[str, BlockRecord] = {}  # blocks this node owns or borrowed from
        self._refused: tuple[str, str] | None = None  # (digest, error) of the last text BIRD refused
        self._status: tuple[float, list[Session] | None, str | None] = (0.0, None, None)
        self._started = threading.Event()  # a sync has BIRD running: watch it
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- events

    def _mine(self, b: BlockRecord | None) -> bool:
        return b is not None and (b.owner == self.node or any(n == self.node for _, n in b.borrowed))

    def on_event(self, ev: ObjectEvent) -> bool:
        kind = kind_of(ev.key)
        if kind != "Block":
            return kind in self.kinds
        record = compact_block(ev.raw) if ev.raw is not None else None
        with self._lock:
            before = self._blocks.get(ev.key)
            if self._mine(record):
                self._blocks[ev.key] = record  # type: ignore[assignment]
            else:
                self._blocks.pop(ev.key, None)
        return self._mine(before) or self._mine(record)

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        if listed is ALL_KEYS:  # the first list: nothing held before it
            return
        with self._lock:
            for key in [k for k in self._blocks if k not in listed]:
                del self._blocks[key]

    # -- sync

    def compile(self) -> NodeBgp | None:
        with self._lock:
            blocks = list(self._blocks.values())
        return compile_node(self.node, self.cache.list(Node), default_config(self.cache.list(BGPConfiguration)),
                            self.cache.list(BGPPeer), self.cache.list(IPPool), blocks)

    def sync(self, full: bool) -> str:
        cfg = self.compile()
        self.config = cfg
        if cfg is None:
            if self.bird.stop():
                self._status = (0.0, None, None)
                return "BIRD stopped: this node has no spec.bgp"
            return ""
        text = render(cfg, self.bird.log_file)
        want = digest(text)
        if self._refused is not None and self._refused[0] == want:
            raise ConfigRefused(self._refused[1])  # the same text again: BIRD's answer stands
        try:
            done = self.bird.apply(text)
        except ConfigRefused as e:
            self._refused = (want, str(e))
            raise
        self._refused = None
        self._started.set()
        if done:
            self._status = (0.0, None, None)
            return (f"BIRD {done}: {len(cfg.peers)} peers, {len(cfg.blocks)} blocks, "
                    f"{len(cfg.borrowed)} borrowed addresses")
        return ""

    def verify(self) -> list[str]:
        if self.config is None:
            return []
        if self.bird.pid() is None:
            return ["BIRD is not running"]
        loaded = self.bird.loaded_digest()
        try:
            on_disk = digest(self.bird.conf.read_text())
        except OSError:
            on_disk = None
        if loaded is None or on_disk != loaded:
            return [f"{self.bird.conf} is not the configuration BIRD loaded"]
        return []

    # -- supervision

    def supervise(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever the BIRD this dataplane runs exits."""
        self._watcher = threading.Thread(target=self._watch, args=(wake,), name="bgp-bird-watch", daemon=True)
        self._watcher.start()

    def _watch(self, wake: Callable[[], None]) -> None:
        while not self._stopping.is_set():
            self._started.wait(1.0)
            pid = self.bird.pid() if self.config is not None else None
            if pid is None:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already: the next check sees it
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                while not self._stopping.is_set() and not poller.poll(1000):
                    pass
            finally:
                os.close(fd)
            if self._stopping.is_set():
                return
            self._started.clear()
            if self.config is not None:
                log.warning("BIRD (pid %d) exited: starting it again", pid)
                wake()

    def close(self) -> None:
        """Stop watching; BIRD keeps running (and routing) for the next agent to adopt."""
        self._stopping.set()
        self._started.set()
        if self._watcher is not None:
            with contextlib.suppress(RuntimeError):
                self._watcher.join(5)

    # -- status, health, metrics

    def sessions(self, max_age: float = STATUS_TTL) -> tuple[list[Session] | None, str | None]:
        """BIRD's BGP sessions (None with the reason when BIRD does not answer), at most
        `max_age` seconds old."""
        at, found, error = self._status
        if time.monotonic() - at <= max_age and (found is not None or error is not None):
            return found, error
        if self.config is None:
            found, error = [], None
        else:
            try:
                found, error = sessions(self.bird.ctl, timeout=2.0), None
            except BirdError as e:
                found, error = None, str(e)
        self._status = (time.monotonic(), found, error)
        return found, error

    def health(self) -> str | None:
        """None when BGP is fine on this node (or not used); else why not."""
        if self.config is None:
            return None
        found, error = self.sessions()
        if found is None:
            return f"BIRD is not ready: {error}"
        return unhealthy(found)

    def metric_families(self) -> Iterator[Metric]:
        """podnet_bgp_* (gauges), read from BIRD when the agent's metrics are scraped."""
        found, _ = self.sessions()
        up = int(found is not None) if self.config is not None else 0
        yield GaugeMetricFamily("podnet_bgp_bird_up", "1 when this node's BIRD answers on its control socket.",
                                value=up)
        found = found or []
        established = sum(1 for s in found if s.established)
        by_state = GaugeMetricFamily("podnet_bgp_sessions", "BGP sessions of this node by state.", labels=["state"])
        by_state.add_metric(["established"], established)
        by_state.add_metric(["other"], len(found) - established)
        yield by_state
        per_peer = GaugeMetricFamily("podnet_bgp_session_established",
                                     "1 while the session with a peer is Established.", labels=["peer", "protocol"])
        routes = GaugeMetricFamily("podnet_bgp_routes", "Routes of a BGP session (imported: learnt from the peer; "
                                   "exported: sent).", labels=["peer", "protocol", "direction"])
        for s in found:
            per_peer.add_metric([s.neighbor or "", s.name], int(s.established))
            routes.add_metric([s.neighbor or "", s.name, "imported"], s.imported)
            routes.add_metric([s.neighbor or "", s.name, "exported"], s.exported)
        yield per_peer
        yield routes
        cfg = self.config
        yield GaugeMetricFamily("podnet_bgp_originated_routes", "Routes this node originates (blocks, borrowed "
                                "/32s, service ranges).", value=len(cfg.statics) if cfg else 0)
