"""Conntrack over netlink (ctnetlink), without the `conntrack` process.

    with Conntrack() as ct:                            # in the calling thread's namespace
        for e in ct.dump(socket.AF_INET, proto=17):    # one dump, filtered by the kernel
            ...
        deleted, gone = ct.delete(entries)             # batched deletes, the outcome of each known

A dump reads the entries of one address family, filtered in the kernel (CTA_FILTER,
Linux 5.10+; an older kernel ignores the filter and the caller's own match still
holds) by the original tuple's protocol and, if given, its destination address and
port; only the tuples, the zone and the id are decoded (an IPv4 tuple by slicing, at the
offsets the kernel lays it out). Deletes name an entry by its original tuple, zone and id
as dumped (an entry replaced since by a new one with the same tuple is not touched: its
id differs), a thousand messages to one send(), the last one acknowledged: the kernel
answers every failed request with an error, so the ones before it without an error
succeeded. An entry that is already gone (it expired) counts as gone, not as an error.
`create` inserts entries the same way (tests and benchmarks).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from podnet.dataplane.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    attr_list,
    dump_replies,
    error_code,
    message,
    messages,
    nested,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLM_F_DUMP = 0x300
NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an error acknowledgement carries the failed request's header only
SO_RCVBUFFORCE = 33

# attributes (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_ID, CTA_ZONE, CTA_FILTER = 1, 2, 3, 7, 12, 18, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5

IPS_CONFIRMED = 1 << 3
BATCH = 1000  # messages per send(): ~100 kB of deletes, their acknowledgements ~36 kB


class Tuple(NamedTuple):
    """One direction of a conntrack entry: addresses packed (4 or 16 bytes), ports as
    numbers (0 for a protocol without ports)."""

    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int


class Entry(NamedTuple):
    family: int
    orig: Tuple
    reply: Tuple
    zone: int  # 0: the default zone
    id: int | None
    key: bytes = b""  # the attributes that name it in a delete (original tuple, zone, id), as dumped


class ConntrackError(OSError):
    pass


# ---------------------------------------------------------------- encoding


def _ip_attrs(family: int, src: bytes | None, dst: bytes | None) -> bytes:
    s, d = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == socket.AF_INET else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    return (attr(s, src) if src is not None else b"") + (attr(d, dst) if dst is not None else b"")


def encode_tuple(kind: int, family: int, t: Tuple) -> bytes:
    proto = attr(CTA_PROTO_NUM, bytes((t.proto,)))
    if t.proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP, 132, 136):  # ports: TCP, UDP, SCTP, UDP-Lite
        proto += attr(CTA_PROTO_SRC_PORT, struct.pack("!H", t.sport)) + attr(CTA_PROTO_DST_PORT,
                                                                                 struct.pack("!H", t.dport))
    return nested(kind, nested(CTA_TUPLE_IP, _ip_attrs(family, t.src, t.dst)) + nested(CTA_TUPLE_PROTO, proto))


def _nfgen(family: int) -> bytes:
    return struct.pack("!BBH", family, 0, 0)


def dump_filter(proto: int, dst: bytes | None = None, dport: int | None = None, family: int = socket.AF_INET) -> bytes:
    """The attributes of a dump request that the kernel filters by (original direction)."""
    flags = FILTER_PROTO_NUM
    ip = b""
    if dst is not None:
        flags |= FILTER_IP_DST
        ip = nested(CTA_TUPLE_IP, _ip_attrs(family, None, dst))
    proto_attrs = attr(CTA_PROTO_NUM, bytes((proto,)))
    if dport is not None:
        flags |= FILTER_PROTO_DST_PORT
        proto_attrs += attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    return (nested(CTA_TUPLE_ORIG, ip + nested(CTA_TUPLE_PROTO, proto_attrs))
            + nested(CTA_FILTER, attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags))))


# ---------------------------------------------------------------- decoding


def _decode_tuple(data: bytes) -> Tuple:
    """A tuple from the payload of a CTA_TUPLE_* attribute (any layout)."""
    src = dst = b""
    proto = sport = dport = 0
    for kind, value in attr_list(data):
        if kind == CTA_TUPLE_IP:
            for k, v in attr_list(value):
                if k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = v
                elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = v
        elif kind == CTA_TUPLE_PROTO:
            for k, v in attr_list(value):
                if k == CTA_PROTO_NUM:
                    proto = v[0]
                elif k == CTA_PROTO_SRC_PORT:
                    sport = (v[0] << 8) | v[1]
                elif k == CTA_PROTO_DST_PORT:
                    dport = (v[0] << 8) | v[1]
    return Tuple(src, dst, proto, sport, dport)


# The kernel lays out an IPv4 entry of a protocol with ports (TCP, UDP, SCTP, ...) the
# same way in every dump: after the 4-byte nfgenmsg, the original tuple (52 bytes: IP
# source and destination, protocol number, source and destination port, in that order)
# and the reply tuple (the same). An entry whose two tuples have those lengths is read by
# slicing at fixed offsets (5x faster than walking its attributes); any other is walked.
_H = struct.Struct("=HH")
_V4_ORIG = _H.pack(52, CTA_TUPLE_ORIG | NLA_F_NESTED)
_V4_REPLY = _H.pack(52, CTA_TUPLE_REPLY | NLA_F_NESTED)
# What a dump's `select` is asked about: (original protocol, destination (packed), destination
# port, reply source (packed), reply source port) -> keep the entry?
Select = Callable[[int, bytes, int, bytes, int], bool]


def _is_v4_ports(body: bytes) -> bool:
    return body[0] == socket.AF_INET and body[4:8] == _V4_ORIG and body[56:60] == _V4_REPLY


def decode_entry(body: bytes) -> Entry:
    """An entry from the body of a conntrack message (after the netlink header)."""
    family = body[0]
    empty = Tuple(b"", b"", 0, 0, 0)
    orig = reply = empty
    zone, ident = 0, None
    key = []
    off, end = 4, len(body)
    if _is_v4_ports(body):
        orig = Tuple(body[16:20], body[24:28], body[36], (body[44] << 8) | body[45], (body[52] << 8) | body[53])
        reply = Tuple(body[68:72], body[76:80], body[88], (body[96] << 8) | body[97], (body[104] << 8) | body[105])
        key.append(body[4:56])
        off = 108
    unpack = _H.unpack_from
    while off + 4 <= end:
        n, kind = unpack(body, off)
        if n < 4:
            break
        kind &= 0x3FFF
        if kind == CTA_TUPLE_ORIG:
            orig = _decode_tuple(body[off + 4:off + n])
            key.append(body[off:off + ((n + 3) & ~3)])
        elif kind == CTA_TUPLE_REPLY:
            reply = _decode_tuple(body[off + 4:off + n])
        elif kind == CTA_ZONE:
            zone = (body[off + 4] << 8) | body[off + 5]
            key.append(body[off:off + 8])
        elif kind == CTA_ID:
            ident = struct.unpack_from("!I", body, off + 4)[0]
            key.append(body[off:off + 8])
            break  # the kernel sends the tuples and the zone before it
        off += (n + 3) & ~3
    return Entry(family, orig, reply, zone, ident, b"".join(key))


# ---------------------------------------------------------------- the socket


class Conntrack:
    """A ctnetlink socket in the network namespace of the thread that makes it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            self.sock.close()
            raise
        self.seq = int.from_bytes(os.urandom(2), "big") << 8

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dump(self, family: int = socket.AF_INET, *, proto: int | None = None, dst: bytes | None = None,
             dport: int | None = None, select: Select | None = None) -> Iterator[Entry]:
        """Every entry of `family` (with the original direction's protocol, destination and
        destination port, when given: filtered by the kernel), or only those `select` keeps
        (asked before the rest of an entry is decoded)."""
        seq = self.seq
        self.seq += 1
        payload = _nfgen(family) + (dump_filter(proto, dst, dport, family) if proto is not None else b"")
        self.sock.send(message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                               seq, payload))
        self.sock.settimeout(30)
        try:
            for body in dump_replies(self.sock, seq):
                if select is None:
                    yield decode_entry(body)
                elif _is_v4_ports(body):
                    if select(body[36], body[24:28], (body[52] << 8) | body[53], body[68:72],
                              (body[96] << 8) | body[97]):
                        yield decode_entry(body)
                else:
                    e = decode_entry(body)
                    if select(e.orig.proto, e.orig.dst, e.orig.dport, e.reply.src, e.reply.sport):
                        yield e
        except TimeoutError as e:
            raise ConntrackError(errno.ETIMEDOUT, "conntrack dump: no answer from the kernel") from e
        finally:
            self.sock.settimeout(None)

    def delete(self, entries: Iterable[Entry]) -> tuple[int, int]:
        """Delete entries (by original tuple, zone and id); (deleted, already gone)."""
        kind, flags = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK
        msgs = []
        for e in entries:
            key = e.key  # as dumped; an entry made by hand is encoded
            if not key:
                key = encode_tuple(CTA_TUPLE_ORIG, e.family, e.orig)
                if e.zone:
                    key += attr(CTA_ZONE, struct.pack("!H", e.zone))
                if e.id is not None:
                    key += attr(CTA_ID, struct.pack("!I", e.id))
            msgs.append((kind, flags, _nfgen(e.family) + key))
        return self._send_all(msgs, "delete")

    def create(self, entries: Iterable[tuple[int, Tuple, Tuple]], timeout: int = 600) -> tuple[int, int]:
        """Insert entries (family, original tuple, reply tuple) that live `timeout` seconds;
        (created, already there)."""
        msgs = []
        for family, orig, reply in entries:
            payload = (_nfgen(family) + encode_tuple(CTA_TUPLE_ORIG, family, orig)
                       + encode_tuple(CTA_TUPLE_REPLY, family, reply)
                       + attr(CTA_TIMEOUT, struct.pack("!I", timeout)))
            msgs.append(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
                         NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, payload))
        return self._send_all(msgs, "create")

    def _send_all(self, msgs: list[tuple[int, int, bytes]], what: str) -> tuple[int, int]:
        """Send the requests BATCH to a send() and learn the outcome of each; (done, refused
        as expected: ENOENT for a delete, EEXIST for a create). Any other refusal raises,
        naming the first.

        The kernel handles the requests of one send() in order before send() returns, and
        answers a request with an error message when it fails, with an acknowledgement only
        when asked (NLM_F_ACK). So only the last request of a batch asks for one: reading up
        to it gives every failure of the batch, and a request with no error succeeded. (An
        acknowledgement for each would cost a recv() each: 10 000 deletes, 10 000 recv()s.)"""
        done = expected = 0
        problems: list[str] = []
        benign = errno.ENOENT if what == "delete" else errno.EEXIST
        for start in range(0, len(msgs), BATCH):
            chunk = msgs[start:start + BATCH]
            seq0 = self.seq
            self.seq += len(chunk)
            last = seq0 + len(chunk) - 1
            self.sock.send(b"".join(message(kind, (flags | NLM_F_ACK) if seq0 + i == last else (flags & ~NLM_F_ACK),
                                            seq0 + i, payload)
                                    for i, (kind, flags, payload) in enumerate(chunk)))
            failed = 0
            self.sock.settimeout(30)
            try:
                finished = False
                while not finished:
                    for kind, _, seq, body in messages(self.sock.recv(1 << 20)):
                        if kind != NLMSG_ERROR or not seq0 <= seq <= last:
                            continue
                        code = -error_code(body)
                        if code:
                            failed += 1
                            if code == benign:
                                expected += 1
                            else:
                                problems.append(f"{os.strerror(code)} ({errno.errorcode.get(code, code)})")
                        if seq == last:
                            finished = True
            except TimeoutError as e:
                raise ConntrackError(errno.ETIMEDOUT, f"conntrack {what}: no answer from the kernel") from e
            finally:
                self.sock.settimeout(None)
            done += len(chunk) - failed
        if problems:
            raise ConntrackError(errno.EIO, f"conntrack {what}: {len(problems)} of {len(msgs)} refused: {problems[0]}")
        return done, expected
