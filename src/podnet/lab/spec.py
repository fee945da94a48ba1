"""The lab file: one YAML document of `kind: Lab` describing an emulated cluster.

    apiVersion: podnet.io/v1
    kind: Lab
    metadata: {name: demo}
    spec:
      underlay: {cidr: 10.99.0.0/24}        # gateway .1, nodes .11, .12, ...
      external: {address: 10.98.0.10/24}   # optional host outside the cluster
        # dns: true, or {zone: example.test, records: {www: 10.98.0.10}}: a DNS server (dnsmasq)
        # on the external address serving that zone (NXDOMAIN for every other name); the
        # agents forward to it and the nodes' resolv.conf names it
      serviceCIDR: 10.96.0.0/16            # optional; ClusterIPs are allocated from it
      resyncSeconds: 60                    # optional; the agents' full reconcile period
      dnsServer: separate                  # optional; node DNS in a process of its own per node
                                           # (`podnet dns serve`, survives the agent) | inprocess
      nodes:
        - {name: node-1, labels: {zone: a}}     # serviceProxy: nftables (default) | iptables
        # policyDataplane: nftables (default) | ebpf (NetworkPolicy by tc programs, with serviceProxy: ebpf; docs/ebpf.md)
        # BGP: `bgp: {}` (or true) gives the Node spec.bgp (asNumber, routeReflectorClusterID):
        # its agent runs BIRD; `rack: NAME` puts the node on that rack's segment
      router: {asNumber: 65000}            # optional; BIRD on the gateway (the external host's
                                           # side) peering with every BGP speaker on the underlay
      racks:                               # optional; needs router: a ToR (BIRD) per rack on the
        - {name: rack-a, cidr: 10.99.1.0/24, asNumber: 65001}   # underlay at .2, .3, ...,
                                           # gateway .1 of its rack's subnet, nodes .11, .12, ...
      cni: {plugin: podnet, chain: [portmap, tuning]}
      pods:
        - {name: web-1, namespace: default, node: node-1, labels: {app: web},
           ports: [{name: http, containerPort: 8080, protocol: TCP}]}
      manifests: [...]                     # Namespace, IPPool, Service, NetworkPolicy, Pod, ...
      cloud: {...}                         # optional; pod addresses from ENIs of a VPC (lab/cloud.py)
      dataNetwork:                         # optional; a second segment every node joins on its link
        cidr: 10.97.0.0/24                 # data0 (no address: the master of macvlan networks), and
        external: {address: 10.97.0.1/24, name: storage}   # a host on it that pods reach directly

Every problem is reported with the file, the lab and the dotted field path, as
manifests are (`podnet.model.manifests`); the inline manifests are validated by
that module, each named `spec.manifests[N]`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from podnet.errors import ValidationError
from podnet.lab.cloud import LabCloud
from podnet.model.base import Schema
from podnet.model.bgp import NodeBGPSpec, check_as_number
from podnet.model.manifests import ManifestErrors, Source, explain, field_path, parse_object, read_text
from podnet.model.objects import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    Container,
    ContainerPort,
    IPPool,
    IPPoolSpec,
    KubeObject,
    Namespace,
    Node,
    NodeAddress,
    NodeSpec,
    NodeStatus,
    ObjectMeta,
    Pod,
    PodSpec,
    Service,
)
from podnet.model.selectors import check_labels

API_VERSION = "podnet.io/v1"
LAB_NAME_MAX = 32
# The first node address is the underlay's .11; .1 is the gateway.
FIRST_NODE_OFFSET = 11
DEFAULT_POOL = {"name": "default-ipv4-ippool", "cidr": "10.244.0.0/16"}
KUBE_DNS = "kube-dns"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
# Reference plugins that take a capability from the runtime when chained.
CHAIN_CAPABILITIES = {"portmap": {"portMappings": True}, "bandwidth": {"bandwidth": True}}
PLUGIN_TYPE = re.compile(r"\A[A-Za-z0-9][-A-Za-z0-9_.]*\Z")
BANDWIDTH_ANNOTATIONS = ("kubernetes.io/ingress-bandwidth", "kubernetes.io/egress-bandwidth")
DEFAULT_DNS_ZONE = "example.test"
CLUSTER_DOMAIN = "cluster.local"  # what the lab's agents serve


class LabPort(ContainerPort):
    """A pod's port in a lab file: a container port, but unknown fields are mistakes here."""

    model_config = ConfigDict(extra="forbid")


