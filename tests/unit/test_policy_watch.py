"""Which netlink events make the eBPF policy's attachment watch wake the agent: policy's
own filters (and the guard) on interfaces it is attached to, their qdisc, and pod veths
it is not on yet; never the Service program's prios, other interfaces or other links."""

import struct

from podnet.dataplane.netlink import attr, message
from podnet.ebpf import attach as tc
from podnet.policy.ebpf.watch import (
    IFINFO,
    IFLA_IFALIAS,
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_NEWLINK,
    RTM_NEWTFILTER,
    TCMSG,
    AttachmentWatch,
)

POD_VETH, OTHER = 7, 9
KNOWN = frozenset({POD_VETH})


def tfilter(kind: int, ifindex: int, direction: str, prio: int) -> bytes:
    return message(kind, 0, 0, TCMSG.pack(0, ifindex, 1, tc.PARENTS[direction], prio << 16 | 0x0003))


def link(ifindex: int, alias: str | None) -> bytes:
    body = IFINFO.pack(0, 1, ifindex, 0, 0) + (attr(IFLA_IFALIAS, alias.encode() + b"\0") if alias else b"")
    return message(RTM_NEWLINK, 0, 0, body)


def relevant(*messages: bytes) -> frozenset[int]:
    return AttachmentWatch.relevant(b"".join(messages), KNOWN)


def test_policy_filters_and_the_guard_deleted_or_replaced_on_a_known_veth():
    for owner in ("policy", "policy-guard"):
        for direction in ("ingress", "egress"):
            prio = tc.hook(owner, direction).prio
            assert relevant(tfilter(RTM_DELTFILTER, POD_VETH, direction, prio)) == {POD_VETH}
            assert relevant(tfilter(RTM_NEWTFILTER, POD_VETH, direction, prio)) == {POD_VETH}
    assert relevant(message(RTM_DELQDISC, 0, 0, TCMSG.pack(0, POD_VETH, 0, 0xFFFFFFF1, 0))) == {POD_VETH}


def test_the_service_programs_prios_and_other_interfaces_are_not_policys():
    for direction in ("ingress", "egress"):
        assert relevant(tfilter(RTM_DELTFILTER, POD_VETH, direction, tc.hook("services", direction).prio)) == set()
        assert relevant(tfilter(RTM_DELTFILTER, OTHER, direction, tc.hook("policy", direction).prio)) == set()


def test_a_new_pod_veth_is_and_other_links_are_not():
    assert relevant(link(OTHER, "podnet:default/web")) == {OTHER}
    assert relevant(link(OTHER, None), link(OTHER, "someone else's")) == set()
    assert relevant(link(POD_VETH, "podnet:default/web")) == set()  # attached already: a state change


def test_several_messages_in_one_read():
    both = relevant(tfilter(RTM_DELTFILTER, POD_VETH, "egress", 1), link(OTHER, "podnet:x/y"),
                    struct.pack("=IHHII", 16, 3, 0, 0, 0))  # NLMSG_DONE
    assert both == {POD_VETH, OTHER}
