"""One additional network of one pod, and its plugin list run as libcni runs a conflist.

ADD runs the plugins in order, each with the list's name and cniVersion, the previous
plugin's result as prevResult and, in runtimeConfig, the capabilities it declares
(ips, mac, portMappings, bandwidth, deviceID, infinibandGUID). DEL runs them in reverse
with the cached ADD result as prevResult (cniVersion 0.4.0 and later), tries every plugin
even when one fails, and reports the first failure. CHECK runs them in order against the
cached result (0.4.0 and later, unless disableCheck).

A plugin whose IPAM is podnet-ipam gets a static IPAM section with the attachment's
address instead (podipam.py); the `ips` capability went into choosing that address.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from podnet.cni.errors import CNIError
from podnet.multinet.invoke import E_INTERNAL, Invocation, run_plugin
from podnet.multinet.podipam import PodnetIpamConfig, parse_config, static_section, uses_podnet_ipam


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except (ValueError, AttributeError):
        return (0, 0, 0)


@dataclass(frozen=True)
class NetworkAttachment:
    """One additional network of a pod: what ADD, DEL and CHECK need, as recorded in the pod's
    attachment record before the first plugin runs (so a DEL never needs the NAD again)."""

    network: str  # <namespace>/<name> of the NetworkAttachmentDefinition, as Multus names it
    ifname: str
    conflist: dict[str, Any] = field(hash=False, compare=False)  # {cniVersion, name, disableCheck, plugins}
    capability_args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    default_route: tuple[str, ...] | None = None
    handle: str | None = None  # podnet-ipam's IPAM handle; None when no plugin uses podnet-ipam
    address: str | None = None  # podnet-ipam's address with its on-link prefix, once allocated
    result: dict[str, Any] | None = field(default=None, hash=False, compare=False)  # the ADD result

    @property
    def version(self) -> str:
        return str(self.conflist.get("cniVersion") or "1.0.0")

    @property
    def name(self) -> str:
        return str(self.conflist.get("name") or self.network)

    @property
    def plugins(self) -> list[dict[str, Any]]:
        return list(self.conflist.get("plugins") or [])

    def podnet_ipam(self) -> PodnetIpamConfig | None:
        for p in self.plugins:
            if uses_podnet_ipam(p):
                return parse_config(p["ipam"])
        return None

    def with_(self, **changes: Any) -> NetworkAttachment:
        return replace(self, **changes)

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"network": self.network, "ifname": self.ifname, "config": self.conflist}
        if self.capability_args:
            out["capabilityArgs"] = self.capability_args
        if self.default_route is not None:
            out["defaultRoute"] = list(self.default_route)
        if self.handle:
            out["handle"] = self.handle
        if self.address:
            out["address"] = self.address
        if self.result is not None:
            out["result"] = self.result
        return out

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> NetworkAttachment:
        gws = rec.get("defaultRoute")
        return cls(network=str(rec.get("network") or "?"), ifname=str(rec.get("ifname") or ""),
                   conflist=rec.get("config") if isinstance(rec.get("config"), dict) else {"plugins": []},
                   capability_args=rec.get("capabilityArgs") or {},
                   default_route=tuple(gws) if isinstance(gws, list) else None,
                   handle=rec.get("handle") or None, address=rec.get("address") or None,
                   result=rec.get("result") if isinstance(rec.get("result"), dict) else None)


def plugin_conf(att: NetworkAttachment, plugin: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """The configuration one plugin gets (libcni's buildOneConfig and injectRuntimeConfig)."""
    conf = {k: v for k, v in plugin.items() if k not in ("runtimeConfig", "prevResult")}
    conf["name"] = att.name
    conf["cniVersion"] = att.version
    if prev is not None:
        conf["prevResult"] = prev
    podnet_ipam = uses_podnet_ipam(plugin)
    runtime = {cap: att.capability_args[cap] for cap, on in (plugin.get("capabilities") or {}).items()
               if on and cap in att.capability_args and not (podnet_ipam and cap == "ips")}
    if runtime:
        conf["runtimeConfig"] = runtime
    if podnet_ipam:
        conf["ipam"] = static_section(parse_config(plugin["ipam"]), att.address)
    return conf


def add(att: NetworkAttachment, inv: Invocation) -> dict[str, Any]:
    """Run ADD on every plugin; the last one's result. Raises the failing plugin's CNIError
    (the caller runs DEL on the whole network: DEL is idempotent)."""
    chained = version_tuple(att.version) >= (0, 3, 0)
    prev: dict[str, Any] | None = None
    for plugin in att.plugins:
        out = run_plugin(plugin_conf(att, plugin, prev if chained else None), "ADD", inv)
        if out is None:
            raise CNIError(E_INTERNAL, "plugin returned no result", plugin=plugin.get("type", "?"), command="ADD")
        prev = out
    if prev is None:
        raise CNIError(E_INTERNAL, "the network has no plugins", plugin="-", command="ADD")
    return prev


def delete(att: NetworkAttachment, inv: Invocation) -> None:
    """Run DEL on every plugin in reverse, also past a failing one; raise the first failure."""
    prev = att.result if version_tuple(att.version) >= (0, 4, 0) else None
    errors: list[CNIError] = []
    for plugin in reversed(att.plugins):
        try:
            run_plugin(plugin_conf(att, plugin, prev), "DEL", inv)
        except CNIError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def check(att: NetworkAttachment, inv: Invocation) -> None:
    """Run CHECK on every plugin against the cached result (nothing below 0.4.0 or with
    disableCheck, as libcni)."""
    if version_tuple(att.version) < (0, 4, 0) or att.conflist.get("disableCheck"):
        return
    if att.result is None:
        raise CNIError(E_INTERNAL, "no cached ADD result: the network was never added", plugin="-",
                       command="CHECK")
    for plugin in att.plugins:
        run_plugin(plugin_conf(att, plugin, att.result), "CHECK", inv)
