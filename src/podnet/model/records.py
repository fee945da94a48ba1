"""Compact records of stored objects, decoded from their stored (JSON) form without the
models, for the readers that keep every one of them: the Service compiler and the DNS
index each hold every Service and EndpointSlice of the cluster.

Stored objects were validated when written, so a record is a plain walk over the
fields its readers use (at 50 000 Services the models cost seconds of an agent's start,
bench/bench_cluster.py, bench/bench_programming.py). The model paths (`slice_record_of`,
`service_record_of`) go through the same decoders, so both paths read an object the
same way: a record applies the defaults the model would (a port's protocol TCP and
targetPort its port, externalTrafficPolicy Cluster for a NodePort or LoadBalancer, a
ClientIP affinity's timeout 10800 s). A value without the expected shape
raises KeyError, TypeError, ValueError or AttributeError, which the agent reports
as an undecodable object (agent/records.py).
"""

from __future__ import annotations

import ipaddress
import sys

from podnet.model.objects import EndpointSlice, Service
from podnet.model.slots import PickledBySlots

_intern = sys.intern
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# (addresses, ready, serving, terminating, nodeName, hostname, targetRef (namespace|None, name) | None)
Endpoint = tuple[tuple[str, ...], "bool | None", "bool | None", "bool | None", "str | None", "str | None",
                 "tuple[str | None, str] | None"]


class SliceRecord(PickledBySlots):
    """An EndpointSlice: what the Service compiler and the DNS index read of it.
    `ports`: (name|None, protocol, port|None) each; None when the slice has no ports field."""

    __slots__ = ("namespace", "name", "version", "service_name", "address_type", "trigger", "ports", "endpoints")

    def __init__(self, namespace: str | None, name: str, version: str | None, service_name: str | None,
                 address_type: str, trigger: str | None, ports: tuple[tuple, ...] | None,
                 endpoints: tuple[Endpoint, ...]):
        self.namespace = namespace
        self.name = name
        self.version = version
        self.service_name = service_name
        self.address_type = address_type
        self.trigger = trigger
        self.ports = ports
        self.endpoints = endpoints


def slice_record(data: dict, version: str | None = None) -> SliceRecord:
    """The record of a stored EndpointSlice; `version`: its revision in the store (else
    metadata.resourceVersion)."""
    meta = data["metadata"]
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    address_type = data["addressType"]
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise ValueError(f"addressType {address_type!r}")
    ports = None
    if data.get("ports") is not None:
        ports = tuple((_intern(p["name"]) if p.get("name") else None, _intern(p.get("protocol") or "TCP"),
                       p.get("port")) for p in data["ports"])
    endpoints = []
    append = endpoints.append
    # Runs for every endpoint of the cluster at an agent's start: one lookup per field
    # (the conditions read only when present).
    for ep in data.get("endpoints") or ():
        # interned: one string per address for the pod's record and every slice listing it
        addresses = ep["addresses"]
        if addresses.__class__ is list and len(addresses) == 1 and addresses[0].__class__ is str:
            addresses = (_intern(addresses[0]),)
        else:
            addresses = tuple([_intern(a) if a.__class__ is str else a for a in addresses])
            if not addresses:
                raise ValueError("an endpoint without addresses")
        c = ep.get("conditions")
        if c:
            ready, serving, terminating = c.get("ready"), c.get("serving"), c.get("terminating")
        else:
            ready = serving = terminating = None
        node = ep.get("nodeName")
        ref = ep.get("targetRef")
        append((addresses, ready, serving, terminating, _intern(node) if node else None, ep.get("hostname"),
                (ref.get("namespace"), ref["name"]) if ref and ref.get("name") else None))
    namespace = meta.get("namespace")
    return SliceRecord(_intern(namespace) if namespace else namespace, meta["name"],
                       version if version is not None else meta.get("resourceVersion"),
                       labels.get(SERVICE_NAME_LABEL), address_type, annotations.get(TRIGGER_ANNOTATION),
                       ports, tuple(endpoints))


def slice_record_of(sl: EndpointSlice) -> SliceRecord:
    """The record of a model EndpointSlice (tests, the CLI, the lab): its stored form decoded."""
    return slice_record(sl.to_dict(), sl.metadata.resource_version)


