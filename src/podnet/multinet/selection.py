"""The pod annotation `k8s.v1.cni.cncf.io/networks`, in both of Multus's forms:

    text:  "underlay, other-ns/storage@stor0, bridge-net"     [<namespace>/]<name>[@<ifname>]
    JSON:  [{"name": "underlay", "namespace": "default", "interface": "net1",
             "ips": ["10.99.0.70/24"], "mac": "02:00:00:00:00:01",
             "default-route": ["10.99.0.1"], "cni-args": {"key": "value"}}]

As Multus decides: a value holding any of `[`, `{` or `"` is JSON, anything else the text
list. A network without a namespace is in the pod's. Interface names: the requested one,
else net1, net2... by position; the cluster network keeps the runtime's (eth0).

Checks (each a SelectionError naming the entry): names are object names, interfaces
kernel interface names and unique in the pod, ips addresses or CIDRs, mac a MAC address,
default-route gateways IP addresses with at most one IPv4 and one IPv6 gateway across the
pod's networks (Multus: no ECMP), cni-args an object; unknown JSON keys are refused (a
misspelt "interfce" must not pass silently).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from podnet.errors import PodnetError
from podnet.model.names import is_dns1123_label, is_dns1123_subdomain

MAX_IFNAME = 15
MAC = re.compile(r"\A[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}\Z")
# Multus's NetworkSelectionElement fields (and interfaceRequest, its pre-3.2 name for interface).
JSON_KEYS = ("name", "namespace", "interface", "interfaceRequest", "ips", "mac", "default-route", "cni-args",
             "portMappings", "bandwidth", "deviceID", "infiniband-guid")


class SelectionError(PodnetError):
    """A networks annotation that cannot be followed; the message names the entry."""


@dataclass(frozen=True)
class NetworkSelection:
    """One requested network of a pod."""

    name: str
    namespace: str
    interface: str | None = None  # None: net<position>
    ips: tuple[str, ...] = ()
    mac: str | None = None
    default_route: tuple[str, ...] | None = None  # gateways; None: not asked
    cni_args: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    port_mappings: tuple[dict[str, Any], ...] = field(default=(), hash=False, compare=False)
    bandwidth: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    device_id: str | None = None
    infiniband_guid: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def capability_args(self) -> dict[str, Any]:
        """What the pod asks of this network's plugins as runtimeConfig capabilities (a plugin
        gets the ones it declares), with Multus's names."""
        caps: dict[str, Any] = {}
        if self.ips:
            caps["ips"] = list(self.ips)
        if self.mac:
            caps["mac"] = self.mac
        if self.port_mappings:
            caps["portMappings"] = [dict(m) for m in self.port_mappings]
        if self.bandwidth:
            caps["bandwidth"] = dict(self.bandwidth)
        if self.device_id:
            caps["deviceID"] = self.device_id
        if self.infiniband_guid:
            caps["infinibandGUID"] = self.infiniband_guid
        return caps


def check_ifname(name: str, where: str) -> str:
    if not name:
        raise SelectionError(f"{where}: the interface name is empty")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_IFNAME:
        raise SelectionError(f"{where}: interface name {name!r} is longer than {MAX_IFNAME} bytes")
    if name in (".", "..") or any(c in "/:" or c.isspace() or c == "\x00" for c in name):
        raise SelectionError(f"{where}: interface name {name!r} may not be '.' or '..' nor hold '/', ':' or "
                             "whitespace")
    return name


def _check_names(name: Any, namespace: Any, where: str) -> None:
    if not isinstance(name, str) or not is_dns1123_subdomain(name):
        raise SelectionError(f"{where}: network name {str(name)[:80]!r} is not a NetworkAttachmentDefinition name "
                             "(lowercase letters, digits, '-' and '.', starting and ending alphanumeric)")
    if namespace is not None and (not isinstance(namespace, str) or not is_dns1123_label(namespace)):
        raise SelectionError(f"{where}: namespace {str(namespace)[:80]!r} is not a namespace name (a DNS label)")


def _text_entry(item: str, index: int, default_ns: str) -> NetworkSelection:
    where = f"entry {index} ({item.strip()[:80]!r})"
    text = item.strip()
    if not text:
        raise SelectionError(f"entry {index} is empty (a stray ',')")
    slash = text.split("/")
    if len(slash) > 2:
        raise SelectionError(f"{where}: expected [<namespace>/]<name>[@<interface>], found more than one '/'")
    namespace = slash[0].strip() if len(slash) == 2 else None
    rest = slash[-1]
    at = rest.split("@")
    if len(at) > 2:
        raise SelectionError(f"{where}: expected [<namespace>/]<name>[@<interface>], found more than one '@'")
    name = at[0].strip()
    ifname = at[1].strip() if len(at) == 2 else None
    _check_names(name, namespace, where)
    if ifname is not None:
        check_ifname(ifname, where)
    return NetworkSelection(name=name, namespace=namespace or default_ns, interface=ifname)


