"""Kubernetes-shaped objects: the core kinds podnet reads and its own IPAM kinds.

Field names are upstream's (camelCase in manifests, snake_case in Python).
Defaulting follows the API server's, since manifests here never pass through one.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from podnet.model.addresses import canonical_ip, packed_ip
from podnet.model.base import Partial, Schema
from podnet.model.bgp import DEFAULT_CONFIG_NAME, BGPConfigurationSpec, BGPPeerSpec, NodeBGPSpec
from podnet.model.cloud import CloudNetworkSpec
from podnet.model.multinet import NetworkAttachmentDefinitionSpec
from podnet.model.names import (  # noqa: F401 - the patterns, for modules that import them from here
    DNS1035_LABEL,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    IANA_SVC_NAME,
    is_dns1035_label,
    is_dns1123_label,
    is_dns1123_subdomain,
    is_iana_svc_name,
)
from podnet.model.selectors import LabelSelector, check_label_key, check_labels

MAX_ANNOTATIONS_BYTES = 256 * 1024  # keys and values together, as the API server counts them

Protocol = Literal["TCP", "UDP", "SCTP"]


def check_port_name(name: str) -> str:
    if not is_iana_svc_name(name):
        raise ValueError(
            f"invalid port name {name!r}: expected at most 15 lowercase letters, digits and "
            "single '-', with at least one letter"
        )
    return name


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} {port} is out of range: expected 1-65535")
    return port


def check_ip(value: str) -> str:
    return canonical_ip(value)


def check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid CIDR ({e})") from None


class ObjectMeta(Partial):
    # what the API server sets or controllers use, which podnet does not read
    UPSTREAM_ONLY = frozenset({"generation", "generateName", "ownerReferences", "finalizers", "managedFields",
                               "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"})

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_dns1123_subdomain(v):
            raise ValueError(
                f"invalid name {v!r}: expected lowercase letters, digits, '-' and '.', "
                "starting and ending alphanumeric, at most 253 characters"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not is_dns1123_label(v):
            raise ValueError(f"invalid namespace {v!r}: expected a DNS label (lowercase, digits, '-', at most 63)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode()) + len(val.encode()) for k, val in v.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"annotations take {size} bytes: at most {MAX_ANNOTATIONS_BYTES} (256 KiB) in all, "
                             "as the API server allows")
        for k in v:
            check_label_key(k)
        return v


class KubeObject(Schema):
    """Common envelope. Subclasses set KIND, API_VERSION, NAMESPACED, PLURAL."""

    KIND: ClassVar[str]
    API_VERSIONS: ClassVar[tuple[str, ...]]
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()

    api_version: str
    kind: str
    metadata: ObjectMeta

    @model_validator(mode="before")
    @classmethod
    def _default_namespace(cls, data: Any) -> Any:
        # Namespaced objects without a namespace land in "default", as kubectl does;
        # cluster-scoped ones must not carry one.
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            meta = data["metadata"]
            if cls.NAMESPACED and not meta.get("namespace"):
                data = {**data, "metadata": {**meta, "namespace": "default"}}
            elif not cls.NAMESPACED and meta.get("namespace"):
                raise ValueError(f"{cls.KIND} is cluster-scoped: metadata.namespace must not be set")
        return data

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v not in cls.API_VERSIONS:
            raise ValueError(f"apiVersion {v!r} is not served for {cls.KIND}: expected {' or '.join(cls.API_VERSIONS)}")
        return v

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    @property
    def ref(self) -> str:
        """`Kind/ns/name` or `Kind/name`: how errors and logs name this object."""
        return f"{self.KIND}/{self.namespace}/{self.name}" if self.NAMESPACED else f"{self.KIND}/{self.name}"

    def with_meta(self, **changes: Any) -> KubeObject:
        return self.model_copy(update={"metadata": self.metadata.model_copy(update=changes)})


# ---------------------------------------------------------------- core/v1


class NamespaceSpec(Partial):
    """Upstream's only field, finalizers, which podnet does not read."""

    UPSTREAM_ONLY = frozenset({"finalizers"})


class Namespace(KubeObject):
    KIND = "Namespace"
    API_VERSIONS = ("v1",)
    NAMESPACED = False
    PLURAL = "namespaces"
    SHORT_NAMES = ("ns",)
    kind: Literal["Namespace"] = "Namespace"
    api_version: str = "v1"
    spec: NamespaceSpec | None = None
    status: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _dns_label(cls, v: ObjectMeta) -> ObjectMeta:
        if not is_dns1123_label(v.name):
            raise ValueError(f"invalid Namespace name {v.name!r}: expected a DNS label (lowercase, digits, '-', at most 63)")
        return v


