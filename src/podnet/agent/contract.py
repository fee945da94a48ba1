"""The one contract every dataplane of the agent implements, and its metrics.

    on_event(ev)       one object event from the watch; True if this dataplane must sync
    begin_reload()     a whole list follows (after a relist or a compacted watch) ...
    end_reload(listed) ... it has been fed; `listed` holds the key of every record it
                       delivered: what the dataplane holds under another key is gone
    sync(full)         program what changed; `full`: reconcile everything (the periodic
                       resync), repairing what verify() found; returns what changed ("" if
                       nothing)
    verify()           compare the kernel with what was applied, as cheaply as the
                       dataplane can tell; a non-empty list (the drift found) makes the
                       next sync repair it

The agent runs each dataplane on its own worker (agent/worker.py): one dataplane's
slow sync never delays another's, and a change waits only for its own dataplane.
Routes, NAT, Services (nftables or iptables), NetworkPolicy and node DNS implement
it today; every dataplane added later (BIRD, ENI addresses, eBPF maps) plugs in the
same way, with no dispatch by name in the agent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import lru_cache

from podnet.agent.cache import kind_of_key
from podnet.ipam.keys import BLOCKS
from podnet.services.metrics import SYNC_BUCKETS, _fmt
from podnet.store.objects import ObjectEvent


class Dataplane:
    """Base of the agent's dataplanes: `name` for logs and metrics, `kinds` the object kinds
    whose events concern it ("Block" for IPAM blocks). Subclasses override sync() and
    usually verify(); event-fed ones (which keep their own compact copy of objects)
    override on_event() and the reload pair too."""

    name = "dataplane"
    kinds: frozenset[str] = frozenset()

    def on_event(self, ev: ObjectEvent) -> bool:
        return kind_of(ev.key) in self.kinds

    def begin_reload(self) -> None:
        pass

    def end_reload(self, listed: frozenset[str] | set[str]) -> None:
        pass

    def sync(self, full: bool) -> str:
        raise NotImplementedError

    def verify(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


@lru_cache(maxsize=256)
def kind_of(key: str) -> str | None:
    """The kind a store key holds, as dataplanes name it: the object's kind, or "Block" for
    an IPAM block."""
    return "Block" if key.startswith(BLOCKS) else kind_of_key(key)


class DataplaneMetrics:
    """Per-dataplane counters under one naming scheme (Prometheus text format):

    podnet_dataplane_sync_duration_seconds{dataplane}   histogram of every sync
    podnet_dataplane_syncs_total{dataplane,result}      result: changed | unchanged | error
    podnet_dataplane_drift_repaired_total{dataplane}    resyncs that found drift and repaired it
    podnet_dataplane_last_sync_error{dataplane}         1 while the last sync failed
    """

    def __init__(self, names: Iterable[str]):
        self._lock = threading.Lock()
        self.names = tuple(names)
        self.buckets = SYNC_BUCKETS
        self._hist = {n: [0] * len(self.buckets) for n in self.names}
        self._count = dict.fromkeys(self.names, 0)
        self._sum = dict.fromkeys(self.names, 0.0)
        self.syncs = {(n, r): 0 for n in self.names for r in ("changed", "unchanged", "error")}
        self.drift = dict.fromkeys(self.names, 0)
        self.failing = dict.fromkeys(self.names, 0)

    def record_sync(self, name: str, seconds: float, result: str) -> None:
        with self._lock:
            self._count[name] += 1
            self._sum[name] += seconds
            for i, b in enumerate(self.buckets):
                if seconds <= b:
                    self._hist[name][i] += 1
            self.syncs[(name, result)] += 1
            self.failing[name] = int(result == "error")

    def record_drift(self, name: str) -> None:
        with self._lock:
            self.drift[name] += 1

    def render(self) -> str:
        h = "podnet_dataplane_sync_duration_seconds"
        with self._lock:
            lines = [f"# HELP {h} Time of one sync of a dataplane.", f"# TYPE {h} histogram"]
            for n in self.names:
                for b, c in zip(self.buckets, self._hist[n], strict=True):
                    lines.append(f'{h}_bucket{{dataplane="{n}",le="{_fmt(b)}"}} {c}')
                lines.append(f'{h}_bucket{{dataplane="{n}",le="+Inf"}} {self._count[n]}')
                lines.append(f'{h}_sum{{dataplane="{n}"}} {_fmt(self._sum[n])}')
                lines.append(f'{h}_count{{dataplane="{n}"}} {self._count[n]}')
            lines += ["# HELP podnet_dataplane_syncs_total Syncs of a dataplane by result.",
                      "# TYPE podnet_dataplane_syncs_total counter"]
            lines += [f'podnet_dataplane_syncs_total{{dataplane="{n}",result="{r}"}} {c}'
                      for (n, r), c in self.syncs.items()]
            lines += ["# HELP podnet_dataplane_drift_repaired_total Resyncs that found the kernel changed "
                      "behind podnet's back and repaired it.",
                      "# TYPE podnet_dataplane_drift_repaired_total counter"]
            lines += [f'podnet_dataplane_drift_repaired_total{{dataplane="{n}"}} {c}' for n, c in self.drift.items()]
            lines += ["# HELP podnet_dataplane_last_sync_error 1 while the last sync of a dataplane failed.",
                      "# TYPE podnet_dataplane_last_sync_error gauge"]
            lines += [f'podnet_dataplane_last_sync_error{{dataplane="{n}"}} {c}' for n, c in self.failing.items()]
        return "\n".join(lines) + "\n"
