"""Queries as the server reads them: the common case parsed with a few byte
comparisons, everything else declined (``NotFast``) or dropped (``Silent``)."""

from __future__ import annotations

import struct

from podnet.dns import wire
from podnet.dns.wire import OPT, QR, RD


class Silent(Exception):
    """Drop the packet without an answer."""


class NotFast(Exception):
    """Our own parser declines: let dnspython look at it."""


class Query:
    __slots__ = ("qid", "flags", "qname", "lname", "qtype", "qclass", "question", "edns", "do", "key")

    def __init__(self, qid: int, flags: int, qname: bytes, qtype: int, qclass: int, edns: int | None, do: bool):
        self.qid = qid
        self.flags = flags
        self.qname = qname
        self.lname = qname.lower()
        self.qtype = qtype
        self.qclass = qclass
        tc = struct.pack("!HH", qtype, qclass)
        self.question = qname + tc
        self.key = self.lname + tc
        self.edns = edns  # the client's UDP payload size (>= 512), None without EDNS
        self.do = do


def parse_query(data: bytes) -> Query:
    """Parse the common case (one question, optional OPT); raise NotFast or Silent otherwise."""
    n = len(data)
    if n < 12:
        raise Silent
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    if flags & QR:
        raise Silent  # a response: never answer one
    if flags & 0x7800 or qd != 1 or an or ns or ar > 1:
        raise NotFast
    off = 12
    while True:
        if off >= n:
            raise NotFast
        c = data[off]
        if c == 0:
            break
        if c > 63:
            raise NotFast
        off += c + 1
    if off - 12 >= wire.MAX_NAME:
        raise NotFast
    qend = off + 5
    if qend > n:
        raise NotFast
    qtype, qclass = struct.unpack_from("!HH", data, off + 1)
    edns, do = None, False
    if ar:
        if qend + 11 > n or data[qend] != 0:
            raise NotFast
        rtype, size, _ext, version, eflags, rdlen = struct.unpack_from("!HHBBHH", data, qend + 1)
        if rtype != OPT or version != 0 or qend + 11 + rdlen != n:
            raise NotFast
        edns, do = max(512, size), bool(eflags & 0x8000)
    elif qend != n:
        raise NotFast
    return Query(qid, flags, data[12:off + 1], qtype, qclass, edns, do)


def error_reply(data: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) carrying rcode, for a message we will not parse further."""
    qid, flags = struct.unpack_from("!HH", data)
    return wire.header(qid, QR | (flags & 0x7800) | (flags & RD) | rcode, 0, 0, 0, 0)


def fast_safe(typeclass: bytes) -> bool:
    """Whether the fast path may find an entry for these type/class bytes.

    The fast path lower-cases the whole question, type and class included. An
    entry is only visible to it when those four bytes hold no ASCII letter, so
    lower-casing cannot turn one record type into another (65 'A' -> 97 'a').
    """
    return typeclass.lower() == typeclass.upper()



def question_type(msg: bytes) -> int:
    """The question type of a DNS message with one question; 0 when it has none or its
    question cannot be read (for counting answers, not for answering)."""
    n = len(msg)
    if n < 17 or msg[4:6] != b"\x00\x01":
        return 0
    i = 12
    while i < n:
        length = msg[i]
        if length == 0:
            return (msg[i + 1] << 8) | msg[i + 2] if i + 2 < n else 0
        if length & 0xC0:  # a compression pointer: not in a question we answer
            return 0
        i += length + 1
    return 0
