"""natOutgoing: pod traffic from such a pool to anywhere outside every pool is
masqueraded to the node's address. Pool lists are small, so the table is
rewritten as a whole, atomically (the old table removed and the new one written
in one transaction)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nftables import Chain, Elements, NftRunner, Rule, Set, Table, Transaction, read_ruleset

NAT_TABLE = "podnet-nat"
TABLE = Table(NAT_TABLE)
NAT_POOLS = Set("nat_pools", type="ipv4_addr", flags=("interval",))
ALL_POOLS = Set("all_pools", type="ipv4_addr", flags=("interval",))
POSTROUTING = Chain("postrouting", type="nat", hook="postrouting", priority="srcnat + 10", policy="accept")
MASQUERADE = Rule("postrouting", "ip saddr @nat_pools ip daddr != @all_pools masquerade fully-random")


@dataclass(frozen=True)
class NatConfig:
    nat_pools: tuple[str, ...]  # CIDRs whose traffic leaving the pools is masqueraded
    all_pools: tuple[str, ...]  # every pool CIDR: traffic between pods is never NATed


def nat_transaction(cfg: NatConfig) -> Transaction:
    """The whole table for `cfg`, replacing any earlier one in the same transaction."""
    tx = Transaction(TABLE)
    tx.recreate()
    for s, cidrs in ((NAT_POOLS, cfg.nat_pools), (ALL_POOLS, cfg.all_pools)):
        tx.add(s)
        tx.add(Elements(s, sorted(str(ipaddress.IPv4Network(c, strict=False)) for c in cidrs)))
    tx.add(POSTROUTING)
    tx.add(MASQUERADE)
    return tx


def read_nat(link: nl.Netlink | None = None) -> NatConfig | None:
    """What the kernel holds now (netlink dumps), or None if the table is missing or not as
    podnet writes it."""
    own = link is None
    link = link or nl.Netlink()
    try:
        table = read_ruleset(link, NAT_TABLE)
    finally:
        if own:
            link.close()
    if table is None or set(table.sets) != {"nat_pools", "all_pools"} or table.rule_counts() != {"postrouting": 1}:
        return None
    spec = f"type {POSTROUTING.type} hook {POSTROUTING.hook} priority 110; policy accept;"
    if table.chains["postrouting"].spec != spec:
        return None

    def cidrs(name: str) -> tuple[str, ...]:
        return tuple(sorted(e if "/" in e else f"{e}/32" for e in table.sets[name].elements))

    return NatConfig(cidrs("nat_pools"), cidrs("all_pools"))


class NatProgrammer:
    def __init__(self, nft: NftRunner | None = None, read=read_nat) -> None:
        self.nft = nft or NftRunner()
        self.read = read
        self.applied: NatConfig | None = None

    def apply(self, cfg: NatConfig) -> bool:
        if self.applied is None:
            self.applied = self.read()  # after a restart: keep a table that is already right
        if cfg == self.applied:
            return False
        self.nft.apply(nat_transaction(cfg))
        self.applied = cfg
        return True
