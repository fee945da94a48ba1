"""The Service proxy's sync metrics (prometheus_client), under podnet's names or kube-proxy's.

    metrics = ServiceMetrics()
    metrics.record_sync(seconds)                       # each sync that ran
    metrics.record_network_programming(slices, now)    # after a sync that applied changes
    metrics.observe_programming({slice: trigger_time}) # the same, for changes already known to be new
    metrics.collect(kube_proxy_names=True)             # the families (the agent registers a collector)

The values are kept once; the names are chosen when they are collected. podnet's
(default) and kube-proxy's, which dashboards built for kube-proxy look for
(`podnet agent --metrics-kube-proxy-names`):

    podnet_service_sync_duration_seconds                kubeproxy_sync_proxy_rules_duration_seconds
    podnet_service_sync_last_timestamp_seconds          kubeproxy_sync_proxy_rules_last_timestamp_seconds
    podnet_service_network_programming_duration_seconds kubeproxy_network_programming_duration_seconds
    podnet_service_sync_failures_total                  kubeproxy_sync_proxy_rules_nftables_sync_failures_total
                                                        (iptables proxy: ..._iptables_restore_failures_total)
    podnet_service_elements_changed_total               (podnet's own, under either choice)
    podnet_service_scheduler_fallbacks                  (podnet's own: Service ports balanced at random
                                                         because the backend cannot do their podnet.io/scheduler)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from podnet.metrics import renamed, text
from podnet.model.objects import EndpointSlice

# kube-proxy: metrics.ExponentialBuckets(0.001, 2, 15)
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy: 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30; podnet adds 5-200 ms below
# them: its target is a p99 under 100 ms, which kube-proxy's first bucket (0.25 s) cannot tell.
# Added buckets leave histogram_quantile() over kube-proxy's dashboards working.
PROGRAMMING_BUCKETS = tuple(
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2]
    + [0.25, 0.5] + [float(i) for i in range(1, 60)] + [60.0 + 5 * i for i in range(12)] + [120.0 + 30 * i for i in range(7)]
)
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# podnet's name -> kube-proxy's (None: kept as podnet's); failures depend on the proxy
KUBE_PROXY_NAMES = {
    "podnet_service_sync_duration_seconds": "kubeproxy_sync_proxy_rules_duration_seconds",
    "podnet_service_sync_last_timestamp_seconds": "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "podnet_service_network_programming_duration_seconds": "kubeproxy_network_programming_duration_seconds",
    "podnet_service_sync_failures": None,
    "podnet_service_elements_changed": None,
    "podnet_service_scheduler_fallbacks": None,
}
KUBE_PROXY_FAILURES = {"nftables": "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                       "iptables": "kubeproxy_sync_proxy_rules_iptables_restore_failures"}


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
    def __init__(self, proxy: str = "nftables"):
        self.proxy = proxy  # which failure counter kube-proxy's names use (the collector may say)
        self.sync_duration = Histogram("podnet_service_sync_duration_seconds",
                                       "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=None)
        self.programming = Histogram("podnet_service_network_programming_duration_seconds",
                                     "In Cluster Network Programming Latency in seconds",
                                     buckets=PROGRAMMING_BUCKETS, registry=None)
        self.last_sync = Gauge("podnet_service_sync_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=None)
        self.failures = Counter("podnet_service_sync_failures", "Failed kernel transactions of the Service proxy",
                                registry=None)
        self.elements_changed = Counter("podnet_service_elements_changed",
                                        "Map and set elements (nftables) or rules (iptables) added or removed",
                                        registry=None)
        self.scheduler_fallbacks = Gauge("podnet_service_scheduler_fallbacks",
                                         "Service ports balanced at random because this backend cannot do their "
                                         "podnet.io/scheduler (the agent's log says why)", registry=None)
        self._seen: dict[str, float] = {}  # slice -> trigger time already observed

    def record_sync(self, seconds: float, ok: bool = True, changed: int = 0, now: float | None = None) -> None:
        self.sync_duration.observe(seconds)
        if ok:
            self.last_sync.set(now if now is not None else time.time())
        else:
            self.failures.inc()
        if changed:
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

    # a prometheus_client collector
    def describe(self) -> list:
        return []

    def collect(self, kube_proxy_names: bool = False, proxy: str | None = None) -> Iterator[Metric]:
        for m in (self.sync_duration, self.programming, self.last_sync, self.failures, self.elements_changed,
                  self.scheduler_fallbacks):
            for family in m.collect():
                if kube_proxy_names:
                    name = KUBE_PROXY_NAMES.get(family.name)
                    if family.name == "podnet_service_sync_failures":
                        name = KUBE_PROXY_FAILURES.get(proxy or self.proxy, KUBE_PROXY_FAILURES["nftables"])
                    if name:
                        family = renamed(family, name)
                yield family

    def collector(self, kube_proxy_names: bool = False, proxy: str | None = None) -> ServiceMetricsCollector:
        return ServiceMetricsCollector(self, kube_proxy_names, proxy)

    def render(self, kube_proxy_names: bool = False, proxy: str | None = None) -> str:
        return text([self.collector(kube_proxy_names, proxy)])


class ServiceMetricsCollector:
    """The Service metrics under the chosen names, as a collector of its own."""

    def __init__(self, metrics: ServiceMetrics, kube_proxy_names: bool, proxy: str | None = None):
        self.metrics, self.kube_proxy_names, self.proxy = metrics, kube_proxy_names, proxy

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect(self.kube_proxy_names, self.proxy)
