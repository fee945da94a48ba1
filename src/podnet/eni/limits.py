"""An instance type's network limits (from DescribeInstanceTypes) and what follows from them.

Shared mode: each ENI holds one primary address (the ENI's own) and `ips_per_eni - 1`
secondary ones for pods, so max pods = ENIs x (IPs per ENI - 1) + 2 (the 2: host-network
pods, as AWS counts). Exclusive mode: each pod takes a whole ENI besides the node's
primary one: max pods = ENIs - 1 + 2.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLimits:
    instance_type: str
    max_enis: int
    ips_per_eni: int  # IPv4 addresses per ENI, its primary included

    @property
    def secondary_per_eni(self) -> int:
        return self.ips_per_eni - 1

    def max_pods(self, mode: str = "shared") -> int:
        if mode == "exclusive":
            return self.max_enis - 1 + 2
        return self.max_enis * (self.ips_per_eni - 1) + 2

    def pod_addresses(self, mode: str = "shared", use_primary_eni: bool = True) -> int:
        """How many pod addresses the node can hold (host-network pods need none)."""
        if mode == "exclusive":
            return self.max_enis - 1
        enis = self.max_enis if use_primary_eni else self.max_enis - 1
        return enis * self.secondary_per_eni

    def describe(self) -> str:
        return f"{self.instance_type}: {self.max_enis} ENIs x {self.ips_per_eni} IPv4 addresses"
