"""podnet-ipam: an IPAM type a delegate's configuration can name, served by the agent from
podnet's own compare-and-swap IPAM, so an additional network that spans nodes (a macvlan
underlay) never hands out one address twice, as host-local would per node.

    "ipam": {"type": "podnet-ipam",
             "pools": ["global"],          # IPPools with allowedUses [Attachment], in order
             "subnet": "10.99.0.0/24",     # optional: the on-link prefix (default: the pool's CIDR)
             "gateway": "10.99.0.1",       # optional: the result's gateway
             "routes": [{"dst": "0.0.0.0/0"}],  # optional, as static IPAM takes them
             "dns": {"nameservers": [...]}}     # optional

Inside podnet's own multi-network ADD, the agent allocates before the delegate runs (handle `<network>.<containerID>.<ifname>`,
a requested `ips` capability asks for that address) and hands the delegate a `static`
IPAM section with the address: the delegate configures it as any IPAM result, and no
second process or socket round trip is needed. The address is released after the
delegate's DEL succeeded, or when the pod's network namespace is gone. Run by any other
runtime, the main plugin executes podnet-ipam itself (podnet.cni.ipamcommands).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from podnet.model.names import is_dns1123_subdomain
from podnet.multinet import PODNET_IPAM
from podnet.multinet.netconf import NetConfError

# agentSocket, agentTimeout: read by the podnet-ipam executable (a main plugin run by another
# runtime finds the agent by them); the agent ignores them
KEYS = ("type", "pools", "subnet", "gateway", "routes", "dns", "agentSocket", "agentTimeout")
STATIC = "static"


@dataclass(frozen=True)
class PodnetIpamConfig:
    pools: tuple[str, ...]
    subnet: str | None = None
    gateway: str | None = None
    routes: tuple[dict[str, Any], ...] = ()
    dns: dict[str, Any] | None = None


def parse_config(ipam: dict[str, Any], path: str = "ipam") -> PodnetIpamConfig:
    """The podnet-ipam section, checked; NetConfError names the field."""
    unknown = [k for k in ipam if k not in KEYS]
    if unknown:
        raise NetConfError(f"{path}.{unknown[0]}", f"unknown field: {PODNET_IPAM} takes {', '.join(KEYS)}")
    pools = ipam.get("pools")
    if not isinstance(pools, list) or not pools or not all(isinstance(p, str) and is_dns1123_subdomain(p)
                                                           for p in pools):
        raise NetConfError(f"{path}.pools", "expected a non-empty list of IPPool names (pools with allowedUses "
                           "[Attachment])")
    subnet = ipam.get("subnet")
    if subnet is not None:
        try:
            subnet = str(ipaddress.ip_network(subnet, strict=True)) if isinstance(subnet, str) else None
        except ValueError as e:
            raise NetConfError(f"{path}.subnet", f"{subnet!r} is not a CIDR ({e})") from None
        if subnet is None:
            raise NetConfError(f"{path}.subnet", "expected a CIDR such as 10.99.0.0/24")
    gateway = ipam.get("gateway")
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway) if isinstance(gateway, str) else None
        except ValueError:
            gw = None
        if gw is None:
            raise NetConfError(f"{path}.gateway", f"{gateway!r} is not an IP address")
        if subnet is not None and gw not in ipaddress.ip_network(subnet):
            raise NetConfError(f"{path}.gateway", f"{gw} is not in subnet {subnet}")
        gateway = str(gw)
    routes = ipam.get("routes", [])
    if not isinstance(routes, list):
        raise NetConfError(f"{path}.routes", "expected a list of {dst, gw}")
    for i, r in enumerate(routes):
        where = f"{path}.routes[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise NetConfError(where, "expected an object with dst (a CIDR) and optionally gw")
        try:
            ipaddress.ip_network(r["dst"], strict=False)
        except ValueError:
            raise NetConfError(f"{where}.dst", f"{r['dst']!r} is not a CIDR") from None
        if "gw" in r:
            try:
                ipaddress.ip_address(r["gw"])
            except (ValueError, TypeError):
                raise NetConfError(f"{where}.gw", f"{r['gw']!r} is not an IP address") from None
    dns = ipam.get("dns")
    if dns is not None and not isinstance(dns, dict):
        raise NetConfError(f"{path}.dns", "expected an object (nameservers, domain, search, options)")
    return PodnetIpamConfig(tuple(pools), subnet, gateway, tuple(routes), dns)


def uses_podnet_ipam(plugin: dict[str, Any]) -> bool:
    ipam = plugin.get("ipam")
    return isinstance(ipam, dict) and ipam.get("type") == PODNET_IPAM


def requested_address(ips: list[str] | None) -> str | None:
    """The first address of an `ips` request (with or without a prefix), or None."""
    for ip in ips or []:
        try:
            return str(ipaddress.ip_interface(ip).ip)
        except ValueError:
            continue
    return None


def on_link(cfg: PodnetIpamConfig, address: str, pool_cidr: str) -> str:
    """address with the prefix the interface gets: the subnet's, else the pool's.
    Raises ValueError if the address is outside the subnet."""
    net = ipaddress.ip_network(cfg.subnet or pool_cidr)
    ip = ipaddress.ip_address(address)
    if ip not in net:
        raise ValueError(f"address {ip} is outside subnet {net}")
    return f"{ip}/{net.prefixlen}"


def static_section(cfg: PodnetIpamConfig, address: str | None) -> dict[str, Any]:
    """The static IPAM section handed to the delegate in place of podnet-ipam (address with
    its prefix; None on DEL, which static ignores)."""
    section: dict[str, Any] = {"type": STATIC}
    if address is not None:
        entry: dict[str, Any] = {"address": address}
        if cfg.gateway is not None:
            entry["gateway"] = cfg.gateway
        section["addresses"] = [entry]
    else:
        section["addresses"] = []
    if cfg.routes:
        section["routes"] = [dict(r) for r in cfg.routes]
    if cfg.dns:
        section["dns"] = dict(cfg.dns)
    return section