class NodeAddress(Schema):
    type: Literal["InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"]
    address: str


class NodeSpec(Partial):
    UPSTREAM_ONLY = frozenset({"taints", "configSource", "externalID"})
    pod_cidr: str | None = Field(default=None, alias="podCIDR")
    pod_cidrs: list[str] | None = Field(default=None, alias="podCIDRs")
    unschedulable: bool = False
    # The cloud's name of the node's machine, as the cloud controller sets it
    # (`aws:///us-east-1a/i-0abc...`): an ENI pool asks the cloud about this instance.
    provider_id: str | None = Field(default=None, alias="providerID")
    # Calico's Node spec.bgp: set on the nodes that run BGP (BIRD); see podnet.bgp
    bgp: NodeBGPSpec | None = None


class NodeStatus(Schema):
    model_config = ConfigDict(extra="ignore")
    addresses: list[NodeAddress] = Field(default_factory=list)
    capacity: dict[str, str] | None = None


class Node(KubeObject):
    KIND = "Node"
    API_VERSIONS = ("v1",)
    NAMESPACED = False
    PLURAL = "nodes"
    SHORT_NAMES = ("no",)
    kind: Literal["Node"] = "Node"
    api_version: str = "v1"
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)

    @property
    def internal_ip(self) -> str | None:
        for a in self.status.addresses:
            if a.type == "InternalIP":
                return a.address
        return None

    @property
    def bgp_address(self) -> str | None:
        """The address this node speaks BGP from: spec.bgp.ipv4Address, else its InternalIP
        (None on a node without spec.bgp)."""
        if self.spec.bgp is None:
            return None
        return self.spec.bgp.address or self.internal_ip


class ContainerPort(Schema):
    name: str | None = None
    container_port: int
    protocol: Protocol = "TCP"
    host_port: int | None = None
    host_ip: str | None = Field(default=None, alias="hostIP")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_port_name(v)

    @field_validator("container_port", "host_port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        return None if v is None else check_port(v)


class Container(Partial):
    # A pod manifest carries many fields podnet has no use for (command, env, ...).
    UPSTREAM_ONLY = frozenset({
        "command", "args", "workingDir", "envFrom", "env", "resources", "resizePolicy", "restartPolicy",
        "volumeMounts", "volumeDevices", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle",
        "terminationMessagePath", "terminationMessagePolicy", "imagePullPolicy", "securityContext", "stdin",
        "stdinOnce", "tty",
    })
    name: str
    image: str | None = None
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(Partial):
    UPSTREAM_ONLY = frozenset({
        "volumes", "initContainers", "ephemeralContainers", "restartPolicy", "terminationGracePeriodSeconds",
        "activeDeadlineSeconds", "dnsPolicy", "nodeSelector", "serviceAccountName", "serviceAccount",
        "automountServiceAccountToken", "hostPID", "hostIPC", "shareProcessNamespace", "securityContext",
        "imagePullSecrets", "affinity", "schedulerName", "tolerations", "hostAliases", "priorityClassName",
        "priority", "dnsConfig", "readinessGates", "runtimeClassName", "enableServiceLinks", "preemptionPolicy",
        "overhead", "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers", "schedulingGates",
        "resourceClaims", "resources",
    })
    node_name: str | None = None
    host_network: bool = False
    containers: list[Container] = Field(default_factory=list)
    hostname: str | None = None
    subdomain: str | None = None


class PodIP(Schema):
    ip: str

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return check_ip(v)


class PodStatus(Schema):
    model_config = ConfigDict(extra="ignore")
    phase: str | None = None
    pod_ip: str | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] | None = Field(default=None, alias="podIPs")
    host_ip: str | None = Field(default=None, alias="hostIP")


class Pod(KubeObject):
    KIND = "Pod"
    API_VERSIONS = ("v1",)
    PLURAL = "pods"
    SHORT_NAMES = ("po",)
    kind: Literal["Pod"] = "Pod"
    api_version: str = "v1"
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    def named_port(self, name: str, protocol: str) -> int | None:
        for c in self.spec.containers:
            for p in c.ports:
                if p.name == name and p.protocol == protocol:
                    return p.container_port
        return None


