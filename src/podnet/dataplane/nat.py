"""natOutgoing: pod traffic from such a pool to anywhere outside every pool is
masqueraded to the node's address. Pool lists are small, so the table is
rewritten as a whole, atomically (the old table removed and the new one written
in one transaction)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nftables import Chain, Elements, NftRunner, Rule, Set, Table, Transaction, read_ruleset
from podnet.dataplane.ruledigest import differing, read_table_digests

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


def read_nat_digests():
    """The table's rules digested per chain (see dataplane.ruledigest), None: no table."""
    return read_table_digests(NAT_TABLE)


class NatProgrammer:
    """`apply(cfg)` rewrites the table when the pools changed; `drift()` checks the kernel's
    table against the last one applied: the pools, and what its rule says (a masquerade
    replaced in place keeps the count of one rule)."""

    def __init__(self, nft: NftRunner | None = None, read=read_nat, digests=read_nat_digests) -> None:
        self.nft = nft or NftRunner()
        self.read = read
        self.digests = digests
        self.applied: NatConfig | None = None
        self.rules = None  # the rules' digests right after podnet's last write (None: not known)

    def apply(self, cfg: NatConfig) -> bool:
        if self.applied is None:
            # after a restart: keep a table that is already right (its rules unchecked when
            # nothing was written yet: they become the reference)
            self.applied = self.read()
            if self.applied is not None and self.rules is not None and differing(self.rules, self.digests()):
                self.applied = None
        if cfg == self.applied:
            if self.rules is None:
                self.rules = self.digests()
            return False
        self.nft.apply(nat_transaction(cfg))
        self.applied = cfg
        self.rules = self.digests()
        return True

    def drift(self) -> list[str]:
        """What differs from the table last applied ([] when none was)."""
        if self.applied is None:
            return []
        if self.read() != self.applied:
            return [f"table {NAT_TABLE} differs from the pools"]
        return differing(self.rules, self.digests()) if self.rules is not None else []
