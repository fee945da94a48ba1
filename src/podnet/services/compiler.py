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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

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


def _ipv4(value: str | None) -> str | None:
    if not value or value == "None":
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    return str(ip) if ip.version == 4 else None


def _ip_key(b: Backend) -> tuple[int, int]:
    return int(ipaddress.IPv4Address(b.ip)), b.port


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
    config = config or ServiceConfig()
    by_service: dict[tuple[str | None, str], list[EndpointSlice]] = defaultdict(list)
    for sl in slices:
        name = sl.service_name
        if name:
            by_service[(sl.namespace, name)].append(sl)
    pod_index = {(p.namespace or "default", p.name): p for p in pods}

    rules: dict[Frontend, FrontendRule] = {}
    health: dict[int, HealthCheck] = {}

    def add(rule: FrontendRule) -> None:
        # Two Services claiming one frontend: the first in (namespace, name) order keeps it.
        rules.setdefault(rule.frontend, rule)

    for svc in sorted(services, key=lambda s: (s.namespace or "", s.name)):
        spec = svc.spec
        if spec.type == "ExternalName" or spec.headless:
            continue
        svc_slices = by_service.get((svc.namespace, svc.name), [])
        cluster_ip = _ipv4(spec.cluster_ip) or next(
            (ip for ip in map(_ipv4, spec.cluster_ips or ()) if ip), None)
        external_local = spec.external_traffic_policy == "Local"
        internal_local = spec.internal_traffic_policy == "Local"
        affinity = None
        if spec.session_affinity == "ClientIP":
            cfg = spec.session_affinity_config
            affinity = cfg.client_ip.timeout_seconds if cfg is not None else 10800
        lb_ips = [ip for ing in svc.status.load_balancer.ingress if (ip := _ipv4(ing.ip))] \
            if spec.type == "LoadBalancer" else []
        ext_ips = [ip for x in spec.external_ips if (ip := _ipv4(x))]
        ranges = collapse_v4(spec.load_balancer_source_ranges)
        local_ready: set[str] = set()

        for sp in spec.ports:
            eps = _endpoints(svc, sp, svc_slices, node_name, pod_index)
            local_ready.update(e.ip for e in eps if e.local and e.ready)
            cluster = _usable(eps)
            local = _usable([e for e in eps if e.local])
            proto = sp.protocol.lower()
            label = f"{svc.namespace}/{svc.name}:{sp.name or ''}"
            none_verdict = "reject" if not cluster else "drop"

            def rule(ip: str | None, port: int, kind: FrontendKind, backends: list[Backend], masq: bool,
                     source_ranges: tuple[str, ...] = ()) -> FrontendRule:
                return FrontendRule(Frontend(ip, proto, port), label, kind, tuple(backends),  # noqa: B023
                                    none_verdict, masq, affinity, source_ranges)  # noqa: B023

            if cluster_ip:
                add(rule(cluster_ip, sp.port, "ClusterIP", local if internal_local else cluster, False))
            external = local if external_local else cluster
            for ip in ext_ips:
                add(rule(ip, sp.port, "ExternalIP", external, not external_local))
            for ip in lb_ips:
                add(rule(ip, sp.port, "LoadBalancer", external, not external_local, ranges))
            if sp.node_port and spec.type in ("NodePort", "LoadBalancer"):
                add(rule(None, sp.node_port, "NodePort", external, not external_local))

        if external_local and spec.health_check_node_port and spec.type in ("NodePort", "LoadBalancer"):
            hc = HealthCheck(spec.health_check_node_port, svc.namespace or "default", svc.name, len(local_ready))
            health.setdefault(hc.port, hc)

    return ServiceState(
        rules=tuple(sorted(rules.values(), key=lambda r: (r.frontend.ip or "", r.frontend.proto, r.frontend.port))),
        service_cidrs=collapse_v4(config.service_cidrs),
        node_ips=tuple(sorted({ip for x in node_ips if (ip := _ipv4(x))}, key=lambda s: ipaddress.IPv4Address(s))),
        health_checks=tuple(sorted(health.values())),
        masquerade_mark=config.masquerade_mark,
    )