class ServicePort(Schema):
    name: str | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = None
    port: int
    target_port: int | str | None = None
    node_port: int | None = None

    @field_validator("port", "node_port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        return None if v is None else check_port(v)

    @field_validator("target_port")
    @classmethod
    def _target(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int):
            return check_port(v, "targetPort")
        if isinstance(v, str):
            return check_port_name(v)
        return v

    @model_validator(mode="after")
    def _default_target(self) -> ServicePort:
        if self.target_port is None:
            object.__setattr__(self, "target_port", self.port)
        return self


class ClientIPConfig(Schema):
    timeout_seconds: int = 10800

    @field_validator("timeout_seconds")
    @classmethod
    def _range(cls, v: int) -> int:
        if not 0 < v <= 86400:
            raise ValueError(f"timeoutSeconds {v} is out of range: expected 1-86400")
        return v


class SessionAffinityConfig(Schema):
    client_ip: ClientIPConfig = Field(default_factory=ClientIPConfig, alias="clientIP")


class ServiceSpec(Partial):
    UPSTREAM_ONLY = frozenset({
        "loadBalancerIP", "ipFamilies", "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass",
        "trafficDistribution",
    })
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    selector: dict[str, str] | None = None
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] | None = Field(default=None, alias="clusterIPs")
    ports: list[ServicePort] = Field(default_factory=list)
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_ips: list[str] = Field(default_factory=list, alias="externalIPs")
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    health_check_node_port: int | None = None
    load_balancer_source_ranges: list[str] = Field(default_factory=list)
    external_name: str | None = None
    publish_not_ready_addresses: bool = False

    @field_validator("cluster_ip")
    @classmethod
    def _cluster_ip(cls, v: str | None) -> str | None:
        return v if v in (None, "None", "") else check_ip(v)

    @field_validator("external_ips")
    @classmethod
    def _external_ips(cls, v: list[str]) -> list[str]:
        return [check_ip(x) for x in v]

    @field_validator("load_balancer_source_ranges")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(x.strip(), strict=False)) if _is_net(x) else _bad_cidr(x) for x in v]

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSpec:
        if self.type == "ExternalName":
            if not self.external_name:
                raise ValueError("type ExternalName needs spec.externalName")
        elif not self.ports and self.cluster_ip != "None":
            raise ValueError("spec.ports must list at least one port")
        names = [p.name for p in self.ports]
        if len(self.ports) > 1 and any(n is None for n in names):
            raise ValueError("spec.ports: every port needs a name when there is more than one")
        seen = set()
        for p in self.ports:
            if p.name in seen:
                raise ValueError(f"spec.ports: duplicate port name {p.name!r}")
            seen.add(p.name)
        first_port: dict[tuple[str, int], int] = {}
        first_node_port: dict[tuple[str, int], int] = {}
        for i, p in enumerate(self.ports):
            j = first_port.setdefault((p.protocol, p.port), i)
            if j != i:
                raise ValueError(f"spec.ports[{i}]: duplicate port {p.port}/{p.protocol} (also spec.ports[{j}])")
            if p.node_port:
                j = first_node_port.setdefault((p.protocol, p.node_port), i)
                if j != i:
                    raise ValueError(f"spec.ports[{i}].nodePort: duplicate nodePort {p.node_port}/{p.protocol} "
                                     f"(also spec.ports[{j}])")
        if self.external_traffic_policy is None and self.type in ("NodePort", "LoadBalancer"):
            object.__setattr__(self, "external_traffic_policy", "Cluster")
        if self.session_affinity == "ClientIP" and self.session_affinity_config is None:
            object.__setattr__(self, "session_affinity_config", SessionAffinityConfig())
        if self.type not in ("NodePort", "LoadBalancer") and any(p.node_port for p in self.ports):
            raise ValueError(f"nodePort may not be set on a Service of type {self.type}")
        return self

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


def _is_net(x: str) -> bool:
    try:
        ipaddress.ip_network(x.strip(), strict=False)
        return True
    except ValueError:
        return False


def _bad_cidr(x: str) -> str:
    raise ValueError(f"{x!r} is not a CIDR")


class LoadBalancerIngress(Schema):
    model_config = ConfigDict(extra="ignore")
    ip: str | None = None
    hostname: str | None = None


class LoadBalancerStatus(Schema):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)


class ServiceStatus(Schema):
    model_config = ConfigDict(extra="ignore")
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)


