"""podnet.io/weights as slots: a backend that picks one of N slots at random balances by
weight when each endpoint fills as many slots as its weight.

The weights are divided by their greatest common divisor first, so that `a=100,b=900`
costs the 10 slots of `a=1,b=9`: the slot count is what a map holds per frontend.
"""

from __future__ import annotations

from functools import reduce
from math import gcd

from podnet.services.model import Backend


def slot_counts(backends: tuple[Backend, ...], weights: tuple[tuple[str, int], ...],
                cap: int | None = None) -> list[int]:
    """Each endpoint's slots: its weight (an address not listed: 1; 0: no new flows),
    divided by the weights' greatest common divisor; with a cap, scaled down to about
    that many slots (a weighted endpoint keeps at least one)."""
    w = dict(weights)
    counts = [w.get(b.ip, 1) for b in backends]
    common = reduce(gcd, counts, 0)
    if common > 1:
        counts = [c // common for c in counts]
    total = sum(counts)
    if cap is not None and total > cap:
        counts = [max(1, c * cap // total) if c else 0 for c in counts]
    return counts


def weighted_slots(backends: tuple[Backend, ...], counts: list[int]) -> tuple[Backend, ...]:
    """Each endpoint repeated by its count, in endpoint order."""
    return tuple(b for b, c in zip(backends, counts, strict=True) for _ in range(c))
