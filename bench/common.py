"""Small helpers the CNI benchmarks share (they run as scripts: bench/ is on sys.path)."""

from __future__ import annotations

import subprocess


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile of seconds, in milliseconds (nearest rank)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))] * 1000
