"""What the endpoint controller does for the lab's Services: the EndpointSlices of one
Service, planned against the slices it has now.

EndpointSlices for Services with a selector: one endpoint per running pod that
matches, ready, with its named target ports resolved for that pod. Pods whose
named ports resolve differently land in different slices, as upstream. A pod with
`spec.hostname` whose `spec.subdomain` names the Service gives its endpoint that
hostname (the DNS name `<hostname>.<service>.<ns>.svc.<zone>`), as upstream. Each
endpoint carries its pod's nodeName and the zone of that node.

A slice holds at most 1000 endpoints (the API server's limit). As upstream's
reconciler, `plan_slices` keeps an endpoint in the slice that already holds it,
fills slices with room before it makes new ones, deletes slices left empty (a
Service with no endpoints keeps one empty placeholder slice), and leaves untouched
every slice whose content would not change, so one pod's change rewrites one slice.
A slice it writes carries `endpoints.kubernetes.io/last-change-trigger-time`: when
the change it reflects was seen.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from podnet.model.objects import (
    MAX_SLICE_ENDPOINTS,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    Node,
    ObjectMeta,
    ObjectReference,
    Pod,
    Service,
    ServicePort,
)

MANAGED_BY = "endpointslice-controller.k8s.io"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"

# One slice's ports: (name, protocol, port, appProtocol) for each resolved Service port.
PortKey = tuple[tuple[str | None, str, int, str | None], ...]
ZoneOf = Callable[[str], str | None]


def trigger_time(when: float) -> str:
    """RFC 3339 in UTC, as upstream writes the annotation."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def controls(svc: Service) -> bool:
    """Whether the controller makes slices for this Service (it has a selector and is not
    an ExternalName)."""
    return bool(svc.spec.selector) and svc.spec.type != "ExternalName"


def serves(pod: Pod) -> bool:
    """A pod that can be an endpoint: running, with an IPv4 address."""
    return (pod.status.phase == "Running" and bool(pod.status.pod_ip)
            and ipaddress.ip_address(pod.status.pod_ip).version == 4)  # type: ignore[arg-type]


def selects(svc: Service, pod: Pod | None) -> bool:
    """Whether the Service's selector picks this pod (any pod, running or not)."""
    if pod is None or not controls(svc) or pod.namespace != svc.namespace:
        return False
    return all(pod.labels.get(k) == v for k, v in (svc.spec.selector or {}).items())


def managed_service(s: EndpointSlice) -> str | None:
    """The Service a slice belongs to, if this controller manages it."""
    return s.service_name if s.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY else None


def _resolve(svc_port: ServicePort, pod: Pod) -> int | None:
    target = svc_port.target_port
    if isinstance(target, int):
        return target
    if isinstance(target, str):
        return pod.named_port(target, svc_port.protocol)
    return svc_port.port


def _endpoint(svc: Service, pod: Pod, zone_of: ZoneOf) -> Endpoint:
    return Endpoint(
        addresses=[pod.status.pod_ip],  # type: ignore[list-item]
        hostname=pod.spec.hostname if pod.spec.hostname and pod.spec.subdomain == svc.name else None,
        conditions=EndpointConditions(ready=True, serving=True, terminating=False),
        node_name=pod.spec.node_name, zone=zone_of(pod.spec.node_name or ""),
        target_ref=ObjectReference(kind="Pod", name=pod.name, namespace=pod.namespace, uid=pod.metadata.uid),
    )


def desired_endpoints(svc: Service, pods: Iterable[Pod], zone_of: ZoneOf) -> dict[PortKey, list[Endpoint]]:
    """The Service's endpoints grouped by their resolved ports, in pod-name order; one empty
    group (no ports) when no pod serves it."""
    groups: dict[PortKey, list[Endpoint]] = {}
    for pod in sorted((p for p in pods if serves(p) and selects(svc, p)), key=lambda p: p.name):
        key = tuple((sp.name, sp.protocol, port, sp.app_protocol) for sp in svc.spec.ports
                    if (port := _resolve(sp, pod)) is not None)
        groups.setdefault(key, []).append(_endpoint(svc, pod, zone_of))
    return groups or {(): []}


def port_key(s: EndpointSlice) -> PortKey:
    return tuple((p.name, p.protocol, p.port, p.app_protocol) for p in s.ports or [] if p.port is not None)


