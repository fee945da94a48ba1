"""The BGP parts of the object model, with Calico's field names (podnet.io/v1):

    BGPConfiguration (name `default`, cluster-wide)
      asNumber 64512, nodeToNodeMeshEnabled true, listenPort 179, nodeMeshMaxRestartTime,
      serviceClusterIPs / serviceExternalIPs / serviceLoadBalancerIPs: [{cidr}] to advertise,
      communities: [{name, value}], prefixAdvertisements: [{cidr, communities}]
    BGPPeer
      peerIP (ip or ip:port) with asNumber, or peerSelector (other nodes); node or
      nodeSelector (which nodes peer; neither: every BGP node); keepOriginalNextHop,
      password, maxRestartTime, sourceAddress (UseNodeIP | None)
    Node spec.bgp: asNumber, ipv4Address, routeReflectorClusterID
    IPPool spec.disableBGPExport

Selectors are Kubernetes label selectors ({matchLabels, matchExpressions}) or the same in
kubectl's text form (`rack=a,!edge`), not Calico's selector language. A password is
given as a string (Calico reads it from a Secret). What BIRD's configuration language
cannot carry is refused here, with the field named, so nothing a user writes reaches
BIRD unchecked (podnet.bgp.render quotes and derives every name it writes).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from podnet.model.base import Schema
from podnet.model.selectors import LabelSelector

AS_MIN, AS_MAX = 1, 4294967295
DEFAULT_AS_NUMBER = 64512
DEFAULT_LISTEN_PORT = 179
DEFAULT_RESTART_TIME = 120  # seconds: BIRD's default graceful-restart time
MAX_RESTART_TIME = 4095  # the graceful-restart capability's 12-bit field
MAX_PASSWORD = 80  # TCP MD5 signature keys (TCP_MD5SIG_MAXKEYLEN)
DEFAULT_CONFIG_NAME = "default"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def check_as_number(value: Any, what: str = "asNumber") -> int:
    """An AS number: an integer or its text, or asdot (`1.10` = 1*65536+10); 1-4294967295."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{what} {value!r} is not an AS number: expected an integer 1-{AS_MAX}")
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+", text):
            value = int(text)
        elif m := re.fullmatch(r"(\d+)\.(\d+)", text):
            high, low = int(m.group(1)), int(m.group(2))
            if high > 65535 or low > 65535:
                raise ValueError(f"{what} {value!r} is out of range: asdot parts are 0-65535")
            value = high * 65536 + low
        else:
            raise ValueError(f"{what} {value!r} is not an AS number: expected an integer 1-{AS_MAX} or asdot (1.10)")
    if not AS_MIN <= value <= AS_MAX:
        raise ValueError(f"{what} {value} is out of range: expected {AS_MIN}-{AS_MAX}")
    return value


