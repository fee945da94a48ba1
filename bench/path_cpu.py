"""The CPU a packet path costs on one CPU: the sender's own time plus its CPU's ksoftirqd.

A sender pinned to one CPU (taskset) carries the whole path of its packets on that CPU:
the veth crossings queue them on that CPU's backlog, and the softirq that forwards them
runs either in the sender's own context (counted in its CPU time) or, when it has run
too long, in that CPU's ksoftirqd thread. How much goes to ksoftirqd varies from run to
run, so counting the sender alone moves with it; the two together are the path's cost.
Run times from /proc/<pid>/schedstat (nanoseconds; /proc/<pid>/stat counts in ticks).
"""

from __future__ import annotations

import os


def ksoftirqd_pid(cpu: int) -> int:
    """The pid of ksoftirqd/<cpu> (a kernel thread, visible from the root pid namespace)."""
    want = f"ksoftirqd/{cpu}"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == want:
                    return int(entry)
        except OSError:
            continue
    raise RuntimeError(f"no {want} thread in /proc")


def runtime_ns(pid: int) -> int:
    """Time the thread has run on a CPU, in ns (schedstat's first field)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])
