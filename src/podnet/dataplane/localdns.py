"""The node-local DNS addresses: /32s on the node's loopback (the link-local
169.254.20.10, and optionally the cluster DNS Service IP), and NOTRACK rules so DNS
packets to and from them skip conntrack: no insertion races, no 5-second timeouts,
and no Service DNAT (NAT needs conntrack), so the node answers them itself. Pods
reach them through their default route to the node.

The addresses have scope host. The kernel never picks a scope-host address as the
source of a packet that leaves the node, and `lo` comes first when it looks for one
on another device: with scope global, every masquerade out of a device without an
address of its own (`pn-vxlan`, a pod's veth) and every node-originated packet on a
route without a source took 169.254.20.10, an address every node owns, so answers
from other nodes never came back. Packets addressed to them are still delivered:
scope limits source selection, not what the node accepts."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from podnet.dataplane.nftables import Chain, NftRunner, Rule, Table, Transaction

DNS_TABLE = "podnet-dns"
RT_SCOPE_HOST = 254


def notrack_transaction(addresses: list[str]) -> Transaction:
    """The whole NOTRACK table, replacing any earlier one in the same transaction."""
    address = "{ " + ", ".join(str(ipaddress.IPv4Address(a)) for a in addresses) + " }"
    tx = Transaction(Table(DNS_TABLE))
    tx.recreate()
    tx.add(Chain("prerouting", type="filter", hook="prerouting", priority="raw", policy="accept"))
    tx.add(Rule("prerouting", f"ip daddr {address} meta l4proto {{ udp, tcp }} th dport 53 notrack"))
    tx.add(Chain("output", type="filter", hook="output", priority="raw", policy="accept"))
    tx.add(Rule("output", f"ip saddr {address} meta l4proto {{ udp, tcp }} th sport 53 notrack"))
    tx.add(Rule("output", f"ip daddr {address} meta l4proto {{ udp, tcp }} th dport 53 notrack"))
    return tx


class DnsAddresses:
    def __init__(self, addresses: list[str], nft: NftRunner | None = None):
        self.addresses = addresses
        self.nft = nft or NftRunner()

    def ensure(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = _on_lo(ipr, lo)
            for address in self.addresses:
                if address in have and have[address] != (32, RT_SCOPE_HOST):
                    # as written before addresses had scope host: re-add (the scope cannot be changed)
                    ipr.addr("del", index=lo, address=address, prefixlen=have.pop(address)[0])
                if address not in have:
                    ipr.addr("add", index=lo, address=address, prefixlen=32, scope=RT_SCOPE_HOST)
        self.nft.apply(notrack_transaction(self.addresses))

    def drift(self) -> list[str]:
        """What differs on `lo` from what ensure() writes (the NOTRACK table aside)."""
        with IPRoute() as ipr:
            have = _on_lo(ipr, ipr.link_lookup(ifname="lo")[0])
        out = [f"address {a} missing from lo" for a in self.addresses if a not in have]
        return out + [f"address {a} on lo is not a /32 of scope host" for a in self.addresses
                      if a in have and have[a] != (32, RT_SCOPE_HOST)]


def _on_lo(ipr: IPRoute, lo: int) -> dict[str, tuple[int, int]]:
    """address -> (prefix length, scope) of lo's IPv4 addresses."""
    return {a.get_attr("IFA_ADDRESS"): (a["prefixlen"], a["scope"]) for a in ipr.get_addr(index=lo, family=2)}