@dataclass
class SlicePlan:
    """Writes that bring one Service's slices to what its pods say: `update` and `delete`
    carry the resourceVersion they were planned against (compare-and-swap)."""

    create: list[EndpointSlice] = field(default_factory=list)
    update: list[EndpointSlice] = field(default_factory=list)
    delete: list[EndpointSlice] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.update or self.delete)


def _slice(svc: Service, name: str, key: PortKey, endpoints: list[Endpoint], when: str,
           resource_version: str | None = None) -> EndpointSlice:
    return EndpointSlice(
        metadata=ObjectMeta(name=name, namespace=svc.namespace, resource_version=resource_version,
                            labels={SERVICE_NAME_LABEL: svc.name, MANAGED_BY_LABEL: MANAGED_BY},
                            annotations={TRIGGER_TIME: when}),
        address_type="IPv4", endpoints=endpoints,
        ports=[EndpointPort(name=n, protocol=proto, port=port, app_protocol=app)  # type: ignore[arg-type]
               for n, proto, port, app in key],
    )


def plan_slices(namespace: str, name: str, svc: Service | None, pods: Iterable[Pod], zone_of: ZoneOf,
                existing: Iterable[EndpointSlice], taken: Callable[[str], bool], when: str) -> SlicePlan:
    """Plan the slices of Service `namespace/name` (`svc` None: it is gone) from its
    namespace's `pods`, given the slices this controller made for it (`existing`);
    `taken(name)` says whether a slice name is in use in the namespace."""
    plan = SlicePlan()
    existing = sorted(existing, key=lambda s: s.name)
    if svc is None or not controls(svc):
        plan.delete = existing
        return plan
    want = desired_endpoints(svc, pods, zone_of)
    by_key: dict[PortKey, list[EndpointSlice]] = {}
    for s in existing:
        if s.address_type != "IPv4" or port_key(s) not in want:
            plan.delete.append(s)
        else:
            by_key.setdefault(port_key(s), []).append(s)
    used = {s.name for s in existing}  # a name is free only once its slice's deletion is written
    for key, endpoints in want.items():
        wanted = {ep.addresses[0]: ep for ep in endpoints}
        placed: set[str] = set()
        kept: list[tuple[EndpointSlice, list[Endpoint]]] = []
        for s in by_key.get(key, []):
            now = []
            for e in s.endpoints:
                a = e.addresses[0]
                if a in wanted and a not in placed:
                    now.append(wanted[a])
                    placed.add(a)
            kept.append((s, now))
        rest = [ep for a, ep in wanted.items() if a not in placed]
        for _, now in kept:
            room = MAX_SLICE_ENDPOINTS - len(now)
            now.extend(rest[:room])
            rest = rest[room:]
        if not endpoints and kept:  # the placeholder: one empty slice stays
            kept, extra = kept[:1], kept[1:]
            plan.delete.extend(s for s, _ in extra)
        for s, now in kept:
            if not now and endpoints:
                plan.delete.append(s)
                continue
            ports = _slice(svc, s.name, key, now, when).ports
            if s.endpoints != now or (s.ports or []) != (ports or []):
                plan.update.append(_slice(svc, s.name, key, now, when, s.metadata.resource_version))
        chunks = [rest[i:i + MAX_SLICE_ENDPOINTS] for i in range(0, len(rest), MAX_SLICE_ENDPOINTS)]
        if not endpoints and not kept:
            chunks = [[]]
        base = f"{svc.name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:5]}"
        n = 1
        for chunk in chunks:
            while (candidate := base if n == 1 else f"{base}-{n}") in used or taken(candidate):
                n += 1
            used.add(candidate)
            plan.create.append(_slice(svc, candidate, key, chunk, when))
    return plan


def endpoint_slices(services: Iterable[Service], pods: Iterable[Pod], nodes: Iterable[Node] = (),
                    when: str | None = None) -> list[EndpointSlice]:
    """The slices of every Service as made from scratch (no slices exist yet)."""
    pods = list(pods)
    zones = {n.name: n.labels.get(ZONE_LABEL) for n in nodes}
    stamp = when or trigger_time(datetime.datetime.now(datetime.UTC).timestamp())
    out: list[EndpointSlice] = []
    for svc in services:
        made: set[str] = set()
        plan = plan_slices(svc.namespace or "default", svc.name, svc, pods, zones.get, (), made.__contains__, stamp)
        out.extend(plan.create)
    return out
