"""DNS wire format: names, records and a compressing renderer.

Everything here works on raw bytes. A record is a plain tuple
``(owner, rtype, rclass, ttl, rdata)`` where ``owner`` is a wire-format name or
``None`` for "the question's name", and ``rdata`` is uncompressed wire rdata.

Rendered sections assume the question sits at offset 12 (one question), so a
rendered body can be reused for any query whose question name has the same
label structure: only the ID and the question bytes (with the client's case)
are patched per query, and compression pointers into the question keep working.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence

# Record types and classes we name.
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, AXFR, IXFR, ANY = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 252, 251, 255
IN = 1
TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", MX: "MX", TXT: "TXT", AAAA: "AAAA",
              SRV: "SRV", OPT: "OPT", ANY: "ANY", AXFR: "AXFR", IXFR: "IXFR"}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended rcode (needs EDNS)
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

# Header flag bits (the 16-bit flags word).
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010

EDNS_SIZE = 1232  # what we advertise (the DNS flag day 2020 value)
MAX_NAME = 255
MAX_LABEL = 63

RR = tuple  # (owner: bytes | None, rtype, rclass, ttl, rdata)


class WireError(ValueError):
    """Malformed wire data."""


# ---------------------------------------------------------------- names


def answer_stat(rcode: int, typeclass: bytes) -> int:
    """Where an answer is counted for the metrics (dns/server/metrics.py): rcode << 8 | the
    question's type, from the question's type and class bytes (types above 255 at 0)."""
    return (rcode & 15) << 8 | (0 if typeclass[0] else typeclass[1])


def name_to_wire(text: str) -> bytes:
    """'a.b.c' or 'a.b.c.' -> b'\\x01a\\x01b\\x01c\\x00'. '' and '.' are the root."""
    text = text.rstrip(".") if text not in ("", ".") else ""
    if not text:
        return b"\x00"
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) <= MAX_LABEL:
            raise WireError(f"bad label {label!r} in {text!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise WireError(f"name {text!r} is longer than 255 octets")
    return bytes(out)


def labels_to_wire(labels: Iterable[bytes]) -> bytes:
    out = bytearray()
    for lab in labels:
        out.append(len(lab))
        out += lab
    out.append(0)
    return bytes(out)


def wire_labels(wire: bytes) -> list[bytes]:
    """Labels of an uncompressed wire name (no root label)."""
    out = []
    i = 0
    while True:
        n = wire[i]
        if n == 0:
            return out
        out.append(wire[i + 1:i + 1 + n])
        i += 1 + n


def wire_to_text(wire: bytes) -> str:
    labels = wire_labels(wire)
    if not labels:
        return "."
    return ".".join(_label_text(lab) for lab in labels) + "."


def _label_text(lab: bytes) -> str:
    out = []
    for b in lab:
        c = chr(b)
        if c in ".\\\"()@;$ ":
            out.append("\\" + c)
        elif 0x21 <= b <= 0x7E:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def read_name(msg: bytes, off: int) -> tuple[bytes, int]:
    """Read a possibly compressed name at off: (uncompressed wire, offset after it)."""
    out = bytearray()
    end = -1
    hops = 0
    n = len(msg)
    while True:
        if off >= n:
            raise WireError("name runs past the end")
        c = msg[off]
        if c & 0xC0 == 0xC0:
            if off + 1 >= n:
                raise WireError("truncated pointer")
            if end < 0:
                end = off + 2
            off = ((c & 0x3F) << 8) | msg[off + 1]
            hops += 1
            if hops > 64:
                raise WireError("compression loop")
            continue
        if c & 0xC0:
            raise WireError("unknown label type")
        if c == 0:
            out.append(0)
            if len(out) > MAX_NAME:
                raise WireError("name too long")
            return bytes(out), (end if end >= 0 else off + 1)
        if off + 1 + c > n:
            raise WireError("label runs past the end")
        out += msg[off:off + 1 + c]
        if len(out) > MAX_NAME:
            raise WireError("name too long")
        off += 1 + c


def skip_name(msg: bytes, off: int) -> int:
    n = len(msg)
    while True:
        if off >= n:
            raise WireError("name runs past the end")
        c = msg[off]
        if c & 0xC0 == 0xC0:
            return off + 2
        if c & 0xC0:
            raise WireError("unknown label type")
        if c == 0:
            return off + 1
        off += 1 + c


# ---------------------------------------------------------------- rdata helpers


def rdata_a(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def rdata_srv(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return struct.pack("!HHH", priority, weight, port) + target


def rdata_txt(*strings: str) -> bytes:
    out = bytearray()
    for s in strings:
        raw = s.encode()
        out.append(len(raw))
        out += raw
    return bytes(out)


def rdata_soa(mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int,
              minimum: int) -> bytes:
    return mname + rname + struct.pack("!IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)


def reverse_name(packed: bytes) -> bytes:
    """The in-addr.arpa / ip6.arpa wire name of a packed address."""
    if len(packed) == 4:
        labels = [str(b).encode() for b in reversed(packed)] + [b"in-addr", b"arpa"]
    else:
        nibbles = packed.hex()
        labels = [c.encode() for c in reversed(nibbles)] + [b"ip6", b"arpa"]
    return labels_to_wire(labels)


def reverse_to_packed(labels: Sequence[bytes]) -> bytes | None:
    """Lower-case labels of a reverse name -> packed address, or None if not a full address."""
    if len(labels) == 6 and labels[4] == b"in-addr" and labels[5] == b"arpa":
        out = bytearray()
        for lab in reversed(labels[:4]):
            if not lab.isdigit() or len(lab) > 3 or (len(lab) > 1 and lab[0] == 0x30):
                return None
            v = int(lab)
            if v > 255:
                return None
            out.append(v)
        return bytes(out)
    if len(labels) == 34 and labels[32] == b"ip6" and labels[33] == b"arpa":
        hexs = b"".join(reversed(labels[:32]))
        if len(hexs) != 32:
            return None
        try:
            return bytes.fromhex(hexs.decode("ascii"))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------- rendering


_COMPRESSIBLE_RDATA = (CNAME, PTR, NS)


class Renderer:
    """Builds the sections after the question, with name compression.

    ``qname`` is the (lower-case) question name; the question occupies
    12 .. 12 + len(qname) + 4. Offsets of every suffix written are remembered so
    later names point at them.
    """

    def __init__(self, qname: bytes):
        self.base = 12 + len(qname) + 4
        self.buf = bytearray()
        self.table: dict[bytes, int] = {}
        self.ttl_offsets: list[int] = []  # relative to the start of the body
        self._remember(qname.lower(), 12)

    def _remember(self, lower: bytes, at: int, upto: int = 256) -> None:
        """Record the suffixes of ``lower`` (written at ``at``) that start before ``upto``."""
        i = 0
        while i < upto and lower[i] != 0 and at + i < 0x4000:
            suffix = lower[i:]
            if suffix not in self.table:
                self.table[suffix] = at + i
            i += 1 + lower[i]

    def name(self, wire: bytes, compress: bool = True) -> None:
        lower = wire.lower()
        start = len(self.buf)
        if compress:
            i = 0
            while lower[i] != 0:
                ptr = self.table.get(lower[i:])
                if ptr is not None:
                    self.buf += wire[:i]
                    self.buf += struct.pack("!H", 0xC000 | ptr)
                    if i:
                        self._remember(lower, self.base + start, upto=i)
                    return
                i += 1 + lower[i]
        self.buf += wire
        self._remember(lower, self.base + start)

    def rr(self, rr: RR) -> None:
        owner, rtype, rclass, ttl, rdata = rr
        if owner is None:
            self.buf += b"\xc0\x0c"
        else:
            self.name(owner)
        self.buf += struct.pack("!HH", rtype, rclass)
        self.ttl_offsets.append(len(self.buf))
        self.buf += struct.pack("!I", ttl & 0xFFFFFFFF)
        if rtype in _COMPRESSIBLE_RDATA or rtype == SOA or rtype == MX:
            len_at = len(self.buf)
            self.buf += b"\x00\x00"
            if rtype == SOA:
                mname, p = read_name(rdata, 0)
                rname, p = read_name(rdata, p)
                self.name(mname)
                self.name(rname)
                self.buf += rdata[p:]
            elif rtype == MX:
                self.buf += rdata[:2]
                self.name(rdata[2:])
            else:
                self.name(rdata)
            struct.pack_into("!H", self.buf, len_at, len(self.buf) - len_at - 2)
            return
        self.buf += struct.pack("!H", len(rdata))
        if rtype == SRV and len(rdata) > 7:
            # the target may not be compressed (RFC 2782), but later owners may point at it
            self.buf += rdata[:6]
            self._remember(rdata[6:].lower(), self.base + len(self.buf))
            self.buf += rdata[6:]
        else:
            self.buf += rdata

    def sections(self, *sections: Sequence[RR]) -> bytes:
        for sec in sections:
            for rr in sec:
                self.rr(rr)
        return bytes(self.buf)


def render(qname: bytes, answer: Sequence[RR], authority: Sequence[RR] = (),
           additional: Sequence[RR] = ()) -> tuple[bytes, list[int]]:
    r = Renderer(qname)
    body = r.sections(answer, authority, additional)
    return body, r.ttl_offsets


def header(qid: int, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def opt_rr(do: bool = False, rcode_ext: int = 0, size: int = EDNS_SIZE) -> bytes:
    return b"\x00\x00\x29" + struct.pack("!HBBHH", size, rcode_ext, 0, 0x8000 if do else 0, 0)


# ---------------------------------------------------------------- parsing (generic, not the hot path)


def parse_records(msg: bytes, off: int, count: int) -> tuple[list[tuple[bytes, int, int, int, bytes, int]], int]:
    """Parse ``count`` records from off: (owner, type, class, ttl, rdata_uncompressed, ttl_offset)."""
    out = []
    n = len(msg)
    for _ in range(count):
        owner, off = read_name(msg, off)
        if off + 10 > n:
            raise WireError("record header runs past the end")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        ttl_at = off + 4
        off += 10
        if off + rdlen > n:
            raise WireError("rdata runs past the end")
        rdata = decompress_rdata(msg, off, rdlen, rtype)
        out.append((owner, rtype, rclass, ttl, rdata, ttl_at))
        off += rdlen
    return out, off


def decompress_rdata(msg: bytes, off: int, rdlen: int, rtype: int) -> bytes:
    end = off + rdlen
    if rtype in (CNAME, PTR, NS, 3, 4, 7, 8, 9, 39):  # a single name (incl. MD MF MB MG MR DNAME)
        name, after = read_name(msg, off)
        if after != end:
            raise WireError("trailing rdata")
        return name
    if rtype == MX or rtype == 18 or rtype == 21:  # 16-bit + name (MX, AFSDB, RT)
        name, after = read_name(msg, off + 2)
        if after != end:
            raise WireError("trailing rdata")
        return msg[off:off + 2] + name
    if rtype == SOA:
        mname, p = read_name(msg, off)
        rname, p = read_name(msg, p)
        if p + 20 != end:
            raise WireError("bad SOA rdata")
        return mname + rname + msg[p:end]
    if rtype == SRV:
        # RFC 2782 forbids compression here, but decompress defensively
        if rdlen < 7:
            raise WireError("short SRV rdata")
        name, after = read_name(msg, off + 6)
        if after != end:
            raise WireError("trailing rdata")
        return msg[off:off + 6] + name
    return msg[off:end]


def rdata_text(rtype: int, rdata: bytes) -> str:
    if rtype == A or rtype == AAAA:
        return str(ipaddress.ip_address(rdata))
    if rtype in (CNAME, PTR, NS):
        return wire_to_text(rdata)
    if rtype == SRV:
        prio, weight, port = struct.unpack_from("!HHH", rdata)
        return f"{prio} {weight} {port} {wire_to_text(rdata[6:])}"
    if rtype == TXT:
        parts, i = [], 0
        while i < len(rdata):
            n = rdata[i]
            parts.append('"' + rdata[i + 1:i + 1 + n].decode(errors="replace") + '"')
            i += 1 + n
        return " ".join(parts)
    if rtype == SOA:
        mname, p = read_name(rdata, 0)
        rname, p = read_name(rdata, p)
        nums = struct.unpack_from("!IIIII", rdata, p)
        return f"{wire_to_text(mname)} {wire_to_text(rname)} " + " ".join(map(str, nums))
    return "\\# " + str(len(rdata)) + " " + rdata.hex()
