"""Service load balancing: pure compiler, nftables-map dataplane, iptables fallback.

    state = compile_services(services, slices, node_name, node_ips, ServiceConfig(service_cidrs=...))
    NftServiceApplier().apply(state)
"""

from podnet.services.compiler import compile_services
from podnet.services.model import Backend, Frontend, FrontendRule, HealthCheck, ServiceConfig, ServiceState

__all__ = [
    "Backend", "Frontend", "FrontendRule", "HealthCheck", "ServiceConfig", "ServiceState", "compile_services",
]
