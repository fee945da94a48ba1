"""Watching the kernel for what undoes the policy attachments between resyncs.

One NETLINK_ROUTE socket subscribed to link and tc events, read on a thread of its own:
a policy filter (or the guard) deleted or replaced on a pod veth the programmer attached
to, its clsact qdisc deleted, or a new pod veth (one made again under a known name gets
a new index) makes `on_change(ifindexes)` run at once; the agent then marks the policy
worker, whose next sync re-attaches (within the worker's minimum interval, 10 ms).
Until then the guard drops what policy did not judge (native/bpf/policy.c).

What netlink cannot tell: a map entry rewritten (bpf(2) sends no events), a pin removed
(bpffs has no notifications we can rely on here). Those stay with the resync's verify().

Why a raw socket with the project's netlink decoding (dataplane/netlink.py) rather than
pyroute2's IPRoute.bind(): pyroute2 0.9 reads the socket through its own buffer, so a
select() on its descriptor misses queued messages and the thread could not be stopped
with a timeout; the messages needed here are two fixed headers and one attribute.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable

from podnet.dataplane.netlink import attrs, messages, text
from podnet.ebpf import attach as tc
from podnet.policy.ebpf.kernel import POD_ALIAS_PREFIX

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_LINK, RTMGRP_TC = 0x1, 0x8
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_DELCHAIN = 37, 44, 45, 101
IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
IFLA_IFALIAS = 20
ALL = None  # on_change(ALL): events were lost, every interface is in doubt

# (parent, prio) of every filter policy owns: an event at another prio (the Services
# program's) is not ours to repair
POLICY_HOOKS = frozenset((tc.PARENTS[h.direction], h.prio) for h in tc.LAYOUT if h.owner.startswith("policy"))


class AttachmentWatch:
    """`known()`: the ifindexes policy is attached to now; `on_change(ifindexes | ALL)`."""

    def __init__(self, known: Callable[[], frozenset[int]], on_change: Callable[[frozenset[int] | None], None]):
        self.known = known
        self.on_change = on_change
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_TC))  # in the namespace of the caller: the node's
        self._thread = threading.Thread(target=self._run, name="policy-attach-watch", daemon=True)

    def start(self) -> AttachmentWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not select.select([self._sock], [], [], 0.5)[0]:
                continue
            try:
                data = self._sock.recv(1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: check everything
                    self.on_change(ALL)
                    continue
                if self._stopping.is_set():
                    return
                raise
            changed = self.relevant(data, self.known())
            if changed:
                self.on_change(changed)

    @staticmethod
    def relevant(data: bytes, known: frozenset[int]) -> frozenset[int]:
        """The interfaces among these messages whose policy filters may be gone."""
        out = set()
        for mtype, _, _, body in messages(data):
            if mtype in (RTM_DELTFILTER, RTM_NEWTFILTER) and len(body) >= TCMSG.size:
                _, ifindex, _, parent, info = TCMSG.unpack_from(body)
                if ifindex in known and (parent, info >> 16) in POLICY_HOOKS:
                    out.add(ifindex)
            elif mtype in (RTM_DELQDISC, RTM_DELCHAIN) and len(body) >= TCMSG.size:
                ifindex = TCMSG.unpack_from(body)[1]
                if ifindex in known:
                    out.add(ifindex)
            elif mtype == RTM_NEWLINK and len(body) >= IFINFO.size:
                ifindex = IFINFO.unpack_from(body)[2]
                alias = text(attrs(body[IFINFO.size:]).get(IFLA_IFALIAS))
                if ifindex not in known and alias.startswith(POD_ALIAS_PREFIX):
                    out.add(ifindex)  # a pod veth the programs are not on yet
        return frozenset(out)
