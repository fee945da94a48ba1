"""How the podnet-svc table follows podnet.io/scheduler: the slots a frontend fills, and
what it cannot do (such a frontend balances at random, and the agent says why).

    random  `numgen random mod N` over the frontend's N slots (the leaf chain's second rule)
    sh      `jhash ip saddr mod N` over the same slots, with a fixed seed: the frontend
            has an @sh_ips / @sh_nodeports element, which the leaf chain's first rule
            tests. A client keeps its endpoint while the endpoints stay (across rebuilds
            and agent restarts too: the seed is not the kernel's random one).
    wrr     each endpoint's slot repeated by its weight (weights over their gcd), then
            random: the frontend's slot count is its total weight, so the tier tree's
            leaf of that count does the choosing and nothing is added to the layout.
            Interval ranges of `numgen random mod TOTAL` would hold one element per
            endpoint instead, but need a leaf per total, a map over an interval
            concatenation, and every range after a changed weight moved.
    lc      not possible: nftables keeps no count of the connections each endpoint holds
            that a rule could compare.

Limits, so that a frontend never costs more than any tree frontend (at most TIER_MAX slot
elements; at 50 000 Services that bounds the slot maps as endpoints already do): sh and
wrr up to TIER_MAX endpoints (a large frontend's chain, sent as netlink, chooses at
random only), and wrr up to TIER_MAX slots (a larger total would need a large chain per
distinct total, goto elements whose loop check the tree exists to avoid).
"""

from __future__ import annotations

from podnet.services.model import Backend, FrontendRule
from podnet.services.nftables.layout import TIER_MAX
from podnet.services.weights import slot_counts, weighted_slots

SUPPORTED = ("sh", "wrr")  # besides random


def scheduler_problem(rule: FrontendRule) -> str:
    """Why this backend balances the frontend at random despite its podnet.io/scheduler
    ("" when it follows it)."""
    scheduler = rule.scheduler
    if not scheduler:
        return ""
    if scheduler == "lc":
        return ("podnet.io/scheduler lc is not available on the nftables backend (nftables keeps no count of "
                "the connections each endpoint holds); balanced at random (--service-proxy ebpf has it)")
    if scheduler not in SUPPORTED:
        return f"podnet.io/scheduler {scheduler} is not available on the nftables backend; balanced at random"
    most = max(len(rule.backends), len(rule.short_circuit))
    if most > TIER_MAX:  # (wrr too: such a frontend is a large one, its chain made for `most` slots)
        return (f"podnet.io/scheduler {scheduler} is available on the nftables backend up to {TIER_MAX} "
                f"endpoints, {rule.frontend} has {most}; balanced at random")
    if scheduler == "wrr":
        for backends in (rule.backends, rule.short_circuit):
            total = sum(slot_counts(backends, rule.weights))
            if total > TIER_MAX:
                return (f"podnet.io/weights: the weights of the {len(backends)} endpoints of {rule.frontend} add "
                        f"up to {total} (divided by their greatest common divisor; an endpoint not listed "
                        f"weighs 1), more than the nftables backend's {TIER_MAX}; balanced at random")
    return ""


def source_hashed(rule: FrontendRule) -> bool:
    """Whether the frontend chooses by a hash of the client address."""
    return rule.scheduler == "sh" and not scheduler_problem(rule)


def frontend_slots(rule: FrontendRule) -> tuple[Backend, ...]:
    """The endpoints in the frontend's slots (wrr: repeated by weight)."""
    return _slots(rule, rule.backends)


def short_circuit_slots(rule: FrontendRule) -> tuple[Backend, ...]:
    """The endpoints in the slots of the frontend's short-circuit view; () where it would
    choose as the frontend's own slots do (the compiler's rule, kept after weighting)."""
    short = rule.short_circuit
    if not short or rule.scheduler != "wrr":
        return short
    slots = _slots(rule, short)
    return () if slots == frontend_slots(rule) else slots


def _slots(rule: FrontendRule, backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    if rule.scheduler != "wrr" or not backends or scheduler_problem(rule):
        return backends
    return weighted_slots(backends, slot_counts(backends, rule.weights))