def _check_ports(ports: list[LabPort]) -> list[LabPort]:
    names, pairs = set(), set()
    for i, p in enumerate(ports):
        if p.name is not None:
            if p.name in names:
                raise ValueError(f"ports[{i}]: duplicate port name {p.name!r}")
            names.add(p.name)
        if (p.container_port, p.protocol) in pairs:
            raise ValueError(f"ports[{i}]: {p.protocol}/{p.container_port} is listed twice")
        pairs.add((p.container_port, p.protocol))
    return ports


class UnderlaySpec(Schema):
    cidr: str

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError as e:
            raise ValueError(f"{v!r} is not a valid CIDR ({e})") from None
        if net.version != 4:
            raise ValueError("the underlay must be an IPv4 network")
        if net.prefixlen > 28:
            raise ValueError(f"underlay {v} is too small: expected /28 or larger (nodes start at .{FIRST_NODE_OFFSET})")
        return str(net)


class ExternalDnsSpec(Schema):
    """The outside world's DNS: one zone of A/AAAA records, NXDOMAIN for everything else."""

    zone: str = DEFAULT_DNS_ZONE
    # relative name (or "@" for the zone itself) -> address; empty: www -> the external address
    records: dict[str, str] = Field(default_factory=dict)

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        zone = v.strip(".").lower()
        if not zone or len(zone) > 253 or not DNS1123_SUBDOMAIN.fullmatch(zone) or any(
                len(label) > 63 for label in zone.split(".")):
            raise ValueError(f"{v!r} is not a domain name, e.g. {DEFAULT_DNS_ZONE}")
        if zone == CLUSTER_DOMAIN or zone.endswith("." + CLUSTER_DOMAIN) or CLUSTER_DOMAIN.endswith("." + zone):
            raise ValueError(f"zone {zone} overlaps the cluster domain {CLUSTER_DOMAIN}, which the nodes serve")
        return zone

    @field_validator("records")
    @classmethod
    def _records(cls, v: dict[str, str]) -> dict[str, str]:
        for name, address in v.items():
            if name != "@" and (len(name) > 190 or not DNS1123_SUBDOMAIN.fullmatch(name)
                                or any(len(label) > 63 for label in name.split("."))):
                raise ValueError(f"record {name!r}: expected a name relative to the zone (e.g. www) or '@'")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"record {name!r}: {address!r} is not an IP address") from None
        return v


class ExternalSpec(Schema):
    address: str
    name: str = "external"
    ports: list[LabPort] = Field(default_factory=lambda: [
        LabPort(container_port=8080, protocol="TCP"), LabPort(container_port=8080, protocol="UDP")])
    dns: ExternalDnsSpec | None = None

    @field_validator("dns", mode="before")
    @classmethod
    def _dns(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return None
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"expected true or a mapping with zone and records, got {v!r}")
        return v

    @model_validator(mode="after")
    def _dns_default_records(self) -> ExternalSpec:
        if self.dns is not None and not self.dns.records:
            ip = str(ipaddress.ip_interface(self.address).ip)
            object.__setattr__(self, "dns", self.dns.model_copy(update={"records": {"www": ip}}))
        return self

    def dns_hosts(self) -> list[tuple[str, str]]:
        """(fully qualified name, address) for every record of spec.external.dns."""
        if self.dns is None:
            return []
        zone = self.dns.zone
        return [(zone if name == "@" else f"{name.lower()}.{zone}", address)
                for name, address in self.dns.records.items()]

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            iface = ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an address with a prefix length, e.g. 10.98.0.10/24") from None
        if "/" not in v:
            raise ValueError(f"{v!r} needs a prefix length, e.g. {v}/24")
        if iface.version != 4:
            raise ValueError("the external address must be IPv4")
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and iface.network.prefixlen < 31:
            raise ValueError(f"{v} is the network or broadcast address of its subnet")
        return str(iface)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[LabPort]) -> list[LabPort]:
        return _check_ports(v)


class DataNetworkSpec(Schema):
    """A second segment for pods' additional networks (podnet.multinet): every node's `data0`
    link is on it, without an address (a macvlan master); the external host is on it too,
    and pods on it reach that host, and are reached by it, without routing or NAT."""

    cidr: str
    external: ExternalSpec | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return UnderlaySpec._cidr(v)


