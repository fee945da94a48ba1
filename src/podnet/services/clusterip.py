"""ClusterIP and NodePort allocation for `podnet apply`, race-free through the store.

Every allocated address or port is a key created with `Op.create` (must not
exist), so two concurrent applies can never hand out the same one:

    /podnet/services/clusterips/<ip>     {"service": "ns/name", "created": <epoch>}
    /podnet/services/nodeports/<port>    {"service": "ns/name", "created": <epoch>}

A Service keeps what it has: an apply without spec.clusterIP (or nodePort) of a
Service already in the store reuses the stored values. Keys left behind (a
failed apply, a deleted Service, a dropped port) are freed by `release_service`
or `gc_allocations`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Iterable, Iterator
from typing import Any

from podnet.errors import ValidationError
from podnet.model.objects import KubeObject, Service, ServicePort
from podnet.store.base import AlreadyExists, KeyValueStore, Op, StoreError
from podnet.store.layout import ALLOC
from podnet.store.objects import ObjectStore

CLUSTERIP_PREFIX = ALLOC + "services/clusterips/"
NODEPORT_PREFIX = ALLOC + "services/nodeports/"
NODEPORT_RANGE = (30000, 32767)
GC_GRACE_SECONDS = 600.0


def _kv(store: Any) -> KeyValueStore:
    return store.kv if isinstance(store, ObjectStore) else store


def _ref(svc: Service) -> str:
    return f"{svc.namespace or 'default'}/{svc.name}"


class _Allocator:
    """Reserve values under one key prefix, probing from a per-Service start point."""

    def __init__(self, kv: KeyValueStore, prefix: str, now: float):
        self.kv, self.prefix, self.now = kv, prefix, now
        records, _ = kv.list(prefix)
        self.owner = {r.key[len(prefix):]: (r.value or {}).get("service") for r in records}

    def reserve(self, value: str, owner: str) -> bool:
        """Claim `value` for owner; True if it is (now) owner's, False if someone else holds it."""
        held = self.owner.get(value)
        if held is not None:
            return held == owner
        try:
            self.kv.txn([Op.create(self.prefix + value, {"service": owner, "created": self.now})])
        except AlreadyExists:
            rec = self.kv.get(self.prefix + value)
            self.owner[value] = (rec.value or {}).get("service") if rec else None
            return self.owner[value] == owner
        self.owner[value] = owner
        return True

    def allocate(self, candidates: Iterator[str], owner: str, what: str, where: str) -> str:
        for value in candidates:
            if value not in self.owner and self.reserve(value, owner):
                return value
        raise ValidationError(f"no free {what} left", where=where)


def _probe(seed: str, size: int) -> Iterator[int]:
    start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % size
    for i in range(size):
        yield (start + i) % size


def _ip_candidates(net: ipaddress.IPv4Network | ipaddress.IPv6Network, seed: str) -> Iterator[str]:
    # Skip the network address, the first host (conventionally the API server's
    # Service) and, for IPv4, the broadcast address.
    first = int(net.network_address) + 2
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    size = max(0, last - first + 1)
    for off in _probe(seed, size):
        yield str(ipaddress.ip_address(first + off))


def _port_candidates(lo: int, hi: int, seed: str) -> Iterator[str]:
    for off in _probe(seed, hi - lo + 1):
        yield str(lo + off)


def allocate_cluster_ips(
    objects: Iterable[KubeObject],
    store: KeyValueStore | ObjectStore,
    service_cidr: str,
    node_port_range: tuple[int, int] = NODEPORT_RANGE,
    now: float | None = None,
) -> list[KubeObject]:
    """Fill in spec.clusterIP, nodePorts and healthCheckNodePort where a Service needs
    them and the manifest leaves them out. Returns the objects in the same order
    (Services replaced by completed copies). Raises ValidationError naming the
    Service and field for an address or port that is taken, out of range or
    changed on an existing Service."""
    kv = _kv(store)
    objects = list(objects)
    if not any(isinstance(o, Service) for o in objects):
        return objects
    net = ipaddress.ip_network(service_cidr, strict=True)
    now = time.time() if now is None else now
    ips = _Allocator(kv, CLUSTERIP_PREFIX, now)
    ports = _Allocator(kv, NODEPORT_PREFIX, now)
    current = ObjectStore(kv)
    out: list[KubeObject] = []
    for obj in objects:
        if isinstance(obj, Service):
            obj = _complete(obj, current.readable(Service, obj.name, obj.namespace), net, ips, ports, node_port_range)
        out.append(obj)
    return out


