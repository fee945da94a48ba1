"""natOutgoing: pod traffic from such a pool to anywhere outside every pool is
masqueraded to the node's address. Pool lists are small, so the table is
rewritten as a whole, atomically (flush and refill in one transaction)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from podnet.dataplane.nft import NftError, nft_apply, nft_list

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


def read_nat() -> NatConfig | None:
    """What the kernel holds now, or None if the table is missing or not as podnet writes it."""
    try:
        doc = json.loads(nft_list(f"-j list table ip {NAT_TABLE}"))["nftables"]
    except (NftError, ValueError, KeyError):
        return None
    sets: dict[str, tuple[str, ...]] = {}
    rules = []
    for item in doc:
        if "set" in item:
            elems = item["set"].get("elem", [])
            sets[item["set"]["name"]] = tuple(sorted(
                f"{e['prefix']['addr']}/{e['prefix']['len']}" if isinstance(e, dict) and "prefix" in e
                else f"{e}/32" for e in elems
            ))
        elif "rule" in item:
            rules.append(item["rule"]["expr"])
    masquerades = [r for r in rules if any("masquerade" in e for e in r)]
    if set(sets) != {"nat_pools", "all_pools"} or len(rules) != 1 or len(masquerades) != 1:
        return None
    return NatConfig(sets["nat_pools"], sets["all_pools"])


class NatProgrammer:
    def __init__(self) -> None:
        self.applied: NatConfig | None = None

    def apply(self, cfg: NatConfig) -> bool:
        if self.applied is None:
            self.applied = read_nat()  # after a restart: keep a table that is already right
        if cfg == self.applied:
            return False
        nft_apply(render_nat(cfg))
        self.applied = cfg
        return True
