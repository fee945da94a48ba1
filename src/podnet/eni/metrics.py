"""The ENI pool's metrics, read from the pool when scraped (agent/metrics.py yields them):

    podnet_eni_pool_ready                          1 once the node's pool runs
    podnet_eni_config_rejected                     1 while the last change of the node's
                                                   CloudNetwork is refused (its log says why)
    podnet_eni_addresses{state}                    idle | cooling | assigned pod addresses
    podnet_eni_enis_attached                       ENIs the pool holds pod addresses on
    podnet_eni_allocations_waiting                 ADDs waiting for the cloud now
    podnet_eni_cloud_calls_total{api,result}       EC2 calls: ok | throttled (RequestLimitExceeded,
                                                   or podnet's own token bucket) | error
    podnet_eni_cloud_errors_total{api,code}        the failed ones, by the cloud's error code
    podnet_eni_allocation_wait_seconds             from an ADD asking the pool to its address
                                                   (idle: microseconds; else the cloud's round)

The counters live in the pool's CloudClient and the histogram in the pool, so a test's or
the benchmark's pools in one process never mix theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from podnet.eni.agent import EniAgent
    from podnet.eni.cloud import CloudClient

THROTTLED = frozenset({"RequestLimitExceeded", "LocallyThrottled", "Throttling"})
# an idle address is handed out in microseconds; a cloud round (Assign) takes ~0.5 s, a new ENI
# (Create + Attach) seconds
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)


def allocation_wait() -> Histogram:
    """One pool's histogram (registry=None: the agent's collector yields it)."""
    return Histogram("podnet_eni_allocation_wait_seconds", "Time from an ADD asking the ENI pool for an address "
                     "to getting one.", buckets=WAIT_BUCKETS, registry=None)


def call_results(cloud: CloudClient) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(api, ok|throttled|error) -> count and (api, code) -> count of the client's calls.
    A call podnet's bucket held back never went out: it counts as throttled, not as a call."""
    with cloud._lock:
        calls, failures = dict(cloud.calls), dict(cloud.failures)
    results: dict[tuple[str, str], int] = {}
    errors: dict[tuple[str, str], int] = {}
    failed: dict[str, int] = {}
    for key, n in failures.items():
        api, _, code = key.partition(":")
        errors[(api, code)] = n
        result = "throttled" if code in THROTTLED else "error"
        results[(api, result)] = results.get((api, result), 0) + n
        if code != "LocallyThrottled":
            failed[api] = failed.get(api, 0) + n
    for api, n in calls.items():
        results[(api, "ok")] = n - failed.get(api, 0)
    return results, errors


class EniMetrics:
    def __init__(self, agent: EniAgent):
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        pool = self.agent.pool
        network = self.agent.network.name
        yield GaugeMetricFamily("podnet_eni_pool_ready", "1 once the node's ENI pool runs.", value=int(pool is not None))
        yield GaugeMetricFamily("podnet_eni_config_rejected", "1 while the last change of the node's CloudNetwork "
                                "is refused (a subnet or security group the cloud does not know).",
                                value=int(self.agent.config_problem is not None))
        if pool is None:
            return
        counts = pool.counts()
        addresses = GaugeMetricFamily("podnet_eni_addresses", "Pod addresses of the node's ENIs, by state.",
                                      labels=["network", "state"])
        for state, n in (("idle", counts.idle), ("cooling", counts.cooling), ("assigned", counts.assigned)):
            addresses.add_metric([network, state], n)
        yield addresses
        yield GaugeMetricFamily("podnet_eni_enis_attached", "ENIs attached to the node that hold its pod addresses.",
                                value=counts.enis)
        yield GaugeMetricFamily("podnet_eni_allocations_waiting", "ADDs waiting for an address from the cloud.",
                                value=counts.waiting)
        results, errors = call_results(pool.cloud)
        calls = CounterMetricFamily("podnet_eni_cloud_calls", "EC2 calls of the node's ENI pool by API and result "
                                    "(ok, throttled, error).", labels=["api", "result"])
        for (api, result), n in sorted(results.items()):
            calls.add_metric([api, result], n)
        yield calls
        failed = CounterMetricFamily("podnet_eni_cloud_errors", "Failed EC2 calls of the node's ENI pool by API and "
                                     "error code.", labels=["api", "code"])
        for (api, code), n in sorted(errors.items()):
            failed.add_metric([api, code], n)
        yield failed
        yield from pool.wait_seconds.collect()
