"""The one contract every dataplane of the agent implements, and its metrics.

    on_event(ev)       one object event from the watch; True if this dataplane must sync
                       (only events of its `kinds`, when it names any: at the start's list
                       most events concern one or two dataplanes of six)
    begin_reload()     a whole list follows (after a relist or a compacted watch) ...
    end_reload(listed) ... it has been fed; `listed` holds the key of every record it
                       delivered: what the dataplane holds under another key is gone
                       (ALL_KEYS after the first list: nothing was held before it)
    sync(full)         program what changed; `full`: reconcile everything (the periodic
                       resync), repairing what verify() found; returns what changed ("" if
                       nothing)
    verify()           compare the kernel with what was applied, as cheaply as the
                       dataplane can tell; a non-empty list (the drift found) makes the
                       next sync repair it
    snapshot()         what it was fed (its compact inputs, picklable), for the restart
    restore(state)     snapshot (agent/snapshot.py); restore() takes it back instead of
                       a first list, and the first sync then starts from it

The agent runs each dataplane on its own worker (agent/worker.py): one dataplane's
slow sync never delays another's, and a change waits only for its own dataplane.
Routes, NAT, Services (nftables or iptables), NetworkPolicy and node DNS implement
it today; every dataplane added later (BIRD, ENI addresses, eBPF maps) plugs in the
same way, with no dispatch by name in the agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from podnet.agent.cache import kind_of_key
from podnet.ipam.keys import BLOCKS
from podnet.metrics import text
from podnet.services.metrics import SYNC_BUCKETS
from podnet.store.objects import ObjectEvent


class AllKeys:
    """end_reload's `listed` after the first list, when nothing was fed before it: every
    key is "listed", so nothing is gone. Collecting the keys of the whole cluster only to
    find that (and each dataplane comparing its own with them) cost an agent of a 5 000-
    node cluster ~25 MiB and half a second at start."""

    __slots__ = ()

    def __contains__(self, key: object) -> bool:
        return True


ALL_KEYS = AllKeys()


class Dataplane:
    """Base of the agent's dataplanes: `name` for logs and metrics, `kinds` the object kinds
    whose events concern it ("Block" for IPAM blocks; the follower hands it no others, or
    every event if it names none). Subclasses override sync() and
    usually verify(); event-fed ones (which keep their own compact copy of objects)
    override on_event() and the reload pair too."""

    name = "dataplane"
    kinds: frozenset[str] = frozenset()

    def on_event(self, ev: ObjectEvent) -> bool:
        return kind_of(ev.key) in self.kinds

    def begin_reload(self) -> None:
        pass

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        pass

    def sync(self, full: bool) -> str:
        raise NotImplementedError

    def verify(self) -> list[str]:
        return []

    def snapshot(self) -> object:
        """What this dataplane holds from events, picklable (None: nothing; it is fed again
        from the cache's objects after a restore)."""
        return None

    def restore(self, state: object) -> None:
        """Hold again what snapshot() returned (on a fresh dataplane, before its first sync)."""

    def close(self) -> None:
        pass


class HoldsBlocks:
    """The restart snapshot of a dataplane that keeps IPAM blocks as compact records in
    `_blocks` under `_lock` (routes, BGP); its first sync after restore() recomputes them all."""

    _blocks: dict
    _lock: Any

    def snapshot(self) -> object:
        with self._lock:
            return dict(self._blocks)

    def restore(self, state: object) -> None:
        with self._lock:
            self._blocks = dict(state)  # type: ignore[call-overload]


@lru_cache(maxsize=256)
def kind_of(key: str) -> str | None:
    """The kind a store key holds, as dataplanes name it: the object's kind, or "Block" for
    an IPAM block."""
    return "Block" if key.startswith(BLOCKS) else kind_of_key(key)


class DataplaneMetrics:
    """Per-dataplane sync metrics (prometheus_client, a collector the agent registers):

    podnet_dataplane_sync_duration_seconds{dataplane}        histogram of every sync
    podnet_dataplane_syncs_total{dataplane,result}           result: changed | unchanged | error
    podnet_dataplane_drift_repaired_total{dataplane}         resyncs that found drift and repaired it
    podnet_dataplane_last_sync_error{dataplane}              1 while the last sync failed
    podnet_dataplane_last_sync_timestamp_seconds{dataplane}  when the last sync succeeded
    """

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        self.duration = Histogram("podnet_dataplane_sync_duration_seconds", "Time of one sync of a dataplane.",
                                  ["dataplane"], buckets=SYNC_BUCKETS, registry=None)
        self.syncs = Counter("podnet_dataplane_syncs", "Syncs of a dataplane by result (changed: it "
                             "changed the kernel; unchanged: nothing to do; error: it failed).",
                             ["dataplane", "result"], registry=None)
        self.drift = Counter("podnet_dataplane_drift_repaired", "Resyncs that found the kernel changed "
                             "behind podnet's back and repaired it.", ["dataplane"], registry=None)
        self.failing = Gauge("podnet_dataplane_last_sync_error", "1 while the last sync of a dataplane failed.",
                             ["dataplane"], registry=None)
        self.last_ok = Gauge("podnet_dataplane_last_sync_timestamp_seconds",
                             "When the last successful sync of a dataplane ended (Unix time).", ["dataplane"],
                             registry=None)
        for n in self.names:  # every series from the start, at 0
            self.duration.labels(n)
            for r in ("changed", "unchanged", "error"):
                self.syncs.labels(n, r)
            self.drift.labels(n)
            self.failing.labels(n)
            self.last_ok.labels(n)

    def record_sync(self, name: str, seconds: float, result: str) -> None:
        self.duration.labels(name).observe(seconds)
        self.syncs.labels(name, result).inc()
        self.failing.labels(name).set(int(result == "error"))
        if result != "error":
            self.last_ok.labels(name).set_to_current_time()

    def record_drift(self, name: str) -> None:
        self.drift.labels(name).inc()

    # a prometheus_client collector
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        for m in (self.duration, self.syncs, self.drift, self.failing, self.last_ok):
            yield from m.collect()

    def render(self) -> str:
        return text([self])
