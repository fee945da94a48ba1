"""From an object of the Kubernetes API to the value podnet's store keeps: only the fields the
dataplanes read, checked by podnet's models, in the same shape `podnet apply` stores (so the
agent's decoders read it unchanged).

A Pod of a real cluster is 5-20 KiB of JSON (managedFields, conditions, container statuses,
volumes); what podnet's dataplanes read of it (name, labels, node, host network, named ports,
phase, addresses) is 300-500 bytes, and most of a Pod's updates (conditions, container
statuses, heartbeats of Nodes) change nothing of it: kube-sync then writes nothing, and no
agent hears of them.

An object the models refuse (a custom resource the API server's schema let through, a value
podnet does not take) raises Rejected naming the field: it never reaches the store.
"""

from __future__ import annotations

from typing import Any

import pydantic

from podnet.model.manifests import explain, field_path
from podnet.model.objects import KINDS, KubeObject
from podnet.store.objects import stored_form

K = True  # keep the whole value

# Annotations podnet reads: IPAM's (podnet.io/), external DNS's, bandwidth limits, multi-network
# and the EndpointSlice controller's trigger time (network programming latency). Others (kubectl's
# last-applied-configuration above all: a copy of the whole object) are dropped.
ANNOTATION_PREFIXES = ("podnet.io/", "external-dns.kubernetes.io/", "k8s.v1.cni.cncf.io/",
                       "kubernetes.io/ingress-bandwidth", "kubernetes.io/egress-bandwidth",
                       "endpoints.kubernetes.io/last-change-trigger-time")

_CONTAINER = {"name": K, "ports": [{"name": K, "containerPort": K, "protocol": K, "hostPort": K, "hostIP": K}]}

# The fields kept of each core kind; podnet's own kinds (podnet.io/v1) keep their whole spec.
SHAPES: dict[str, dict[str, Any]] = {
    "Namespace": {},
    "Node": {"spec": {"podCIDR": K, "podCIDRs": K, "unschedulable": K, "providerID": K},
             "status": {"addresses": [{"type": K, "address": K}]}},
    "Pod": {"spec": {"nodeName": K, "hostNetwork": K, "hostname": K, "subdomain": K,
                     "containers": [_CONTAINER]},
            "status": {"phase": K, "podIP": K, "podIPs": [{"ip": K}], "hostIP": K}},
    "Service": {"spec": {"type": K, "selector": K, "clusterIP": K, "clusterIPs": K, "ports": [
        {"name": K, "protocol": K, "appProtocol": K, "port": K, "targetPort": K, "nodePort": K}],
        "sessionAffinity": K, "sessionAffinityConfig": K, "externalIPs": K, "externalTrafficPolicy": K,
        "internalTrafficPolicy": K, "healthCheckNodePort": K, "loadBalancerSourceRanges": K,
        "externalName": K, "publishNotReadyAddresses": K},
        "status": {"loadBalancer": {"ingress": [{"ip": K, "hostname": K}]}}},
    "EndpointSlice": {"addressType": K, "endpoints": [
        {"addresses": K, "conditions": {"ready": K, "serving": K, "terminating": K}, "hostname": K,
         "nodeName": K, "zone": K, "targetRef": {"kind": K, "name": K, "namespace": K, "uid": K}}],
        "ports": [{"name": K, "protocol": K, "port": K, "appProtocol": K}]},
    "NetworkPolicy": {"spec": K},
}
CUSTOM_SHAPE = {"spec": K}


class Rejected(ValueError):
    """An object podnet's models refuse; field is the dotted path ('' if the object as a whole)."""

    def __init__(self, ref: str, field: str, reason: str):
        self.ref = ref
        self.field = field
        self.reason = reason
        super().__init__(f"{ref}: " + (f"field {field}: " if field else "") + reason)


def _project(value: Any, shape: Any) -> Any:
    if shape is K:
        return value
    if isinstance(shape, list):
        if not isinstance(value, list):
            return value  # the model says what is wrong with it
        return [_project(v, shape[0]) for v in value]
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return value
        return {k: _project(v, shape[k]) for k, v in value.items() if k in shape and v is not None}
    return value


def project_meta(meta: dict) -> dict:
    out = {k: meta[k] for k in ("name", "namespace", "uid") if meta.get(k)}
    if meta.get("labels"):
        out["labels"] = meta["labels"]
    ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(ANNOTATION_PREFIXES)}
    if ann:
        out["annotations"] = ann
    return out


def ref_of(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')}/{ns}/{meta.get('name', '?')}" if ns else f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def to_model(obj: dict) -> KubeObject:
    """The API object as podnet's model, keeping only the fields the dataplanes read."""
    kind = obj.get("kind", "")
    cls = KINDS.get(kind)
    if cls is None:
        raise Rejected(ref_of(obj), "kind", f"podnet does not know the kind {kind!r}")
    shape = SHAPES.get(kind, CUSTOM_SHAPE)
    data = {"apiVersion": obj.get("apiVersion"), "kind": kind,
            "metadata": project_meta(obj.get("metadata") or {}),
            **{k: _project(v, shape[k]) for k, v in obj.items() if k in shape and v is not None}}
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise Rejected(ref_of(obj), field_path(err["loc"]), explain(err)) from None
    except ValueError as e:
        raise Rejected(ref_of(obj), "", str(e)) from None


def to_stored(obj: dict) -> dict:
    """The value the store keeps for an API object (Rejected if podnet refuses it)."""
    return stored_form(to_model(obj))
