"""The agent's Service dataplane: compiler, nftables applier, health checks, metrics."""

from __future__ import annotations

from collections.abc import Iterable

from podnet.model.objects import EndpointSlice, Service
from podnet.services.applier import NftServiceApplier
from podnet.services.compiler import ServiceCompiler
from podnet.services.health import HealthCheckServer
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import ServiceConfig


class ServiceDataplane:
    def __init__(self, node: str, node_ip: str, service_cidrs: tuple[str, ...], local_dns: tuple[str, ...] = ()):
        self.metrics = ServiceMetrics()
        self.compiler = ServiceCompiler(node, [node_ip], ServiceConfig(service_cidrs=service_cidrs,
                                                                       local_dns=local_dns))
        self.applier = NftServiceApplier(metrics=self.metrics)
        self.health = HealthCheckServer()

    def sync(self, services: Iterable[Service], slices: Iterable[EndpointSlice], full: bool) -> str:
        slices = list(slices)
        state = self.compiler.compile(services, slices)
        result = self.applier.apply(state, resync=full)
        self.health.sync(state.health_checks)
        self.metrics.record_network_programming(slices)
        if result.errors:
            raise RuntimeError("; ".join(result.errors))
        if not result.sent:
            return ""
        how = f"rebuilt ({result.reason})" if result.full else "updated"
        return (f"table {how}: +{result.added} -{result.removed} elements"
                + (f", {result.stale_flows} stale UDP flows cleared" if result.stale_flows else ""))

    def close(self) -> None:
        self.health.close()  # the table stays: a restart must not interrupt Services