def parse_duration(text: str, what: str) -> float:
    """A Go/Kubernetes duration (`120s`, `2m`, `1h30m`, `500ms`) in seconds."""
    if not isinstance(text, str) or not text or _DURATION.sub("", text) != "":
        raise ValueError(f"{what} {text!r} is not a duration: expected e.g. 120s, 2m or 1h30m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(text))


def check_restart_time(text: str | None, what: str) -> str | None:
    if text is None:
        return None
    seconds = parse_duration(text, what)
    if not 1 <= seconds <= MAX_RESTART_TIME:
        raise ValueError(f"{what} {text} is out of range: expected 1s to {MAX_RESTART_TIME}s "
                         "(the graceful-restart capability's limit)")
    return text


def restart_seconds(text: str | None) -> int | None:
    return None if text is None else max(1, round(parse_duration(text, "restart time")))


def _selector(value: Any) -> Any:
    if isinstance(value, str):
        return LabelSelector.parse(value) if value.strip() else LabelSelector()
    return value


def _ipv4_cidr(value: str, what: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{what} {value!r} is not a valid CIDR ({e})") from None
    if net.version != 4:
        raise ValueError(f"{what} {value}: only IPv4 is routed by BGP here")
    return str(net)


class NodeBGPSpec(Schema):
    """Node spec.bgp: a node with it runs BIRD."""

    as_number: int | None = None  # default: BGPConfiguration's
    ipv4_address: str | None = Field(default=None, alias="ipv4Address")  # default: the InternalIP
    route_reflector_cluster_id: str | None = Field(default=None, alias="routeReflectorClusterID")

    @field_validator("as_number", mode="before")
    @classmethod
    def _as(cls, v: Any) -> int | None:
        return None if v is None else check_as_number(v)

    @field_validator("ipv4_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            iface = ipaddress.ip_interface(v)  # Calico writes it with its prefix length
        except ValueError:
            raise ValueError(f"ipv4Address {v!r} is not an IPv4 address (with or without a prefix length)") from None
        if iface.version != 4:
            raise ValueError(f"ipv4Address {v!r} is not an IPv4 address")
        return v

    @field_validator("route_reflector_cluster_id")
    @classmethod
    def _cluster_id(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"routeReflectorClusterID {v!r} is not a cluster ID: expected an IPv4 address "
                             "form, e.g. 244.0.0.1") from None

    @property
    def address(self) -> str | None:
        return str(ipaddress.ip_interface(self.ipv4_address).ip) if self.ipv4_address else None


class ServiceIPBlock(Schema):
    cidr: str

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return _ipv4_cidr(v, "cidr")


_STANDARD = re.compile(r"(\d+):(\d+)")
_LARGE = re.compile(r"(\d+):(\d+):(\d+)")
_COMMUNITY_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def community_parts(value: str) -> tuple[int, ...]:
    """(a, b) of a standard community `a:b` (16-bit parts), (a, b, c) of a large one (32-bit)."""
    if m := _STANDARD.fullmatch(value):
        parts = tuple(int(x) for x in m.groups())
        if max(parts) > 65535:
            raise ValueError(f"community {value!r}: the parts of a standard community are 0-65535")
        return parts
    if m := _LARGE.fullmatch(value):
        parts = tuple(int(x) for x in m.groups())
        if max(parts) > AS_MAX:
            raise ValueError(f"community {value!r}: the parts of a large community are 0-{AS_MAX}")
        return parts
    raise ValueError(f"community {value!r}: expected aa:nn (standard) or aa:nn:mm (large)")


class Community(Schema):
    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _COMMUNITY_NAME.fullmatch(v):
            raise ValueError(f"community name {v!r}: expected lowercase letters, digits and '-' (at most 63)")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: str) -> str:
        community_parts(v)
        return v


class PrefixAdvertisement(Schema):
    cidr: str
    communities: list[str] = Field(default_factory=list)  # names from spec.communities, or values

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return _ipv4_cidr(v, "cidr")


class BGPConfigurationSpec(Schema):
    as_number: int = DEFAULT_AS_NUMBER
    node_to_node_mesh_enabled: bool = True
    listen_port: int = DEFAULT_LISTEN_PORT
    node_mesh_max_restart_time: str | None = None
    service_cluster_ips: list[ServiceIPBlock] = Field(default_factory=list, alias="serviceClusterIPs")
    service_external_ips: list[ServiceIPBlock] = Field(default_factory=list, alias="serviceExternalIPs")
    service_load_balancer_ips: list[ServiceIPBlock] = Field(default_factory=list, alias="serviceLoadBalancerIPs")
    communities: list[Community] = Field(default_factory=list)
    prefix_advertisements: list[PrefixAdvertisement] = Field(default_factory=list)

    @field_validator("as_number", mode="before")
    @classmethod
    def _as(cls, v: Any) -> int:
        return check_as_number(v)

    @field_validator("listen_port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"listenPort {v} is out of range: expected 1-65535")
        return v

    @field_validator("node_mesh_max_restart_time")
    @classmethod
    def _restart(cls, v: str | None) -> str | None:
        return check_restart_time(v, "nodeMeshMaxRestartTime")

    @model_validator(mode="after")
    def _communities_known(self) -> BGPConfigurationSpec:
        names = [c.name for c in self.communities]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"communities[{i}]: name {name!r} is listed twice")
        for i, adv in enumerate(self.prefix_advertisements):
            for c in adv.communities:
                if c not in names:
                    try:
                        community_parts(c)
                    except ValueError:
                        raise ValueError(f"prefixAdvertisements[{i}].communities: {c!r} is neither a name from "
                                         "spec.communities nor a community value (aa:nn or aa:nn:mm)") from None
        return self

    def community_values(self, adv: PrefixAdvertisement) -> list[tuple[int, ...]]:
        named = {c.name: c.value for c in self.communities}
        return [community_parts(named.get(c, c)) for c in adv.communities]

    @property
    def service_cidrs(self) -> list[str]:
        return sorted({b.cidr for b in (*self.service_cluster_ips, *self.service_external_ips,
                                        *self.service_load_balancer_ips)})


def split_peer_ip(text: str) -> tuple[str, int | None]:
    """(address, port or None) of `10.0.0.1`, `10.0.0.1:1790` (Calico's peerIP forms, IPv4)."""
    host, sep, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not sep:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"peerIP {text!r} is not an IPv4 address or address:port") from None
    if ip.version != 4:
        raise ValueError(f"peerIP {text!r}: only IPv4 peers are supported")
    if not sep:
        return str(ip), None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"peerIP {text!r}: the port must be 1-65535")
    return str(ip), int(port)


