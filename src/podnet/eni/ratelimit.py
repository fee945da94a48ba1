"""Token buckets, one per cloud API (as Terway's pkg/aliyun/client/ratelimit.go keeps them).

A bucket holds up to `burst` tokens and refills at `per_minute / 60` per second. A call
takes one token; with none left the caller learns how long until the next one, so a pool
can wait when that is short and tell a waiting pod why when it is not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from podnet.model.cloud import RateLimit


class TokenBucket:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = per_minute / 60.0
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def try_take(self) -> float:
        """Take a token: 0.0 if taken, else the seconds until one is there (nothing taken)."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def wait_time(self) -> float:
        """Seconds until a token is there (0.0: now), taking nothing."""
        with self._lock:
            self._refill(self._clock())
            return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def tokens(self) -> float:
        with self._lock:
            self._refill(self._clock())
            return self._tokens


class RateLimiter:
    """The buckets of every API, by the API's group name (model/cloud.py APIS)."""

    def __init__(self, limits: dict[str, RateLimit], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.limits = dict(limits)
        self.buckets = {api: TokenBucket(lim.per_minute, lim.burst, clock) for api, lim in limits.items()}

    def update(self, limits: dict[str, RateLimit]) -> list[str]:
        """New limits for a running pool (a changed CloudNetwork); the APIs whose changed. A
        changed bucket keeps the tokens it has (up to its new burst): a change never lets a
        burst through that the old bucket held back."""
        changed = []
        for api, lim in limits.items():
            old = self.limits.get(api)
            if old is not None and (old.per_minute, old.burst) == (lim.per_minute, lim.burst):
                continue
            bucket = TokenBucket(lim.per_minute, lim.burst, self.clock)
            if api in self.buckets:
                bucket._tokens = min(float(lim.burst), self.buckets[api].tokens())
            self.buckets[api] = bucket
            self.limits[api] = lim
            changed.append(api)
        return changed

    def try_take(self, api: str) -> float:
        bucket = self.buckets.get(api)
        return 0.0 if bucket is None else bucket.try_take()

    def wait_time(self, api: str) -> float:
        bucket = self.buckets.get(api)
        return 0.0 if bucket is None else bucket.wait_time()

    def describe(self, api: str) -> str:
        lim = self.limits.get(api)
        return f"{lim.per_minute}/min, burst {lim.burst}" if lim else "unlimited"
