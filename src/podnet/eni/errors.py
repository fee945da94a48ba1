"""ENI pool errors. Each is one line a user can act on; the IPAM ones map to CNI codes
(TryLater: 11, try again later; IPAMExhausted: the node has no room left)."""

from __future__ import annotations

from podnet.errors import PodnetError
from podnet.ipam.errors import IPAMExhausted, TryLater


class CloudError(PodnetError):
    """A cloud API call failed: names the call and the cloud's error code."""

    def __init__(self, api: str, code: str, message: str):
        self.api = api
        self.code = code
        self.message = message
        super().__init__(f"EC2 {api} failed: {code}: {message}")

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLE_CODES


THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "LocallyThrottled"})
# The codes that say the call can never work as configured (not worth retrying soon).
CONFIG_CODES = frozenset({"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
                          "InvalidSubnetID.NotFound", "InvalidGroup.NotFound", "InvalidInstanceID.NotFound",
                          "InvalidInstanceID.Malformed", "InvalidInstanceType"})


class PoolUnavailable(TryLater):
    """The pool has no address for a pod now and cannot get one in time (throttled, the
    cloud down, addresses cooling): try again later."""


class PoolExhausted(IPAMExhausted):
    """The node is at its instance type's limit (or every subnet is full): no address now."""

    def __init__(self, node: str, reason: str):
        self.node = node
        self.pools = []
        self.reasons = [reason]
        Exception.__init__(self, f"no ENI address available for node {node}: {reason}")


class SetupError(PodnetError):
    """A node's pool cannot start: names the CloudNetwork, its field, or the API call and its code."""
