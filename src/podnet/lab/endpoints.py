"""What the API server and the endpoint controller would do for the lab's Services.

* ClusterIPs (and nodePorts) for Services that do not name one, from the lab's
  service CIDR, in manifest order; the first address is left for `kubernetes`.
* EndpointSlices for Services with a selector: one endpoint per running pod
  that matches, ready, with its named target ports resolved for that pod. Pods
  whose named ports resolve differently land in different slices, as upstream.
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
NODE_PORT_RANGE = (30000, 32767)
ZONE_LABEL = "topology.kubernetes.io/zone"


def allocate_service_addresses(services: Iterable[Service], cidr: str) -> list[Service]:
    services = list(services)
    net = ipaddress.ip_network(cidr)
    used = {s.spec.cluster_ip for s in services if s.spec.cluster_ip not in (None, "", "None")}
    used_ports = {p.node_port for s in services for p in s.spec.ports if p.node_port}
    hosts = (str(net.network_address + i) for i in range(10, net.num_addresses - 1))
    next_port = NODE_PORT_RANGE[0]
    out = []
    for svc in services:
        spec = svc.spec
        changes: dict = {}
        if spec.type != "ExternalName" and spec.cluster_ip in (None, ""):
            ip = next(h for h in hosts if h not in used)
            used.add(ip)
            changes["cluster_ip"] = ip
            changes["cluster_ips"] = [ip]
        if spec.type in ("NodePort", "LoadBalancer") and any(not p.node_port for p in spec.ports):
            ports: list[ServicePort] = []
            for p in spec.ports:
                if not p.node_port:
                    while next_port in used_ports:
                        next_port += 1
                    p = p.model_copy(update={"node_port": next_port})
                    used_ports.add(next_port)
                ports.append(p)
            changes["ports"] = ports
        out.append(svc.model_copy(update={"spec": spec.model_copy(update=changes)}) if changes else svc)
    return out


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