class Service(KubeObject):
    KIND = "Service"
    API_VERSIONS = ("v1",)
    PLURAL = "services"
    SHORT_NAMES = ("svc",)
    kind: Literal["Service"] = "Service"
    api_version: str = "v1"
    spec: ServiceSpec
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @field_validator("metadata")
    @classmethod
    def _dns1035(cls, v: ObjectMeta) -> ObjectMeta:
        if not is_dns1035_label(v.name):
            raise ValueError(
                f"invalid Service name {v.name!r}: expected a DNS-1035 label "
                "(starts with a letter; lowercase, digits, '-'; at most 63)"
            )
        return v


# ---------------------------------------------------------------- discovery.k8s.io/v1


class EndpointConditions(Schema):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None

    # Upstream: a nil ready/serving is read as true, a nil terminating as false.
    @property
    def is_ready(self) -> bool:
        return self.ready is not False

    @property
    def is_serving(self) -> bool:
        return self.serving if self.serving is not None else self.is_ready

    @property
    def is_terminating(self) -> bool:
        return bool(self.terminating)


class ObjectReference(Schema):
    model_config = ConfigDict(extra="ignore")
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None


class Endpoint(Schema):
    addresses: list[str]
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    target_ref: ObjectReference | None = None

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        if not 1 <= len(v) <= 100:
            raise ValueError("an endpoint needs 1 to 100 addresses")
        return v


class EndpointPort(Schema):
    name: str | None = None
    protocol: Protocol = "TCP"
    port: int | None = None
    app_protocol: str | None = None

    @field_validator("port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        return None if v is None else check_port(v)


MAX_SLICE_ENDPOINTS = 1000  # the API server's limit per EndpointSlice


class EndpointSlice(KubeObject):
    KIND = "EndpointSlice"
    API_VERSIONS = ("discovery.k8s.io/v1",)
    PLURAL = "endpointslices"
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    api_version: str = "discovery.k8s.io/v1"
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] | None = None

    @field_validator("endpoints")
    @classmethod
    def _at_most_a_thousand(cls, v: list[Endpoint]) -> list[Endpoint]:
        if len(v) > MAX_SLICE_ENDPOINTS:
            raise ValueError(f"{len(v)} endpoints: an EndpointSlice holds at most {MAX_SLICE_ENDPOINTS} (as the "
                             "API server allows); spread them over several slices of the Service")
        return v

    @model_validator(mode="after")
    def _addresses_fit_type(self) -> EndpointSlice:
        for i, ep in enumerate(self.endpoints):
            for a in ep.addresses:
                if self.address_type in ("IPv4", "IPv6"):
                    try:
                        size = len(packed_ip(a))
                    except ValueError:
                        raise ValueError(f"endpoints[{i}].addresses: {a!r} is not an IP address") from None
                    if (size == 4) != (self.address_type == "IPv4"):
                        raise ValueError(f"endpoints[{i}].addresses: {a} is not {self.address_type}")
        return self

    @property
    def service_name(self) -> str | None:
        return self.metadata.labels.get("kubernetes.io/service-name")


# ---------------------------------------------------------------- networking.k8s.io/v1


class IPBlock(Schema):
    cidr: str
    except_: list[str] | None = Field(default=None, alias="except")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"ipBlock.cidr {v!r} is not a CIDR") from None

    @model_validator(mode="after")
    def _except_inside(self) -> IPBlock:
        outer = ipaddress.ip_network(self.cidr)
        for e in self.except_ or ():
            try:
                inner = ipaddress.ip_network(e, strict=False)
            except ValueError:
                raise ValueError(f"ipBlock.except {e!r} is not a CIDR") from None
            if inner.version != outer.version or not inner.subnet_of(outer):  # type: ignore[arg-type]
                raise ValueError(f"ipBlock.except {e} is not inside ipBlock.cidr {self.cidr}")
            if inner.prefixlen == outer.prefixlen:
                raise ValueError(f"ipBlock.except {e} must be strictly smaller than ipBlock.cidr {self.cidr}")
        return self


class NetworkPolicyPeer(Schema):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPolicyPeer:
        if self.ip_block is not None and (self.pod_selector is not None or self.namespace_selector is not None):
            raise ValueError("a peer may set ipBlock or podSelector/namespaceSelector, not both")
        if self.ip_block is None and self.pod_selector is None and self.namespace_selector is None:
            raise ValueError("a peer must set one of podSelector, namespaceSelector or ipBlock")
        return self