class LabNode(Schema):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    # the agent's Service dataplane: podnet's nftables maps, kube-proxy's iptables layout, or eBPF on tc
    service_proxy: Literal["nftables", "iptables", "ebpf"] = "nftables"
    # the agent's NetworkPolicy dataplane: podnet's nftables table, or eBPF on tc at the pods' veths
    policy_dataplane: Literal["nftables", "ebpf"] = "nftables"
    # BGP: the Node's spec.bgp (the agent runs BIRD); `true` for an empty one
    bgp: NodeBGPSpec | None = None
    rack: str | None = None  # the rack (spec.racks) whose segment the node is on

    @field_validator("bgp", mode="before")
    @classmethod
    def _bgp(cls, v: Any) -> Any:
        return {} if v is True else None if v is False else v

    @model_validator(mode="after")
    def _policy_needs_ebpf_services(self) -> LabNode:
        from podnet.policy.ebpf import combination_error

        if self.policy_dataplane == "ebpf" and (error := combination_error(self.service_proxy, "policyDataplane:",
                                                                           "serviceProxy:")):
            raise ValueError(error)
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.fullmatch(v):
            raise ValueError(f"invalid node name {v!r}: expected a DNS label (lowercase, digits, '-', at most 63)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)


class LabRack(Schema):
    """A rack: its own subnet behind a ToR router (BIRD, in AS asNumber) on the underlay."""

    name: str
    cidr: str
    as_number: int

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.fullmatch(v):
            raise ValueError(f"invalid rack name {v!r}: expected a DNS label (lowercase, digits, '-', at most 63)")
        return v

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return UnderlaySpec._cidr(v)

    @field_validator("as_number", mode="before")
    @classmethod
    def _as(cls, v: Any) -> int:
        return check_as_number(v)


class LabRouter(Schema):
    """The external router: BIRD in the underlay's namespace, on the gateway address."""

    as_number: int = 65000

    @field_validator("as_number", mode="before")
    @classmethod
    def _as(cls, v: Any) -> int:
        return check_as_number(v)


class CniSpec(Schema):
    # podnet: podnet-cni talking to one agent per node (the real thing).
    # bridge: the reference bridge + host-local plugins with one block of the first pool
    #         per node and direct routes between nodes; needs no agent.
    plugin: Literal["podnet", "bridge"] = "podnet"
    chain: list[str | dict[str, Any]] = Field(default_factory=list)
    cni_version: str | None = None

    @field_validator("chain")
    @classmethod
    def _chain(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for i, entry in enumerate(v):
            kind = entry if isinstance(entry, str) else entry.get("type")
            if not isinstance(kind, str) or not PLUGIN_TYPE.fullmatch(kind):
                raise ValueError(f"chain[{i}]: expected a plugin name or a mapping with a 'type' (got {kind!r})")
            if kind == "podnet-cni":
                raise ValueError(f"chain[{i}]: podnet-cni is always first; list only the plugins chained after it")
        return v

    def chain_configs(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.chain:
            if isinstance(entry, str):
                conf: dict[str, Any] = {"type": entry}
                if entry in CHAIN_CAPABILITIES:
                    conf["capabilities"] = dict(CHAIN_CAPABILITIES[entry])
                if entry == "portmap":
                    conf["snat"] = True
                out.append(conf)
            else:
                out.append(dict(entry))
        return out


class LabPod(Schema):
    name: str
    namespace: str = "default"
    node: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    host_network: bool = False
    ports: list[LabPort] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        ObjectMeta._name(v)
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        ObjectMeta._namespace(v)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[LabPort]) -> list[LabPort]:
        return _check_ports(v)

    def to_pod(self) -> Pod:
        meta = ObjectMeta(name=self.name, namespace=self.namespace, labels=self.labels,
                          annotations=self.annotations)
        ports = [ContainerPort(name=p.name, container_port=p.container_port, protocol=p.protocol,
                               host_port=p.host_port, host_ip=p.host_ip) for p in self.ports]
        container = Container(name="server", image="podnet-lab-server", ports=ports)
        return Pod(metadata=meta, spec=PodSpec(node_name=self.node, host_network=self.host_network,
                                                containers=[container]))


class LabSpecBody(Schema):
    underlay: UnderlaySpec
    external: ExternalSpec | None = None
    service_cidr: str = Field(default=DEFAULT_SERVICE_CIDR, alias="serviceCIDR")
    # the agents' full reconcile period (podnet agent --resync): drift heals within it
    resync_seconds: float = Field(default=60.0, alias="resyncSeconds", gt=0, le=3600)
    # node DNS: `podnet dns serve` per node beside the agent (answers while the agent is
    # down), or the agent itself (podnet agent --dns-server)
    dns_server: Literal["separate", "inprocess"] = Field(default="separate", alias="dnsServer")
    nodes: list[LabNode]
    router: LabRouter | None = None
    racks: list[LabRack] = Field(default_factory=list)
    cloud: LabCloud | None = None  # ENI pools against a cloud API (lab/cloud.py)
    data_network: DataNetworkSpec | None = None  # a second segment for additional networks
    cni: CniSpec = Field(default_factory=CniSpec)
    pods: list[LabPod] = Field(default_factory=list)
    manifests: list[Any] = Field(default_factory=list)

    @field_validator("service_cidr")
    @classmethod
    def _service_cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"{v!r} is not a valid CIDR ({e})") from None

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[LabNode]) -> list[LabNode]:
        if not v:
            raise ValueError("a lab needs at least one node")
        return v


