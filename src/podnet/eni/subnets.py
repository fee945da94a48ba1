"""Which subnet a new ENI goes to: Terway's `most` policy.

Among the CloudNetwork's subnets in the node's zone, the one with the most free addresses
(DescribeSubnets' AvailableIpAddressCount, read when the choice is made). A subnet that
answered InsufficientFreeAddressesInSubnet is skipped for `skip_seconds` (Terway: 10 min),
so a full subnet costs one failed call, not one per pod.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class SubnetChooser:
    def __init__(self, subnets: list[str], skip_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.subnets = list(subnets)  # the node's zone's, in the CloudNetwork's order
        self.skip_seconds = skip_seconds
        self.clock = clock
        self._skipped: dict[str, float] = {}
        self._lock = threading.Lock()

    def set_subnets(self, subnets: list[str]) -> None:
        """The CloudNetwork's subnets changed: new ENIs go to these (skips of those kept stay)."""
        with self._lock:
            self.subnets = list(subnets)

    def skip(self, subnet: str) -> None:
        with self._lock:
            self._skipped[subnet] = self.clock() + self.skip_seconds

    def usable(self) -> list[str]:
        now = self.clock()
        with self._lock:
            return [s for s in self.subnets if self._skipped.get(s, 0.0) <= now]

    def is_skipped(self, subnet: str) -> bool:
        with self._lock:
            return self._skipped.get(subnet, 0.0) > self.clock()

    def choose(self, free: dict[str, int]) -> str | None:
        """The usable subnet with the most free addresses (ties: the CloudNetwork's order), or
        None when every one is skipped or full."""
        best = None
        for s in self.usable():
            if free.get(s, 0) > 0 and (best is None or free[s] > free[best]):
                best = s
        return best
