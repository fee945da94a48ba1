"""IPAM errors. Each is a PodnetError, so a user sees one line that says what and why."""

from __future__ import annotations

from podnet.errors import PodnetError


class IPAMError(PodnetError):
    """Base of the IPAM errors."""


class IPAMExhausted(IPAMError):
    """No address could be handed out: the message names the pools, the node and why."""

    def __init__(self, node: str, pools: list[str], reasons: list[str]):
        self.node = node
        self.pools = list(pools)
        self.reasons = list(reasons)
        names = ", ".join(pools) if pools else "(none)"
        super().__init__(f"no address available for node {node} in IPPool {names}: {'; '.join(reasons)}")


class NoPool(IPAMError):
    """No pool may be used for the request (none selects the node/namespace, unknown or disabled pool)."""


class AddressUnavailable(IPAMError):
    """A fixed address that cannot be given: outside every pool, reserved, or held by another handle."""

    def __init__(self, address: str, reason: str):
        self.address = address
        super().__init__(f"address {address} cannot be allocated: {reason}")


class TryLater(IPAMError):
    """The address source cannot answer now (a cloud API throttled or down, a pool still
    filling): the message says why; the runtime should try again later (CNI code 11)."""


class TooManyConflicts(IPAMError):
    """Gave up after many lost compare-and-swaps (extreme contention)."""
