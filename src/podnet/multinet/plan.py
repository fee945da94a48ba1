"""Which additional networks a pod gets, decided before anything is made.

From the Pod in the store (the runtime's K8S_POD_NAMESPACE and K8S_POD_NAME): its
`k8s.v1.cni.cncf.io/networks` annotation (selection.py), each named
NetworkAttachmentDefinition (netconf.py), namespace isolation (a pod uses the networks
of its own namespace and of the configured global namespaces), and the interface names.
The result is a list of NetworkAttachment (delegate.py) with the configuration each will
run, which the ADD records before the first plugin runs.

A Pod the store does not hold (a runtime outside Kubernetes, or a store that lags) gets
eth0 alone; a Pod the store holds under another UID than the runtime's is a store that
lags: try again later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from podnet.model.objects import NetworkAttachmentDefinition, Pod
from podnet.multinet import ANNOTATION_NETWORKS
from podnet.multinet.delegate import NetworkAttachment
from podnet.multinet.netconf import NetConf, NetConfError
from podnet.multinet.podipam import uses_podnet_ipam
from podnet.multinet.selection import NetworkSelection, SelectionError, interface_names, parse_networks
from podnet.store.base import KeyValueStore
from podnet.store.objects import ObjectStore, UndecodableObject

DEFAULT_GLOBAL_NAMESPACES = ("default",)  # Multus's default non-isolated namespace


class PlanError(Exception):
    """The pod's networks cannot be set up: `message` names the pod and the network; `lag`
    when the store may just be behind (try again later)."""

    def __init__(self, message: str, *, lag: bool = False):
        self.message = message
        self.lag = lag
        super().__init__(message)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str | None = None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def read_pod(kv: KeyValueStore, ref: PodRef) -> Pod | None:
    try:
        pod = ObjectStore(kv).get(Pod, ref.name, ref.namespace)
    except UndecodableObject as e:
        raise PlanError(f"pod {ref}: the stored Pod cannot be read ({e.reason})") from None
    if pod is not None and ref.uid and pod.metadata.uid and pod.metadata.uid != ref.uid:
        raise PlanError(f"pod {ref}: the store holds UID {pod.metadata.uid}, the runtime asks for UID {ref.uid} "
                        "(the store has not caught up yet)", lag=True)
    return pod


def plan_networks(kv: KeyValueStore, pod: Pod | None, ref: PodRef, *, primary_ifname: str, handle_prefix: str,
                  container_id: str, default_version: str,
                  global_namespaces: Sequence[str] = DEFAULT_GLOBAL_NAMESPACES) -> list[NetworkAttachment]:
    """The pod's additional networks in annotation order; PlanError names what is wrong."""
    if pod is None:
        return []
    value = pod.metadata.annotations.get(ANNOTATION_NETWORKS)
    if value is None:
        return []
    try:
        selections = parse_networks(value, ref.namespace)
        ifnames = interface_names(selections, primary_ifname)
    except SelectionError as e:
        raise PlanError(f"pod {ref}: annotation {ANNOTATION_NETWORKS}: {e}") from None
    objects = ObjectStore(kv)
    out = []
    for sel, ifname in zip(selections, ifnames, strict=True):
        if sel.namespace != ref.namespace and sel.namespace not in global_namespaces:
            allowed = ", ".join([ref.namespace, *global_namespaces])
            raise PlanError(f"pod {ref}: network {sel.ref}: a pod may use only the networks of its own namespace "
                            f"or of a global namespace ({allowed})")
        nad = _nad(objects, sel, ref)
        try:
            conf = NetConf.parse(nad.spec.config)
        except NetConfError as e:
            raise PlanError(f"pod {ref}: network {sel.ref}: NetworkAttachmentDefinition {sel.ref} field spec.config: "
                            f"{e}") from None
        conflist = conf.conflist(default_name=nad.name, default_version=default_version, cni_args=sel.cni_args)
        uses_ipam = any(uses_podnet_ipam(p) for p in conflist["plugins"])
        out.append(NetworkAttachment(
            network=sel.ref, ifname=ifname, conflist=conflist, capability_args=sel.capability_args(),
            default_route=sel.default_route,
            handle=f"{handle_prefix}.{container_id}.{ifname}" if uses_ipam else None))
    return out


def _nad(objects: ObjectStore, sel: NetworkSelection, ref: PodRef) -> NetworkAttachmentDefinition:
    try:
        nad = objects.get(NetworkAttachmentDefinition, sel.name, sel.namespace)
    except UndecodableObject as e:
        raise PlanError(f"pod {ref}: network {sel.ref}: the stored NetworkAttachmentDefinition cannot be read "
                        f"({e.reason})") from None
    if nad is None:
        raise PlanError(f"pod {ref}: network {sel.ref}: NetworkAttachmentDefinition {sel.ref} does not exist")
    return nad


def record_of(networks: list[NetworkAttachment]) -> list[dict[str, Any]]:
    return [n.to_record() for n in networks]
