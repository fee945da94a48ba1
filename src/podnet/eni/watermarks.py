"""How many addresses a pool asks for or gives back: pure functions of its counts.

    idle      addresses ready for a pod now
    cooling   freed addresses waiting out the cooldown (not ready, but not gone either)
    waiting   pods waiting for an address

Below the low watermark (idle < min_idle, counting the waiting pods) the pool asks for the
shortfall, rounded up to whole batches within the high watermark (`ask`); above the high
one (idle > max_idle) it gives back `surplus`, only of idle addresses (a cooling address
is never handed to the cloud: another node could get it while the old pod's peers still
send to it). The asks go out in batches of at most `batch` addresses, one
AssignPrivateIpAddresses call per batch and ENI.

AWS's settings map onto the two watermarks (docs/eni.md): WARM_IP_TARGET=w and
MINIMUM_IP_TARGET=m give min_idle = w, max_idle = max(w, m); WARM_ENI_TARGET=k gives
min_idle = k x (IPs per ENI - 1) and max_idle = (k + 1) x (IPs per ENI - 1) - 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from podnet.model.cloud import WarmPool


def shortfall(idle: int, waiting: int, min_idle: int) -> int:
    return max(0, waiting + min_idle - idle)


def ask(idle: int, waiting: int, min_idle: int, max_idle: int, batch: int) -> int:
    """What to ask for: the shortfall, rounded up to whole batches while that stays within
    the high watermark (a call costs the same for 5 addresses as for 10)."""
    short = shortfall(idle, waiting, min_idle)
    if not short:
        return 0
    rounded = -(-short // batch) * batch
    return max(short, min(rounded, waiting + max_idle - idle))


def surplus(idle: int, cooling: int, waiting: int, max_idle: int) -> int:
    """Idle addresses above the high watermark. Cooling ones are not counted yet: they come
    back as idle after the cooldown and are counted then (as AWS counts only available
    addresses), so pod churn within the cooldown costs no call."""
    if waiting:
        return 0
    return max(0, idle - max_idle)


def split(need: int, rooms: Iterable[tuple[str, int]], batch: int) -> list[tuple[str, int]]:
    """The Assign calls for `need` addresses over ENIs with room: (ENI, count) with count <=
    batch. Each batch goes to the ENI with the least room that still takes it whole (ties:
    the order given), so ENIs fill up without leaving fragments that cost a call of their
    own; when none takes a whole batch, the one with the most room gets what it holds.
    Fewer addresses than `need` if the ENIs lack room."""
    left = dict(rooms)
    order = {eni: i for i, eni in enumerate(left)}
    calls: list[tuple[str, int]] = []
    while need > 0:
        chunk = min(need, batch)
        fits = [e for e, r in left.items() if r >= chunk]
        if fits:
            eni = min(fits, key=lambda e: (left[e], order[e]))
        else:
            eni = max(left, key=lambda e: (left[e], -order[e]), default=None)
            if eni is None or left[eni] <= 0:
                break
            chunk = left[eni]
        calls.append((eni, chunk))
        left[eni] -= chunk
        need -= chunk
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
