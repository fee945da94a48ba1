"""Waiting on BGP events in tests: a condition re-checked until it holds (a session
Established per BIRD, a route present per `ip -j route`), never a fixed sleep."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from podnet.bgp.control import BirdError
from podnet.bgp.status import Session, sessions

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 30.0, every: float = 0.05) -> T:
    """check() until it returns something true; that value. AssertionError naming `what`
    (and the last value seen) when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s (last seen: {last!r})")
        time.sleep(every)


def bird_sessions(control_socket: str) -> list[Session]:
    try:
        return sessions(control_socket, timeout=2.0)
    except BirdError:
        return []


def established(control_socket: str, peers: int | None = None) -> bool:
    """Every BGP session of this BIRD is Established (and there are `peers` of them)."""
    found = bird_sessions(control_socket)
    return bool(found) and all(s.established for s in found) and (peers is None or len(found) == peers)


def routes(netns: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-j", "route", "show"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def route_to(netns: str, prefix: str) -> dict | None:
    """The main table's route for exactly `prefix` (`10.0.0.0/26`; a /32 is shown without
    its length), or None."""
    dst = prefix[:-3] if prefix.endswith("/32") else prefix
    return next((r for r in routes(netns) if r.get("dst") == dst), None)
