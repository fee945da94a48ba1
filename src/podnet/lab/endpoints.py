"""What the endpoint controller would do for the lab's Services.

EndpointSlices for Services with a selector: one endpoint per running pod that
matches, ready, with its named target ports resolved for that pod. Pods whose
named ports resolve differently land in different slices, as upstream. A pod with
`spec.hostname` whose `spec.subdomain` names the Service gives its endpoint that
hostname (the DNS name `<hostname>.<service>.<ns>.svc.<zone>`), as upstream.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from podnet.model.objects import (
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
ZONE_LABEL = "topology.kubernetes.io/zone"


def _resolve(svc_port: ServicePort, pod: Pod) -> int | None:
    target = svc_port.target_port
    if isinstance(target, int):
        return target
    if isinstance(target, str):
        return pod.named_port(target, svc_port.protocol)
    return svc_port.port


def endpoint_slices(services: Iterable[Service], pods: Iterable[Pod], nodes: Iterable[Node] = ()) -> list[EndpointSlice]:
    pods = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip
            and ipaddress.ip_address(p.status.pod_ip).version == 4]
    zones = {n.name: n.labels.get(ZONE_LABEL) for n in nodes}
    out: list[EndpointSlice] = []
    for svc in services:
        if not svc.spec.selector or svc.spec.type == "ExternalName":
            continue
        selected = [p for p in pods if p.namespace == svc.namespace
                    and all(p.labels.get(k) == v for k, v in svc.spec.selector.items())]
        groups: dict[tuple, list[Pod]] = {}
        for pod in sorted(selected, key=lambda p: p.name):
            key = tuple((sp.name, sp.protocol, _resolve(sp, pod)) for sp in svc.spec.ports)
            groups.setdefault(key, []).append(pod)
        if not groups:
            groups[tuple((sp.name, sp.protocol, None) for sp in svc.spec.ports)] = []
        for key, members in groups.items():
            ports = [EndpointPort(name=n, protocol=proto, port=port) for n, proto, port in key if port is not None]
            endpoints = [
                Endpoint(
                    addresses=[p.status.pod_ip],  # type: ignore[list-item]
                    hostname=p.spec.hostname if p.spec.hostname and p.spec.subdomain == svc.name else None,
                    conditions=EndpointConditions(ready=True, serving=True, terminating=False),
                    node_name=p.spec.node_name, zone=zones.get(p.spec.node_name or ""),
                    target_ref=ObjectReference(kind="Pod", name=p.name, namespace=p.namespace, uid=p.metadata.uid),
                )
                for p in members
            ]
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:5]
            out.append(EndpointSlice(
                metadata=ObjectMeta(name=f"{svc.name}-{digest}", namespace=svc.namespace, labels={
                    "kubernetes.io/service-name": svc.name,
                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                }),
                address_type="IPv4", endpoints=endpoints, ports=ports,
            ))
    return out