class NetworkPolicyPort(Schema):
    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    @field_validator("port")
    @classmethod
    def _port(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int):
            return check_port(v)
        if isinstance(v, str):
            return check_port_name(v)
        return v

    @model_validator(mode="after")
    def _end_port(self) -> NetworkPolicyPort:
        if self.end_port is not None:
            if not isinstance(self.port, int):
                raise ValueError("endPort needs a numeric port")
            check_port(self.end_port, "endPort")
            if self.end_port < self.port:
                raise ValueError(f"endPort {self.end_port} is below port {self.port}")
        return self


class NetworkPolicyIngressRule(Schema):
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from")
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicyEgressRule(Schema):
    to: list[NetworkPolicyPeer] | None = None
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicySpec(Schema):
    pod_selector: LabelSelector
    policy_types: list[Literal["Ingress", "Egress"]] | None = None
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None

    @model_validator(mode="after")
    def _default_policy_types(self) -> NetworkPolicySpec:
        # As the API server: Ingress always; Egress only when egress rules exist.
        if not self.policy_types:
            types: list[Literal["Ingress", "Egress"]] = ["Ingress"]
            if self.egress:
                types.append("Egress")
            object.__setattr__(self, "policy_types", types)
        elif len(set(self.policy_types)) != len(self.policy_types):
            raise ValueError("policyTypes lists a type twice")
        return self


class NetworkPolicy(KubeObject):
    KIND = "NetworkPolicy"
    API_VERSIONS = ("networking.k8s.io/v1",)
    PLURAL = "networkpolicies"
    SHORT_NAMES = ("netpol",)
    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    api_version: str = "networking.k8s.io/v1"
    spec: NetworkPolicySpec


# ---------------------------------------------------------------- podnet.io/v1 (IPAM)

ALLOWED_USES = ("Workload", "Tunnel", "LoadBalancer", "Attachment")
# Attachment: addresses for pods' additional networks (podnet-ipam, podnet.multinet) only. Such a
# pool's addresses live on an underlay that routes them: podnet neither routes, tunnels nor
# advertises its blocks, and never gives them to eth0.
ATTACHMENT = "Attachment"


class IPPoolSpec(Schema):
    cidr: str
    block_size: int | None = None
    node_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    encapsulation: Literal["None", "VXLAN"] = "VXLAN"
    nat_outgoing: bool = False
    disabled: bool = False
    # BGP: the pool's blocks are never advertised to peers outside the cluster (podnet.bgp)
    disable_bgp_export: bool = Field(default=False, alias="disableBGPExport")
    allowed_uses: list[Literal["Workload", "Tunnel", "LoadBalancer", "Attachment"]] = Field(
        default_factory=lambda: ["Workload", "Tunnel"]
    )

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return check_cidr(v)

    @property
    def for_attachments(self) -> bool:
        """A pool of additional networks' addresses (allowedUses [Attachment]): not routed by podnet."""
        return ATTACHMENT in self.allowed_uses

    @model_validator(mode="after")
    def _attachment(self) -> IPPoolSpec:
        if ATTACHMENT not in self.allowed_uses:
            return self
        if len(set(self.allowed_uses)) > 1:
            raise ValueError("allowedUses: Attachment cannot be combined with other uses: an Attachment pool's "
                             "addresses are on an underlay that routes them, never on eth0 or podnet's tunnels")
        if "encapsulation" not in self.model_fields_set:
            object.__setattr__(self, "encapsulation", "None")
        elif self.encapsulation != "None":
            raise ValueError("encapsulation: an Attachment pool is never tunnelled by podnet: expected None "
                             "(or leave it out)")
        return self

    @model_validator(mode="after")
    def _block_size(self) -> IPPoolSpec:
        net = ipaddress.ip_network(self.cidr)
        if self.block_size is None:
            object.__setattr__(self, "block_size", 26 if net.version == 4 else 122)
        bs = self.block_size
        assert bs is not None
        limit = 32 if net.version == 4 else 128
        low = 20 if net.version == 4 else 116
        if not low <= bs <= limit:
            raise ValueError(f"blockSize {bs} is out of range: expected {low}-{limit} for IPv{net.version}")
        if bs < net.prefixlen:
            raise ValueError(f"blockSize /{bs} is larger than the pool {self.cidr}")
        return self


