"""The kube-proxy sync metrics, in Prometheus text exposition format (no dependency).

    metrics = ServiceMetrics()
    metrics.record_sync(seconds)                       # each sync that ran
    metrics.record_network_programming(slices, now)    # after a sync that applied changes
    metrics.observe_programming({slice: trigger_time}) # the same, for changes already known to be new
    text = metrics.render()                            # serve as text/plain; version=0.0.4
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from podnet.model.objects import EndpointSlice

# kube-proxy: metrics.ExponentialBuckets(0.001, 2, 15)
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy: 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30
PROGRAMMING_BUCKETS = tuple(
    [0.25, 0.5] + [float(i) for i in range(1, 60)] + [60.0 + 5 * i for i in range(12)] + [120.0 + 30 * i for i in range(7)]
)
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
PREFIX = ""  # pass "kubeproxy_" for the names dashboards built for kube-proxy look for


def _fmt(v: float) -> str:
    return "+Inf" if math.isinf(v) else repr(float(v))


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += value
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1

    def render(self) -> str:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            for b, c in zip(self.buckets, self.counts, strict=True):
                lines.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {c}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
            lines.append(f"{self.name}_sum {_fmt(self.sum)}")
            lines.append(f"{self.name}_count {self.count}")
        return "\n".join(lines) + "\n"


class Gauge:
    def __init__(self, name: str, help_text: str, kind: str = "gauge"):
        self.name, self.help, self.kind = name, help_text, kind
        self.value = 0.0

    def set(self, v: float) -> None:
        self.value = v

    def inc(self, v: float = 1.0) -> None:
        self.value += v

    def render(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n{self.name} {_fmt(self.value)}\n"


def trigger_times(slices: Iterable[EndpointSlice]) -> list[float]:
    """The last-change-trigger-time annotations (as epoch seconds) of EndpointSlices."""
    out = []
    for sl in slices:
        value = sl.metadata.annotations.get(TRIGGER_ANNOTATION)
        if not value:
            continue
        try:
            out.append(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            continue
    return out


class ServiceMetrics:
    def __init__(self, prefix: str = PREFIX):
        self.sync_duration = Histogram(
            f"{prefix}sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS)
        self.programming = Histogram(
            f"{prefix}network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds", PROGRAMMING_BUCKETS)
        self.last_sync = Gauge(f"{prefix}sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced")
        self.failures = Gauge(f"{prefix}sync_proxy_rules_nftables_failures_total",
                              "Failed nftables transactions", "counter")
        self.elements_changed = Gauge(f"{prefix}sync_proxy_rules_elements_changed_total",
                                      "Map and set elements added or removed", "counter")
        self._seen: dict[str, float] = {}  # slice -> trigger time already observed

    def record_sync(self, seconds: float, ok: bool = True, changed: int = 0, now: float | None = None) -> None:
        self.sync_duration.observe(seconds)
        if ok:
            self.last_sync.set(now if now is not None else time.time())
        else:
            self.failures.inc()
        self.elements_changed.inc(changed)

    def record_network_programming(self, slices: Iterable[EndpointSlice], now: float | None = None) -> int:
        """Observe now - trigger time once per new EndpointSlice change; returns how many."""
        now = now if now is not None else time.time()
        n = 0
        for sl in slices:
            times = trigger_times([sl])
            if not times:
                continue
            key = f"{sl.namespace}/{sl.name}"
            if self._seen.get(key) == times[0]:
                continue
            self._seen[key] = times[0]
            self.programming.observe(max(0.0, now - times[0]))
            n += 1
        return n

    def observe_programming(self, triggers: Mapping[str, float], now: float | None = None) -> int:
        """Observe now - trigger time for each EndpointSlice change just programmed
        (slice -> its last-change-trigger-time, as epoch seconds); returns how many.
        The caller passes each change once: only slices whose trigger time changed."""
        if not triggers:
            return 0
        now = now if now is not None else time.time()
        for t in triggers.values():
            self.programming.observe(max(0.0, now - t))
        return len(triggers)

    def render(self) -> str:
        return "".join(m.render() for m in (self.sync_duration, self.programming, self.last_sync,
                                               self.failures, self.elements_changed))
