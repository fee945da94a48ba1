"""Which address ranges overlap: IPPools with each other and with the Service CIDR, and blocks.

Pure functions over CIDR strings. Two pools that share addresses would let two
nodes hold blocks covering the same addresses, and so hand one address to two
pods; `podnet apply` refuses them and `podnet ipam check` reports what a store
already holds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import TypeVar

K = TypeVar("K")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def overlapping_pairs(ranges: Iterable[tuple[K, str]]) -> Iterator[tuple[K, K]]:
    """Every pair (a, b) of the given (key, cidr) whose CIDRs share an address.

    A sweep over the ranges sorted by first address: the cost is n log n plus the
    number of pairs reported. a is the range that starts first (or is larger)."""
    items = sorted(((ipaddress.ip_network(c), k) for k, c in ranges),
                   key=lambda nk: (nk[0].version, int(nk[0].network_address), nk[0].prefixlen))
    open_: list[tuple[Network, K]] = []  # ranges that may still reach the next one
    for net, key in items:
        start = int(net.network_address)
        open_ = [(n, k) for n, k in open_ if n.version == net.version and int(n.broadcast_address) >= start]
        for _, other in open_:
            yield other, key
        open_.append((net, key))


def shared(a: str, b: str) -> Network:
    """The addresses two overlapping CIDRs share: the smaller of the two."""
    na, nb = ipaddress.ip_network(a), ipaddress.ip_network(b)
    return na if na.prefixlen >= nb.prefixlen else nb
