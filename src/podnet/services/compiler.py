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

Objects are read once, when they arrive, into compact records (`ServiceInfo`,
`SliceInfo`) holding only what compiling needs; the compiler keeps those, not
the objects.
"""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import logging
import socket
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from itertools import chain
from types import MappingProxyType

from podnet.model.objects import EndpointSlice, Pod, Service
from podnet.model.records import (
    SCHEDULER_ANNOTATION,
    WEIGHTS_ANNOTATION,
    ServiceRecord,
    SliceRecord,
    service_record_of,
    slice_record_of,
)
from podnet.model.slots import PickledBySlots
from podnet.services.model import (
    LARGE_ABOVE,
    Backend,
    Frontend,
    FrontendRule,
    HealthCheck,
    ServiceConfig,
    ServiceState,
)

log = logging.getLogger("podnet.services")

PROTOCOLS = ("TCP", "UDP", "SCTP")
_NODE_TYPES = ("NodePort", "LoadBalancer")
_PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


def _valid_port(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def check_service(svc: ServiceRecord | Service) -> None:
    """Raise ValueError naming the field for what the dataplane cannot take. Objects
    from the store were validated already; this guards what reaches nftables text
    (numbers must be numbers) whatever produced the object."""
    if not isinstance(svc, ServiceRecord):
        svc = service_record_of(svc)
    seen: dict[tuple[str, int], int] = {}
    for i, (_, protocol, port, node_port, target_port) in enumerate(svc.ports):
        if protocol not in PROTOCOLS:
            raise ValueError(f"spec.ports[{i}].protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if not _valid_port(port):
            raise ValueError(f"spec.ports[{i}].port: {port!r} is not a port number (1-65535)")
        if node_port is not None and not _valid_port(node_port):
            raise ValueError(f"spec.ports[{i}].nodePort: {node_port!r} is not a port number (1-65535)")
        if not isinstance(target_port, str) and not _valid_port(target_port):
            raise ValueError(f"spec.ports[{i}].targetPort: {target_port!r} is not a port number (1-65535)")
        first = seen.setdefault((protocol, port), i)
        if first != i:
            raise ValueError(f"spec.ports[{i}]: duplicate port {port}/{protocol} (also spec.ports[{first}])")
    hc = svc.health_check_node_port
    if hc is not None and not _valid_port(hc):
        raise ValueError(f"spec.healthCheckNodePort: {hc!r} is not a port number (1-65535)")


def _ipv4(value: str | None) -> str | None:
    """The canonical text of an IPv4 address, None for anything else."""
    if not value or value == "None" or ":" in value:
        return None
    try:
        canonical = socket.inet_ntoa(socket.inet_pton(socket.AF_INET, value))
    except (OSError, TypeError):
        return None
    return value if canonical == value else canonical  # the object's own string: no copy


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


class _Cidrs:
    """Membership of IPv4 addresses in a few CIDRs, as integer masks."""

    __slots__ = ("text", "_nets")

    def __init__(self, cidrs: tuple[str, ...]):
        self.text = cidrs
        self._nets = [(int(n.network_address), int(n.netmask))
                      for n in map(ipaddress.IPv4Network, cidrs)]

    def __contains__(self, ip: str) -> bool:
        addr = int.from_bytes(socket.inet_aton(ip), "big")
        for net, mask in self._nets:
            if addr & mask == net:
                return True
        return False


# ---------------------------------------------------------------- compact records


class _Interner:
    """Shares equal small tuples and strings between records (ports, node names)."""

    __slots__ = ("_seen",)
    LIMIT = 1 << 16

    def __init__(self) -> None:
        self._seen: dict = {}

    def __call__(self, value):  # type: ignore[no-untyped-def]
        seen = self._seen
        try:
            v = seen.get(value)
        except TypeError:  # unhashable (an object made in code with odd values): not shared
            return value
        if v is None:
            if len(seen) >= self.LIMIT:
                seen.clear()  # what was shared stays shared; only later records stop sharing with it
            v = seen[value] = value
        return v


_STRINGS = _Interner()


class ServiceInfo(PickledBySlots):
    """What compiling needs of one Service (ports: (name|None, protocol, port,
    nodePort, targetPort) each). `problem`: why it cannot be compiled (check_service);
    `active` False: it produces nothing (headless, ExternalName)."""

    __slots__ = ("key", "namespace", "name", "version", "active", "problem", "cluster_ip", "node_ports", "ports",
                 "external_ips", "lb_ips", "source_ranges", "external_local", "internal_local", "publish_all",
                 "affinity", "health_port", "named_target", "scheduler", "weights")

    def __init__(self, svc: ServiceRecord | Service, intern: _Interner = _STRINGS):
        if not isinstance(svc, ServiceRecord):
            svc = service_record_of(svc)
        self.namespace = intern(svc.namespace) if svc.namespace else svc.namespace
        self.name = svc.name
        self.key: Key = (self.namespace or "default", svc.name)
        self.version = svc.version
        self.active = not (svc.type == "ExternalName" or svc.headless)
        self.problem: str | None = None
        self.cluster_ip: str | None = None
        self.node_ports = False
        self.ports: tuple[tuple, ...] = ()
        self.external_ips: tuple[str, ...] = ()
        self.lb_ips: tuple[str, ...] = ()
        self.source_ranges: tuple[str, ...] = ()
        self.external_local = self.internal_local = self.publish_all = self.named_target = False
        self.affinity: int | None = None
        self.health_port: int | None = None
        self.scheduler = ""
        self.weights: Mapping[str, int] = _NO_WEIGHTS
        if not self.active:
            return
        try:
            check_service(svc)
            self.cluster_ip = _ipv4(svc.cluster_ip) or next(
                (ip for ip in map(_ipv4, svc.cluster_ips) if ip), None)
            self.node_ports = svc.type in _NODE_TYPES
            self.ports = intern(tuple([intern(p) for p in svc.ports]))
            self.named_target = any([isinstance(p[4], str) for p in self.ports])
            if svc.external_ips:
                self.external_ips = tuple(ip for x in svc.external_ips if (ip := _ipv4(x)))
            if svc.type == "LoadBalancer":
                self.lb_ips = tuple(ip for x in svc.lb_ips if (ip := _ipv4(x)))
            if svc.source_ranges:
                self.source_ranges = intern(collapse_v4(svc.source_ranges))
            self.external_local = svc.external_policy == "Local"
            self.internal_local = svc.internal_policy == "Local"
            self.publish_all = svc.publish_not_ready
            self.affinity = svc.affinity
            self.scheduler, self.weights = _scheduler(svc.scheduler, svc.weights)
            if self.external_local and svc.health_check_node_port and self.node_ports:
                self.health_port = svc.health_check_node_port
        except Exception as e:  # one bad object must not stop the sync of the rest
            self.problem = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)

    @property
    def ref(self) -> str:
        return f"{self.namespace or 'default'}/{self.name}"


SCHEDULERS = ("random", "lc", "sh", "wrr")


# one empty mapping for every Service without weights (an empty dict each was 64 bytes
# per Service of the cluster on every agent)
_NO_WEIGHTS: Mapping[str, int] = MappingProxyType({})


def _scheduler(name: str | None, weights: str | None) -> tuple[str, Mapping[str, int]]:
    """The podnet.io/scheduler and podnet.io/weights annotations checked: ("" for random,
    {address: weight}); ValueError naming the annotation."""
    if name is None and not weights:  # most Services (asked of each at an agent's start)
        return "", _NO_WEIGHTS
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"metadata.annotations[{SCHEDULER_ANNOTATION}]: {name!r} is not one of "
                         f"{', '.join(SCHEDULERS)}")
    out: dict[str, int] = {}
    for i, item in enumerate((weights or "").split(",")):
        if not item.strip():
            continue
        ip, _, w = item.strip().partition("=")
        if _ipv4(ip) is None or not w.isdigit() or int(w) > 1000:
            raise ValueError(f"metadata.annotations[{WEIGHTS_ANNOTATION}] item {i}: {item.strip()!r} is not "
                             "ADDRESS=WEIGHT (an IPv4 address, a weight 0-1000)")
        out[_ipv4(ip)] = int(w)  # type: ignore[index]
    if out and name != "wrr":
        raise ValueError(f"metadata.annotations[{WEIGHTS_ANNOTATION}]: weights need "
                         f"{SCHEDULER_ANNOTATION}: wrr")
    return ("" if name in (None, "random") else name), out or _NO_WEIGHTS  # type: ignore[return-value]


# endpoint flags (LOCAL: on the compiler's node)
READY, SERVING, TERMINATING, LOCAL = 1, 2, 4, 8
READY_ALL = frozenset(f for f in range(16) if f & READY)  # the flag values with READY


class SliceInfo(PickledBySlots):
    """What compiling needs of one EndpointSlice, as seen from node `node_name`: its
    Service, ports ((name|None, protocol, port) each; empty: the slice lists none)
    and, IPv4 slices only, its endpoints in address order: `backends` (first
    address, the slice's first port or 0), `flags` (one byte each: READY, SERVING,
    TERMINATING, LOCAL), `refs` (Pod (namespace, name) each, only for a slice without
    ports). `plain`: every endpoint ready, no address twice. `trigger`: the
    last-change-trigger-time annotation, as epoch seconds."""

    __slots__ = ("namespace", "name", "version", "service", "ipv4", "ports", "backends", "flags", "refs", "plain",
                 "trigger", "_set")

    def __init__(self, sl: SliceRecord | EndpointSlice, node_name: str | None, intern: _Interner = _STRINGS):
        if not isinstance(sl, SliceRecord):
            sl = slice_record_of(sl)
        self.namespace = intern(sl.namespace) if sl.namespace else sl.namespace
        self.name = sl.name
        self.version = sl.version
        self.service = sl.service_name or None
        self.ipv4 = sl.address_type == "IPv4"
        self.trigger = _trigger_time(sl.trigger)
        self.ports: tuple[tuple, ...] = intern(tuple(intern(p) for p in sl.ports or ()))
        endpoints = []
        if self.ipv4:
            port = self.ports[0][2] if self.ports and _valid_port(self.ports[0][2]) else 0
            with_refs = not self.ports  # a Pod reference only matters for a slice without ports
            default_ns = sl.namespace or "default"
            append = endpoints.append
            for addresses, ready, serving, terminating, ep_node, _, target in sl.endpoints:
                ip = addresses[0]  # upstream: consumers use the first address only
                try:  # _ipv4 inlined: this loop runs for every endpoint of the cluster at start
                    packed = _inet_pton(_AF_INET, ip)
                except (OSError, TypeError):
                    continue
                canonical = _inet_ntoa(packed)
                if canonical != ip:
                    ip = canonical
                ready = ready is not False
                if serving is None:
                    serving = ready
                flags = (READY if ready else 0) | (SERVING if serving else 0) | (TERMINATING if terminating else 0)
                if ep_node == node_name and node_name is not None:
                    flags |= LOCAL
                ref = None
                if with_refs and target is not None:
                    ref = (target[0] or default_ns, target[1])
                # tuple.__new__ is Backend(ip, port) without the Python-level __new__ of a NamedTuple
                append((packed, _new_tuple(Backend, (ip, port)), flags, ref))
            if len(endpoints) > 1:
                endpoints.sort(key=_first)  # stable: duplicates keep their order
        if endpoints:
            # one pass each over the endpoints' columns (no generator per column)
            packed_all, backends, flags_all, refs = zip(*endpoints, strict=True)
            self.backends: tuple[Backend, ...] = backends
            flags = bytes(flags_all)
            self.refs: tuple[tuple[str, str] | None, ...] | None = refs if any(refs) else None
            # plain: every endpoint ready, no address twice
            self.plain = READY_ALL.issuperset(flags) and len(set(packed_all)) == len(packed_all)
        else:
            self.backends = ()
            flags = b""
            self.refs = None
            self.plain = True
        self.flags = intern(flags) if len(flags) <= 16 else flags  # a small slice's: one per pattern
        self._set: frozenset[Backend] | None = None

    def backend_set(self) -> frozenset[Backend]:
        """The backends as a set (made once: merging the slices of a large Service unions them)."""
        if self._set is None:
            self._set = frozenset(self.backends)
        return self._set

    def reuse(self, old: SliceInfo) -> None:
        """Take the very Backend objects of an earlier version of the slice for the endpoints
        it still has: what did not change is then the same object (identity checks downstream)."""
        if old.backends and self.backends:
            same = {b: b for b in old.backends}
            self.backends = tuple([same.get(b, b) for b in self.backends])
            self._set = None


_inet_pton, _inet_ntoa, _AF_INET = socket.inet_pton, socket.inet_ntoa, socket.AF_INET
_new_tuple = tuple.__new__


def _first(e: tuple) -> bytes:
    return e[0]


def _trigger_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---------------------------------------------------------------- compiling one Service


_PER_ENDPOINT = -1  # the port depends on the endpoint's Pod (named targetPort, slice without ports)


def _slice_port(sp: tuple, sl: SliceInfo) -> int | None:
    """The port a slice gives a ServicePort: a number, None (not a port of this
    slice), or _PER_ENDPOINT."""
    if sl.ports:
        name, proto = sp[0], sp[1]
        for p in sl.ports:
            if p[0] == name and p[1] == proto:
                return p[2]
        return None  # the slice lists its ports and this one is not among them
    target = sp[4]
    if isinstance(target, int):
        return target
    return _PER_ENDPOINT if isinstance(target, str) else None


def _endpoints(sp: tuple, slices: tuple[SliceInfo, ...], pods: dict[tuple[str, str], Pod], publish_all: int,
               ) -> tuple[dict[Backend, int], bool]:
    """Backend -> flags, duplicates merged (a ready one wins), and whether they are in
    address order already (they came from one slice, with one port)."""
    seen: dict[Backend, int] = {}
    sources = 0
    for sl in slices:
        if not sl.ipv4:
            continue
        slice_port = _slice_port(sp, sl)
        if slice_port is None:
            continue
        if slice_port == _PER_ENDPOINT:
            sources += 2
            refs = sl.refs or (None,) * len(sl.backends)
            for b, flags, ref in zip(sl.backends, sl.flags, refs, strict=True):
                pod = pods.get(ref) if ref is not None else None
                port = pod.named_port(str(sp[4]), sp[1]) if pod is not None else None
                if port is None or not _valid_port(port):
                    continue
                b = Backend(b[0], port)
                flags |= publish_all
                old = seen.get(b)
                if old is None or (flags & READY and not old & READY):
                    seen[b] = flags
            continue
        if not _valid_port(slice_port):
            continue
        sources += 1
        for b, flags in zip(sl.backends, sl.flags, strict=True):
            if b[1] != slice_port:
                b = Backend(b[0], slice_port)
            flags |= publish_all
            old = seen.get(b)
            if old is None or (flags & READY and not old & READY):
                seen[b] = flags
    return seen, sources <= 1


def _plain_backends(sp: tuple, slices: tuple[SliceInfo, ...]) -> tuple[Backend, ...] | None:
    """The common case at little cost: every endpoint ready, on its slice's first port,
    none in two slices. None: take the long way. In address order (one slice), or for
    several slices in theirs (_usable's order)."""
    if not slices:
        return None
    for sl in slices:
        if not (sl.plain and sl.ipv4 and sl.ports and sl.backends):
            return None
        port = _slice_port(sp, sl)
        if not port or port != sl.backends[0][1]:
            return None
    if len(slices) == 1:
        return slices[0].backends
    merged = tuple(chain.from_iterable(sl.backends for sl in slices))
    if len(frozenset().union(*(sl.backend_set() for sl in slices))) != len(merged):
        return None  # an endpoint in two slices
    return _in_order(merged)


def _usable(eps: dict[Backend, int], ordered: bool, mask: int = 0) -> tuple[Backend, ...]:
    """Ready endpoints; if there are none, serving-and-terminating ones (as kube-proxy),
    in address order (see _in_order). mask LOCAL: this node's only."""
    want = READY | mask
    chosen = [b for b, f in eps.items() if f & want == want]
    if not chosen:
        want = SERVING | TERMINATING | mask
        chosen = [b for b, f in eps.items() if f & want == want]
    if not ordered and len(chosen) > 1:
        return _in_order(chosen)
    return tuple(chosen)


def _in_order(backends: list[Backend] | tuple[Backend, ...]) -> tuple[Backend, ...]:
    """Address order; a large list is left as it is (its slots are ordered by _keep_slots)."""
    if len(backends) > LARGE_ABOVE:
        return tuple(backends)
    return tuple(sorted(backends, key=_ip_key))


def affinity_key(svc: ServiceInfo, port_index: int, local: bool) -> int:
    """The key of a Service port's affinity entries (a conntrack mark): shared by its
    frontends that balance over the same endpoints (`local`: this node's only). Made of
    the low 20 bits of the clusterIP (a service CIDR is at most a /12, as upstream
    requires), the port's index and the policy: unique per Service port and policy on a
    node. A Service without an IPv4 clusterIP gets a hash of its name instead."""
    ip = svc.cluster_ip
    base = int.from_bytes(socket.inet_aton(ip), "big") if ip else \
        int.from_bytes(hashlib.blake2b(svc.ref.encode(), digest_size=4).digest(), "big")
    return ((base & 0xFFFFF) << 12) | (((port_index + 1) & 0x7FF) << 1) | int(local)


def _compile_service(svc: ServiceInfo, slices: tuple[SliceInfo, ...], pods: dict[tuple[str, str], Pod],
                     cidrs: _Cidrs | None = None, local_dns: tuple[str, ...] = (),
                     ) -> tuple[list[FrontendRule], HealthCheck | None]:
    """The frontends of one Service (and its health check), in port order."""
    out: list[FrontendRule] = []
    if not svc.active:
        return out, None
    if svc.problem is not None:
        raise ValueError(svc.problem)
    cluster_ip = svc.cluster_ip
    if cluster_ip in local_dns:
        log.debug("services: %s: clusterIP %s is answered by this node's DNS server", svc.ref, cluster_ip)
        cluster_ip = None
    elif cluster_ip and cidrs is not None and cidrs.text and cluster_ip not in cidrs:
        log.warning("services: %s: clusterIP %s is outside the service CIDRs %s; its ClusterIP frontends are "
                    "ignored", svc.ref, cluster_ip, ",".join(cidrs.text))
        cluster_ip = None
    for sl in slices:
        if not (sl.ports and sl.ipv4):
            continue
        for sp in svc.ports:
            if _slice_port(sp, sl) is not None:
                break
        else:
            log.warning("services: %s: EndpointSlice %s has no port matching the Service's ports (name and "
                        "protocol); it is ignored", svc.ref, sl.name)
    external_local, internal_local = svc.external_local, svc.internal_local
    affinity = svc.affinity
    publish_all = READY | SERVING if svc.publish_all else 0
    external_ips, lb_ips, node_ports = svc.external_ips, svc.lb_ips, svc.node_ports
    local_ready: set[str] = set()
    prefix = f"{svc.namespace}/{svc.name}:"
    any_local = external_local or internal_local
    owner = True  # the first ClusterIP frontend carries the address's cluster_ips element
    for index, sp in enumerate(svc.ports):
        cluster = None if any_local else _plain_backends(sp, slices)  # type: ignore[assignment]
        local: tuple[Backend, ...] = ()
        if cluster is None:
            eps, ordered = _endpoints(sp, slices, pods, publish_all)
            if svc.health_port:
                local_ready.update(b[0] for b, f in eps.items() if f & (LOCAL | READY) == LOCAL | READY)
            cluster = _usable(eps, ordered)
            if any_local:
                local = _usable(eps, ordered, LOCAL)
        proto = _PROTO[sp[1]]
        label = prefix + (sp[0] or "")
        none_verdict = "reject" if not cluster else "drop"
        port, node_port = sp[2], sp[3] if node_ports else None
        if affinity:
            key_cluster, key_local = affinity_key(svc, index, False), affinity_key(svc, index, True)
        else:
            key_cluster = key_local = 0
        if cluster_ip:
            out.append(FrontendRule(Frontend(cluster_ip, proto, port), label, "ClusterIP",
                                    local if internal_local else cluster, none_verdict, False, affinity, (),
                                    owner, key_local if internal_local else key_cluster))
            owner = False
        if external_ips or lb_ips or node_port:
            external = local if external_local else cluster
            masq = not external_local
            key = key_local if external_local else key_cluster
            # pods of this node and the node itself: every endpoint (kube-proxy's short-circuit)
            short = cluster if external_local and cluster and len(cluster) != len(local) else ()
            for ip in external_ips:
                out.append(FrontendRule(Frontend(ip, proto, port), label, "ExternalIP", external, none_verdict,
                                        masq, affinity, (), False, key, short))
            for ip in lb_ips:
                out.append(FrontendRule(Frontend(ip, proto, port), label, "LoadBalancer", external, none_verdict,
                                        masq, affinity, svc.source_ranges, False, key, short))
            if node_port:
                out.append(FrontendRule(Frontend(None, proto, node_port), label, "NodePort", external,
                                        none_verdict, masq, affinity, (), False, key, short))
    if svc.scheduler:
        weights = tuple(sorted(svc.weights.items()))
        out = [r._replace(scheduler=svc.scheduler, weights=weights) for r in out]
    hc = None
    if svc.health_port:
        hc = HealthCheck(svc.health_port, svc.namespace or "default", svc.name, len(local_ready))
    return out, hc


def _compile_or_skip(svc: ServiceInfo, slices: tuple[SliceInfo, ...], pods: dict[tuple[str, str], Pod],
                     cidrs: _Cidrs | None, local_dns: tuple[str, ...] = (),
                     ) -> tuple[list[FrontendRule], HealthCheck | None, str | None]:
    """One Service; a Service that cannot be compiled is skipped with a logged
    reason (the third item) so that it never blocks the others."""
    try:
        rules, hc = _compile_service(svc, slices, pods, cidrs, local_dns)
        return rules, hc, None
    except Exception as e:  # one bad object must not stop the sync of the rest
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        log.warning("services: skipping Service %s: %s", svc.ref, reason)
        return [], None, reason


def _node_ips(node_ips: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({ip for x in node_ips if (ip := _ipv4(x))}, key=socket.inet_aton))


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
    by_service: dict[Key, list[SliceInfo]] = {}
    for sl in slices:
        info = SliceInfo(sl, node_name)
        if info.service:
            by_service.setdefault((sl.namespace, info.service), []).append(info)  # type: ignore[arg-type]
    pod_index = {(p.namespace or "default", p.name): p for p in pods}
    config = config or ServiceConfig()
    cidrs = _Cidrs(balanced_cidrs(config))
    infos = sorted(map(ServiceInfo, services), key=lambda s: (s.namespace or "", s.name))
    rules: dict[Frontend, FrontendRule] = {}
    health: dict[int, HealthCheck] = {}
    for svc in infos:
        svc_rules, hc, _ = _compile_or_skip(svc, by_service.get((svc.namespace, svc.name), ()),  # type: ignore[arg-type]
                                            pod_index, cidrs, config.local_dns)
        for r in svc_rules:
            if len(r.backends) > LARGE_ABOVE or len(r.short_circuit) > LARGE_ABOVE:
                r = _keep_slots(r, None, {}, {})  # (address order: nothing to keep)
            # Two Services claiming one frontend: the first in (namespace, name) order keeps it.
            rules.setdefault(r.frontend, r)
        if hc is not None:
            health.setdefault(hc.port, hc)
    return ServiceState(
        rules=tuple(rules.values()),  # Services in (namespace, name) order, each in port order
        service_cidrs=cidrs.text,
        node_ips=_node_ips(node_ips),
        health_checks=tuple(sorted(health.values())),
        masquerade_mark=config.masquerade_mark,
    )


# ---------------------------------------------------------------- the event-fed compiler


Key = tuple[str, str]  # (namespace, name) of a Service


def _key(namespace: str | None, name: str) -> Key:
    return (namespace or "default", name)


class ServiceCompiler:
    """The same result as compile_services, maintained from watch events so that a
    sync costs in proportion to what changed.

        c = ServiceCompiler(node_name, node_ips, config)
        c.set_service(svc); c.set_slice(sl); c.delete_service(ns, name); c.delete_slice(ns, name)
        state = c.state()      # recompiles only the Services touched since the last call

    Objects are turned into compact records at once and not kept. Unchanged
    Services keep their very FrontendRule objects (a recompiled rule equal to the
    old one is the old one), so the applier's comparison of two states is identity
    checks. States share the compiler's frontend index (see ServiceState): state()
    costs the change, not the number of Services. `compile(services, slices)`
    feeds whole lists instead (unchanged objects recognised by resourceVersion).

    Not thread-safe: feed and call state() from one thread, or under one lock.
    """

    def __init__(self, node_name: str, node_ips: Iterable[str] = (), config: ServiceConfig | None = None):
        self.node_name = node_name
        self.config = config or ServiceConfig()
        self._node_ips = _node_ips(node_ips)
        self._cidrs = _Cidrs(balanced_cidrs(self.config))
        self._intern = _Interner()
        self._services: dict[Key, ServiceInfo] = {}
        self._slices: dict[Key, tuple[SliceInfo, ...]] = {}  # by owning Service, in arrival order
        self._slice_index: dict[Key, SliceInfo] = {}  # (namespace, slice name) -> slice
        self._pods: dict[tuple[str, str], Pod] = {}
        self._outs: dict[Key, tuple[FrontendRule, ...]] = {}  # compiled rules of each Service
        self._claims: dict[Frontend, Key | set[Key]] = {}  # the Service(s) whose rules have the frontend
        self._rules: dict[Frontend, FrontendRule] = {}  # the live index the states share
        self._health: dict[Key, HealthCheck] = {}
        self._dirty: set[Key] = set()
        self._state: ServiceState | None = None
        self._states: list[weakref.ref[ServiceState]] = []  # states made here (over _rules), maybe still in use
        self._seq = 0
        self.recompiled = 0  # Services compiled by the last state()
        self.skipped: dict[Key, str] = {}  # Services that could not be compiled, and why
        # large frontend -> (endpoints, short-circuit endpoints) in the slot order to keep when
        # it is compiled without an earlier rule (the kernel's, after an agent restart)
        self._slot_hints: dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]] = {}
        # Service -> its large frontends' endpoint lists as compiled, before their slots were
        # kept (what the next compile compares its own with, to find what came and left)
        self._raw: dict[Key, dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]] = {}

    def __len__(self) -> int:
        return len(self._services)

    # what snapshot() keeps: the inputs and what was compiled from them (not the states
    # handed out, which restore() makes anew from the same rules)
    _SNAPSHOT = ("_services", "_slices", "_slice_index", "_pods", "_outs", "_claims", "_rules", "_health",
                 "_dirty", "_raw", "_slot_hints", "skipped")

    def snapshot(self) -> dict[str, object]:
        """For the agent's restart snapshot: the records and the rules compiled from them."""
        return {name: getattr(self, name) for name in self._SNAPSHOT}

    def restore(self, held: dict[str, object]) -> None:
        """Hold what snapshot() returned (on a compiler fed nothing yet): the next state()
        compiles only what was pending then."""
        for name in self._SNAPSHOT:
            setattr(self, name, held[name])
        self._state, self._states = None, []

    # -- events

    def set_service(self, svc: Service | ServiceInfo) -> None:
        info = svc if isinstance(svc, ServiceInfo) else ServiceInfo(svc, self._intern)
        k = info.key
        old = self._services.get(k)
        if old is not None:
            k = old.key  # one key object per Service
            info.key = k
        else:
            held = self._slices.pop(k, None)
            if held is not None:  # its slices came first (they are listed before Services)
                self._slices[k] = held  # under the Service's key object, not an equal one
                for sl in held:
                    sl.service = info.name  # ... and one string of its name
        self._services[k] = info
        self._dirty.add(k)

    def delete_service(self, namespace: str | None, name: str) -> None:
        k = _key(namespace, name)
        if self._services.pop(k, None) is not None:
            self._dirty.add(k)

    def set_slice(self, sl: EndpointSlice | SliceInfo) -> None:
        info = sl if isinstance(sl, SliceInfo) else SliceInfo(sl, self.node_name, self._intern)
        sk = _key(info.namespace, info.name)
        owner = _key(info.namespace, info.service) if info.service else None
        old = self._slice_index.get(sk)
        if old is not None:
            old_owner = _key(old.namespace, old.service)  # type: ignore[arg-type]
            if old_owner != owner:
                self._drop_slice(sk, old, old_owner)
                old = None
        if owner is None:
            return
        svc = self._services.get(owner)
        if svc is not None:  # one key object and one name string per Service
            owner = svc.key
            info.service = svc.name
        self._slice_index[sk] = info
        held = self._slices.get(owner, ())
        if old is not None:
            info.reuse(old)
            self._slices[owner] = tuple(info if s is old else s for s in held)
        else:
            self._slices[owner] = (*held, info)
        self._dirty.add(owner)

    def delete_slice(self, namespace: str | None, name: str) -> None:
        sk = _key(namespace, name)
        old = self._slice_index.get(sk)
        if old is not None:
            self._drop_slice(sk, old, _key(old.namespace, old.service))  # type: ignore[arg-type]

    def _drop_slice(self, sk: Key, old: SliceInfo, owner: Key) -> None:
        del self._slice_index[sk]
        held = tuple(s for s in self._slices.get(owner, ()) if s is not old)
        if held:
            self._slices[owner] = held
        else:
            self._slices.pop(owner, None)
        self._dirty.add(owner)

    def slice_info(self, namespace: str | None, name: str) -> SliceInfo | None:
        """The record held for an EndpointSlice (e.g. to tell a new change from a replay)."""
        return self._slice_index.get(_key(namespace, name))

    def service_info(self, namespace: str | None, name: str) -> ServiceInfo | None:
        return self._services.get(_key(namespace, name))

    def service_keys(self) -> list[Key]:
        return list(self._services)

    def slice_keys(self) -> list[Key]:
        """(namespace, name) of every EndpointSlice held (those of a Service)."""
        return list(self._slice_index)

    def keep_slots(self, orders: dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]) -> None:
        """The slot order of large frontends to start from (frontend -> its endpoints and its
        short-circuit endpoints, as the kernel holds them): the next state() keeps the slots
        of those endpoints that are still there, as it does between two of its own states."""
        self._slot_hints = dict(orders)

    def set_pods(self, pods: Iterable[Pod]) -> None:
        """Pods only matter for named targetPorts that slices leave unresolved."""
        self._pods = {(p.namespace or "default", p.name): p for p in pods}
        self._dirty.update(k for k, svc in self._services.items() if svc.named_target)

    def compile(self, services: Iterable[Service], slices: Iterable[EndpointSlice],
                pods: Iterable[Pod] | None = None) -> ServiceState:
        """Feed whole lists (unchanged objects are recognised by resourceVersion)."""
        self.replace(services, slices)
        if pods is not None:
            self.set_pods(pods)
        return self.state()

    def replace(self, services: Iterable[Service], slices: Iterable[EndpointSlice]) -> None:
        """Make the inputs exactly these objects: feed what is new or changed, delete what is gone."""
        seen: set[Key] = set()
        for svc in services:
            k = _key(svc.namespace, svc.name)
            seen.add(k)
            old = self._services.get(k)
            if not same_version(old, svc):
                self.set_service(svc)
        for k in [k for k in self._services if k not in seen]:
            self.delete_service(*k)
        seen_slices: set[Key] = set()
        for sl in slices:
            sk = _key(sl.namespace, sl.name)
            seen_slices.add(sk)
            old_sl = self._slice_index.get(sk)
            if not (same_version(old_sl, sl) and old_sl.service == (sl.service_name or None)):  # type: ignore[union-attr]
                self.set_slice(sl)
        for sk in [sk for sk in self._slice_index if sk not in seen_slices]:
            self.delete_slice(*sk)

    # -- the state

    def state(self) -> ServiceState:
        self.recompiled = 0
        if not self._dirty and self._state is not None:
            return self._state
        with _gc_paused(len(self._dirty) >= _GC_PAUSE_FROM):
            return self._update()

    def _update(self) -> ServiceState:
        live, claims, outs, services, slices = self._rules, self._claims, self._outs, self._services, self._slices
        health_checks, skipped = self._health, self.skipped
        pods, cidrs, local_dns = self._pods, self._cidrs, self.config.local_dns
        touched: list[Frontend] = []  # frontends whose claims changed (may repeat)
        fresh: dict[Frontend, FrontendRule] = {}  # rules made now, by frontend
        health_changed = False
        recompiled = 0
        hints, self._slot_hints = self._slot_hints, {}
        raws = self._raw
        for k in self._dirty:
            old_rules = outs.pop(k, None)
            old_raw = raws.pop(k, None)
            if old_rules:
                for r in old_rules:
                    fe = r.frontend
                    c = claims.get(fe)
                    if c == k:
                        del claims[fe]
                    elif type(c) is set:
                        c.discard(k)
                        if len(c) == 1:
                            claims[fe] = next(iter(c))
                    touched.append(fe)
            if health_checks.pop(k, None) is not None:
                health_changed = True
            svc = services.get(k)
            if svc is None:
                skipped.pop(k, None)
                continue
            rules, hc, problem = _compile_or_skip(svc, slices.get(k, ()), pods, cidrs, local_dns)
            if problem is None:
                if skipped:
                    skipped.pop(k, None)
            else:
                skipped[k] = problem
            recompiled += 1
            if hc is not None:
                health_checks[k] = hc
                health_changed = True
            if not rules:
                continue
            before = {r.frontend: r for r in old_rules} if old_rules else {}
            if any(len(r.backends) > LARGE_ABOVE or len(r.short_circuit) > LARGE_ABOVE for r in rules):
                # a large frontend keeps the slots of the endpoints that stay
                kept: dict[tuple[int, int], tuple[Backend, ...]] = {}
                raws[k] = {r.frontend: (r.backends, r.short_circuit) for r in rules}
                rules = [_keep_slots(r, before.get(r.frontend), hints, kept, (old_raw or {}).get(r.frontend))
                         for r in rules]
            if before:  # an equal rule stays the very same object
                rules = [r if (o := before.get(r.frontend)) is None or o != r else o for r in rules]
            outs[k] = tuple(rules)
            for r in rules:
                fe = r.frontend
                c = claims.get(fe)
                if c is None:
                    claims[fe] = k
                elif type(c) is set:
                    c.add(k)
                elif c != k:
                    claims[fe] = {c, k}
                fresh[fe] = r
                touched.append(fe)
        self._dirty.clear()
        self.recompiled = recompiled
        track = self._state is not None  # states share `live`: say what each frontend had
        previous: dict[Frontend, FrontendRule | None] = {}
        for fe in touched:
            c = claims.get(fe)
            if c is None:
                rule = None
            elif type(c) is tuple:  # one claimant: made now, or (its rival gone) made before
                rule = fresh.get(fe) or _rule_of(outs[c], fe)  # type: ignore[index]
            else:  # the first claimant in (namespace, name) order
                rule = _rule_of(outs[min(c)], fe)  # type: ignore[type-var]
            was = live.get(fe)
            if was is rule:
                continue
            if track and fe not in previous:
                previous[fe] = was
            if rule is None:
                del live[fe]
            else:
                live[fe] = rule
        old = self._state
        health = old.health_checks if old is not None else ()
        if health_changed or old is None:  # (the first state of a compiler restored from a snapshot has some)
            by_port: dict[int, HealthCheck] = {}
            for k in sorted(health_checks):
                by_port.setdefault(health_checks[k].port, health_checks[k])
            health = tuple(sorted(by_port.values()))
        if old is not None and not previous and health == old.health_checks:
            return old  # recompiled to the same rules
        alive = []
        for ref in self._states:
            st = ref()
            if st is not None:
                st._moved_on(previous)
                alive.append(ref)
        self._seq += 1
        self._state = ServiceState.shared(
            live, self._seq, old, previous,
            service_cidrs=self._cidrs.text, node_ips=self._node_ips,
            health_checks=health, masquerade_mark=self.config.masquerade_mark)
        alive.append(weakref.ref(self._state))
        self._states = alive
        return self._state


