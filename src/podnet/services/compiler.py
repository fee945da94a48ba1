"""Services + EndpointSlices -> the desired Service dataplane of one node (pure).

Follows kube-proxy's semantics (pkg/proxy: CategorizeEndpoints, the nftables and
iptables proxiers):

- endpoints: the ready ones; if none is ready, the serving-and-terminating ones.
  Under a Local traffic policy the same choice is made among this node's
  endpoints only.
- a port's endpoints come from the EndpointSlices labelled with the Service's
  name, matching the ServicePort by name and protocol; the slice carries the
  resolved (possibly named) targetPort. A slice without port information falls
  back to a numeric targetPort, or to the Pod's named container port.
- no endpoints at all: reject. endpoints, but none allowed by a Local policy:
  drop. NodePort/externalIP/LoadBalancer traffic under externalTrafficPolicy
  Cluster is masqueraded; under Local it keeps the client address.
- only IPv4: the dataplane table is `ip` family.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from podnet.model.objects import EndpointSlice, Pod, Service, ServicePort
from podnet.services.model import (
    Backend,
    Frontend,
    FrontendKind,
    FrontendRule,
    HealthCheck,
    ServiceConfig,
    ServiceState,
)


@dataclass(frozen=True)
class _Endpoint:
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    local: bool


@lru_cache(maxsize=1 << 20)
def _ipv4(value: str | None) -> str | None:
    """The canonical text of an IPv4 address, None for anything else (cached: hot at scale)."""
    if not value or value == "None" or ":" in value:
        return None
    try:
        return socket.inet_ntoa(socket.inet_pton(socket.AF_INET, value))
    except OSError:
        return None


def _ip_key(b: Backend) -> tuple[bytes, int]:
    return socket.inet_aton(b.ip), b.port  # big-endian bytes sort numerically


def collapse_v4(cidrs: Iterable[str]) -> tuple[str, ...]:
    """IPv4 CIDRs merged so that none overlaps (nftables interval sets refuse overlaps)."""
    nets = []
    for c in cidrs:
        try:
            n = ipaddress.ip_network(c.strip(), strict=False)
        except ValueError:
            continue
        if n.version == 4:
            nets.append(n)
    return tuple(str(n) for n in ipaddress.collapse_addresses(nets))


def _endpoint_port(
    sp: ServicePort, slice_: EndpointSlice, target_ref: tuple[str, str] | None, pods: dict[tuple[str, str], Pod]
) -> int | None:
    if slice_.ports:
        for p in slice_.ports:
            if (p.name or None) == (sp.name or None) and p.protocol == sp.protocol:
                return p.port
        return None  # the slice lists its ports and this one is not among them
    if isinstance(sp.target_port, int):
        return sp.target_port
    if isinstance(sp.target_port, str) and target_ref is not None:
        pod = pods.get(target_ref)
        if pod is not None:
            return pod.named_port(sp.target_port, sp.protocol)
    return None


def _endpoints(
    svc: Service, sp: ServicePort, slices: list[EndpointSlice], node_name: str, pods: dict[tuple[str, str], Pod]
) -> list[_Endpoint]:
    publish_all = svc.spec.publish_not_ready_addresses
    seen: dict[tuple[str, int], _Endpoint] = {}
    for sl in slices:
        if sl.address_type != "IPv4":
            continue
        for ep in sl.endpoints:
            ref = None
            if ep.target_ref is not None and ep.target_ref.name:
                ref = (ep.target_ref.namespace or sl.namespace or "default", ep.target_ref.name)
            port = _endpoint_port(sp, sl, ref, pods)
            if port is None:
                continue
            ip = _ipv4(ep.addresses[0])  # upstream: consumers use the first address only
            if ip is None:
                continue
            c = ep.conditions
            e = _Endpoint(ip, port, c.is_ready or publish_all, c.is_serving or publish_all, c.is_terminating,
                          ep.node_name == node_name)
            old = seen.get((ip, port))
            if old is None or (e.ready and not old.ready):
                seen[(ip, port)] = e
    return list(seen.values())


def _usable(eps: list[_Endpoint]) -> list[Backend]:
    """Ready endpoints; if there are none, serving-and-terminating ones (as kube-proxy)."""
    chosen = [e for e in eps if e.ready]
    if not chosen:
        chosen = [e for e in eps if e.serving and e.terminating]
    return sorted((Backend(e.ip, e.port) for e in chosen), key=_ip_key)


def _compile_service(
    svc: Service, svc_slices: list[EndpointSlice], node_name: str, pods: dict[tuple[str, str], Pod]
) -> tuple[list[FrontendRule], HealthCheck | None]:
    """The frontends of one Service (and its health check), in port order."""
    spec = svc.spec
    out: list[FrontendRule] = []
    if spec.type == "ExternalName" or spec.headless:
        return out, None
    cluster_ip = _ipv4(spec.cluster_ip) or next((ip for ip in map(_ipv4, spec.cluster_ips or ()) if ip), None)
    external_local = spec.external_traffic_policy == "Local"
    internal_local = spec.internal_traffic_policy == "Local"
    affinity = None
    if spec.session_affinity == "ClientIP":
        cfg = spec.session_affinity_config
        affinity = cfg.client_ip.timeout_seconds if cfg is not None else 10800
    lb_ips = [ip for ing in svc.status.load_balancer.ingress if (ip := _ipv4(ing.ip))] \
        if spec.type == "LoadBalancer" else []
    ext_ips = [ip for x in spec.external_ips if (ip := _ipv4(x))]
    ranges = collapse_v4(spec.load_balancer_source_ranges) if spec.load_balancer_source_ranges else ()
    local_ready: set[str] = set()
    for sp in spec.ports:
        eps = _endpoints(svc, sp, svc_slices, node_name, pods)
        local_ready.update(e.ip for e in eps if e.local and e.ready)
        cluster = _usable(eps)
        local = _usable([e for e in eps if e.local]) if (external_local or internal_local) else []
        proto = sp.protocol.lower()
        label = f"{svc.namespace}/{svc.name}:{sp.name or ''}"
        none_verdict = "reject" if not cluster else "drop"

        def rule(ip: str | None, port: int, kind: FrontendKind, backends: list[Backend], masq: bool,
                 source_ranges: tuple[str, ...] = ()) -> FrontendRule:
            return FrontendRule(Frontend(ip, proto, port), label, kind, tuple(backends),  # noqa: B023
                                none_verdict, masq, affinity, source_ranges)  # noqa: B023

        if cluster_ip:
            out.append(rule(cluster_ip, sp.port, "ClusterIP", local if internal_local else cluster, False))
        external = local if external_local else cluster
        for ip in ext_ips:
            out.append(rule(ip, sp.port, "ExternalIP", external, not external_local))
        for ip in lb_ips:
            out.append(rule(ip, sp.port, "LoadBalancer", external, not external_local, ranges))
        if sp.node_port and spec.type in ("NodePort", "LoadBalancer"):
            out.append(rule(None, sp.node_port, "NodePort", external, not external_local))
    hc = None
    if external_local and spec.health_check_node_port and spec.type in ("NodePort", "LoadBalancer"):
        hc = HealthCheck(spec.health_check_node_port, svc.namespace or "default", svc.name, len(local_ready))
    return out, hc


def _slices_by_service(slices: Iterable[EndpointSlice]) -> dict[tuple[str | None, str], list[EndpointSlice]]:
    by_service: dict[tuple[str | None, str], list[EndpointSlice]] = defaultdict(list)
    for sl in slices:
        name = sl.service_name
        if name:
            by_service[(sl.namespace, name)].append(sl)
    return by_service


def _assemble(per_service: Iterable[tuple[list[FrontendRule], HealthCheck | None]], node_ips: Iterable[str],
              config: ServiceConfig) -> ServiceState:
    rules: dict[Frontend, FrontendRule] = {}
    health: dict[int, HealthCheck] = {}
    for svc_rules, hc in per_service:
        for r in svc_rules:
            # Two Services claiming one frontend: the first in (namespace, name) order keeps it.
            rules.setdefault(r.frontend, r)
        if hc is not None:
            health.setdefault(hc.port, hc)
    return ServiceState(
        rules=tuple(rules.values()),  # Services in (namespace, name) order, each in port order
        service_cidrs=collapse_v4(config.service_cidrs),
        node_ips=tuple(sorted({ip for x in node_ips if (ip := _ipv4(x))}, key=socket.inet_aton)),
        health_checks=tuple(sorted(health.values())),
        masquerade_mark=config.masquerade_mark,
    )


def _ordered(services: Iterable[Service]) -> list[Service]:
    return sorted(services, key=lambda s: (s.namespace or "", s.name))  # linear when already sorted


def compile_services(
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    node_name: str,
    node_ips: Iterable[str] = (),
    config: ServiceConfig | None = None,
    pods: Iterable[Pod] = (),
) -> ServiceState:
    """The desired Service dataplane of node `node_name`.

    node_ips: this node's addresses (NodePort session affinity is recorded for
    traffic to these). pods: only needed to resolve a named targetPort for
    slices that carry no port information.
    """
    by_service = _slices_by_service(slices)
    pod_index = {(p.namespace or "default", p.name): p for p in pods}
    return _assemble((_compile_service(svc, by_service.get((svc.namespace, svc.name), []), node_name, pod_index)
                      for svc in _ordered(services)), node_ips, config or ServiceConfig())


def _version(obj: Service | EndpointSlice) -> object:
    return obj.metadata.resource_version or id(obj)


class ServiceCompiler:
    """compile_services with a memo per Service: a sync recompiles only the Services
    whose object or EndpointSlices changed (by resourceVersion, or identity for
    objects not read from a store) and reuses the very same FrontendRule objects
    for the rest, so that the applier's comparison is mostly identity checks.
    """

    def __init__(self, node_name: str, node_ips: Iterable[str] = (), config: ServiceConfig | None = None):
        self.node_name = node_name
        self.node_ips = tuple(node_ips)
        self.config = config or ServiceConfig()
        self._memo: dict[tuple[str | None, str], tuple[tuple, tuple, tuple[list[FrontendRule], HealthCheck | None]]] = {}
        self.recompiled = 0  # Services compiled by the last call (the rest came from the memo)

    def compile(self, services: Iterable[Service], slices: Iterable[EndpointSlice],
                pods: Iterable[Pod] = ()) -> ServiceState:
        by_service = _slices_by_service(slices)
        pod_index = {(p.namespace or "default", p.name): p for p in pods}
        memo: dict = {}
        results = []
        self.recompiled = 0
        for svc in _ordered(services):
            key = (svc.namespace, svc.name)
            svc_slices = by_service.get(key, [])
            fingerprint = (_version(svc), *map(_version, svc_slices))
            held = self._memo.get(key)
            # named targetPorts resolved through Pods depend on more than the fingerprint
            if held is not None and held[0] == fingerprint and not (pod_index and held[1]):
                result = held[2]
            else:
                result = _compile_service(svc, svc_slices, self.node_name, pod_index)
                self.recompiled += 1
            named = tuple(p.target_port for p in svc.spec.ports if isinstance(p.target_port, str))
            memo[key] = (fingerprint, named, result, svc, svc_slices)  # objects kept: ids stay unique
            results.append(result)
        self._memo = {k: (v[0], v[1], v[2]) for k, v in memo.items()}
        self._alive = [(v[3], v[4]) for v in memo.values()]
        return _assemble(results, self.node_ips, self.config)
