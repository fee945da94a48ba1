"""The node-local DNS address: a link-local /32 on the node's loopback, and NOTRACK
rules so DNS packets to and from it skip conntrack (no insertion races, no
5-second timeouts). Pods reach it through their default route to the node."""

from __future__ import annotations

from pyroute2 import IPRoute

from podnet.dataplane.nft import nft_apply

DNS_TABLE = "podnet-dns"


def render_notrack(address: str) -> str:
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


class DnsAddress:
    def __init__(self, address: str):
        self.address = address

    def ensure(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
            if self.address not in have:
                ipr.addr("add", index=lo, address=self.address, prefixlen=32)
        nft_apply(render_notrack(self.address))