_GC_PAUSE_FROM = 1000  # Services recompiled at once


@contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Compiling many Services allocates many objects and no reference cycles: the
    cyclic collector would only walk every live object, again and again."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _keep_slots(rule: FrontendRule, old: FrontendRule | None,
                hints: dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]],
                done: dict[tuple[int, int], tuple[Backend, ...]],
                raw: tuple[tuple[Backend, ...], tuple[Backend, ...]] | None = None) -> FrontendRule:
    """The rule with its large endpoint lists in the slot order of `old` (or of the hint for
    its frontend): see kept_order. `raw`: old's lists as compiled, before their slots were
    kept (what came and left is found against them). `done` shares the work between
    frontends of one Service."""
    if old is not None:
        before = (old.backends, old.short_circuit)
    else:
        before = hints.get(rule.frontend) or ((), ())
        raw = None
    now = (rule.backends, rule.short_circuit)
    after = []
    for i, (prev, cur) in enumerate(zip(before, now, strict=True)):
        if len(cur) <= LARGE_ABOVE or prev is cur:
            after.append(cur)
            continue
        key = (id(prev), id(cur))
        order = done.get(key)
        if order is None:  # (nothing to keep: address order)
            changes = _changes(raw[i], cur) if raw is not None and len(raw[i]) == len(prev) else None
            order = done[key] = kept_order(prev, cur, changes) if prev else tuple(sorted(cur, key=_ip_key))
        after.append(order)
    if after[0] is now[0] and after[1] is now[1]:
        return rule
    return rule._replace(backends=after[0], short_circuit=after[1])