class ServiceRecord(PickledBySlots):
    """A Service: what the Service compiler and the DNS index read of it. `ports`: (name|None,
    protocol, port, nodePort|None, targetPort) each; `lb_ips`: the status's load-balancer
    ingress addresses; `affinity`: the ClientIP affinity timeout in seconds, None without
    affinity; `external_policy`: externalTrafficPolicy (None for a ClusterIP Service without
    one)."""

    __slots__ = ("namespace", "name", "version", "type", "cluster_ip", "cluster_ips", "ports", "external_ips",
                 "lb_ips", "source_ranges", "external_policy", "internal_policy", "health_check_node_port",
                 "publish_not_ready", "affinity", "external_name", "scheduler", "weights")

    def __init__(self, namespace: str | None, name: str, version: str | None, type: str,
                 cluster_ip: str | None, cluster_ips: tuple[str, ...], ports: tuple[tuple, ...],
                 external_ips: tuple[str, ...] = (), lb_ips: tuple[str, ...] = (), source_ranges: tuple[str, ...] = (),
                 external_policy: str | None = None, internal_policy: str = "Cluster",
                 health_check_node_port: int | None = None, publish_not_ready: bool = False,
                 affinity: int | None = None, external_name: str | None = None,
                 scheduler: str | None = None, weights: str | None = None):
        self.namespace = namespace
        self.name = name
        self.version = version
        self.type = type
        self.cluster_ip = cluster_ip
        self.cluster_ips = cluster_ips
        self.ports = ports
        self.external_ips = external_ips
        self.lb_ips = lb_ips
        self.source_ranges = source_ranges
        self.external_policy = external_policy
        self.internal_policy = internal_policy
        self.health_check_node_port = health_check_node_port
        self.publish_not_ready = publish_not_ready
        self.affinity = affinity
        self.external_name = external_name
        # the podnet.io/scheduler and podnet.io/weights annotations, as written (the
        # Service compiler checks them)
        self.scheduler = scheduler
        self.weights = weights

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


_NODE_PORT_TYPES = ("NodePort", "LoadBalancer")


def _port_of(p: dict) -> tuple:
    port = p["port"]
    target = p.get("targetPort")
    return (_intern(p["name"]) if p.get("name") else None, _intern(p.get("protocol") or "TCP"), port,
            p.get("nodePort"), port if target is None else target)


# How a Service's endpoints are chosen (the eBPF Service backend: docs/ebpf.md)
SCHEDULER_ANNOTATION = "podnet.io/scheduler"  # random (default) | lc | sh | wrr
WEIGHTS_ANNOTATION = "podnet.io/weights"  # "10.0.1.5=3,10.0.1.6=1": wrr's weight per endpoint address (else 1)


def service_record(data: dict, version: str | None = None) -> ServiceRecord:
    """The record of a stored Service; `version`: its revision in the store (else
    metadata.resourceVersion)."""
    meta = data["metadata"]
    spec = data["spec"]
    kind = spec.get("type") or "ClusterIP"
    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        client_ip = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        affinity = client_ip.get("timeoutSeconds", 10800)
    ranges = spec.get("loadBalancerSourceRanges")
    ingress = ((data.get("status") or {}).get("loadBalancer") or {}).get("ingress")
    namespace = meta.get("namespace")
    annotations = meta.get("annotations") or {}
    return ServiceRecord(
        _intern(namespace) if namespace else namespace, meta["name"],
        version if version is not None else meta.get("resourceVersion"), kind,
        spec.get("clusterIP"), tuple(spec.get("clusterIPs") or ()), tuple(map(_port_of, spec.get("ports") or ())),
        external_ips=tuple(spec.get("externalIPs") or ()),
        lb_ips=tuple(i["ip"] for i in ingress if i.get("ip")) if ingress else (),
        # as the model: each range as its network's text (a host's bits dropped)
        source_ranges=tuple(str(ipaddress.ip_network(r.strip(), strict=False)) for r in ranges) if ranges else (),
        external_policy=spec.get("externalTrafficPolicy") or ("Cluster" if kind in _NODE_PORT_TYPES else None),
        internal_policy=spec.get("internalTrafficPolicy") or "Cluster",
        health_check_node_port=spec.get("healthCheckNodePort"),
        publish_not_ready=spec.get("publishNotReadyAddresses") is True,
        affinity=affinity, external_name=spec.get("externalName"),
        scheduler=annotations.get(SCHEDULER_ANNOTATION), weights=annotations.get(WEIGHTS_ANNOTATION))


def service_record_of(svc: Service) -> ServiceRecord:
    """The record of a model Service (tests, the CLI, the lab): its stored form decoded."""
    return service_record(svc.to_dict(), svc.metadata.resource_version)
