"""A node's BGP configuration as BIRD 2's configuration text (pure).

Nothing a user wrote reaches the text as written: protocol names are derived from
addresses (config.protocol_name), prefixes and addresses are printed from parsed
values, AS numbers and communities are integers, and the one string (a TCP MD5
password) is checked against the characters BIRD's string literals can carry (they
have no escapes) before it is quoted. The same input always renders the same text,
so the agent reloads BIRD only when the text changes.

    router id, log, timeformat (status.py parses `show protocols` in this format)
    functions: which routes are the node's own blocks, cluster routes, exportable
    filters: kernel in/out, cluster peers in/out, external peers in/out
    protocols: device, direct (next hops), kernel (learnt routes -> the kernel; GR,
               ECMP), static (the node's blocks, borrowed /32s, service ranges as
               blackholes: what it originates), one bgp per peer from a template
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from podnet.bgp.config import NodeBgp, Peer

KERNEL_SCAN_SECONDS = 10  # a full kernel-table scan; changes are also seen at once over netlink
POD_INTERFACES = "pn*"  # the host ends of pods' veths and pn-vxlan: no next hops there
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_STRING = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # printable ASCII without '"' and '\'


def symbol(name: str) -> str:
    if not _SYMBOL.fullmatch(name):
        raise ValueError(f"{name!r} is not a BIRD symbol")
    return name


def quoted(text: str) -> str:
    """A BIRD string literal: BIRD's lexer has no escapes, so what it cannot hold is refused."""
    if not _STRING.fullmatch(text):
        raise ValueError("a BIRD string can hold only printable ASCII characters other than '\"' and '\\'")
    return f'"{text}"'


def address(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


def prefix(text: str) -> str:
    return str(ipaddress.IPv4Network(text))


def prefix_set(prefixes: Iterable[str], subnets: bool) -> str | None:
    """`[ a/n+, ... ]` (with every subnet when `subnets`), or None for no prefixes."""
    items = [prefix(p) + ("+" if subnets else "") for p in prefixes]
    return f"[ {', '.join(items)} ]" if items else None


def _match(name: str, prefixes: Iterable[str], subnets: bool = True) -> list[str]:
    s = prefix_set(prefixes, subnets)
    return [f"function {name}()", "{", f"  return {f'net ~ {s}' if s else 'false'};", "}", ""]


def render(cfg: NodeBgp, log_file: str | None = None) -> str:
    out = ["# podnet: BIRD configuration of one node, rendered from the store. Changes here are",
           "# replaced at the agent's next sync.", "",
           f"router id {address(cfg.router_id)};",
           "timeformat protocol iso long;"]
    if log_file:
        out.append(f"log {quoted(log_file)} {{ info, remote, warning, error, auth, fatal, bug }};")
    out.append("")
    out += _match("podnet_own_block", cfg.blocks, subnets=False)
    out += _match("podnet_cluster_route", cfg.cluster_pools)
    out += _match("podnet_pool_route", cfg.all_pools)
    out += _match("podnet_export_route", cfg.export_pools)
    out += _match("podnet_service_route", cfg.services)
    out += ["function podnet_communities()", "{"]
    for adv in cfg.advertisements:
        adds = []
        for c in adv.communities:
            attr = "bgp_community" if len(c) == 2 else "bgp_large_community"
            adds.append(f"{attr}.add(({','.join(str(int(x)) for x in c)}));")
        if adds:
            out.append(f"  if net ~ [ {prefix(adv.prefix)}+ ] then {{ {' '.join(adds)} }}")
    out += ["}", ""]
    out += [
        "# Routes learnt from the kernel (the default route, the underlay) resolve next hops;",
        "# nothing of the pools or service ranges is taken from it.",
        "filter podnet_kernel_import",
        "{",
        "  if podnet_pool_route() || podnet_service_route() then reject;",
        "  accept;",
        "}",
        "",
        "# Into the kernel: learnt routes of the pools BGP routes, nothing else.",
        "filter podnet_kernel_export",
        "{",
        "  if source = RTS_BGP && podnet_cluster_route() then accept;",
        "  reject;",
        "}",
        "",
        "filter podnet_cluster_import",
        "{",
        "  if podnet_own_block() then reject;",
        "  if podnet_cluster_route() then accept;",
        "  reject;",
        "}",
        "",
        "# To cluster nodes: the node's own routes and, on a route reflector, what it reflects.",
        "filter podnet_cluster_export",
        "{",
        "  if !podnet_cluster_route() then reject;",
        "  if source = RTS_STATIC || source = RTS_BGP then accept;",
        "  reject;",
        "}",
        "",
        "filter podnet_external_import",
        "{",
        "  if podnet_own_block() then reject;",
        "  accept;",
        "}",
        "",
        "# To routers outside the cluster: only what this node originates.",
        "filter podnet_external_export",
        "{",
        "  if source != RTS_STATIC then reject;",
        "  if podnet_export_route() || podnet_service_route() then {",
        "    podnet_communities();",
        "    accept;",
        "  }",
        "  reject;",
        "}",
        "",
        "protocol device {",
        f"  scan time {KERNEL_SCAN_SECONDS};",
        "}",
        "",
        "protocol direct podnet_direct {",
        "  ipv4;",
        f"  interface -{quoted(POD_INTERFACES)}, \"*\";",
        "}",
        "",
        "protocol kernel podnet_kernel {",
        "  ipv4 { import filter podnet_kernel_import; export filter podnet_kernel_export; };",
        "  learn;",
        "  persist;",
        f"  scan time {KERNEL_SCAN_SECONDS};",
        "  graceful restart;",
        "  merge paths on;",
        "}",
        "",
        "protocol static podnet_routes {",
        "  ipv4;",
    ]
    out += [f"  route {prefix(p)} blackhole;" for p in cfg.statics]
    out += [
        "}",
        "",
        "template bgp podnet_peer {",
        f"  local as {int(cfg.asn)};",
        "  multihop;",
        "  graceful restart on;",
        "  connect delay time 2;",
        "  connect retry time 5;",
        "  error wait time 5,30;",
        "}",
        "",
    ]
    for peer in cfg.peers:
        out += _peer(cfg, peer)
    return "\n".join(out) + "\n"


def _peer(cfg: NodeBgp, p: Peer) -> list[str]:
    local = f"  local {address(p.source_address)}" if p.source_address else "  local"
    lines = [f"protocol bgp {symbol(p.name)} from podnet_peer {{",
             f"{local} port {int(cfg.listen_port)} as {int(cfg.asn)};",
             f"  neighbor {address(p.address)} port {int(p.port)} as {int(p.asn)};"]
    if p.passive:
        lines.append("  passive on;")
    if p.rr_client and cfg.cluster_id:
        lines += ["  rr client;", f"  rr cluster id {address(cfg.cluster_id)};"]
    if p.password:
        lines.append(f"  password {quoted(p.password)};")
    if p.restart_time:
        lines.append(f"  graceful restart time {int(p.restart_time)};")
    side = "cluster" if p.cluster else "external"
    channel = [f"import filter podnet_{side}_import;", f"export filter podnet_{side}_export;",
               "gateway recursive;", "add paths on;"]
    if p.keep_next_hop:
        channel.append("next hop keep;")
    lines += [f"  ipv4 {{ {' '.join(channel)} }};", "}", ""]
    return lines