_PASSWORD = re.compile(r"[\x21\x23-\x5b\x5d-\x7e ]+")  # printable ASCII without '"' and '\'


class BGPPeerSpec(Schema):
    # Fields are checked in this order; each consistency rule sits on the later field of
    # the pair, so that an error names the field to fix.
    node: str | None = None
    node_selector: LabelSelector | None = None
    as_number: int | None = None
    peer_ip: str | None = Field(default=None, alias="peerIP")
    peer_selector: LabelSelector | None = None
    keep_original_next_hop: bool = False
    password: str | None = None
    max_restart_time: str | None = None
    source_address: Literal["UseNodeIP", "None"] = "UseNodeIP"

    @field_validator("node_selector", "peer_selector", mode="before")
    @classmethod
    def _selectors(cls, v: Any) -> Any:
        return _selector(v)

    @field_validator("as_number", mode="before")
    @classmethod
    def _as(cls, v: Any) -> int | None:
        return None if v is None else check_as_number(v)

    @field_validator("node_selector")
    @classmethod
    def _node_or_selector(cls, v: LabelSelector | None, info: ValidationInfo) -> LabelSelector | None:
        if v is not None and info.data.get("node") is not None:
            raise ValueError("node and nodeSelector: set one or neither (neither: every BGP node)")
        return v

    @field_validator("peer_ip")
    @classmethod
    def _peer_ip(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        split_peer_ip(v)
        if "as_number" in info.data and info.data["as_number"] is None:
            raise ValueError("peerIP needs asNumber (the peer's AS)")
        return v

    @field_validator("peer_selector")
    @classmethod
    def _ip_or_selector(cls, v: LabelSelector | None, info: ValidationInfo) -> LabelSelector | None:
        if v is not None and info.data.get("peer_ip") is not None:
            raise ValueError("set exactly one of peerIP and peerSelector")
        if v is not None and info.data.get("as_number") is not None:
            raise ValueError("asNumber goes with peerIP: nodes a peerSelector selects speak their own AS")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not 1 <= len(v) <= MAX_PASSWORD or not _PASSWORD.fullmatch(v):
            raise ValueError(f"password: expected 1-{MAX_PASSWORD} printable ASCII characters other than '\"' and "
                             "'\\' (a TCP MD5 key)")
        return v

    @field_validator("max_restart_time")
    @classmethod
    def _restart(cls, v: str | None) -> str | None:
        return check_restart_time(v, "maxRestartTime")


    @model_validator(mode="after")
    def _a_peer(self) -> BGPPeerSpec:
        if self.peer_ip is None and self.peer_selector is None:
            raise ValueError("set one of peerIP (with asNumber) and peerSelector")
        return self

    @property
    def peer_address(self) -> tuple[str, int | None] | None:
        return split_peer_ip(self.peer_ip) if self.peer_ip else None
