"""The node-local DNS addresses: /32s on the node's loopback (the link-local
169.254.20.10, and optionally the cluster DNS Service IP), and NOTRACK rules so DNS
packets to and from them skip conntrack: no insertion races, no 5-second timeouts,
and no Service DNAT (NAT needs conntrack), so the node answers them itself. Pods
reach them through their default route to the node."""

from __future__ import annotations

from pyroute2 import IPRoute

from podnet.dataplane.nft import nft_apply

DNS_TABLE = "podnet-dns"


def render_notrack(addresses: list[str]) -> str:
    address = "{ " + ", ".join(addresses) + " }"
    return f"""table ip {DNS_TABLE}
delete table ip {DNS_TABLE}
table ip {DNS_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {address} meta l4proto {{ udp, tcp }} th dport 53 notrack
  }}
  chain output {{
    type filter hook output priority raw; policy accept;
    ip saddr {address} meta l4proto {{ udp, tcp }} th sport 53 notrack
    ip daddr {address} meta l4proto {{ udp, tcp }} th dport 53 notrack
  }}
}}
"""


class DnsAddresses:
    def __init__(self, addresses: list[str]):
        self.addresses = addresses

    def ensure(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
            for address in self.addresses:
                if address not in have:
                    ipr.addr("add", index=lo, address=address, prefixlen=32)
        nft_apply(render_notrack(self.addresses))