_FEW = 64  # endpoints that came or left, up to which kept_order finds their slots by search
_RUN = 256  # endpoints compared at once by _changes


def _changes(a: tuple[Backend, ...], b: tuple[Backend, ...]) -> tuple[set[Backend], set[Backend]]:
    """(came, left) between two lists of distinct endpoints, found from the ends in: the
    common head and tail are compared a run at a time in C (the slices that did not change
    hold the very same objects), only the part between them goes into sets."""
    if a is b:
        return set(), set()
    n = min(len(a), len(b))
    i = 0
    while i + _RUN <= n and a[i:i + _RUN] == b[i:i + _RUN]:
        i += _RUN
    while i < n and a[i] == b[i]:
        i += 1
    j, m, la, lb = 0, n - i, len(a), len(b)
    while j + _RUN <= m and a[la - j - _RUN:la - j] == b[lb - j - _RUN:lb - j]:
        j += _RUN
    while j < m and a[la - 1 - j] == b[lb - 1 - j]:
        j += 1
    mid_a, mid_b = set(a[i:la - j]), set(b[i:lb - j])
    return mid_b - mid_a, mid_a - mid_b


def kept_order(before: tuple[Backend, ...], endpoints: tuple[Backend, ...],
               changes: tuple[set[Backend], set[Backend]] | None = None) -> tuple[Backend, ...]:
    """`endpoints` in slots that keep every endpoint of `before` that is still there where
    it was: the slots of the endpoints that left are filled, in order, first by the ones
    that stay but sat beyond the new count (in slot order), then by the new ones (in
    address order). The slots that change are as many as the endpoints that came, left or
    moved up. `changes`: the endpoints that (came, left), when known (see _changes; then
    `before` holds no endpoint twice): a few cost a search each in C, not a pass in Python."""
    n = len(endpoints)
    if changes is not None:
        came, left = changes
        if not came and not left and len(before) == n:
            return before  # the same endpoints: every one in its slot
        if len(came) + len(left) <= _FEW:
            kept: list[Backend | None] = list(before[:n])
            holes = sorted(i for i in map(before.index, left) if i < n)
            for i in holes:
                kept[i] = None
            if n > len(before):
                holes += range(len(before), n)
                kept += [None] * (n - len(before))
            fill = [b for b in before[n:] if b not in left] + sorted(came, key=_ip_key)
            for i, b in zip(holes, fill, strict=True):
                kept[i] = b
            return tuple(kept)  # type: ignore[arg-type]
    where = {b: i for i, b in enumerate(before)}
    slots: list[Backend | None] = [None] * n
    rest: list[Backend] = []
    moved: list[Backend] = []
    for b in endpoints:
        i = where.get(b)
        if i is None:
            rest.append(b)
        elif i < n and slots[i] is None:
            slots[i] = b
        else:
            moved.append(b)
    if not rest and not moved and len(before) == n:
        return before  # the same endpoints: every one in its slot
    moved.sort(key=where.__getitem__)
    rest.sort(key=_ip_key)
    fill = iter(moved + rest)
    for i in range(n):
        if slots[i] is None:
            slots[i] = next(fill)
    return tuple(slots)  # type: ignore[arg-type]


def _rule_of(rules: tuple[FrontendRule, ...], fe: Frontend) -> FrontendRule:
    for r in rules:
        if r.frontend == fe:
            return r
    raise KeyError(fe)


def same_version(old: ServiceInfo | SliceInfo | None,
                 new: Service | EndpointSlice | ServiceRecord | SliceRecord) -> bool:
    """Whether the compiler already holds new at its resourceVersion (a replayed list costs nothing)."""
    rv = new.version if isinstance(new, (SliceRecord, ServiceRecord)) else new.metadata.resource_version
    return old is not None and rv is not None and old.version == rv
