"""The resolv.conf a pod gets (kubelet's ClusterFirst policy, pointed at the node's DNS).

The search path is what autopath replays on the server: ``<ns>.svc.<zone>``,
``svc.<zone>``, ``<zone>``, then the host's own search domains.
"""

from __future__ import annotations

import ipaddress
import re

# glibc before 2.26 read at most 6 domains / 256 characters; kubelet keeps to
# 32 domains and 2048 characters (MaxDNSSearchPaths, MaxDNSSearchListChars).
MAX_SEARCH = 32
MAX_SEARCH_CHARS = 2048
_DOMAIN = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*$")


def search_path(namespace: str, zone: str = "cluster.local", host_search: list[str] | tuple[str, ...] = ()) -> list[str]:
    zone = zone.strip(".")
    out = [f"{namespace}.svc.{zone}", f"svc.{zone}", zone]
    for d in host_search:
        d = d.strip(".")
        if d and d not in out:
            out.append(d)
    return out



NODE_DNS_ADDRESS = "169.254.20.10"  # NodeLocal DNSCache's link-local address, served by the agent

def render(namespace: str, nameservers: list[str] | str, zone: str = "cluster.local",
           host_search: list[str] | tuple[str, ...] = (), ndots: int = 5, options: list[str] | tuple[str, ...] = ()) -> str:
    """resolv.conf text for a pod in ``namespace``; ``nameservers`` is the node DNS address(es)."""
    servers = [nameservers] if isinstance(nameservers, str) else list(nameservers)
    if not servers:
        raise ValueError("at least one nameserver is needed")
    for s in servers:
        ipaddress.ip_address(s)  # raises ValueError for anything else
    if not 0 <= ndots <= 15:
        raise ValueError(f"ndots {ndots} is out of range: expected 0-15 (glibc caps it at 15)")
    search = search_path(namespace, zone, host_search)
    for d in search:
        if len(d) > 253 or not _DOMAIN.fullmatch(d):  # (match's `$` takes a trailing newline)
            raise ValueError(f"search domain {d!r} is not a valid domain name")
    while len(search) > MAX_SEARCH or len(" ".join(search)) > MAX_SEARCH_CHARS:
        search.pop()  # as kubelet: host domains beyond the limits are dropped
    lines = [f"nameserver {s}" for s in servers[:3]]
    lines.append("search " + " ".join(search))
    lines.append(" ".join(["options", f"ndots:{ndots}", *options]))
    return "\n".join(lines) + "\n"


def host_search_domains(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's search domains (the last search/domain line wins, as in glibc)."""
    domains: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("search", "domain"):
                    domains = parts[1:]
    except FileNotFoundError:
        return []
    return [d.strip(".") for d in domains if d.strip(".")]
