"""natOutgoing: pod traffic from such a pool to anywhere outside every pool is
masqueraded to the node's address. Pool lists are small, so the table is
rewritten as a whole, atomically (flush and refill in one transaction)."""

from __future__ import annotations

from dataclasses import dataclass

from podnet.dataplane.nft import nft_apply

NAT_TABLE = "podnet-nat"


@dataclass(frozen=True)
class NatConfig:
    nat_pools: tuple[str, ...]  # CIDRs whose traffic leaving the pools is masqueraded
    all_pools: tuple[str, ...]  # every pool CIDR: traffic between pods is never NATed


def render_nat(cfg: NatConfig) -> str:
    def elements(cidrs: tuple[str, ...]) -> str:
        return f"elements = {{ {', '.join(sorted(cidrs))} }}" if cidrs else ""

    return f"""table ip {NAT_TABLE}
delete table ip {NAT_TABLE}
table ip {NAT_TABLE} {{
  set nat_pools {{ type ipv4_addr; flags interval; {elements(cfg.nat_pools)} }}
  set all_pools {{ type ipv4_addr; flags interval; {elements(cfg.all_pools)} }}
  chain postrouting {{
    type nat hook postrouting priority srcnat + 10; policy accept;
    ip saddr @nat_pools ip daddr != @all_pools masquerade fully-random
  }}
}}
"""


class NatProgrammer:
    def __init__(self) -> None:
        self.applied: NatConfig | None = None

    def apply(self, cfg: NatConfig) -> bool:
        if cfg == self.applied:
            return False
        nft_apply(render_nat(cfg))
        self.applied = cfg
        return True
