"""The Service source: which records the Services in the store ask for, as ExternalDNS's
service source reads them.

A Service is published under the names of its `external-dns.kubernetes.io/hostname`
annotation (comma-separated) with

    LoadBalancer   spec.externalIPs, else status.loadBalancer.ingress IPs (hostnames,
                   as a CNAME, only when there is no IP)
    NodePort       the nodes' ExternalIPs, else their InternalIPs (annotation
                   external-dns.kubernetes.io/access: public | private picks one); with
                   externalTrafficPolicy Local only nodes with a ready endpoint;
                   unschedulable nodes left out; an SRV record per node port
                   (_<service>._<proto>.<hostname>) when SRV is a managed type
    ClusterIP      headless: the ready endpoints' addresses from its EndpointSlices (and
                   <hostname>.<name> for an endpoint with a hostname); else its
                   ClusterIP, only with --publish-internal-services
    ExternalName   spec.externalIPs, else spec.externalName as a CNAME

and under the names of `external-dns.kubernetes.io/internal-hostname` with its
ClusterIP. `external-dns.kubernetes.io/target` replaces the targets; `ttl` sets the
TTL (seconds or a duration: 300, 5m). A Service whose annotations do not parse
(a name with odd characters, a TTL that is not one) is reported, naming the Service
and the annotation, and held: its records stay as they are until it is fixed, and
every other Service goes on.

It is one more consumer of the agent's follower (a Dataplane fed by events): its
indexes are Services, their EndpointSlices and the Nodes; each Service's records are
computed once and again only when the Service, its slices or (for NodePort) a Node
changes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from podnet.agent.contract import Dataplane
from podnet.externaldns.endpoint import Endpoint, canonical_target, check_dns_name, parse_ttl, record_type
from podnet.model.objects import EndpointSlice, Node, Service
from podnet.model.records import SliceRecord, slice_record_of
from podnet.store.objects import ObjectEvent, split_object_key

PREFIX = "external-dns.kubernetes.io/"
HOSTNAME = PREFIX + "hostname"
INTERNAL_HOSTNAME = PREFIX + "internal-hostname"
TTL = PREFIX + "ttl"
TARGET = PREFIX + "target"
ACCESS = PREFIX + "access"
CONTROLLER = PREFIX + "controller"
CONTROLLER_VALUE = "dns-controller"  # ExternalDNS's: a Service naming another controller is not ours
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")

ServiceRef = tuple[str, str]


@dataclass(frozen=True)
class SourceOptions:
    publish_internal: bool = False  # --publish-internal-services
    service_types: frozenset[str] = frozenset()  # --service-type-filter (empty: all)
    always_publish_not_ready: bool = False  # --always-publish-not-ready-addresses
    exclude_unschedulable: bool = True  # --exclude-unschedulable


def resource_of(svc: Service) -> str:
    return f"service/{svc.namespace}/{svc.name}"


class Problem(ValueError):
    """An annotation that does not parse; the message names the annotation."""


def _names(svc: Service, key: str) -> list[str]:
    raw = svc.metadata.annotations.get(key)
    if raw is None:
        return []
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(check_dns_name(part))
        except ValueError as e:
            raise Problem(f"annotation {key}: {e}") from None
    return out


def service_endpoints(svc: Service, slices: Iterable[SliceRecord | EndpointSlice], nodes: Iterable[Node],
                      opts: SourceOptions = SourceOptions()) -> list[Endpoint]:
    """The records the Service asks for; Problem naming the annotation that does not parse."""
    slices = [s if isinstance(s, SliceRecord) else slice_record_of(s) for s in slices]
    ann = svc.metadata.annotations
    if ann.get(CONTROLLER, CONTROLLER_VALUE) != CONTROLLER_VALUE:
        return []
    if opts.service_types and svc.spec.type not in opts.service_types:
        return []
    hostnames = _names(svc, HOSTNAME)
    internal = _names(svc, INTERNAL_HOSTNAME)
    if not hostnames and not internal:
        return []
    ttl = None
    if TTL in ann:
        try:
            ttl = parse_ttl(ann[TTL])
        except ValueError as e:
            raise Problem(f"annotation {TTL}: {e}") from None
    override = None
    if TARGET in ann and ann[TARGET].strip():
        override = []
        for t in ann[TARGET].split(","):
            t = t.strip()
            if not t:
                continue
            try:
                override.append(canonical_target(t) if record_type(t) != "CNAME" else check_dns_name(t, wildcard=False))
            except ValueError as e:
                raise Problem(f"annotation {TARGET}: {e}") from None
    access = ann.get(ACCESS)
    if access is not None and access not in ("public", "private"):
        raise Problem(f"annotation {ACCESS}: {access!r} is not public or private")
    resource = resource_of(svc)
    slices = list(slices)
    out: list[Endpoint] = []
    for hostname in hostnames:
        out += _for_hostname(svc, hostname, ttl, override, slices, nodes, opts, resource, internal=False)
    for hostname in internal:
        out += _for_hostname(svc, hostname, ttl, override, slices, nodes, opts, resource, internal=True)
    return out


def _for_hostname(svc: Service, hostname: str, ttl: int | None, override: list[str] | None,
                  slices: list[SliceRecord], nodes: Iterable[Node], opts: SourceOptions, resource: str,
                  internal: bool) -> list[Endpoint]:
    spec = svc.spec
    extra: list[Endpoint] = []
    if override is not None:
        targets = override
        return _by_type(hostname, targets, ttl, resource, from_annotation=True)
    targets: list[str] = []
    if spec.type == "LoadBalancer":
        if internal:
            targets = _cluster_ips(svc)
        elif spec.external_ips:
            targets = list(spec.external_ips)
        else:
            for ing in svc.status.load_balancer.ingress:
                if ing.ip:
                    targets.append(ing.ip)
                if ing.hostname:
                    targets.append(ing.hostname)
    elif spec.type == "ClusterIP":
        if spec.headless:
            return _headless(svc, hostname, ttl, slices, opts, resource)
        if internal or opts.publish_internal:
            targets = _cluster_ips(svc)
    elif spec.type == "NodePort":
        targets = _node_targets(svc, slices, nodes, opts)
        for p in spec.ports:
            if p.node_port:
                extra.append(Endpoint(f"_{svc.name}._{p.protocol.lower()}.{hostname}", "SRV",
                                      (f"0 50 {p.node_port} {hostname}",), ttl, resource))
    elif spec.type == "ExternalName":
        targets = list(spec.external_ips) or ([spec.external_name] if spec.external_name else [])
    return _by_type(hostname, targets, ttl, resource) + extra


def _cluster_ips(svc: Service) -> list[str]:
    ips = svc.spec.cluster_ips or ([svc.spec.cluster_ip] if svc.spec.cluster_ip else [])
    return [ip for ip in ips if ip not in ("None", "")]


def _by_type(hostname: str, targets: Iterable[str], ttl: int | None, resource: str,
             from_annotation: bool = False) -> list[Endpoint]:
    """A, AAAA and CNAME records from mixed targets. Where there are addresses a hostname
    target is dropped (a CNAME shares its name with nothing); more than one hostname and
    no address cannot be one CNAME."""
    by: dict[str, set[str]] = {}
    for t in targets:
        by.setdefault(record_type(t), set()).add(canonical_target(t))
    if "CNAME" in by and ("A" in by or "AAAA" in by):
        if from_annotation:
            raise Problem(f"annotation {TARGET}: mixes addresses and hostnames ({', '.join(sorted(by['CNAME']))}); "
                          "a name holds addresses or one CNAME, not both")
        del by["CNAME"]
    if len(by.get("CNAME", ())) > 1:
        where = f"annotation {TARGET}" if from_annotation else "status.loadBalancer.ingress"
        raise Problem(f"{where}: {len(by['CNAME'])} hostnames ({', '.join(sorted(by['CNAME']))}) for {hostname}: "
                      "a CNAME has one target")
    return [Endpoint(hostname, t, tuple(sorted(by[t])), ttl, resource) for t in ("A", "AAAA", "CNAME") if by.get(t)]


def _publishes(svc: Service, opts: SourceOptions, ready: bool) -> bool:
    return ready or svc.spec.publish_not_ready_addresses or opts.always_publish_not_ready


def _headless(svc: Service, hostname: str, ttl: int | None, slices: list[SliceRecord], opts: SourceOptions,
              resource: str) -> list[Endpoint]:
    by_name: dict[str, list[str]] = {}
    for s in slices:
        if s.address_type not in ("IPv4", "IPv6"):
            continue
        for addresses, ready, _, _, _, ep_hostname, _ in s.endpoints:
            if not addresses or not _publishes(svc, opts, ready is not False):
                continue
            address = addresses[0]
            by_name.setdefault(hostname, []).append(address)
            if ep_hostname:
                by_name.setdefault(f"{ep_hostname}.{hostname}", []).append(address)
    out: list[Endpoint] = []
    for name in sorted(by_name):
        out += _by_type(name, by_name[name], ttl, resource)
    return out


def _node_targets(svc: Service, slices: list[SliceRecord], nodes: Iterable[Node], opts: SourceOptions) -> list[str]:
    chosen = list(nodes)
    if svc.spec.external_traffic_policy == "Local":
        local = {node for s in slices for _, ready, _, _, node, _, _ in s.endpoints
                 if node and _publishes(svc, opts, ready is not False)}
        chosen = [n for n in chosen if n.name in local]
    internal_ips, external_ips = [], []
    for node in chosen:
        if node.spec.unschedulable and opts.exclude_unschedulable:
            continue
        for a in node.status.addresses:
            if a.type == "ExternalIP":
                external_ips.append(a.address)
            elif a.type == "InternalIP":
                internal_ips.append(a.address)
    access = svc.metadata.annotations.get(ACCESS)
    if access == "public":
        return external_ips
    if access == "private":
        return internal_ips
    return external_ips or internal_ips


class ServiceSource(Dataplane):
    """Services, their EndpointSlices and the Nodes, fed by the follower; the records they
    ask for, and the Services whose annotations do not parse."""

    name = "external-dns"
    kinds = frozenset({Service.KIND, EndpointSlice.KIND, Node.KIND})

    def __init__(self, opts: SourceOptions = SourceOptions()):
        self.opts = opts
        self.cond = threading.Condition()
        self.revision = 0
        self.changed = True  # something changed since the last snapshot
        self._reset()

    def _reset(self) -> None:
        self.services: dict[ServiceRef, Service] = {}
        self.slices: dict[str, SliceRecord] = {}
        self.slices_of: dict[ServiceRef, set[str]] = {}
        self.nodes: dict[str, Node] = {}
        self._results: dict[ServiceRef, list[Endpoint] | Problem] = {}

    # ------------------------------------------------------------------ events (the follower's thread)

    def begin_reload(self) -> None:
        with self.cond:
            self._reset()
            self.changed = True

    def on_event(self, ev: ObjectEvent) -> bool:
        parts = split_object_key(ev.key)
        if parts is None:
            return False
        kind, ns, name = parts
        with self.cond:
            if kind == Service.KIND:
                ref = (ns or "default", name)
                old = self.services.get(ref)
                if ev.object is None:
                    self.services.pop(ref, None)
                else:
                    self.services[ref] = ev.object  # type: ignore[assignment]
                if old is not None and ev.object is not None and _same_service(old, ev.object):  # type: ignore[arg-type]
                    return False
                self._results.pop(ref, None)
            elif kind == EndpointSlice.KIND:
                old_slice = self.slices.pop(ev.key, None)
                refs = set()
                if old_slice is not None and old_slice.service_name:
                    refs.add((ns or "default", old_slice.service_name))
                    self.slices_of.get((ns or "default", old_slice.service_name), set()).discard(ev.key)
                if ev.object is not None:
                    s = ev.object if isinstance(ev.object, SliceRecord) else slice_record_of(ev.object)  # type: ignore[arg-type]
                    self.slices[ev.key] = s
                    if s.service_name:
                        refs.add((ns or "default", s.service_name))
                        self.slices_of.setdefault((ns or "default", s.service_name), set()).add(ev.key)
                refs = {r for r in refs if r in self.services and _uses_slices(self.services[r])}
                if not refs:
                    return False
                for r in refs:
                    self._results.pop(r, None)
            elif kind == Node.KIND:
                old_node = self.nodes.get(name)
                if ev.object is None:
                    self.nodes.pop(name, None)
                else:
                    self.nodes[name] = ev.object  # type: ignore[assignment]
                if old_node is not None and ev.object is not None and _node_view(old_node) == _node_view(ev.object):  # type: ignore[arg-type]
                    return False
                for r, svc in self.services.items():
                    if svc.spec.type == "NodePort":
                        self._results.pop(r, None)
            else:
                return False
            self.changed = True
            return True

    def on_change(self, revision: int, _dirty: list[Dataplane]) -> None:
        with self.cond:
            self.revision = max(self.revision, revision)
            self.cond.notify_all()

    def sync(self, full: bool) -> str:  # the controller reads snapshot() from its own loop
        return ""

    # ------------------------------------------------------------------ the controller's thread

    def wait(self, timeout: float, stopping: threading.Event) -> bool:
        """Wait up to `timeout` for a change; True if there is one."""
        with self.cond:
            if not self.changed and not stopping.is_set():
                self.cond.wait(timeout)
            return self.changed

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def snapshot(self) -> tuple[int, list[Endpoint], dict[str, list[str]]]:
        """(revision, every desired record, problems by resource) as of now."""
        with self.cond:
            self.changed = False
            endpoints: list[Endpoint] = []
            problems: dict[str, list[str]] = {}
            for ref, svc in self.services.items():
                got = self._results.get(ref)
                if got is None:
                    slices = [self.slices[k] for k in self.slices_of.get(ref, ())]
                    try:
                        got = service_endpoints(svc, slices, self.nodes.values(), self.opts)
                    except Problem as e:
                        got = e
                    self._results[ref] = got
                if isinstance(got, Problem):
                    problems.setdefault(resource_of(svc), []).append(str(got))
                else:
                    endpoints.extend(got)
            return self.revision, endpoints, problems


def _same_service(a: Service, b: Service) -> bool:
    return (a.spec == b.spec and a.status == b.status
            and {k: v for k, v in a.metadata.annotations.items() if k.startswith(PREFIX)}
            == {k: v for k, v in b.metadata.annotations.items() if k.startswith(PREFIX)})


def _uses_slices(svc: Service) -> bool:
    return svc.spec.headless or (svc.spec.type == "NodePort" and svc.spec.external_traffic_policy == "Local")


def _node_view(node: Node) -> tuple:
    return (node.spec.unschedulable, tuple((a.type, a.address) for a in node.status.addresses))
