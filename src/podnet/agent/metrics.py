"""The agent's metrics: one collector over whatever of the agent runs at scrape time.

The agent registers it in the process's registry (podnet.metrics.REGISTRY), beside
the process collectors and the process-wide CNI, IPAM and conntrack metrics, and
serves them on its metrics listener with /healthz and /readyz (podnet.metrics). The
parts are read when scraped, so a part built later (the dataplanes after the Node is
known, the DNS server) shows from the next scrape on:

    podnet_agent_ready                     1 when /readyz answers 200
    podnet_dataplane_*{dataplane}          every dataplane's syncs (agent/contract.py)
    podnet_service_* or kubeproxy_*        the Service proxy's syncs (services/metrics.py)
    podnet_bgp_*                           BIRD's sessions and routes (agent/bgp.py)
    podnet_dns_*                           the in-process node DNS server (dns/server/metrics.py)
    podnet_eni_*                           the node's ENI pool, on a node a CloudNetwork selects
                                           (eni/metrics.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from podnet.agent.daemon import Agent


class AgentMetrics:
    """A prometheus_client collector over one agent."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def describe(self) -> list:
        return []  # what it yields depends on what runs: no names to reserve

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        yield GaugeMetricFamily("podnet_agent_ready", "1 when the agent is ready: the node is programmed, no "
                                "dataplane's last sync failed and BGP sessions are Established.",
                                value=int(a.not_ready() is None))
        if a.metrics is not None:
            yield from a.metrics.collect()
        if a.services is not None:
            yield from a.services.metrics.collect(kube_proxy_names=a.cfg.metrics_kube_proxy_names,
                                                  proxy=a.cfg.service_proxy)
        if a.bgp is not None:
            yield from a.bgp.metric_families()
        if a.dns is not None:
            from podnet.dns.server.metrics import DnsMetrics

            yield from DnsMetrics(a.dns).collect()
        if a.eni is not None:
            from podnet.eni.metrics import EniMetrics

            yield from EniMetrics(a.eni).collect()