class LabMeta(Schema):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > LAB_NAME_MAX or not DNS1123_LABEL.fullmatch(v):
            raise ValueError(f"invalid lab name {v!r}: expected a DNS label of at most {LAB_NAME_MAX} characters")
        return v


class LabDocument(Schema):
    api_version: Literal["podnet.io/v1"]
    kind: Literal["Lab"]
    metadata: LabMeta
    spec: LabSpecBody

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping with apiVersion, kind, metadata and spec, got {type(data).__name__}")
        return data


@dataclass(frozen=True)
class _ManifestSource(Source):
    """Names an inline manifest as `FILE: spec.manifests[N] (Kind/ns/name)`."""

    def describe(self, obj: dict | None = None) -> str:
        text = f"{self.file}: spec.manifests[{self.index}]"
        if isinstance(obj, dict):
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            name, ns = meta.get("name") or "?", meta.get("namespace")
            kind = obj.get("kind") or "?"
            text += f" ({kind}/{ns}/{name})" if ns else f" ({kind}/{name})"
        return text


@dataclass(frozen=True)
class LabNodeInfo:
    index: int  # 1-based, as in the namespace name
    name: str
    labels: dict[str, str]
    address: str  # without prefix length
    service_proxy: str = "nftables"
    bgp: NodeBGPSpec | None = None
    rack: str | None = None
    policy_dataplane: str = "nftables"

    def to_node(self, prefixlen: int) -> Node:
        return Node(metadata=ObjectMeta(name=self.name, labels=self.labels), spec=NodeSpec(bgp=self.bgp),
                    status=NodeStatus(addresses=[NodeAddress(type="InternalIP", address=self.address),
                                                 NodeAddress(type="Hostname", address=self.name)]))


@dataclass(frozen=True)
class LabSpec:
    """A checked lab file: everything `lab up` needs, with defaults filled in."""

    file: str
    name: str
    underlay: ipaddress.IPv4Network
    gateway: str
    nodes: tuple[LabNodeInfo, ...]
    external: ExternalSpec | None
    service_cidr: str
    cni: CniSpec
    pods: tuple[Pod, ...]
    objects: tuple[KubeObject, ...]  # manifests (without Pods), defaults and auto Namespaces
    raw: dict[str, Any]
    resync_seconds: float = 60.0
    dns_server: str = "separate"  # or "inprocess" (the agent answers)
    router: LabRouter | None = None
    racks: tuple[LabRack, ...] = ()
    cloud: LabCloud | None = None
    data_network: DataNetworkSpec | None = None

    def rack(self, name: str) -> LabRack:
        return next(r for r in self.racks if r.name == name)

    def tor_address(self, rack: str) -> str:
        """A rack's ToR on the underlay: .2, .3, ... in the order of spec.racks."""
        i = next(i for i, r in enumerate(self.racks) if r.name == rack)
        return str(self.underlay.network_address + 2 + i)

    def segment(self, node: LabNodeInfo) -> tuple[str, str]:
        """(CIDR, gateway) of the segment a node is on: its rack's or the underlay."""
        if node.rack is None:
            return str(self.underlay), self.gateway
        net = ipaddress.ip_network(self.rack(node.rack).cidr)
        return str(net), str(net.network_address + 1)

    @property
    def cluster_dns_ip(self) -> str | None:
        """The kube-system/kube-dns ClusterIP: every node's agent answers DNS there too."""
        for o in self.objects:
            if isinstance(o, Service) and o.namespace == "kube-system" and o.name == KUBE_DNS:
                return o.spec.cluster_ip
        return None

    @property
    def pools(self) -> list[IPPool]:
        return [o for o in self.objects if isinstance(o, IPPool)]

    def node(self, name: str) -> LabNodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_objects(self) -> list[Node]:
        return [n.to_node(self.underlay.prefixlen) for n in self.nodes]


