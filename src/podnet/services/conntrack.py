"""Conntrack housekeeping for Services: stale UDP flows and table sizing.

UDP has no connection end, so a client that keeps its socket keeps its
conntrack entry, still DNATed to an endpoint that is gone. As kube-proxy does,
after a sync we delete the entries whose reply source is a removed endpoint, and
the entries of frontends that had no endpoints (they were never NATed).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from podnet.services.model import StaleFlow

DEFAULT_CONNTRACK_MAX_PER_CORE = 32768  # kube-proxy's defaults (podnet plan uses the same formula)
DEFAULT_CONNTRACK_MIN = 131072

log = logging.getLogger("podnet.services")

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def run_command(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def conntrack_delete_command(flow: StaleFlow) -> list[str]:
    fe = flow.frontend
    cmd = ["conntrack", "-D", "-p", fe.proto]
    if fe.ip is not None:
        cmd += ["--orig-dst", fe.ip]
    cmd += ["--orig-port-dst", str(fe.port)]
    if flow.backend is not None:
        cmd += ["--reply-src", flow.backend.ip, "--reply-port-src", str(flow.backend.port)]
    return cmd


def delete_stale_flows(flows: Iterable[StaleFlow], run: Runner = run_command) -> int:
    """Delete the conntrack entries of stale UDP flows; returns how many were deleted.

    `conntrack -D` exits 1 when nothing matched: that is not an error here.
    """
    deleted = 0
    for flow in flows:
        try:
            proc = run(conntrack_delete_command(flow))
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("conntrack cleanup for %s failed: %s", flow.frontend, e)
            continue
        # "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted."
        for word in (proc.stderr or "").split(" flow entries")[0].split()[-1:]:
            if word.isdigit():
                deleted += int(word)
    return deleted


@dataclass(frozen=True)
class ConntrackSizing:
    """kube-proxy's --conntrack-max-per-core / --conntrack-min (0 per core: leave the kernel alone)."""

    max_per_core: int = DEFAULT_CONNTRACK_MAX_PER_CORE
    minimum: int = DEFAULT_CONNTRACK_MIN


def conntrack_max(cores: int, sizing: ConntrackSizing = ConntrackSizing()) -> int:
    """The nf_conntrack_max kube-proxy would set: max(per core x cores, minimum); 0 = unchanged."""
    if sizing.max_per_core <= 0:
        return 0
    return max(sizing.max_per_core * max(1, cores), sizing.minimum)


def apply_conntrack_sizing(
    sizing: ConntrackSizing = ConntrackSizing(),
    cores: int | None = None,
    path: str = "/proc/sys/net/netfilter/nf_conntrack_max",
) -> int | None:
    """Raise nf_conntrack_max to the configured size (never lowers it, as kube-proxy).

    Returns the value written, or None when nothing had to change.
    """
    want = conntrack_max(cores if cores is not None else (os.cpu_count() or 1), sizing)
    if want == 0:
        return None
    with open(path) as f:
        current = int(f.read().strip() or 0)
    if current >= want:
        return None
    with open(path, "w") as f:
        f.write(str(want))
    return want