def _string_list(value: Any, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SelectionError(f"{where}: {what} must be a list of strings")
    return value


def _json_entry(obj: Any, index: int, default_ns: str) -> NetworkSelection:
    where = f"entry {index}"
    if not isinstance(obj, dict):
        raise SelectionError(f"{where}: expected an object with at least name, got {type(obj).__name__}")
    if isinstance(obj.get("name"), str):
        where = f"entry {index} ({obj['name'][:80]})"
    unknown = [k for k in obj if k not in JSON_KEYS]
    if unknown:
        raise SelectionError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(JSON_KEYS)})")
    if "name" not in obj:
        raise SelectionError(f"{where}: name is missing")
    name, namespace = obj["name"], obj.get("namespace") or None
    _check_names(name, namespace, where)
    interface = obj.get("interface") or obj.get("interfaceRequest") or None
    if interface is not None:
        if not isinstance(interface, str):
            raise SelectionError(f"{where}: interface must be a string")
        check_ifname(interface, where)
    ips = _string_list(obj.get("ips", []), "ips", where)
    for ip in ips:
        try:
            ipaddress.ip_interface(ip) if "/" in ip else ipaddress.ip_address(ip)
        except ValueError:
            raise SelectionError(f"{where}: ips: {ip!r} is neither an IP address nor a CIDR") from None
    mac = obj.get("mac")
    if mac is not None:
        if not isinstance(mac, str) or not MAC.fullmatch(mac):
            raise SelectionError(f"{where}: mac {str(mac)[:40]!r} is not a MAC address (six hex pairs, e.g. "
                                 "02:00:00:00:00:01)")
        mac = mac.lower().replace("-", ":")
    gateways: tuple[str, ...] | None = None
    if "default-route" in obj:
        listed = _string_list(obj["default-route"], "default-route", where)
        checked = []
        for gw in listed:
            try:
                checked.append(str(ipaddress.ip_address(gw)))
            except ValueError:
                raise SelectionError(f"{where}: default-route: {gw!r} is not an IP address") from None
        gateways = tuple(checked)
    cni_args = obj.get("cni-args")
    if cni_args is not None and not isinstance(cni_args, dict):
        raise SelectionError(f"{where}: cni-args must be an object")
    mappings = obj.get("portMappings") or []
    if not isinstance(mappings, list) or not all(isinstance(m, dict) for m in mappings):
        raise SelectionError(f"{where}: portMappings must be a list of objects")
    bandwidth = obj.get("bandwidth")
    if bandwidth is not None and not isinstance(bandwidth, dict):
        raise SelectionError(f"{where}: bandwidth must be an object")
    for key in ("deviceID", "infiniband-guid"):
        if key in obj and not isinstance(obj[key], str):
            raise SelectionError(f"{where}: {key} must be a string")
    return NetworkSelection(
        name=name, namespace=namespace or default_ns, interface=interface, ips=tuple(ips), mac=mac,
        default_route=gateways, cni_args=cni_args or None, port_mappings=tuple(mappings), bandwidth=bandwidth,
        device_id=obj.get("deviceID") or None, infiniband_guid=obj.get("infiniband-guid") or None)


def parse_networks(value: str, default_namespace: str) -> list[NetworkSelection]:
    """The annotation's networks, in order; SelectionError naming the entry at fault."""
    if not isinstance(value, str):
        raise SelectionError("the value must be text")
    if not value.strip():
        return []
    if any(c in value for c in '[{"'):
        try:
            items = json.loads(value)
        except ValueError as e:
            raise SelectionError(f"not valid JSON: {e}") from None
        except RecursionError:
            raise SelectionError("not valid JSON: nested too deeply") from None
        if isinstance(items, dict):
            items = [items]  # one object: Multus's parser refuses it; taking it is harmless and clearer
        if not isinstance(items, list):
            raise SelectionError(f"expected a JSON list of objects, got {type(items).__name__}")
        out = [_json_entry(obj, i, default_namespace) for i, obj in enumerate(items)]
    else:
        out = [_text_entry(item, i, default_namespace) for i, item in enumerate(value.split(","))]
    v4 = [s for s in out for gw in s.default_route or () if ipaddress.ip_address(gw).version == 4]
    v6 = [s for s in out for gw in s.default_route or () if ipaddress.ip_address(gw).version == 6]
    for family, asking in ((4, v4), (6, v6)):
        if len(asking) > 1:
            raise SelectionError(f"default-route: more than one IPv{family} gateway ("
                                 f"{', '.join(s.ref for s in asking)}): one default route per address family")
    return out


def interface_names(selections: list[NetworkSelection], primary: str) -> list[str]:
    """Each network's interface name in the pod: the requested one, else net<position> (from 1),
    checked unique and different from the cluster network's `primary` name."""
    names: list[str] = []
    seen = {primary: "the cluster network"}
    for i, s in enumerate(selections, start=1):
        name = s.interface or f"net{i}"
        if name in seen:
            raise SelectionError(f"entry {i - 1} ({s.ref}): interface {name} is already {seen[name]}'s"
                                 " (interface names must be unique in the pod)")
        seen[name] = s.ref
        names.append(name)
    return names
