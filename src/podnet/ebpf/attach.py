"""THE hook layout of podnet's tc programs on a pod's host-side veth, and attaching
them there (tc clsact, cls_bpf direct-action, through pyroute2's netlink).

    ingress hook (packets from the pod):  services prio 1, then policy prio 2, policy's guard prio 3,
                                          the Services fast path's redirect prio 4
    egress  hook (packets to the pod):    policy prio 1, then services (reverse NAT) prio 2, guard prio 3

A program returns TC_ACT_UNSPEC to hand the packet to the next filter (and then to
the stack), TC_ACT_SHOT to drop it. Services run first from the pod so that policy
sees the backend the packet really goes to (as NetworkPolicy is specified for
Services: against the endpoint, after DNAT); towards the pod policy runs first, on the
packet as the backend sent it, before reverse NAT hides the backend's address.

The guard (attached with policy, last but one at ingress, last at egress) drops a packet
policy has not passed: a policy filter deleted behind the agent's back then drops, it
never opens. The Services fast path redirects a packet to another pod's veth only after
policy and the guard passed it (prio 4), and the redirect lands at that veth's egress
hook, where the destination's policy runs as for a routed packet.

Every filter has handle 1 at its prio; attaching is a tc `replace` of that filter, so
a new build takes over a hook atomically (no packet meets an empty hook). A filter's
name is "<program>:<build digest>" (programs.LoadedObject.filter_name): the agent
tells its current filters from a stale or foreign one by name.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.errors import PodnetError

Direction = Literal["ingress", "egress"]
Owner = Literal["services", "policy", "policy-guard", "services-redirect"]

# TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
PARENTS: dict[str, int] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
HANDLE = 1
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Hook:
    owner: str
    direction: str
    prio: int


# The one layout. Change it here only (and in docs/ebpf.md, native/bpf/podnet_bpf.h).
LAYOUT: tuple[Hook, ...] = (
    Hook("services", "ingress", 1),
    Hook("policy", "ingress", 2),
    Hook("policy", "egress", 1),
    Hook("services", "egress", 2),
    Hook("policy-guard", "ingress", 3),
    Hook("services-redirect", "ingress", 4),
    Hook("policy-guard", "egress", 3),
)


def hook(owner: str, direction: str) -> Hook:
    for h in LAYOUT:
        if h.owner == owner and h.direction == direction:
            return h
    raise ValueError(f"no hook for {owner} {direction} in the layout")


class AttachError(PodnetError):
    pass


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise AttachError(f"interface {ifindex}: cannot add the clsact qdisc: {e}") from None


def attach(ipr: IPRoute, ifindex: int, owner: str, direction: str, prog_fd: int, name: str) -> None:
    """Put the program at owner's hook in direction on the interface (replacing what is there)."""
    h = hook(owner, direction)
    ensure_clsact(ipr, ifindex)
    try:
        ipr.tc("replace-filter", "bpf", ifindex, HANDLE, parent=PARENTS[direction], prio=h.prio,
               protocol=ETH_P_ALL, fd=prog_fd, name=name, direct_action=True)
    except NetlinkError as e:
        raise AttachError(f"interface {ifindex}: cannot attach {name} at {direction} prio {h.prio}: {e}") from None


def attached(ipr: IPRoute, ifindex: int, direction: str) -> dict[int, str]:
    """prio -> filter name of the bpf filters at that hook of the interface ({} if none,
    or if the interface has no clsact qdisc)."""
    try:
        filters = ipr.get_filters(ifindex, parent=PARENTS[direction])
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return {}
        raise
    out: dict[int, str] = {}
    for f in filters:
        if f.get_attr("TCA_KIND") != "bpf":
            continue
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            out[(f["info"] >> 16) & 0xFFFF] = name
    return out


@dataclass(frozen=True)
class PodnetFilter:
    ifname: str
    ifindex: int
    direction: str
    prio: int
    name: str  # <program>:<build>


def podnet_filters(ipr: IPRoute) -> list[PodnetFilter]:
    """podnet's bpf filters (named `podnet_*`) on every interface of this namespace."""
    out = []
    for link in ipr.get_links():
        ifname, index = link.get_attr("IFLA_IFNAME"), link["index"]
        for direction in PARENTS:
            for prio, name in attached(ipr, index, direction).items():
                if name.startswith("podnet_"):
                    out.append(PodnetFilter(ifname, index, direction, prio, name))
    return out


def detach(ipr: IPRoute, ifindex: int, owner: str, direction: str) -> bool:
    """Remove owner's filter in direction; False if there was none."""
    return detach_prio(ipr, ifindex, direction, hook(owner, direction).prio)


def detach_prio(ipr: IPRoute, ifindex: int, direction: str, prio: int) -> bool:
    """Remove the filter at prio in direction; False if there was none."""
    try:
        ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=PARENTS[direction], prio=prio, protocol=ETH_P_ALL)
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise AttachError(f"interface {ifindex}: cannot detach the filter at {direction} prio {prio}: {e}") from None
    return True
