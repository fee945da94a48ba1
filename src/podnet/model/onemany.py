"""A dict whose value is one string or, rarely, a set of them: most keys (a pod's
address, a Service's slices) hold one, and a set per key would cost 216 bytes each
across a cluster's worth of keys."""

from __future__ import annotations


def add_one(index: dict, key, value: str) -> None:
    held = index.get(key)
    if held is None or held == value:
        index[key] = value
    elif isinstance(held, set):
        held.add(value)
    else:
        index[key] = {held, value}


def discard_one(index: dict, key, value: str) -> None:
    held = index.get(key)
    if held == value:
        del index[key]
    elif isinstance(held, set):
        held.discard(value)
        if len(held) == 1:
            index[key] = next(iter(held))
