"""Shared by the benchmarks that run many worker processes at once."""

from __future__ import annotations

import subprocess
import time


def start_together(children: list[subprocess.Popen], go: str) -> float:
    """Wait until every worker has printed "ready" (imports and connections stay outside
    the measurement), then release them all at once by creating the file `go`; returns
    the start time."""
    for c in children:
        assert c.stdout is not None
        if c.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker failed to start:\n{c.communicate()[1][-3000:]}")
    t0 = time.time()
    with open(go, "w"):
        pass
    return t0
