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
import logging
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

log = logging.getLogger("podnet.services")

PROTOCOLS = ("TCP", "UDP", "SCTP")


def _valid_port(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def check_service(svc: Service) -> None:
    """Raise ValueError naming the field for what the dataplane cannot take. Objects
    from the store were validated already; this guards what reaches nftables text
    (numbers must be numbers) whatever produced the object."""
    seen: dict[tuple[str, int], int] = {}
    for i, sp in enumerate(svc.spec.ports):
        if sp.protocol not in PROTOCOLS:
            raise ValueError(f"spec.ports[{i}].protocol: {sp.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if not _valid_port(sp.port):
            raise ValueError(f"spec.ports[{i}].port: {sp.port!r} is not a port number (1-65535)")
        if sp.node_port is not None and not _valid_port(sp.node_port):
            raise ValueError(f"spec.ports[{i}].nodePort: {sp.node_port!r} is not a port number (1-65535)")
        if isinstance(sp.target_port, int) and not _valid_port(sp.target_port):
            raise ValueError(f"spec.ports[{i}].targetPort: {sp.target_port!r} is not a port number (1-65535)")
        first = seen.setdefault((sp.protocol, sp.port), i)
        if first != i:
            raise ValueError(f"spec.ports[{i}]: duplicate port {sp.port}/{sp.protocol} (also spec.ports[{first}])")
    hc = svc.spec.health_check_node_port
    if hc is not None and not _valid_port(hc):
        raise ValueError(f"spec.healthCheckNodePort: {hc!r} is not a port number (1-65535)")


def _svc_ref(svc: Service) -> str:
    return f"{svc.namespace or 'default'}/{svc.name}"


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


def balanced_cidrs(config: ServiceConfig) -> tuple[str, ...]:
    """The service CIDRs less the addresses the node's DNS server answers itself."""
    nets = [ipaddress.ip_network(c) for c in collapse_v4(config.service_cidrs)]
    for addr in config.local_dns:
        host = ipaddress.ip_network(f"{addr}/32")
        nets = [part for n in nets
                for part in (n.address_exclude(host) if host.subnet_of(n) else [n])]  # type: ignore[arg-type]
    return tuple(str(n) for n in ipaddress.collapse_addresses(nets))


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


_PER_ENDPOINT = -1  # the port depends on the endpoint's Pod (named targetPort, slice without ports)


def _slice_port(sp: ServicePort, slice_: EndpointSlice) -> int | None:
    """The port a slice gives a ServicePort: a number, None (not a port of this
    slice), or _PER_ENDPOINT."""
    if slice_.ports:
        for p in slice_.ports:
            if (p.name or None) == (sp.name or None) and p.protocol == sp.protocol:
                return p.port
        return None  # the slice lists its ports and this one is not among them
    if isinstance(sp.target_port, int):
        return sp.target_port
    return _PER_ENDPOINT if isinstance(sp.target_port, str) else None


def _pod_port(sp: ServicePort, target_ref: tuple[str, str] | None, pods: dict[tuple[str, str], Pod]) -> int | None:
    pod = pods.get(target_ref) if target_ref is not None else None
    return pod.named_port(str(sp.target_port), sp.protocol) if pod is not None else None


def _endpoints(
    svc: Service, sp: ServicePort, slices: list[EndpointSlice], node_name: str, pods: dict[tuple[str, str], Pod]
) -> list[_Endpoint]:
    publish_all = svc.spec.publish_not_ready_addresses
    seen: dict[tuple[str, int], _Endpoint] = {}
    for sl in slices:
        if sl.address_type != "IPv4":
            continue
        slice_port = _slice_port(sp, sl)
        if slice_port is None or (slice_port != _PER_ENDPOINT and not _valid_port(slice_port)):
            continue
        for ep in sl.endpoints:
            port: int | None = slice_port
            if slice_port == _PER_ENDPOINT:
                ref = None
                if ep.target_ref is not None and ep.target_ref.name:
                    ref = (ep.target_ref.namespace or sl.namespace or "default", ep.target_ref.name)
                port = _pod_port(sp, ref, pods)
                if port is None or not _valid_port(port):
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
    svc: Service, svc_slices: list[EndpointSlice], node_name: str, pods: dict[tuple[str, str], Pod],
    service_cidrs: tuple[str, ...] = (), local_dns: tuple[str, ...] = (),
) -> tuple[list[FrontendRule], HealthCheck | None]:
    """The frontends of one Service (and its health check), in port order.

    Raises ValueError for a Service the dataplane cannot take (see check_service)."""
    spec = svc.spec
    out: list[FrontendRule] = []
    if spec.type == "ExternalName" or spec.headless:
        return out, None
    check_service(svc)
    cluster_ip = _ipv4(spec.cluster_ip) or next((ip for ip in map(_ipv4, spec.cluster_ips or ()) if ip), None)
    if cluster_ip in local_dns:
        log.debug("services: %s: clusterIP %s is answered by this node's DNS server", _svc_ref(svc), cluster_ip)
        cluster_ip = None
    elif cluster_ip and service_cidrs and not _in_cidrs(cluster_ip, service_cidrs):
        log.warning("services: %s: clusterIP %s is outside the service CIDRs %s; its ClusterIP frontends are "
                    "ignored", _svc_ref(svc), cluster_ip, ",".join(service_cidrs))
        cluster_ip = None
    for sl in svc_slices:
        if sl.ports and sl.address_type == "IPv4" and all(_slice_port(sp, sl) is None for sp in spec.ports):
            log.warning("services: %s: EndpointSlice %s has no port matching the Service's ports (name and "
                        "protocol); it is ignored", _svc_ref(svc), sl.name)
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


@lru_cache(maxsize=1 << 16)
def _in_cidrs(ip: str, cidrs: tuple[str, ...]) -> bool:
    addr = ipaddress.IPv4Address(ip)
    return any(addr in ipaddress.IPv4Network(c) for c in cidrs)


def _compile_or_skip(svc: Service, svc_slices: list[EndpointSlice], node_name: str,
                     pods: dict[tuple[str, str], Pod], service_cidrs: tuple[str, ...],
                     local_dns: tuple[str, ...] = (),
                     ) -> tuple[list[FrontendRule], HealthCheck | None, str | None]:
    """One Service; a Service that cannot be compiled is skipped with a logged
    reason (the third item) so that it never blocks the others."""
    try:
        rules, hc = _compile_service(svc, svc_slices, node_name, pods, service_cidrs, local_dns)
        return rules, hc, None
    except Exception as e:  # one bad object must not stop the sync of the rest
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        log.warning("services: skipping Service %s: %s", _svc_ref(svc), reason)
        return [], None, reason


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
        service_cidrs=balanced_cidrs(config),
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
    config = config or ServiceConfig()
    cidrs = balanced_cidrs(config)
    return _assemble((_compile_or_skip(svc, by_service.get((svc.namespace, svc.name), []), node_name, pod_index,
                                       cidrs, config.local_dns)[:2]
                      for svc in _ordered(services)), node_ips, config)


Key = tuple[str, str]  # (namespace, name) of a Service


def _key(namespace: str | None, name: str) -> Key:
    return (namespace or "default", name)


class ServiceCompiler:
    """The same result as compile_services, maintained from watch events so that a
    sync costs in proportion to what changed.

        c = ServiceCompiler(node_name, node_ips, config)
        c.set_service(svc); c.set_slice(sl); c.delete_service(ns, name); c.delete_slice(ns, name)
        state = c.state()      # recompiles only the Services touched since the last call

    Unchanged Services keep their very FrontendRule objects, so the applier's
    comparison of two states is identity checks. The order of `state().rules` is
    the order frontends first appeared (states compare by frontend, not order).
    `compile(services, slices)` feeds whole lists instead (diffed by identity).
    """

    def __init__(self, node_name: str, node_ips: Iterable[str] = (), config: ServiceConfig | None = None):
        self.node_name = node_name
        self.config = config or ServiceConfig()
        self._node_ips = tuple(sorted({ip for x in node_ips if (ip := _ipv4(x))}, key=socket.inet_aton))
        self._cidrs = balanced_cidrs(self.config)
        self._services: dict[Key, Service] = {}
        self._slices: dict[Key, dict[str, EndpointSlice]] = {}  # by owning Service
        self._slice_owner: dict[Key, Key] = {}  # (namespace, slice name) -> Service
        self._pods: dict[tuple[str, str], Pod] = {}
        self._out: dict[Key, tuple[list[FrontendRule], HealthCheck | None]] = {}
        self._claims: dict[Frontend, set[Key]] = {}
        self._rules: dict[Frontend, FrontendRule] = {}
        self._health: dict[Key, HealthCheck] = {}
        self._dirty: set[Key] = set()
        self._state: ServiceState | None = None
        self.recompiled = 0  # Services compiled by the last state()
        self.skipped: dict[Key, str] = {}  # Services that could not be compiled, and why

    # -- events

    def set_service(self, svc: Service) -> None:
        k = _key(svc.namespace, svc.name)
        if self._services.get(k) is not svc:
            self._services[k] = svc
            self._dirty.add(k)

    def delete_service(self, namespace: str | None, name: str) -> None:
        k = _key(namespace, name)
        if self._services.pop(k, None) is not None:
            self._dirty.add(k)

    def set_slice(self, sl: EndpointSlice) -> None:
        sk = _key(sl.namespace, sl.name)
        owner = _key(sl.namespace, sl.service_name) if sl.service_name else None
        old_owner = self._slice_owner.get(sk)
        if old_owner is not None and old_owner != owner:
            self._drop_slice(sk, old_owner)
        if owner is None:
            return
        held = self._slices.setdefault(owner, {})
        if held.get(sl.name) is not sl:
            held[sl.name] = sl
            self._slice_owner[sk] = owner
            self._dirty.add(owner)

    def delete_slice(self, namespace: str | None, name: str) -> None:
        sk = _key(namespace, name)
        owner = self._slice_owner.get(sk)
        if owner is not None:
            self._drop_slice(sk, owner)

    def _drop_slice(self, sk: Key, owner: Key) -> None:
        self._slice_owner.pop(sk, None)
        held = self._slices.get(owner, {})
        if held.pop(sk[1], None) is not None:
            self._dirty.add(owner)
        if not held:
            self._slices.pop(owner, None)

    def set_pods(self, pods: Iterable[Pod]) -> None:
        """Pods only matter for named targetPorts that slices leave unresolved."""
        self._pods = {(p.namespace or "default", p.name): p for p in pods}
        self._dirty.update(k for k, svc in self._services.items()
                           if any(isinstance(p.target_port, str) for p in svc.spec.ports))

    def compile(self, services: Iterable[Service], slices: Iterable[EndpointSlice],
                pods: Iterable[Pod] | None = None) -> ServiceState:
        """Feed whole lists (unchanged objects are recognised by identity or resourceVersion)."""
        seen: set[Key] = set()
        for svc in services:
            k = _key(svc.namespace, svc.name)
            seen.add(k)
            old = self._services.get(k)
            if old is not svc and not _same_version(old, svc):
                self.set_service(svc)
        for k in [k for k in self._services if k not in seen]:
            self.delete_service(*k)
        seen_slices: set[Key] = set()
        for sl in slices:
            sk = _key(sl.namespace, sl.name)
            seen_slices.add(sk)
            owner = self._slice_owner.get(sk)
            old = self._slices.get(owner, {}).get(sl.name) if owner else None
            if old is not sl and not (_same_version(old, sl) and owner == _key(sl.namespace, sl.service_name or "")):
                self.set_slice(sl)
        for sk in [sk for sk in self._slice_owner if sk not in seen_slices]:
            self.delete_slice(*sk)
        if pods is not None:
            self.set_pods(pods)
        return self.state()

    # -- the state

    def state(self) -> ServiceState:
        self.recompiled = 0
        if not self._dirty and self._state is not None:
            return self._state
        touched: set[Frontend] = set()
        for k in self._dirty:
            old_rules, _ = self._out.pop(k, ([], None))
            self._health.pop(k, None)
            for r in old_rules:
                claims = self._claims.get(r.frontend)
                if claims is not None:
                    claims.discard(k)
                touched.add(r.frontend)
            svc = self._services.get(k)
            if svc is None:
                self.skipped.pop(k, None)
                continue
            rules, hc, problem = _compile_or_skip(svc, list(self._slices.get(k, {}).values()), self.node_name,
                                                  self._pods, self._cidrs, self.config.local_dns)
            if problem is None:
                self.skipped.pop(k, None)
            else:
                self.skipped[k] = problem
            self.recompiled += 1
            self._out[k] = (rules, hc)
            if hc is not None:
                self._health[k] = hc
            for r in rules:
                self._claims.setdefault(r.frontend, set()).add(k)
                touched.add(r.frontend)
        self._dirty.clear()
        for fe in touched:
            claims = self._claims.get(fe)
            if not claims:
                self._claims.pop(fe, None)
                self._rules.pop(fe, None)
                continue
            owner = min(claims)  # two Services on one frontend: the first in (namespace, name) order
            rule = next(r for r in self._out[owner][0] if r.frontend == fe)
            if self._rules.get(fe) is not rule:
                self._rules.pop(fe, None)  # re-inserted: the dict keeps first-appearance order otherwise
                self._rules[fe] = rule
        health: dict[int, HealthCheck] = {}
        for k in sorted(self._health):
            health.setdefault(self._health[k].port, self._health[k])
        self._state = ServiceState.from_frontends(
            self._rules, base=self._state, changed=frozenset(touched),
            service_cidrs=self._cidrs, node_ips=self._node_ips,
            health_checks=tuple(sorted(health.values())), masquerade_mark=self.config.masquerade_mark)
        return self._state


def _same_version(old: Service | EndpointSlice | None, new: Service | EndpointSlice) -> bool:
    rv = new.metadata.resource_version
    return old is not None and rv is not None and old.metadata.resource_version == rv
