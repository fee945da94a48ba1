"""Netlink framing shared by podnet's two raw clients (nfnetlink.py for nf_tables,
rtnl.py for links, addresses and routes): attributes and message streams."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_F_NESTED = 0x8000
HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


def nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def strz(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return HEADER.pack(16 + len(payload), kind, flags, seq, 0) + payload


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence number, body) of each message in what one recv returned. For
    an NLMSG_ERROR the body starts with the error code and the failed request's header."""
    off = 0
    while off + 16 <= len(data):
        n, kind, flags, seq, _ = HEADER.unpack_from(data, off)
        if n < 16:
            return
        yield kind, flags, seq, data[off + 16:off + n]
        off += (n + 3) & ~3


def dump_replies(sock, seq: int) -> Iterator[bytes]:
    """The body of every message answering the dump request numbered `seq` on `sock`, until
    its end; a refused dump raises OSError with the kernel's errno."""
    while True:
        for kind, _, mseq, body in messages(sock.recv(1 << 20)):
            if mseq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                code = error_code(body)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
            yield body


def error_code(body: bytes) -> int:
    """The (negative) errno of an NLMSG_ERROR body; 0 is an acknowledgement."""
    return struct.unpack_from("=i", body)[0]


def attr_list(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4:
            return
        yield kind & 0x3FFF, data[off + 4:off + n]  # without the nested / byte-order flags
        off += (n + 3) & ~3


def attrs(data: bytes) -> dict[int, bytes]:
    return dict(attr_list(data))


def text(raw: bytes | None) -> str:
    """A NUL-terminated string attribute's value."""
    return (raw or b"").split(b"\0", 1)[0].decode()