def load_lab(path: str | Path) -> LabSpec:
    p = Path(path)
    if not p.exists():
        raise ValidationError(f"{p}: no such file")
    return parse_lab(read_text(p), str(p))


def parse_lab(text: str, file: str = "<lab>") -> LabSpec:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValidationError(f"not valid YAML: {problem}", where=where) from None
    if len(docs) != 1:
        raise ValidationError(f"expected exactly one YAML document of kind Lab, found {len(docs)}", where=file)
    doc = docs[0]
    name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) else None
    where = f"{file} (Lab/{name or '?'})"
    if isinstance(doc, dict):
        if doc.get("kind") != "Lab":
            raise ValidationError(f"expected kind Lab, got {doc.get('kind')!r}", where=where, field="kind")
        if doc.get("apiVersion") != API_VERSION:
            raise ValidationError(f"expected apiVersion {API_VERSION}, got {doc.get('apiVersion')!r}",
                                  where=where, field="apiVersion")
    try:
        lab = LabDocument.model_validate(doc)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise ValidationError(explain(err), where=where, field=field_path(err["loc"])) from None
    return _check(lab, doc, file, where)


def _fail(where: str, field: str, message: str) -> ValidationError:
    return ValidationError(message, where=where, field=field)


def _check(lab: LabDocument, raw: dict, file: str, where: str) -> LabSpec:
    spec = lab.spec
    underlay = ipaddress.ip_network(spec.underlay.cidr)
    assert isinstance(underlay, ipaddress.IPv4Network)
    gateway = underlay.network_address + 1

    # Nodes: unique names, addresses that fit the underlay.
    seen: set[str] = set()
    for i, n in enumerate(spec.nodes):
        if n.name in seen:
            raise _fail(where, f"spec.nodes[{i}].name", f"node {n.name!r} is listed twice")
        seen.add(n.name)
    # Racks: each a segment of its own behind a ToR on the underlay (.2, .3, ...).
    racks = {r.name: r for r in spec.racks}
    if spec.racks and spec.router is None:
        raise _fail(where, "spec.racks", "racks need spec.router: the external router their ToRs peer with")
    if len(spec.racks) > FIRST_NODE_OFFSET - 2:
        raise _fail(where, "spec.racks", f"at most {FIRST_NODE_OFFSET - 2} racks: their ToRs take the underlay's "
                    f".2 to .{FIRST_NODE_OFFSET - 1}")
    for i, r in enumerate(spec.racks):
        if list(racks).index(r.name) != i:
            raise _fail(where, f"spec.racks[{i}].name", f"rack {r.name!r} is listed twice")
    segments: dict[str | None, list[int]] = {}
    for i, n in enumerate(spec.nodes):
        if n.rack is not None and n.rack not in racks:
            raise _fail(where, f"spec.nodes[{i}].rack", f"rack {n.rack!r} is not in spec.racks: expected one of "
                        f"{', '.join(racks) or '(none)'}")
        segments.setdefault(n.rack, []).append(i)
    addresses: dict[int, str] = {}
    for rack, members in segments.items():
        net = underlay if rack is None else ipaddress.ip_network(racks[rack].cidr)
        last = net.network_address + FIRST_NODE_OFFSET + len(members) - 1
        if last >= net.broadcast_address:
            room = max(0, int(net.broadcast_address) - int(net.network_address) - FIRST_NODE_OFFSET)
            raise _fail(where, "spec.nodes", f"{len(members)} nodes do not fit {f'rack {rack} ' if rack else ''}"
                        f"{'underlay ' if rack is None else ''}{net}: addresses start at .{FIRST_NODE_OFFSET}, "
                        f"room for {room}")
        for j, i in enumerate(members):
            addresses[i] = str(net.network_address + FIRST_NODE_OFFSET + j)
    nodes = tuple(
        LabNodeInfo(i + 1, n.name, dict(n.labels), addresses[i], n.service_proxy, bgp=n.bgp, rack=n.rack,
                    policy_dataplane=n.policy_dataplane)
        for i, n in enumerate(spec.nodes)
    )

    # The external host sits outside the underlay and the cluster's ranges.
    taken: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = [("spec.underlay.cidr", underlay)]
    if spec.external is not None:
        ext = ipaddress.ip_interface(spec.external.address)
        if ext.network.overlaps(underlay):
            raise _fail(where, "spec.external.address",
                        f"{ext} overlaps the underlay {underlay}: the external host must be reached through the gateway")
        taken.append(("spec.external.address", ext.network))
    for i, r in enumerate(spec.racks):
        rnet = ipaddress.ip_network(r.cidr)
        for fname, net in taken:
            if rnet.overlaps(net):
                raise _fail(where, f"spec.racks[{i}].cidr", f"{rnet} overlaps {fname} ({net})")
        taken.append((f"spec.racks[{i}].cidr", rnet))
    service_net = ipaddress.ip_network(spec.service_cidr)
    for fname, net in taken:
        if net.overlaps(service_net):
            raise _fail(where, "spec.serviceCIDR", f"{service_net} overlaps {fname} ({net})")
    taken.append(("spec.serviceCIDR", service_net))
    if spec.data_network is not None:
        data_net = ipaddress.ip_network(spec.data_network.cidr)
        for fname, net in taken:
            if net.overlaps(data_net):
                raise _fail(where, "spec.dataNetwork.cidr", f"{data_net} overlaps {fname} ({net})")
        taken.append(("spec.dataNetwork.cidr", data_net))
        dext = spec.data_network.external
        if dext is not None:
            if ipaddress.ip_interface(dext.address).network != data_net:
                raise _fail(where, "spec.dataNetwork.external.address",
                            f"{dext.address} is not on the data network {data_net}: the host sits on that segment")
            if dext.dns is not None:
                raise _fail(where, "spec.dataNetwork.external.dns", "only spec.external serves DNS")
        if spec.cni.plugin != "podnet":
            raise _fail(where, "spec.dataNetwork", "additional networks need cni plugin podnet")

    # Inline manifests, validated as any manifest is.
    objects: list[KubeObject] = []
    errors: list[ValidationError] = []
    for i, m in enumerate(spec.manifests):
        try:
            objects.append(parse_object(m, _ManifestSource(file, i)))
        except ValidationError as e:
            errors.append(e)
    if errors:
        raise ManifestErrors(errors) if len(errors) > 1 else errors[0]
    refs: dict[str, int] = {}
    for i, o in enumerate(objects):
        src = _ManifestSource(file, i).describe(o.to_dict())
        if o.ref in refs:
            raise ValidationError(f"the same object appears twice (first at spec.manifests[{refs[o.ref]}])", where=src)
        refs[o.ref] = i
        if isinstance(o, Node):
            raise ValidationError("Nodes come from spec.nodes, not from manifests", where=src, field="kind")
        if isinstance(o, Pod) and o.spec.node_name not in seen:
            raise ValidationError(
                f"spec.nodeName {o.spec.node_name!r} is not a lab node (there is no scheduler: "
                f"expected one of {', '.join(sorted(seen))})", where=src, field="spec.nodeName")

    # Pools: given, or one default; none may overlap the lab's other ranges or each other.
    pools = [(i, o) for i, o in enumerate(objects) if isinstance(o, IPPool)]
    if not pools:
        default = IPPool(metadata=ObjectMeta(name=DEFAULT_POOL["name"]),
                         spec=IPPoolSpec(cidr=DEFAULT_POOL["cidr"], nat_outgoing=True))
        objects.append(default)
        pools = [(-1, default)]
    for i, pool in pools:
        pnet = ipaddress.ip_network(pool.spec.cidr)
        src = _ManifestSource(file, i).describe(pool.to_dict()) if i >= 0 else f"{where}: default IPPool"
        for fname, net in taken:
            if fname == "spec.dataNetwork.cidr" and pool.spec.for_attachments:
                continue  # an Attachment pool's addresses live on the data network
            if pnet.overlaps(net):
                raise ValidationError(f"pool {pnet} overlaps {fname} ({net})", where=src, field="spec.cidr")
        taken.append((f"IPPool/{pool.name}", pnet))
    if spec.cni.plugin == "bridge":
        pool = pools[0][1]
        blocks = 2 ** ((pool.spec.block_size or 26) - ipaddress.ip_network(pool.spec.cidr).prefixlen)
        if blocks < len(nodes):
            raise _fail(where, "spec.cni.plugin", f"plugin bridge gives each node one block of IPPool/{pool.name}: "
                        f"{pool.spec.cidr} has {blocks} blocks of /{pool.spec.block_size} for {len(nodes)} nodes")

    # Pods: shorthand ones and Pods from manifests, on known nodes, each once.
    pods: list[Pod] = []
    fields: list[str] = []
    for i, lp in enumerate(spec.pods):
        if lp.node not in seen:
            raise _fail(where, f"spec.pods[{i}].node", f"node {lp.node!r} is not a lab node: expected one of "
                        f"{', '.join(n.name for n in spec.nodes)}")
        pods.append(lp.to_pod())
        fields.append(f"spec.pods[{i}]")
    for o in objects:
        if isinstance(o, Pod):
            pods.append(o)
            fields.append(f"spec.manifests[{refs[o.ref]}]")
    seen_pods: set[str] = set()
    for pod, f in zip(pods, fields, strict=True):
        if pod.ref in seen_pods:
            raise _fail(where, f, f"pod {pod.namespace}/{pod.name} is defined twice")
        seen_pods.add(pod.ref)
        for key in BANDWIDTH_ANNOTATIONS:
            value = pod.metadata.annotations.get(key)
            if value is not None:
                try:
                    parse_quantity(value)
                except ValueError as e:
                    raise _fail(where, f"{f}.annotations", f"{key}: {e}") from None

    # Namespaces used but not declared are created, labelled as the API server labels them.
    declared = {o.name for o in objects if isinstance(o, Namespace)}
    objects = [
        o.with_meta(labels={**o.labels, "kubernetes.io/metadata.name": o.name}) if isinstance(o, Namespace) else o
        for o in objects if not isinstance(o, Pod)
    ]
    used = {o.namespace for o in [*objects, *pods] if o.NAMESPACED and o.namespace} | {"default"}
    auto: list[KubeObject] = [Namespace(metadata=ObjectMeta(name=ns, labels={"kubernetes.io/metadata.name": ns}))
                              for ns in sorted(used - declared)]
    objects = auto + objects
    if not any(isinstance(o, Service) and o.namespace == "kube-system" and o.name == KUBE_DNS
               for o in objects):
        # As in a cluster: the DNS Service at the tenth address, answered on every node by its agent.
        objects.append(Service.model_validate({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": KUBE_DNS, "namespace": "kube-system"},
            "spec": {"clusterIP": str(service_net.network_address + 10),
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}))

    for o in objects:
        if isinstance(o, Service) and o.spec.cluster_ip not in (None, "", "None"):
            if ipaddress.ip_address(o.spec.cluster_ip) not in service_net:
                raise ValidationError(f"clusterIP {o.spec.cluster_ip} is outside spec.serviceCIDR {service_net}",
                                      where=f"{where}: {o.ref}", field="spec.clusterIP")

    return LabSpec(
        file=file, name=lab.metadata.name, underlay=underlay, gateway=str(gateway), nodes=nodes,
        external=spec.external, service_cidr=str(service_net), cni=spec.cni, pods=tuple(pods),
        objects=tuple(objects), raw=raw, resync_seconds=spec.resync_seconds, dns_server=spec.dns_server,
        router=spec.router, racks=tuple(spec.racks), cloud=spec.cloud, data_network=spec.data_network,
    )


_QUANTITY = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?|m)?\Z")
_FACTORS = {None: 1, "m": 0.001, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: str) -> int:
    """A Kubernetes quantity (`10M`, `1Gi`, `500k`) as an integer: bits per second for bandwidth."""
    m = _QUANTITY.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a quantity like 10M or 1Gi")
    n = int(float(m.group(1)) * _FACTORS[m.group(2)])
    if n <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return n