class IPPool(KubeObject):
    KIND = "IPPool"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "ippools"
    SHORT_NAMES = ("pool",)
    kind: Literal["IPPool"] = "IPPool"
    api_version: str = "podnet.io/v1"
    spec: IPPoolSpec


class IPReservationSpec(Schema):
    reserved_cidrs: list[str] = Field(alias="reservedCIDRs")

    @field_validator("reserved_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for c in v:
            try:
                out.append(str(ipaddress.ip_network(c, strict=True)))
            except ValueError as e:
                raise ValueError(f"reservedCIDRs: {c!r} is not a CIDR or address ({e})") from None
        return out


class IPReservation(KubeObject):
    KIND = "IPReservation"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "ipreservations"
    kind: Literal["IPReservation"] = "IPReservation"
    api_version: str = "podnet.io/v1"
    spec: IPReservationSpec


class IPAMConfigSpec(Schema):
    strict_affinity: bool = False
    max_blocks_per_host: int = 0

    @field_validator("max_blocks_per_host")
    @classmethod
    def _max(cls, v: int) -> int:
        if v < 0:
            raise ValueError("maxBlocksPerHost must be 0 (no limit) or more")
        return v


class IPAMConfig(KubeObject):
    KIND = "IPAMConfig"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "ipamconfigs"
    kind: Literal["IPAMConfig"] = "IPAMConfig"
    api_version: str = "podnet.io/v1"
    spec: IPAMConfigSpec = Field(default_factory=IPAMConfigSpec)


class CloudNetwork(KubeObject):
    """Pod addresses from the cloud's network (ENIs) for the nodes it selects: model/cloud.py."""

    KIND = "CloudNetwork"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "cloudnetworks"
    SHORT_NAMES = ("cloudnet",)
    kind: Literal["CloudNetwork"] = "CloudNetwork"
    api_version: str = "podnet.io/v1"
    spec: CloudNetworkSpec


# ---------------------------------------------------------------- podnet.io/v1 (BGP, model/bgp.py)


class BGPConfiguration(KubeObject):
    """Cluster-wide BGP settings: only the one named `default` is read."""

    KIND = "BGPConfiguration"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "bgpconfigurations"
    SHORT_NAMES = ("bgpconfig",)
    DEFAULT_NAME: ClassVar[str] = DEFAULT_CONFIG_NAME
    kind: Literal["BGPConfiguration"] = "BGPConfiguration"
    api_version: str = "podnet.io/v1"
    spec: BGPConfigurationSpec = Field(default_factory=BGPConfigurationSpec)


class BGPPeer(KubeObject):
    KIND = "BGPPeer"
    API_VERSIONS = ("podnet.io/v1",)
    NAMESPACED = False
    PLURAL = "bgppeers"
    kind: Literal["BGPPeer"] = "BGPPeer"
    api_version: str = "podnet.io/v1"
    spec: BGPPeerSpec


# ---------------------------------------------------------------- k8s.cni.cncf.io/v1 (model/multinet.py)


class NetworkAttachmentDefinition(KubeObject):
    """An additional network pods ask for by name (annotation k8s.v1.cni.cncf.io/networks)."""

    KIND = "NetworkAttachmentDefinition"
    API_VERSIONS = ("k8s.cni.cncf.io/v1",)
    PLURAL = "network-attachment-definitions"
    SHORT_NAMES = ("net-attach-def", "nad")
    kind: Literal["NetworkAttachmentDefinition"] = "NetworkAttachmentDefinition"
    api_version: str = "k8s.cni.cncf.io/v1"
    spec: NetworkAttachmentDefinitionSpec


KINDS: dict[str, type[KubeObject]] = {
    cls.KIND: cls
    for cls in (
        Namespace, Node, Pod, Service, EndpointSlice, NetworkPolicy, IPPool, IPReservation, IPAMConfig,
        CloudNetwork,
        BGPConfiguration, BGPPeer,
        NetworkAttachmentDefinition,
    )
}


def kind_for(name: str) -> type[KubeObject]:
    """Resolve `pods`, `pod`, `po`, `Pod` to the Pod class (as kubectl does)."""
    low = name.lower()
    for cls in KINDS.values():
        if low in (cls.KIND.lower(), cls.PLURAL, *cls.SHORT_NAMES):
            return cls
    raise ValueError(f"unknown kind {name!r}: expected one of {', '.join(sorted(KINDS))}")