def _complete(svc: Service, stored: Service | None, net, ips: _Allocator, ports: _Allocator,
              node_port_range: tuple[int, int]) -> Service:
    spec = svc.spec
    if spec.type == "ExternalName":
        return svc
    owner, where = _ref(svc), svc.ref
    updates: dict[str, Any] = {}
    old_ip = stored.spec.cluster_ip if stored is not None else None
    ip = spec.cluster_ip
    if not spec.headless:
        if ip and old_ip and old_ip not in ("None", "") and ip != old_ip:
            raise ValidationError(f"is immutable: stored {old_ip}, manifest {ip}", where=where, field="spec.clusterIP")
        ip = ip or (old_ip if old_ip not in (None, "", "None") else None)
        if ip:
            if ipaddress.ip_address(ip) not in net:
                raise ValidationError(f"{ip} is not in the service CIDR {net}", where=where, field="spec.clusterIP")
            if not ips.reserve(ip, owner):
                raise ValidationError(f"{ip} is already allocated to Service {ips.owner.get(ip)}",
                                      where=where, field="spec.clusterIP")
        else:
            ip = ips.allocate(_ip_candidates(net, owner), owner, f"address in the service CIDR {net}", where)
        updates.update(cluster_ip=ip, cluster_ips=[ip])

    if spec.type in ("NodePort", "LoadBalancer"):
        lo, hi = node_port_range
        old_ports = {(p.name, p.port, p.protocol): p.node_port for p in (stored.spec.ports if stored else [])}
        new_ports: list[ServicePort] = []
        for i, p in enumerate(spec.ports):
            node_port = p.node_port or old_ports.get((p.name, p.port, p.protocol))
            field = f"spec.ports[{i}].nodePort"
            if node_port:
                if not lo <= node_port <= hi:
                    raise ValidationError(f"{node_port} is outside the NodePort range {lo}-{hi}", where=where,
                                          field=field)
                if not ports.reserve(str(node_port), owner):
                    raise ValidationError(f"{node_port} is already allocated to Service "
                                          f"{ports.owner.get(str(node_port))}", where=where, field=field)
            else:
                node_port = int(ports.allocate(_port_candidates(lo, hi, f"{owner}/{i}"), owner,
                                               f"NodePort in {lo}-{hi}", where))
            new_ports.append(p.model_copy(update={"node_port": node_port}))
        updates["ports"] = new_ports
        if spec.type == "LoadBalancer" and spec.external_traffic_policy == "Local":
            hc = spec.health_check_node_port or (stored.spec.health_check_node_port if stored else None)
            if hc:
                if not ports.reserve(str(hc), owner):
                    raise ValidationError(f"{hc} is already allocated to Service {ports.owner.get(str(hc))}",
                                          where=where, field="spec.healthCheckNodePort")
            else:
                hc = int(ports.allocate(_port_candidates(lo, hi, f"{owner}/health"), owner,
                                        f"NodePort in {lo}-{hi}", where))
            updates["health_check_node_port"] = hc
    if not updates:
        return svc
    return svc.model_copy(update={"spec": spec.model_copy(update=updates)})


def _uses(svc: Service) -> tuple[set[str], set[str]]:
    ips = {svc.spec.cluster_ip} if svc.spec.cluster_ip and svc.spec.cluster_ip != "None" else set()
    ports = {str(p.node_port) for p in svc.spec.ports if p.node_port}
    if svc.spec.health_check_node_port:
        ports.add(str(svc.spec.health_check_node_port))
    return ips, ports


def release_service(store: KeyValueStore | ObjectStore, svc: Service) -> int:
    """Free the keys a (deleted) Service holds; returns how many."""
    return release_service_named(store, svc.namespace or "default", svc.name)


def release_service_named(store: KeyValueStore | ObjectStore, namespace: str, name: str) -> int:
    """Free the keys held by the Service of that name (one deleted, or one that could not be read)."""
    kv = _kv(store)
    owner = f"{namespace}/{name}"
    freed = 0
    for prefix in (CLUSTERIP_PREFIX, NODEPORT_PREFIX):
        records, _ = kv.list(prefix)
        for r in records:
            if (r.value or {}).get("service") == owner:
                try:
                    kv.txn([Op.delete(r.key, r.revision)])
                    freed += 1
                except StoreError:  # changed meanwhile: leave it to gc
                    continue
    return freed


def gc_allocations(store: KeyValueStore | ObjectStore, grace: float = GC_GRACE_SECONDS,
                   now: float | None = None) -> list[str]:
    """Free keys older than `grace` whose Service is gone or no longer uses them.

    The grace period covers an apply between its reservation and its write.
    Each delete is conditioned on the key's revision. Returns the freed keys.
    """
    kv = _kv(store)
    now = time.time() if now is None else now
    in_use: dict[str, tuple[set[str], set[str]]] = {
        _ref(s): _uses(s) for s in ObjectStore(kv).list(Service)  # type: ignore[misc]
    }
    freed = []
    for prefix, which in ((CLUSTERIP_PREFIX, 0), (NODEPORT_PREFIX, 1)):
        records, _ = kv.list(prefix)
        for r in records:
            value = r.value or {}
            if now - float(value.get("created", 0)) < grace:
                continue
            uses = in_use.get(value.get("service", ""))
            if uses is not None and r.key[len(prefix):] in uses[which]:
                continue
            try:
                kv.txn([Op.delete(r.key, r.revision)])
                freed.append(r.key)
            except StoreError:  # changed meanwhile: look again next time
                continue
    return freed
