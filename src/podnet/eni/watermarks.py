"""How many addresses a pool asks for or gives back: pure functions of its counts.

    idle      addresses ready for a pod now
    cooling   freed addresses waiting out the cooldown (not ready, but not gone either)
    waiting   pods waiting for an address

Below the low watermark (idle < min_idle, counting the waiting pods) the pool asks for
`shortfall`; above the high one (idle + cooling > max_idle) it gives back `surplus`, only
of idle addresses (a cooling address is never handed to the cloud: another node could get
it while the old pod's peers still send to it). The asks go out in batches of at most
`batch` addresses, one AssignPrivateIpAddresses call per batch and ENI.

AWS's settings map onto the two watermarks (docs/eni.md): WARM_IP_TARGET=w and
MINIMUM_IP_TARGET=m give min_idle = w, max_idle = max(w, m); WARM_ENI_TARGET=k gives
min_idle = k x (IPs per ENI - 1) and max_idle = (k + 1) x (IPs per ENI - 1) - 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from podnet.model.cloud import WarmPool


def shortfall(idle: int, waiting: int, min_idle: int) -> int:
    return max(0, waiting + min_idle - idle)


def surplus(idle: int, cooling: int, waiting: int, max_idle: int) -> int:
    if waiting:
        return 0
    return max(0, min(idle, idle + cooling - max_idle))


def split(need: int, rooms: Iterable[tuple[str, int]], batch: int) -> list[tuple[str, int]]:
    """The Assign calls for `need` addresses over ENIs with room, in the order given:
    (ENI, count) with count <= batch. Fewer addresses than `need` if the ENIs lack room."""
    calls: list[tuple[str, int]] = []
    for eni, room in rooms:
        while need > 0 and room > 0:
            n = min(need, room, batch)
            calls.append((eni, n))
            need -= n
            room -= n
        if need <= 0:
            break
    return calls


def from_aws(*, ips_per_eni: int, warm_ip_target: int | None = None, minimum_ip_target: int | None = None,
             warm_eni_target: int | None = None) -> WarmPool:
    """The watermarks that keep what AWS VPC CNI's settings keep (see the module's text)."""
    if warm_ip_target is not None or minimum_ip_target is not None:
        w = warm_ip_target or 0
        m = minimum_ip_target or 0
        return WarmPool(min_idle=w, max_idle=max(w, m))
    k = 1 if warm_eni_target is None else warm_eni_target
    per_eni = ips_per_eni - 1
    return WarmPool(min_idle=k * per_eni, max_idle=max(k * per_eni, (k + 1) * per_eni - 1))
