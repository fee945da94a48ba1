"""`podnet apply`, `podnet get`, `podnet delete`: manifests in and out of the store."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from podnet.cli.common import objects_from_args
from podnet.cli.output import Column, add_output_flag, emit, is_table, print_table
from podnet.cluster import (
    CLUSTER_CONFIG_KEY,
    DEFAULT_SERVICE_CIDR,
    ensure_cluster_config,
    planned_cluster_config,
)
from podnet.errors import PodnetError, ValidationError
from podnet.ipam.overlap import overlapping_pairs
from podnet.model.manifests import Source, load_paths, locate
from podnet.model.objects import (
    BGPConfiguration,
    BGPPeer,
    EndpointSlice,
    IPAMConfig,
    IPPool,
    IPReservation,
    KubeObject,
    Namespace,
    NetworkAttachmentDefinition,
    NetworkPolicy,
    Node,
    Pod,
    Service,
    kind_for,
)
from podnet.model.selectors import LabelSelector
from podnet.services.clusterip import allocate_cluster_ips, release_service, release_service_named
from podnet.store.objects import ObjectStore, UndecodableObject, object_key, split_object_key

# Namespaces that exist without a manifest, as in a fresh cluster.
BUILTIN_NAMESPACES = {"default", "kube-system"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="create or update objects from manifests, all or nothing")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR",
                   help="manifest file or directory (repeatable)")
    p.add_argument("--service-cidr", default=None,
                   help="the cluster's Service CIDR, where Services without spec.clusterIP get one: set by the "
                        f"first apply on a store (default $PODNET_SERVICE_CIDR or {DEFAULT_SERVICE_CIDR}) and "
                        f"kept in {CLUSTER_CONFIG_KEY}; a later apply may only repeat it")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("get", help="show objects")
    p.add_argument("kind", help="kind, plural or short name (pods, svc, ippools, ...)")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", help="label selector, e.g. app=web,tier in (a,b)")
    add_output_flag(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", help="delete the objects named in manifests, or one object by kind and name")
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-f", "--filename", action="append", metavar="FILE|DIR")
    p.add_argument("--key", metavar="KEY",
                   help="delete the stored value at this object key, even one that cannot be read "
                        "(as `podnet get` names it)")
    p.set_defaults(func=cmd_delete)


def load_manifests(paths: list[str]) -> list[KubeObject]:
    return load_paths(list(paths))


def check_namespaces(store: ObjectStore, objects: list[KubeObject]) -> None:
    """A namespaced object needs its Namespace, in the store or in the same manifest set."""
    wanted = {o.namespace for o in objects if o.NAMESPACED and o.namespace not in BUILTIN_NAMESPACES}
    given = {o.name for o in objects if isinstance(o, Namespace)}
    for ns in sorted(wanted - given):
        if store.kv.get(object_key(Namespace, ns)) is None:
            first = next(o for o in objects if o.NAMESPACED and o.namespace == ns)
            raise ValidationError(f"namespace {ns!r} does not exist (add a Namespace manifest)",
                                  where=first.ref, field="metadata.namespace")


# Fields that cannot change once set: blocks are cut from them and may hold pods.
IMMUTABLE: dict[type[KubeObject], tuple[str, ...]] = {IPPool: ("cidr", "block_size")}


def check_immutable(store: ObjectStore, objects: list[KubeObject]) -> None:
    for obj in objects:
        fields = IMMUTABLE.get(type(obj))
        current = store.readable(type(obj), obj.name, obj.namespace) if fields else None
        for f in fields or ():
            old, new = getattr(current.spec, f) if current else None, getattr(obj.spec, f)
            if current is not None and old != new:
                alias = type(obj.spec).model_fields[f].alias or f
                raise ValidationError(f"is immutable: stored {old}, manifest {new} (delete and recreate the object)",
                                      where=obj.ref, field=f"spec.{alias}")


def check_pool_overlaps(store: ObjectStore, objects: list[KubeObject], service_cidr: str,
                        sources: dict[str, Source]) -> None:
    """No two IPPools may share an address, nor a pool and the Service CIDR: blocks cut
    from both would hand one address to two pods (or a pod a Service's address)."""
    applied = [o for o in objects if isinstance(o, IPPool)]
    if not applied:
        return
    names = {p.name for p in applied}
    stored = [p for p in store.list(IPPool) if p.name not in names]
    # Keys: an index into `applied`, a stored pool's ref, or None for the Service CIDR.
    ranges: list[tuple[int | str | None, str]] = [(i, p.spec.cidr) for i, p in enumerate(applied)]
    ranges += [(p.ref, p.spec.cidr) for p in stored]
    ranges.append((None, service_cidr))
    by_ref = {p.ref: p for p in stored}
    for a, b in overlapping_pairs(ranges):
        if isinstance(b, int) and (not isinstance(a, int) or b > a):
            a, b = b, a  # blame the pool being applied, the later one if both are
        if not isinstance(a, int):
            continue  # two stored pools: `podnet ipam check` reports what they did
        pool = applied[a]
        if b is None:
            what = f"the Service CIDR {service_cidr} (the cluster's serviceCIDR, {CLUSTER_CONFIG_KEY})"
        elif isinstance(b, int):
            other = applied[b]
            src = sources.get(other.ref)
            at = f"{src.file}: document {src.index}" if src else "in this apply"
            what = f"{other.ref} field spec.cidr {other.spec.cidr} ({at})"
        else:
            what = f"{b} field spec.cidr {by_ref[b].spec.cidr} (in the store)"
        raise ValidationError(f"{pool.spec.cidr} overlaps {what}: pools must not share addresses",
                              where=pool.ref, field="spec.cidr")


def cmd_apply(args: argparse.Namespace) -> int:
    sources: dict[str, Source] = {}
    objects = load_paths(list(args.filename), sources)
    store = objects_from_args(args, create=True)
    cidr, origin = args.service_cidr, "--service-cidr"
    if cidr is None and os.environ.get("PODNET_SERVICE_CIDR"):
        cidr, origin = os.environ["PODNET_SERVICE_CIDR"], "$PODNET_SERVICE_CIDR"
    cluster, new = planned_cluster_config(store.kv, service_cidr=cidr, origin=origin)
    try:
        check_namespaces(store, objects)
        check_immutable(store, objects)
        check_pool_overlaps(store, objects, cluster.service_cidr, sources)
        if new:  # the first apply on this store: its Service CIDR is the cluster's from now on
            cluster = ensure_cluster_config(store.kv, service_cidr=cluster.service_cidr, origin=origin)
        # As the API server does: Services get their ClusterIP and nodePorts before they are stored.
        objects = allocate_cluster_ips(objects, store, cluster.service_cidr)
    except ValidationError as e:
        raise locate(e, sources) from None
    _, outcome = store.apply(objects)
    for ref, what in outcome:
        print(f"{ref} {what}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = objects_from_args(args)
    if args.key:
        return _delete_key(store, args.key)
    if args.filename:
        objects = load_manifests(args.filename)
    elif args.kind and args.name:
        cls = _kind(args.kind)
        try:
            found = store.get(cls, args.name, args.namespace or "default")
        except UndecodableObject as e:  # remove it all the same: that is how it gets fixed
            return _delete_key(store, e.key)
        if found is None:
            raise PodnetError(f"{cls.KIND} {args.name!r} not found")
        objects = [found]
    else:
        raise PodnetError("delete needs -f FILE, KIND NAME or --key KEY")
    _, outcome = store.delete_all(objects)
    deleted = {ref for ref, what in outcome if what == "deleted"}
    for obj in objects:
        if isinstance(obj, Service) and obj.ref in deleted:
            release_service(store, obj)  # its ClusterIP and nodePorts are free again
    for ref, what in outcome:
        print(f"{ref} {what}")
    return 0


def _delete_key(store: ObjectStore, key: str) -> int:
    """Delete one stored object by key, readable or not, and free what a Service held."""
    gone = store.delete_key(key)
    if gone is None:
        raise PodnetError(f"{key}: not found")
    if isinstance(gone, UndecodableObject):
        kind, namespace, name = split_object_key(key) or ("", None, "")
        if kind == Service.KIND and namespace:
            release_service_named(store, namespace, name)
        print(f"{key} deleted (it could not be read: {gone.reason})")
        return 0
    if isinstance(gone, Service):
        release_service(store, gone)
    print(f"{gone.ref} deleted")
    return 0


def _kind(name: str) -> type[KubeObject]:
    try:
        return kind_for(name)
    except ValueError as e:
        raise PodnetError(str(e)) from None


def cmd_get(args: argparse.Namespace) -> int:
    cls = _kind(args.kind)
    store = objects_from_args(args)
    ns = None if (args.all_namespaces or not cls.NAMESPACED) else (args.namespace or "default")
    if args.name:
        try:
            obj = store.get(cls, args.name, ns)
        except UndecodableObject as e:
            raise PodnetError(f"{e} (remove it with `podnet delete --key {e.key}`)") from None
        if obj is None:
            raise PodnetError(f"{cls.KIND} {args.name!r} not found" + (f" in namespace {ns}" if ns else ""))
        objs = [obj]
    else:
        selector = None
        if args.selector:
            try:
                selector = LabelSelector.parse(args.selector)
            except ValueError as e:
                raise PodnetError(f"--selector: {e}") from None
        found = store.scan(cls, ns, selector)
        for bad in found.undecodable:
            print(f"warning: skipped {bad} (remove it with `podnet delete --key {bad.key}`)", file=sys.stderr)
        objs = found.objects
    if is_table(args.output):
        print_objects(cls, objs, show_namespace=cls.NAMESPACED and ns is None, wide=args.output == "wide")
    else:
        data = [o.to_dict() for o in objs]
        emit(data[0] if args.name else {"kind": "List", "items": data}, args.output)
    return 0


def _ports(s: Service) -> str:
    return ",".join(f"{p.port}{':' + str(p.node_port) if p.node_port else ''}/{p.protocol}" for p in s.spec.ports)


def _external_ips(s: Service) -> list[str]:
    return [*s.spec.external_ips, *(i.ip or i.hostname for i in s.status.load_balancer.ingress if i.ip or i.hostname)]


def _labels(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _selector(sel: LabelSelector | None) -> str:
    """kubectl's form: `app=web,tier in (a,b),!legacy`; empty for an empty selector."""
    if sel is None:
        return ""
    terms = [f"{k}={v}" for k, v in sorted((sel.match_labels or {}).items())]
    for r in sel.match_expressions or ():
        if r.operator == "Exists":
            terms.append(r.key)
        elif r.operator == "DoesNotExist":
            terms.append(f"!{r.key}")
        else:
            terms.append(f"{r.key} {r.operator.lower()} ({','.join(sorted(r.values or ()))})")
    return ",".join(terms)


def _attachments(pod: Pod) -> str:
    """Every interface of the pod from its network-status annotation: `eth0=10.244.0.5,
    net1=10.99.0.70(default/underlay)` (the cluster network without its name)."""
    from podnet.multinet.status import read_status

    out = []
    for entry in read_status(pod):
        ips = "+".join(entry.get("ips") or []) or "-"
        network = "" if entry.get("default") else f"({entry.get('name')})"
        out.append(f"{entry.get('interface') or '?'}={ips}{network}")
    return ",".join(out)


def _nad_plugins(nad: NetworkAttachmentDefinition) -> str:
    from podnet.multinet.netconf import NetConf, NetConfError

    try:
        conf = NetConf.parse(nad.spec.config)
    except NetConfError:
        return "<invalid>"
    ipam = [p["ipam"]["type"] for p in conf.plugins if isinstance(p.get("ipam"), dict) and p["ipam"].get("type")]
    return ",".join(p["type"] for p in conf.plugins) + (f" (ipam {','.join(ipam)})" if ipam else "")


def _slice_ports(s: EndpointSlice) -> str:
    return ",".join(str(p.port) if p.port is not None else "<unset>" for p in s.ports or ())


def _slice_endpoints(s: EndpointSlice) -> str:
    """The first three addresses and how many more, as kubectl shows them."""
    addrs = [a for e in s.endpoints for a in e.addresses]
    return ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")


def _node_address(kind: str) -> Callable[[Node], str | None]:
    return lambda n: next((a.address for a in n.status.addresses if a.type == kind), None)


# Columns after NAMESPACE and NAME, per kind, as `kubectl get` shows them; wide=True only with -o wide.
COLUMNS: dict[type[KubeObject], list[Column]] = {
    Namespace: [Column("STATUS", lambda o: (o.status or {}).get("phase") or "Active"),
                Column("LABELS", lambda o: _labels(o.labels), wide=True)],
    Node: [Column("INTERNAL-IP", _node_address("InternalIP")),
           Column("EXTERNAL-IP", _node_address("ExternalIP"), wide=True),
           Column("POD-CIDR", lambda o: o.spec.pod_cidrs or o.spec.pod_cidr, wide=True),
           Column("UNSCHEDULABLE", lambda o: o.spec.unschedulable, wide=True)],
    Pod: [Column("STATUS", lambda o: o.status.phase),
          Column("IP", lambda o: o.status.pod_ip, wide=True),
          Column("NODE", lambda o: o.spec.node_name, wide=True),
          Column("HOST-NETWORK", lambda o: o.spec.host_network, wide=True),
          Column("NETWORKS", _attachments, wide=True)],
    NetworkAttachmentDefinition: [Column("PLUGINS", _nad_plugins)],
    Service: [Column("TYPE", lambda o: o.spec.type), Column("CLUSTER-IP", lambda o: o.spec.cluster_ip),
              Column("EXTERNAL-IP", _external_ips), Column("PORT(S)", _ports),
              Column("SELECTOR", lambda o: _labels(o.spec.selector), wide=True)],
    EndpointSlice: [Column("ADDRESSTYPE", lambda o: o.address_type), Column("PORTS", _slice_ports),
                    Column("ENDPOINTS", _slice_endpoints),
                    Column("SERVICE", lambda o: o.labels.get("kubernetes.io/service-name"), wide=True)],
    NetworkPolicy: [Column("POD-SELECTOR", lambda o: _selector(o.spec.pod_selector)),
                    Column("POLICY-TYPES", lambda o: o.spec.policy_types, wide=True),
                    Column("INGRESS-RULES", lambda o: len(o.spec.ingress or ()), wide=True),
                    Column("EGRESS-RULES", lambda o: len(o.spec.egress or ()), wide=True)],
    IPPool: [Column("CIDR", lambda o: o.spec.cidr), Column("BLOCK", lambda o: f"/{o.spec.block_size}"),
             Column("ENCAP", lambda o: o.spec.encapsulation), Column("NAT", lambda o: o.spec.nat_outgoing),
             Column("DISABLED", lambda o: o.spec.disabled),
             Column("NODE-SELECTOR", lambda o: _selector(o.spec.node_selector), wide=True),
             Column("NAMESPACE-SELECTOR", lambda o: _selector(o.spec.namespace_selector), wide=True),
             Column("ALLOWED-USES", lambda o: o.spec.allowed_uses, wide=True)],
    IPReservation: [Column("RESERVED-CIDRS", lambda o: o.spec.reserved_cidrs)],
    IPAMConfig: [Column("STRICT-AFFINITY", lambda o: o.spec.strict_affinity),
                 Column("MAX-BLOCKS-PER-HOST", lambda o: o.spec.max_blocks_per_host)],
    BGPConfiguration: [Column("AS", lambda o: o.spec.as_number),
                       Column("MESH", lambda o: o.spec.node_to_node_mesh_enabled),
                       Column("LISTEN-PORT", lambda o: o.spec.listen_port, wide=True),
                       Column("SERVICE-CIDRS", lambda o: o.spec.service_cidrs, wide=True)],
    BGPPeer: [Column("PEER", lambda o: o.spec.peer_ip or _selector(o.spec.peer_selector)),
              Column("AS", lambda o: o.spec.as_number),
              Column("NODES", lambda o: o.spec.node or _selector(o.spec.node_selector) or "(all)"),
              Column("RESTART-TIME", lambda o: o.spec.max_restart_time, wide=True)],
}


def print_objects(cls: type[KubeObject], objs: list[KubeObject], *, show_namespace: bool, wide: bool = False) -> None:
    if not objs:
        print(f"No {cls.PLURAL} found.", file=sys.stderr)
        return
    cols = ([Column("NAMESPACE", lambda o: o.namespace)] if show_namespace else []) + [Column("NAME", lambda o: o.name)]
    print_table(cols + COLUMNS.get(cls, []), objs, wide=wide)
