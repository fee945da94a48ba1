"""CNI results of any version in one shape, and the pod's result with every network in it.

A delegate answers in its configuration's cniVersion: 0.1.0/0.2.0 (`ip4`, `ip6`),
0.3.x/0.4.0 (`ips[].version`) or 1.x. `normalize` brings each to the 1.x shape; `merge`
appends the additional networks to podnet's eth0 result in the version the runtime asked
for: their interfaces after eth0's, their addresses pointing at them (an address a plugin
left without an interface goes to the network's pod interface), their routes except
default ones (unless the pod moved its default route there: default-route). The runtime
reads the pod's address from eth0, which stays first.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

DEFAULTS = ("0.0.0.0/0", "::/0")


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except (ValueError, AttributeError):
        return (1, 0, 0)


def normalize(result: dict[str, Any] | None) -> dict[str, Any]:
    """{interfaces, ips, routes, dns} in the 1.x shape (a copy)."""
    if not result:
        return {"interfaces": [], "ips": [], "routes": [], "dns": {}}
    r = copy.deepcopy(result)
    if "ip4" in r or "ip6" in r:  # 0.1.0 / 0.2.0
        ips, routes = [], []
        for key in ("ip4", "ip6"):
            part = r.get(key)
            if not isinstance(part, dict) or "ip" not in part:
                continue
            entry = {"address": part["ip"]}
            if part.get("gateway"):
                entry["gateway"] = part["gateway"]
            ips.append(entry)
            routes += [x for x in part.get("routes") or [] if isinstance(x, dict)]
        return {"interfaces": [], "ips": ips, "routes": routes, "dns": r.get("dns") or {}}
    ips = []
    for ip in r.get("ips") or []:
        if isinstance(ip, dict) and isinstance(ip.get("address"), str):
            ip.pop("version", None)
            ips.append(ip)
    return {"interfaces": [i for i in r.get("interfaces") or [] if isinstance(i, dict)], "ips": ips,
            "routes": [x for x in r.get("routes") or [] if isinstance(x, dict)], "dns": r.get("dns") or {}}


def pod_interface_index(res: dict[str, Any], ifname: str) -> int | None:
    """Index of the pod-side interface ifname in a normalized result."""
    for i, iface in enumerate(res["interfaces"]):
        if iface.get("name") == ifname and iface.get("sandbox"):
            return i
    for i, iface in enumerate(res["interfaces"]):
        if iface.get("sandbox"):
            return i
    return None


def is_default(route: dict[str, Any]) -> bool:
    return route.get("dst") in DEFAULTS


def merge(primary: dict[str, Any], networks: list[tuple[str, dict[str, Any], tuple[str, ...] | None]],
          version: str) -> dict[str, Any]:
    """primary (podnet's eth0 result, already in `version`) with each (ifname, delegate result,
    default-route gateways or None) appended."""
    out = copy.deepcopy(primary)
    old = _version_tuple(version) < (1, 0, 0)
    interfaces = out.setdefault("interfaces", [])
    ips = out.setdefault("ips", [])
    routes = out.setdefault("routes", [])
    for ifname, raw, gateways in networks:
        res = normalize(raw)
        offset = len(interfaces)
        interfaces += res["interfaces"]
        own = pod_interface_index(res, ifname)
        for ip in res["ips"]:
            entry = dict(ip)
            idx = entry.get("interface")
            if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(res["interfaces"]):
                entry["interface"] = idx + offset
            elif own is not None:
                entry["interface"] = own + offset
            else:
                entry.pop("interface", None)
            if old:
                try:
                    entry = {"version": str(ipaddress.ip_interface(entry["address"]).version), **entry}
                except ValueError:
                    pass
            ips.append(entry)
        if gateways:  # this network has the pod's default route of these families now
            families = {ipaddress.ip_address(g).version for g in gateways}
            out["routes"] = routes = [r for r in routes if not (is_default(r) and _family(r) in families)]
            routes += [{"dst": DEFAULTS[0] if ipaddress.ip_address(g).version == 4 else DEFAULTS[1], "gw": g}
                       for g in gateways]
        routes += [r for r in res["routes"] if not is_default(r)]
    return out


def _family(route: dict[str, Any]) -> int:
    return 6 if ":" in str(route.get("dst", "")) else 4
