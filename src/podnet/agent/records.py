"""Stored objects decoded straight into the compact records the agent's dataplanes keep.

What the agent reads was validated when it was written (`podnet apply`, or the
Kubernetes source), so the agent does not validate it again: decoding every Pod of a
150 000-pod cluster through the pydantic models was most of the agent's start (measured
in bench/bench_cluster.py: 3 s of 4 s of decoding at a quarter of that size), to build
objects each dataplane then reduced to a few fields. A record is made once per event
and shared by every dataplane that needs it (a Pod's PodInfo by policy and DNS, a
Service's ServiceRecord and an EndpointSlice's SliceRecord by Services and DNS).

A value without the expected shape raises UndecodableObject naming the key and the
field, and is skipped like any object the models refuse: one bad object never stops
the agent.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

from podnet.model.addresses import ipv4_or_none
from podnet.model.records import service_record, slice_record
from podnet.policy.model import PodInfo
from podnet.store.objects import UndecodableObject

_intern = sys.intern
_inet_pton, _AF_INET = socket.inet_pton, socket.AF_INET
_EMPTY: dict = {}  # (never changed) a missing spec or status
_FINISHED = ("Succeeded", "Failed")
_PORT_SETS: dict[tuple, tuple] = {}  # one tuple per distinct set of named ports
_PORT_SETS_MAX = 1 << 16


def _shared_ports(ports: tuple) -> tuple:
    """The one tuple of these named ports, its strings interned (only the first time a
    set is seen: every later pod with it takes the tuple kept)."""
    found = _PORT_SETS.get(ports)
    if found is None:
        if len(_PORT_SETS) >= _PORT_SETS_MAX:
            _PORT_SETS.clear()
        found = _PORT_SETS[ports] = tuple([(_intern(n), _intern(p), num) for n, p, num in ports])
    return found


def pod_record(data: dict, version: str | None = None) -> PodInfo:
    """A stored Pod as PodInfo: what policy (address, labels, named ports) and DNS (every
    address, the node) use of it. The same choices as policy.model.pod_info on the
    model: policy's address is the first IPv4 of podIP then podIPs, none for hostNetwork
    or finished pods; `ips` holds every address unless the pod uses the host's network."""
    # Runs for every pod of the cluster at an agent's start: the common shapes (one
    # address in podIPs, equal to podIP; one container with a port) take the short way,
    # with no generator or helper call per pod.
    meta = data["metadata"]
    spec = data.get("spec") or _EMPTY
    status = data.get("status") or _EMPTY
    host_network = spec.get("hostNetwork") is True
    pod_ip = status.get("podIP")
    if pod_ip.__class__ is str:  # one string per address, shared with the slices that list it
        pod_ip = _intern(pod_ip)
    pod_ips = status.get("podIPs")
    ips: tuple[str, ...] = ()
    if not host_network:
        if pod_ips:  # the first is podIP again: keep one string of it
            if pod_ips.__class__ is list and len(pod_ips) == 1 and pod_ips[0]["ip"] == pod_ip:
                ips = (pod_ip,)
            else:
                ips = tuple(pod_ip if p["ip"] == pod_ip else p["ip"] for p in pod_ips)
        elif pod_ip:
            ips = (pod_ip,)
    ip = None
    if not host_network and status.get("phase") not in _FINISHED:
        if pod_ip:  # ipv4_or_none inlined
            try:
                _inet_pton(_AF_INET, pod_ip)
                ip = pod_ip
            except (OSError, TypeError):
                pass
        if ip is None:
            ip = next((a for p in pod_ips or () if (a := ipv4_or_none(p["ip"]))), None)
    ports = []
    for c in spec.get("containers") or ():
        for p in c.get("ports") or ():
            if p.get("name"):
                ports.append((p["name"], p.get("protocol") or "TCP", int(p["containerPort"])))
    labels = meta.get("labels")
    node = spec.get("nodeName")
    return PodInfo(_intern(meta.get("namespace") or "default"), meta["name"], ip,
                   tuple(sorted(labels.items())) if labels else (),
                   _shared_ports(tuple(ports)) if ports else (), host_network,
                   _intern(node) if node else None, ips)


# kind -> decoder(stored value, its revision in the store)
DECODERS: dict[str, Callable[[dict, str], object]] = {"Pod": pod_record, "EndpointSlice": slice_record,
                                                      "Service": service_record}


def decode_record(kind: str, key: str, data: object, revision: int = 0) -> object:
    """The record of a stored object of `kind`; UndecodableObject if it lacks the shape."""
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise UndecodableObject(key, f"stored object is not a {kind} (found {found!r})")
    try:
        return DECODERS[kind](data, str(revision))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"field {e.args[0]!r} missing" if isinstance(e, KeyError) else str(e)
        raise UndecodableObject(key, f"stored {kind} does not have the expected shape: {what}") from None
