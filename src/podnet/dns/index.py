"""The cluster's DNS records, in memory, updated one object at a time.

Built from Services, EndpointSlices, Pods (and optionally Namespaces), it answers
a question (lower-case wire name, type) with the records of the Kubernetes DNS
specification (kubernetes/dns docs/specification.md):

- ``<svc>.<ns>.svc.<zone>``: A/AAAA with the ClusterIP(s); for a headless Service
  one record per ready endpoint, NXDOMAIN when none is ready; CNAME for
  ExternalName Services.
- ``<hostname>.<svc>.<ns>.svc.<zone>``: A/AAAA of the ready endpoints of a headless
  Service with that hostname (an endpoint without one is named by its dashed IP).
- ``_<port>._<proto>.<svc>.<ns>.svc.<zone>``: SRV per named port (ClusterIP: one,
  pointing at the Service; headless: one per ready endpoint), with the target
  addresses in the additional section.
- PTR for ClusterIPs and for the ready endpoints of headless Services.
- ``<a>-<b>-<c>-<d>.<ns>.pod.<zone>``: A (the deprecated pod records the spec keeps).
- ``dns-version.<zone>`` TXT "1.1.0"; SOA and NS at the apex.

Negative answers are exact: NXDOMAIN when the name does not exist, NODATA
(NOERROR, empty answer) when it exists with other types or only as an empty
non-terminal (``<ns>.svc.<zone>``, ``_tcp.<svc>...``); both carry the zone's SOA.

Each object is stored compactly (tuples, packed addresses); a change costs time
in proportion to the object changed. Rendered responses are cached by the
server in ``responses`` and dropped per Service / namespace / address when the
objects behind them change.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from podnet.dns import wire
from podnet.dns.wire import AAAA, ANY, CNAME, IN, NS, NXDOMAIN, PTR, SOA, SRV, TXT, A
from podnet.model import records
from podnet.model.addresses import packed_ip
from podnet.model.objects import EndpointSlice, KubeObject, Namespace, Pod, Service
from podnet.model.onemany import add_one, discard_one
from podnet.model.records import SliceRecord, slice_record_of
from podnet.model.slots import PickledBySlots
from podnet.policy.model import PodInfo, pod_info
from podnet.store.objects import split_object_key

SCHEMA_VERSION = "1.1.0"
_inet_pton, _AF_INET = socket.inet_pton, socket.AF_INET

KIND_CLUSTERIP, KIND_HEADLESS, KIND_EXTERNAL = 0, 1, 2
POD_MODES = ("insecure", "verified", "disabled")


@dataclass
class Answer:
    """What the index says about one question (records carry wire data)."""

    rcode: int
    answer: list = field(default_factory=list)
    authority: list = field(default_factory=list)
    additional: list = field(default_factory=list)
    # ExternalName: the CNAME target (outside the zone) still to be resolved upstream
    chase: bytes | None = None
    # NXDOMAIN for a name under <ns>.svc.<zone>: autopath may walk the search path
    autopath_ns: str | None = None

    def records(self, section: str = "answer") -> list[tuple[str, str, int, str]]:
        """(name, type, ttl, value) in presentation form, for tests and tools."""
        out = []
        for owner, rtype, _cls, ttl, rdata in getattr(self, section):
            name = wire.wire_to_text(owner) if owner is not None else "@"
            out.append((name, wire.TYPE_NAMES.get(rtype, str(rtype)), ttl, wire.rdata_text(rtype, rdata)))
        return out


class NamedPort(NamedTuple):
    """A named port of a Service or an EndpointSlice (interned: shared between objects)."""

    name: str  # lower-case
    proto: str  # lower-case: tcp, udp, sctp
    port: int


# One Service, compactly: (kind, ips, ports, external, publish_not_ready) = KIND_*, the
# packed ClusterIPs, the named ports, the ExternalName target as a wire name (None when it
# is not a valid name), whether not-ready endpoints of a headless Service get records.
# A plain tuple, read by unpacking: building a NamedTuple costs 0.3 us more, a tenth of
# applying a Service.
ServiceRecord = tuple[int, tuple[bytes, ...], tuple[NamedPort, ...], bytes | None, bool]
# Whose endpoint an address is, for its PTR record: (ns, svc, host), host the endpoint's
# hostname (lower-case) or None (named by its dashed address). A plain tuple for the same
# reason: one is built per named endpoint whenever its slice changes.
EndpointName = tuple[str, str, str | None]


class _Slice(PickledBySlots):
    """One EndpointSlice, compactly: packed addresses, a ready bitmask, hostnames."""

    __slots__ = ("svc", "width", "addrs", "ready", "hosts", "ports")

    def __init__(self, svc: str, width: int, addrs: bytes, ready: int, hosts: tuple | None,
                 ports: tuple[NamedPort, ...]):
        self.svc = svc
        self.width = width
        self.addrs = addrs
        self.ready = ready
        self.hosts = hosts  # per address: hostname (lower) or None; None when no endpoint has one
        self.ports = ports  # NamedPorts, sorted

    def endpoints(self, all_ready: bool = False) -> Iterable[tuple[bytes, str | None]]:
        w, addrs, ready, hosts = self.width, self.addrs, self.ready, self.hosts
        for i in range(len(addrs) // w):
            if all_ready or (ready >> i) & 1:
                yield addrs[i * w:(i + 1) * w], (hosts[i] if hosts else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Slice) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def dashed(packed: bytes) -> str:
    """The system-assigned endpoint hostname: the address with dashes (as CoreDNS)."""
    if len(packed) == 4:
        return "-".join(str(b) for b in packed)
    return ipaddress.IPv6Address(packed).exploded.replace(":", "-")


def _pod_name_to_packed(label: bytes) -> bytes | None:
    try:
        text = label.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split("-")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
        try:
            return ipaddress.IPv4Address(".".join(parts)).packed
        except ValueError:
            return None
    if ":" in text or "." in text:
        return None
    try:
        return ipaddress.IPv6Address(text.replace("-", ":")).packed
    except ValueError:
        return None


class ClusterIndex:
    """Services, EndpointSlices and Pods -> DNS answers.

    Mutations (apply/remove) and answer compilation take ``lock``; readers of
    ``responses`` (the server's hot path) need no lock: entries are replaced or
    deleted whole.
    """

    def __init__(self, zone: str = "cluster.local", ttl: int = 5, pod_records: str = "insecure",
                 dns_address: str | None = None, node_name: str | None = None, max_cached: int = 100_000):
        if pod_records not in POD_MODES:
            raise ValueError(f"pod_records {pod_records!r}: expected one of {', '.join(POD_MODES)}")
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError(f"ttl {ttl} is out of range")
        self.zone = zone.strip(".").lower()
        self.zone_wire = wire.name_to_wire(self.zone)
        self.zone_labels = wire.wire_labels(self.zone_wire)
        self.ttl = ttl
        self.pod_records = pod_records
        self.dns_address = ipaddress.ip_address(dns_address).packed if dns_address else None
        self.node_name = node_name
        self.max_cached = max_cached
        self.lock = threading.RLock()
        self.generation = 0
        self._svc: dict[str, dict[str, ServiceRecord]] = {}  # ns -> {name -> record}
        self._slices: dict[tuple[str, str], _Slice] = {}
        # (ns, svc) -> its slice name, or a set of names when it has several (one is the rule)
        self._svc_slices: dict[tuple[str, str], str | set[str]] = {}
        self._cip_ptr: dict[bytes, tuple[str, str]] = {}  # ClusterIP -> (ns, svc)
        # endpoint IP -> its EndpointName, or a list of them (one EndpointName per slice for the
        # endpoints without a hostname)
        self._ep_ptr: dict[bytes, EndpointName | list[EndpointName]] = {}
        self._interned: dict[tuple, tuple] = {}  # named ports and tuples of them, shared between objects
        # "ns/name" -> its packed addresses (verified mode; () otherwise: only that it exists)
        self._pods: dict[str, tuple[bytes, ...]] = {}
        self._pod_ips: dict[str, dict[bytes, int]] = {}  # ns -> {ip: count} (verified mode)
        self._ns_objects: set[str] = set()
        self._ns_count: dict[str, int] = {}
        self.local_pods: dict[str, str] = {}  # pod IP -> namespace, for pods on node_name
        self._local_by_key: dict[str, tuple[str, ...]] = {}
        # rendered responses (filled by the server) and what to drop when something changes
        self.responses: dict[bytes, object] = {}
        self._groups: dict[object, list[bytes]] = {}
        self.serial = int(time.time()) & 0xFFFFFFFF
        self._soa_rr = (self.zone_wire, SOA, IN, ttl, wire.rdata_soa(
            wire.name_to_wire("ns.dns." + self.zone), wire.name_to_wire("hostmaster." + self.zone),
            self.serial, 7200, 1800, 86400, ttl))

    # ------------------------------------------------------------ feeding

    def apply(self, obj: KubeObject) -> None:
        """Add or replace one object (other kinds are ignored)."""
        # The agent's records first, by their exact class: an agent's first list brings every
        # pod of the cluster, and isinstance against the models' classes is an ABC check each.
        cls = obj.__class__
        if cls is PodInfo:  # the agent's record of a Pod (agent/records.py)
            self._set_pod_ips(obj.namespace, obj.name, obj.ips, obj.node, obj.key)  # type: ignore[attr-defined]
        elif cls is SliceRecord:
            self._apply_slice(obj)  # type: ignore[arg-type]
        elif cls is records.ServiceRecord:
            self._apply_service(obj)  # type: ignore[arg-type]
        elif isinstance(obj, records.ServiceRecord):  # the agent's record of a Service
            self._apply_service(obj)
        elif isinstance(obj, Service):
            self._apply_service(records.service_record_of(obj))
        elif isinstance(obj, (SliceRecord, EndpointSlice)):
            self._apply_slice(obj)
        elif isinstance(obj, Pod):
            self._apply_pod(obj)
        elif isinstance(obj, PodInfo):  # the agent's record of a Pod (agent/records.py)
            self._set_pod_ips(obj.namespace, obj.name, obj.ips, obj.node, obj.key)
        elif isinstance(obj, Namespace):
            with self.lock:
                if obj.name not in self._ns_objects:
                    self._ns_objects.add(obj.name)
                    self._ns_delta(obj.name, 1)

    def remove(self, obj: KubeObject) -> None:
        self.remove_key(obj.KIND, obj.namespace, obj.name)

    def remove_key(self, kind: str, namespace: str | None, name: str) -> None:
        ns = namespace or "default"
        with self.lock:
            if kind == "Service":
                self._remove_service(ns, name)
            elif kind == "EndpointSlice":
                self._set_slice(ns, name, None)
            elif kind == "Pod":
                self._set_pod(ns, name, None, False)
            elif kind == "Namespace":
                if name in self._ns_objects:
                    self._ns_objects.discard(name)
                    self._ns_delta(name, -1)

    def apply_event(self, event) -> None:
        """Feed one ``podnet.store.objects.ObjectEvent``."""
        if event.type == "DELETED":
            if event.object is not None:
                self.remove(event.object)
                return
            parts = split_object_key(event.key)
            if parts is not None:
                self.remove_key(*parts)
        elif event.object is not None:
            self.apply(event.object)

    def load(self, objects: Iterable[KubeObject]) -> None:
        for obj in objects:
            self.apply(obj)

    # what the index was fed, for the agent's restart snapshot (answers are rendered again)
    _FED = ("_svc", "_slices", "_svc_slices", "_cip_ptr", "_ep_ptr", "_interned", "_pods", "_pod_ips",
            "_ns_objects", "_ns_count", "local_pods", "_local_by_key")

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {name: getattr(self, name) for name in self._FED}

    def restore(self, state: dict[str, object]) -> None:
        """Hold what snapshot() returned, in place (the server keeps this index)."""
        with self.lock:
            for name in self._FED:
                setattr(self, name, state[name])
            self.generation += 1
            self.responses.clear()
            self._groups.clear()

    def keys(self) -> list[tuple[str, str | None, str]]:
        """(kind, namespace, name) of every object held ("default" for an empty namespace,
        None for Namespaces): what a reload compares with a fresh list."""
        with self.lock:
            out: list[tuple[str, str | None, str]] = [
                ("Service", ns, name) for ns, names in self._svc.items() for name in names]
            out += [("EndpointSlice", ns, name) for ns, name in self._slices]
            out += [("Pod", *key.split("/", 1)) for key in self._pods]  # type: ignore[misc]
            out += [("Namespace", None, name) for name in self._ns_objects]
        return out

    # -- services

    def _service_record(self, svc: records.ServiceRecord) -> ServiceRecord:
        ports = self._intern(tuple(self._named_port(p[0], p[1], p[2]) for p in svc.ports if p[0]))
        if svc.type == "ExternalName":
            target = (svc.external_name or "").strip().lower()
            try:
                ext = wire.name_to_wire(target)
            except (wire.WireError, UnicodeError):
                ext = None
            return (KIND_EXTERNAL, (), ports, ext, False)
        if svc.headless:
            return (KIND_HEADLESS, (), ports, None, svc.publish_not_ready)
        ips = []
        for ip in svc.cluster_ips or ((svc.cluster_ip,) if svc.cluster_ip else ()):
            if ip and ip != "None":
                try:
                    ips.append(packed_ip(ip))
                except ValueError:
                    pass
        return (KIND_CLUSTERIP, tuple(ips), ports, None, False)

    def _apply_service(self, svc: records.ServiceRecord) -> None:
        ns, name = svc.namespace or "default", svc.name
        rec = self._service_record(svc)
        with self.lock:
            old = self._svc.get(ns, {}).get(name)
            if old == rec:
                return
            self._unindex_service(ns, name, old)
            self._svc.setdefault(ns, {})[name] = rec
            if old is None:
                self._ns_delta(ns, 1)
            self._index_service(ns, name, rec)
            self._changed((ns, name))

    def _remove_service(self, ns: str, name: str) -> None:
        old = self._svc.get(ns, {}).get(name)
        if old is None:
            return
        self._unindex_service(ns, name, old)
        del self._svc[ns][name]
        if not self._svc[ns]:
            del self._svc[ns]
        self._ns_delta(ns, -1)
        self._changed((ns, name))

    def _index_service(self, ns: str, name: str, rec: ServiceRecord) -> None:
        kind, ips, _, _, _ = rec
        key = (ns, name)
        for ip in ips:
            self._cip_ptr[ip] = key
            self._invalidate(("ptr", ip))
        if kind == KIND_HEADLESS:
            for slice_name in self._slice_names(key):
                self._slice_ptrs(ns, self._slices[(ns, slice_name)], rec, add=True)

    def _unindex_service(self, ns: str, name: str, rec: ServiceRecord | None) -> None:
        if rec is None:
            return
        kind, ips, _, _, _ = rec
        key = (ns, name)
        for ip in ips:
            if self._cip_ptr.get(ip) == key:
                del self._cip_ptr[ip]
            self._invalidate(("ptr", ip))
        if kind == KIND_HEADLESS:
            for slice_name in self._slice_names(key):
                self._slice_ptrs(ns, self._slices[(ns, slice_name)], rec, add=False)

    # -- endpoint slices

    def _apply_slice(self, es: SliceRecord | EndpointSlice) -> None:
        if not isinstance(es, SliceRecord):
            es = slice_record_of(es)
        ns = es.namespace or "default"
        svc = es.service_name
        if not svc or es.address_type == "FQDN":
            with self.lock:
                self._set_slice(ns, es.name, None)
            return
        width = 4 if es.address_type == "IPv4" else 16
        addrs = bytearray()
        ready = 0
        hosts: list[str | None] = []
        i = 0
        for addresses, is_ready, _, _, _, hostname, _ in es.endpoints:
            host = hostname.lower() if hostname else None
            for a in addresses:
                try:  # packed_ip's first try inlined: every endpoint of the cluster passes here
                    addrs += _inet_pton(_AF_INET, a)
                except (OSError, TypeError):
                    addrs += packed_ip(a)
                if is_ready is not False:
                    ready |= 1 << i
                hosts.append(host)
                i += 1
        ports = self._intern(tuple(sorted(
            self._named_port(name, protocol, port) for name, protocol, port in es.ports or () if name and port)))
        rec = _Slice(svc, width, bytes(addrs), ready,
                     tuple(hosts) if any(h is not None for h in hosts) else None, ports)
        with self.lock:
            self._set_slice(ns, es.name, rec)

    def _set_slice(self, ns: str, name: str, rec: _Slice | None) -> None:
        key = (ns, name)
        old = self._slices.get(key)
        if old == rec:
            return
        if old is not None:
            svc_rec = self._svc.get(ns, {}).get(old.svc)
            if svc_rec is not None and svc_rec[0] == KIND_HEADLESS:  # its kind
                self._slice_ptrs(ns, old, svc_rec, add=False)
            discard_one(self._svc_slices, (ns, old.svc), name)
            del self._slices[key]
            self._changed((ns, old.svc))
        if rec is not None:
            self._slices[key] = rec
            add_one(self._svc_slices, (ns, rec.svc), name)
            svc_rec = self._svc.get(ns, {}).get(rec.svc)
            if svc_rec is not None and svc_rec[0] == KIND_HEADLESS:  # its kind
                self._slice_ptrs(ns, rec, svc_rec, add=True)
            self._changed((ns, rec.svc))

    def _slice_names(self, key: tuple[str, str]) -> Iterable[str]:
        names = self._svc_slices.get(key)
        if names is None:
            return ()
        return (names,) if isinstance(names, str) else sorted(names)

    def _intern(self, value: tuple) -> tuple:
        return self._interned.setdefault(value, value)

    def _named_port(self, name: str, protocol: str, port: int) -> NamedPort:
        name, protocol = name.lower(), protocol.lower()
        named = self._interned.get((name, protocol, port))  # equal to the NamedPort stored
        if named is None:
            named = NamedPort(sys.intern(name), sys.intern(protocol), port)
            self._interned[named] = named
        return named

    def _slice_ptrs(self, ns: str, sl: _Slice, svc_rec: ServiceRecord, add: bool) -> None:
        table = self._ep_ptr
        publish_not_ready = svc_rec[4]
        shared = (ns, sl.svc, None)  # one tuple for every endpoint without a hostname (compared by value)
        for packed, host in sl.endpoints(all_ready=publish_not_ready):
            entry = shared if host is None else (ns, sl.svc, host)
            cur = table.get(packed)
            if add:
                if cur is None:
                    table[packed] = entry
                elif type(cur) is list:
                    cur.append(entry)
                else:
                    table[packed] = [cur, entry]
            elif cur is not None:
                if type(cur) is list:
                    if entry in cur:
                        cur.remove(entry)
                    if len(cur) == 1:
                        table[packed] = cur[0]
                elif cur == entry:
                    del table[packed]
            self._invalidate(("ptr", packed))

    # -- pods and namespaces

    def _apply_pod(self, pod: Pod) -> None:
        info = pod_info(pod)  # the one reading of a model Pod's addresses
        self._set_pod_ips(info.namespace, info.name, info.ips, info.node, info.key)

    def _set_pod_ips(self, ns: str, name: str, ips: tuple[str, ...], node: str | None,
                     key: str | None = None) -> None:
        local = bool(self.node_name) and node == self.node_name and bool(ips)
        # Only verified pod records need a pod's addresses; otherwise an agent keeps one
        # entry per pod of the cluster, so it keeps nothing else.
        packed = tuple(packed_ip(i) for i in ips) if self.pod_records == "verified" else ()
        with self.lock:
            self._set_pod(ns, name, packed, local, ips, key)

    def _set_pod(self, ns: str, name: str, packed: tuple | None, local: bool, texts: tuple[str, ...] = (),
                 key: str | None = None) -> None:
        key = key or f"{ns}/{name}"
        old = self._pods.get(key)
        # local pods for autopath
        for ip in self._local_by_key.pop(key, ()):
            if self.local_pods.get(ip) == ns:
                del self.local_pods[ip]
        if local:
            self._local_by_key[key] = tuple(texts)
            for ip in texts:
                self.local_pods[ip] = ns
        if old == packed:
            return
        if self.pod_records == "verified":
            ips = self._pod_ips.setdefault(ns, {})
            for ip in old or ():
                n = ips.get(ip, 0) - 1
                if n > 0:
                    ips[ip] = n
                else:
                    ips.pop(ip, None)
            for ip in packed or ():
                ips[ip] = ips.get(ip, 0) + 1
            if not ips:
                del self._pod_ips[ns]
        if packed is None:
            del self._pods[key]
            self._ns_delta(ns, -1)
        else:
            self._pods[key] = packed
            if old is None:
                self._ns_delta(ns, 1)
        if self.pod_records == "verified":
            self._changed(("ns", ns))

    def _ns_delta(self, ns: str, delta: int) -> None:
        before = self._ns_count.get(ns, 0)
        after = before + delta
        if after > 0:
            self._ns_count[ns] = after
        else:
            self._ns_count.pop(ns, None)
        if (before > 0) != (after > 0):
            self._changed(("ns", ns))

    def namespace_exists(self, ns: str) -> bool:
        return ns in self._ns_count

    # ------------------------------------------------------------ cache invalidation

    def _changed(self, group: object) -> None:
        self.generation += 1
        self._invalidate(group)

    def _invalidate(self, group: object) -> None:
        keys = self._groups.pop(group, None)
        if keys:
            responses = self.responses
            for k in keys:
                responses.pop(k, None)

    def cache_response(self, key: bytes, group: object, entry: object, generation: int) -> bool:
        """Store a rendered response, unless the index changed since ``generation``."""
        with self.lock:
            if generation != self.generation:
                return False
            if len(self.responses) >= self.max_cached:
                self.responses.clear()
                self._groups.clear()
            self.responses[key] = entry
            if group is not None:
                self._groups.setdefault(group, []).append(key)
            return True

    # ------------------------------------------------------------ answering

    def is_ours(self, qname: bytes) -> bool:
        """Whether a lower-case wire name is at or under the cluster zone."""
        zw = self.zone_wire
        if not qname.endswith(zw):
            return False
        i = 0
        cut = len(qname) - len(zw)
        while i < cut:
            i += 1 + qname[i]
        return i == cut

    def lookup(self, name: str, qtype: int | str = A) -> Answer | None:
        """Resolve a presentation-form name (any case): the Answer, or None if not ours."""
        if isinstance(qtype, str):
            qtype = wire.TYPE_CODES[qtype.upper()]
        res = self.resolve(wire.name_to_wire(name).lower(), qtype)
        return None if res is None else res[0]

    def resolve(self, qname: bytes, qtype: int) -> tuple[Answer, object] | None:
        """Answer a lower-case wire name: (Answer, invalidation group), or None if the
        name is neither in the zone nor a reverse name we hold."""
        with self.lock:
            labels = wire.wire_labels(qname)
            zl = self.zone_labels
            nz = len(zl)
            if len(labels) >= nz and labels[len(labels) - nz:] == zl:
                return self._in_zone(labels[:len(labels) - nz], qtype)
            if qtype in (PTR, ANY) and len(labels) in (6, 34):
                packed = wire.reverse_to_packed(labels)
                if packed is not None:
                    return self._ptr(packed)
            return None

    def _negative(self, rcode: int, autopath_ns: str | None = None) -> Answer:
        return Answer(rcode, [], [self._soa_rr], autopath_ns=autopath_ns)

    def _nodata(self) -> Answer:
        return self._negative(0)

    def _addr_answer(self, owner: bytes | None, addrs: Iterable[bytes], qtype: int) -> list:
        ttl = self.ttl
        out = []
        for a in addrs:
            t = A if len(a) == 4 else AAAA
            if qtype == t or qtype == ANY:
                out.append((owner, t, IN, ttl, a))
        return out

    def _in_zone(self, rel: list[bytes], qtype: int) -> tuple[Answer, object]:
        n = len(rel)
        ttl = self.ttl
        if n == 0:
            ans = []
            if qtype in (SOA, ANY):
                ans.append((None, SOA, IN, ttl, self._soa_rr[4]))
            if qtype in (NS, ANY):
                ans.append((None, NS, IN, ttl, wire.name_to_wire("ns.dns." + self.zone)))
            return (Answer(0, ans) if ans else self._nodata()), None
        top = rel[-1]
        if top == b"svc":
            if n == 1:
                return self._nodata(), None
            ns = rel[-2].decode("ascii", "replace")
            if n == 2:
                return (self._nodata() if ns in self._ns_count else self._negative(NXDOMAIN)), ("ns", ns)
            svc = rel[-3].decode("ascii", "replace")
            return self._service_answer(ns, svc, rel[:-3], qtype), (ns, svc)
        if top == b"pod":
            if n == 1:
                return self._nodata(), None
            ns = rel[-2].decode("ascii", "replace")
            group = ("ns", ns)
            if ns not in self._ns_count or n > 3:
                return self._negative(NXDOMAIN), group
            if n == 2:
                return self._nodata(), group
            packed = _pod_name_to_packed(rel[0]) if self.pod_records != "disabled" else None
            if packed is None or (self.pod_records == "verified"
                                  and packed not in self._pod_ips.get(ns, {})):
                return self._negative(NXDOMAIN), group
            ans = self._addr_answer(None, [packed], qtype)
            return (Answer(0, ans) if ans else self._nodata()), group
        if n == 1 and top == b"dns-version":
            if qtype in (TXT, ANY):
                return Answer(0, [(None, TXT, IN, ttl, wire.rdata_txt(SCHEMA_VERSION))]), None
            return self._nodata(), None
        if self.dns_address is not None and top == b"dns":
            if n == 1:
                return self._nodata(), None
            if n == 2 and rel[0] == b"ns":
                ans = self._addr_answer(None, [self.dns_address], qtype)
                return (Answer(0, ans) if ans else self._nodata()), None
        return self._negative(NXDOMAIN), None

    def _ready(self, ns: str, svc: str, rec: ServiceRecord) -> list[tuple[bytes, str | None, _Slice]]:
        """(packed address, hostname, its slice) of each endpoint that gets records."""
        publish_not_ready = rec[4]
        out = []
        for slice_name in self._slice_names((ns, svc)):
            sl = self._slices[(ns, slice_name)]
            for packed, host in sl.endpoints(all_ready=publish_not_ready):
                out.append((packed, host, sl))
        return out

    def _service_answer(self, ns: str, svc: str, below: list[bytes], qtype: int) -> Answer:
        rec = self._svc.get(ns, {}).get(svc)
        nxdomain = self._negative(NXDOMAIN, autopath_ns=ns)
        if rec is None:
            return nxdomain
        kind, ips, ports, external, _ = rec
        ttl = self.ttl
        svc_wire = wire.labels_to_wire([svc.encode(), ns.encode(), b"svc", *self.zone_labels])
        if kind == KIND_EXTERNAL:
            if below or external is None:
                return nxdomain
            ans = Answer(0, [(None, CNAME, IN, ttl, external)])
            if qtype != CNAME:
                ans.chase = external
            return ans
        if kind == KIND_CLUSTERIP:
            if not below:
                recs = self._addr_answer(None, ips, qtype)
                return Answer(0, recs) if recs else self._nodata()
            if len(below) == 1:
                lab = below[0]
                if lab[:1] == b"_" and any("_" + p.proto == lab.decode("ascii", "replace") for p in ports):
                    return self._nodata()
                return nxdomain
            if len(below) == 2:
                pname, proto = below[0].decode("ascii", "replace"), below[1].decode("ascii", "replace")
                for p in ports:
                    if "_" + p.name == pname and "_" + p.proto == proto:
                        if qtype not in (SRV, ANY):
                            return self._nodata()
                        return Answer(0, [(None, SRV, IN, ttl, wire.rdata_srv(0, 100, p.port, svc_wire))], [],
                                      self._addr_answer(svc_wire, ips, ANY))
            return nxdomain
        # headless
        eps = self._ready(ns, svc, rec)
        if not eps:
            return nxdomain
        if not below:
            recs = self._addr_answer(None, sorted({packed for packed, _, _ in eps}), qtype)
            return Answer(0, recs) if recs else self._nodata()
        if len(below) == 1:
            lab = below[0].decode("ascii", "replace")
            if lab.startswith("_"):
                if any("_" + p.proto == lab for _, _, sl in eps for p in sl.ports):
                    return self._nodata()
                return nxdomain
            addrs = sorted({packed for packed, host, _ in eps if (host or dashed(packed)) == lab})
            if not addrs:
                return nxdomain
            recs = self._addr_answer(None, addrs, qtype)
            return Answer(0, recs) if recs else self._nodata()
        if len(below) == 2:
            pname, proto = below[0].decode("ascii", "replace"), below[1].decode("ascii", "replace")
            targets: dict[tuple[bytes, int], None] = {}
            hosts: dict[bytes, set[bytes]] = {}
            for packed, host, sl in eps:
                for p in sl.ports:
                    if "_" + p.name == pname and "_" + p.proto == proto:
                        target = wire.labels_to_wire([(host or dashed(packed)).encode()])[:-1] + svc_wire
                        targets[(target, p.port)] = None
                        hosts.setdefault(target, set()).add(packed)
            if not targets:
                return nxdomain
            if qtype not in (SRV, ANY):
                return self._nodata()
            weight = max(1, 100 // len(targets))
            srv = [(None, SRV, IN, ttl, wire.rdata_srv(0, weight, port, target))
                   for target, port in sorted(targets)]
            extra = []
            for target in sorted(hosts):
                extra += self._addr_answer(target, sorted(hosts[target]), ANY)
            return Answer(0, srv, [], extra)
        return nxdomain

    def _ptr(self, packed: bytes) -> tuple[Answer, object] | None:
        targets = []
        svc_key = self._cip_ptr.get(packed)
        if svc_key is not None:
            ns, svc = svc_key
            targets.append(wire.labels_to_wire([svc.encode(), ns.encode(), b"svc", *self.zone_labels]))
        cur = self._ep_ptr.get(packed)
        if cur is not None:
            for ns, svc, host in (cur if type(cur) is list else [cur]):
                t = wire.labels_to_wire([(host or dashed(packed)).encode(), svc.encode(), ns.encode(), b"svc",
                                         *self.zone_labels])
                if t not in targets:
                    targets.append(t)
        if not targets:
            return None
        ttl = self.ttl
        return Answer(0, [(None, PTR, IN, ttl, t) for t in targets]), ("ptr", packed)

    # ------------------------------------------------------------ numbers

    def stats(self) -> dict[str, int]:
        return {
            "services": sum(len(v) for v in self._svc.values()),
            "endpoint_slices": len(self._slices),
            "endpoints": sum(len(s.addrs) // s.width for s in self._slices.values()),
            "pods": len(self._pods),
            "namespaces": len(self._ns_count),
            "ptr_cluster_ips": len(self._cip_ptr),
            "ptr_endpoints": len(self._ep_ptr),
            "cached_responses": len(self.responses),
        }
