"""Compact records of stored objects, decoded from their stored (JSON) form without the
models, for the readers that keep every one of them: the Service compiler and the DNS
index each hold every EndpointSlice of the cluster.

Stored objects were validated when written, so a record is a plain walk over the
fields its readers use (at 50 000 slices the models cost seconds of an agent's start,
bench/bench_cluster.py). The model path (`slice_record_of`) goes through the same
decoder, so both paths read a slice the same way. A value without the expected shape
raises KeyError, TypeError, ValueError or AttributeError, which the agent reports
as an undecodable object (agent/records.py).
"""

from __future__ import annotations

import sys

from podnet.model.objects import EndpointSlice

_intern = sys.intern
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# (addresses, ready, serving, terminating, nodeName, hostname, targetRef (namespace|None, name) | None)
Endpoint = tuple[tuple[str, ...], "bool | None", "bool | None", "bool | None", "str | None", "str | None",
                 "tuple[str | None, str] | None"]


class SliceRecord:
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
    for ep in data.get("endpoints") or ():
        addresses = tuple(ep["addresses"])
        if not addresses:
            raise ValueError("an endpoint without addresses")
        c = ep.get("conditions") or {}
        node = ep.get("nodeName")
        ref = ep.get("targetRef")
        endpoints.append((addresses, c.get("ready"), c.get("serving"), c.get("terminating"),
                          _intern(node) if node else None, ep.get("hostname"),
                          (ref.get("namespace"), ref["name"]) if ref and ref.get("name") else None))
    namespace = meta.get("namespace")
    return SliceRecord(_intern(namespace) if namespace else namespace, meta["name"],
                       version if version is not None else meta.get("resourceVersion"),
                       labels.get(SERVICE_NAME_LABEL), address_type, annotations.get(TRIGGER_ANNOTATION),
                       ports, tuple(endpoints))


def slice_record_of(sl: EndpointSlice) -> SliceRecord:
    """The record of a model EndpointSlice (tests, the CLI, the lab): its stored form decoded."""
    return slice_record(sl.to_dict(), sl.metadata.resource_version)
