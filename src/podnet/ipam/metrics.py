"""IPAM metrics (process-wide; the agent registers COLLECTORS, its CNI ADDs and DELs move
them):

    podnet_ipam_allocations_total{pool}                 addresses handed out (or handed back to a
                                                        handle that already held one)
    podnet_ipam_allocation_failures_total{reason}       exhausted | conflicts | unavailable | no_pool | error
    podnet_ipam_exhausted_total{pool}                   allocations refused because no address was left
                                                        for the node (each pool that was tried)
    podnet_ipam_allocation_duration_seconds             time of one allocation, store round trips included
    podnet_ipam_releases_total                          addresses freed
    podnet_ipam_blocks_claimed_total{pool}              blocks a node claimed
    podnet_ipam_conflicts_total                         compare-and-swaps lost (and retried)
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ALLOCATIONS = Counter("podnet_ipam_allocations", "Addresses handed out by IPAM, by pool.", ["pool"],
                      registry=None)
FAILURES = Counter("podnet_ipam_allocation_failures", "Allocations that failed, by reason (exhausted, conflicts, "
                   "unavailable, no_pool, error).", ["reason"], registry=None)
EXHAUSTED = Counter("podnet_ipam_exhausted", "Allocations refused because no address was left for the node, by "
                    "pool tried.", ["pool"], registry=None)
DURATION = Histogram("podnet_ipam_allocation_duration_seconds", "Time of one IPAM allocation.",
                     buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                     registry=None)
RELEASES = Counter("podnet_ipam_releases", "Addresses freed by IPAM.", registry=None)
BLOCKS_CLAIMED = Counter("podnet_ipam_blocks_claimed", "Blocks claimed for a node, by pool.", ["pool"],
                         registry=None)
CONFLICTS = Counter("podnet_ipam_conflicts", "Compare-and-swaps IPAM lost to another writer (and retried).",
                    registry=None)
COLLECTORS = (ALLOCATIONS, FAILURES, EXHAUSTED, DURATION, RELEASES, BLOCKS_CLAIMED, CONFLICTS)
for _reason in ("exhausted", "conflicts", "unavailable", "no_pool", "error"):
    FAILURES.labels(_reason)
