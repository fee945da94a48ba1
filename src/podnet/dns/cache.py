"""Cache of upstream answers: upstream TTLs, bounded size, ready-to-send bytes.

An entry keeps the answer rendered for "question at offset 12" plus the offsets
of every TTL field, so serving it means patching the TTLs (once a second, then
reused) and the message ID. Positive answers live for the smallest TTL of the
answer section, negative ones (NXDOMAIN, NODATA) for min(SOA TTL, SOA minimum)
(RFC 2308), both capped. The size is bounded; eviction drops the least recently
used entry (recency is refreshed when an entry is re-rendered, at most once a
second). Entries used in at least ``prefetch_hits`` distinct seconds are
refreshed in the background shortly before they expire.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from time import monotonic

from podnet.dns import wire
from podnet.dns.wire import CD, NOERROR, NXDOMAIN, OPT, QR, RA, RD, SOA, TC


class CacheEntry:
    __slots__ = ("rcode", "sections", "template", "ttl_offsets", "ttls", "stored", "expires", "ttl",
                 "hits", "second", "body", "hdrs", "valid_until", "fresh_until", "prefetching", "counts", "fast",
                 "lru", "key", "stat")

    def __init__(self, rcode: int, sections: tuple[list, list, list], ttl: int, now: float, prefetch_window: float):
        self.rcode = rcode
        self.sections = sections
        self.ttl = ttl
        self.stored = now
        self.expires = now + ttl
        self.fresh_until = self.expires - prefetch_window
        self.hits = 0
        self.prefetching = False
        self.second = -1
        self.body = b""
        self.valid_until = 0.0
        an, ns, ar = sections
        self.counts = (len(an), len(ns), len(ar))
        self.ttls = [rr[3] for sec in sections for rr in sec]
        self.template, self.ttl_offsets = None, None
        self.hdrs = None
        self.fast = True  # whether the fast path may serve it (see server.fast_safe)
        self.lru: OrderedDict | None = None  # the cache holding it, to refresh its recency
        self.key = b""
        self.stat = 0  # where the fast path counts an answer from it (wire.answer_stat), set with its key

    def render(self, qname: bytes, now: float) -> bytes:
        """The sections with TTLs as of ``now``; the result is reused within the same second."""
        sec = int(now - self.stored)
        if sec != self.second:
            if self.template is None:
                body, offs = wire.render(qname, *self.sections)
                self.template, self.ttl_offsets = body, offs
                an, ns, ar = self.counts
                base = QR | RA | self.rcode
                self.hdrs = tuple(struct.pack("!HHHHH", base | (RD if i & 1 else 0) | (CD if i & 2 else 0),
                                              1, an, ns, ar + (1 if i & 4 else 0)) for i in range(8))
            buf = bytearray(self.template)
            for off, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                struct.pack_into("!I", buf, off, max(ttl - sec, 0))
            self.body = bytes(buf)
            self.second = sec
            self.valid_until = min(self.stored + sec + 1, self.fresh_until) if self.fast else 0.0
        return self.body

    def retick(self, now: float) -> bool:
        """Re-patch the TTLs for the current second (the fast path's once-a-second refresh).

        Only for an already rendered entry that is still fresh; counts the use for
        prefetch. Returns whether the entry may be served by the fast path now."""
        if self.template is None or not self.fast or now >= self.fresh_until:
            return False
        sec = int(now - self.stored)
        if sec != self.second:
            buf = bytearray(self.template)
            for off, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                struct.pack_into("!I", buf, off, max(ttl - sec, 0))
            self.body = bytes(buf)
            self.second = sec
            self.hits += 1
            self.valid_until = min(self.stored + sec + 1, self.fresh_until)
            if self.lru is not None and self.key in self.lru:
                self.lru.move_to_end(self.key)
        return now < self.valid_until

    def records(self, owner: bytes, now: float) -> tuple[list, list, list]:
        """The sections with absolute owners and TTLs as of now (to compose other answers)."""
        sec = int(now - self.stored)
        out = []
        for section in self.sections:
            out.append([(owner if o is None else o, t, c, max(ttl - sec, 0), rd) for o, t, c, ttl, rd in section])
        return out[0], out[1], out[2]


def entry_from_response(resp: bytes, qname: bytes, now: float, max_ttl: int, max_negative_ttl: int,
                        prefetch_fraction: float = 0.1) -> tuple[CacheEntry, bool]:
    """Parse an upstream response into an entry; returns (entry, cacheable)."""
    flags = struct.unpack_from("!H", resp, 2)[0]
    rcode = flags & 0xF
    qd, an, ns, ar = struct.unpack_from("!HHHH", resp, 4)
    off = 12
    for _ in range(qd):
        off = wire.skip_name(resp, off) + 4
    lower = qname.lower()
    sections = []
    for count in (an, ns, ar):
        recs, off = wire.parse_records(resp, off, count)
        sec = []
        for owner, rtype, rclass, ttl, rdata, _ in recs:
            if rtype == OPT or rtype == 250:  # EDNS, TSIG: per message, never cached
                continue
            if ttl & 0x80000000:
                ttl = 0
            sec.append((None if owner.lower() == lower else owner, rtype, rclass, ttl, rdata))
        sections.append(sec)
    answer, authority, additional = sections
    cacheable = False
    ttl = 0
    if rcode == NOERROR and answer:
        ttl = min(min(rr[3] for rr in answer), max_ttl)
        cacheable = True
    elif rcode in (NOERROR, NXDOMAIN):
        soa = next((rr for rr in authority if rr[1] == SOA), None)
        if soa is not None:
            minimum = struct.unpack_from("!I", soa[4], len(soa[4]) - 4)[0]
            ttl = min(soa[3], minimum, max_negative_ttl)
            cacheable = True
    if flags & TC:
        cacheable = False
    window = max(1.0, ttl * prefetch_fraction) if ttl > 2 else 0.0
    entry = CacheEntry(rcode, (answer, authority, additional), ttl, now, window)
    return entry, cacheable and ttl > 0


class ResponseCache:
    def __init__(self, max_entries: int = 10_000, max_ttl: int = 3600, max_negative_ttl: int = 1800,
                 prefetch_hits: int = 2):
        self.entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.prefetch_hits = prefetch_hits
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes, now: float | None = None) -> CacheEntry | None:
        e = self.entries.get(key)
        if e is None:
            return None
        if (now if now is not None else monotonic()) >= e.expires:
            self.entries.pop(key, None)
            return None
        return e

    def touch(self, key: bytes) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def put(self, key: bytes, entry: CacheEntry) -> None:
        entry.lru, entry.key = self.entries, key
        entry.stat = wire.answer_stat(entry.rcode, key[-4:])
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
            self.evictions += 1

    def wants_prefetch(self, entry: CacheEntry, now: float) -> bool:
        return (not entry.prefetching and entry.hits >= self.prefetch_hits
                and now >= entry.fresh_until and entry.ttl > 2)

    def clear(self) -> None:
        self.entries.clear()
