"""The slow path: everything the fast path does not serve.

A query that is not in the rendered-response table, or not in the common shape,
is parsed (our parser, or dnspython for unusual messages), answered from the
index (the rendered entry is then cached for the fast path), from the upstream
cache, or forwarded upstream. ExternalName CNAMEs are chased here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass
from time import monotonic

from podnet.dns import wire
from podnet.dns.cache import CacheEntry, ResponseCache, entry_from_response
from podnet.dns.index import ClusterIndex
from podnet.dns.server.entries import AUTOPATH, FINAL, OPT_DO, OPT_PLAIN, ZoneEntry, entry_from_answer
from podnet.dns.server.query import NotFast, Query, Silent, error_reply, fast_safe, parse_query
from podnet.dns.upstream import UpstreamError, UpstreamPool
from podnet.dns.wire import (
    AA,
    ANY,
    AXFR,
    CD,
    CNAME,
    FORMERR,
    IN,
    IXFR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPT,
    QR,
    RA,
    RD,
    REFUSED,
    SERVFAIL,
    TC,
)

log = logging.getLogger("podnet.dns.server")

MAX_CHASE = 8


@dataclass
class Result:
    """Records for one name, owners absolute (used to compose chased and autopath answers)."""

    rcode: int
    answer: list
    authority: list
    additional: list
    aa: bool


def _dangling_cname(answer: list, lname: bytes, qtype: int) -> bytes | None:
    """The end of the CNAME chain from lname when it has no record of qtype, else None."""
    if qtype in (CNAME, ANY):
        return None
    cnames = {owner.lower(): rdata.lower() for owner, rtype, _, _, rdata in answer if rtype == CNAME}
    name = lname
    for _ in range(MAX_CHASE):
        if name not in cnames:
            break
        name = cnames[name]
    if name == lname or any(owner.lower() == name and rtype == qtype for owner, rtype, _, _, _ in answer):
        return None
    return name


class SlowPath:
    """DNSServer's answers that take more than a table lookup (a mixin; the state is DNSServer's)."""

    index: ClusterIndex
    cache: ResponseCache
    upstream: UpstreamPool
    stats: dict[str, int]
    autopath: bool
    local_pods: dict[str, str]
    prefetch: bool
    max_udp_size: int
    _inflight: dict[bytes, asyncio.Future]

    # ------------------------------------------------------------ one query

    def _handle(self, data: bytes, src: str, udp: bool):
        """bytes to send, None for silence, or a coroutine producing either."""
        try:
            q = parse_query(data)
        except Silent:
            self.stats["dropped"] += 1
            return None
        except NotFast:
            got = self._fallback(data)
            if got is None or isinstance(got, bytes):
                return got
            q = got
        limit = min(q.edns, self.max_udp_size) if q.edns else 512
        if not udp:
            limit = 65535
        return self._answer(q, src, limit)

    def _fallback(self, data: bytes) -> Query | bytes | None:
        """Messages our parser declines: dnspython decides between an answer and FORMERR."""
        self.stats["fallback"] += 1
        qid, flags = struct.unpack_from("!HH", data)
        if (flags >> 11) & 0xF != 0:
            return error_reply(data, NOTIMP)
        import dns.exception
        import dns.flags
        import dns.message

        try:
            msg = dns.message.from_wire(data)
        except dns.message.UnknownTSIGKey:
            return error_reply(data, 9)  # NOTAUTH
        except (dns.exception.DNSException, ValueError, IndexError, struct.error, UnicodeError):
            self.stats["formerr"] += 1
            return error_reply(data, FORMERR)
        if msg.edns > 0:
            if len(msg.question) != 1:
                return wire.header(qid, QR | (flags & RD), 0, 0, 0, 1) + wire.opt_rr(False, wire.BADVERS >> 4)
            rr = msg.question[0]
            question = rr.name.to_wire() + struct.pack("!HH", rr.rdtype, rr.rdclass)
            return wire.header(qid, QR | (flags & RD), 1, 0, 0, 1) + question + wire.opt_rr(False, wire.BADVERS >> 4)
        if len(msg.question) != 1 or msg.answer or msg.authority:
            self.stats["formerr"] += 1
            return error_reply(data, FORMERR)
        rrset = msg.question[0]
        try:
            qname = rrset.name.to_wire()
        except dns.exception.DNSException:
            return error_reply(data, FORMERR)
        edns = max(512, msg.payload) if msg.edns == 0 else None
        return Query(qid, flags, qname, int(rrset.rdtype), int(rrset.rdclass), edns,
                     bool(msg.ednsflags & dns.flags.DO))

    def _assemble(self, q: Query, flags: int, counts: tuple[int, int, int], body: bytes, limit: int) -> bytes:
        an, ns, ar = counts
        flags |= QR | RA | (q.flags & (RD | CD))
        opt = b""
        if q.edns is not None:
            ar += 1
            opt = OPT_DO if q.do else OPT_PLAIN
        msg = wire.header(q.qid, flags, 1, an, ns, ar) + q.question + body + opt
        if len(msg) > limit:
            self.stats["truncated"] += 1
            msg = wire.header(q.qid, flags | TC, 1, 0, 0, 1 if opt else 0) + q.question + opt
        return msg

    def _error(self, q: Query, rcode: int, limit: int) -> bytes:
        if rcode == SERVFAIL:
            self.stats["servfail"] += 1
        return self._assemble(q, rcode, (0, 0, 0), b"", limit)

    def _from_entry(self, q: Query, entry: ZoneEntry, limit: int) -> bytes:
        rcode, an, ns, ar = entry.meta
        return self._assemble(q, AA | rcode, (an, ns, ar), entry.body, limit)

    def _from_cache(self, q: Query, e: CacheEntry, limit: int) -> bytes:
        body = e.render(q.lname, monotonic())
        return self._assemble(q, e.rcode, e.counts, body, limit)

    def _zone_entry(self, q: Query) -> ZoneEntry | None:
        return self._zone_entry_for(q.lname, q.qtype, q.key)

    def _zone_entry_for(self, lower: bytes, qtype: int, key: bytes) -> ZoneEntry | None:
        """The rendered zone answer for a lower-case name, rendered and cached on a miss;
        None when the index does not hold the name."""
        entry = self.index.responses.get(key)
        if entry is not None:
            return entry
        gen = self.index.generation
        res = self.index.resolve(lower, qtype)
        if res is None:
            return None
        ans, group = res
        entry = entry_from_answer(ans, lower, key[-4:])
        self.index.cache_response(key, group, entry, gen)
        return entry

    def _answer(self, q: Query, src: str, limit: int):
        if q.qclass != IN:
            return self._error(q, REFUSED, limit)
        if q.qtype in (AXFR, IXFR):
            return self._error(q, REFUSED if q.qtype == AXFR else NOTIMP, limit)
        if q.qtype == OPT:
            return self._error(q, FORMERR, limit)
        entry = self._zone_entry(q)
        if entry is not None:
            kind = entry.kind & 7
            if kind == FINAL:
                return self._from_entry(q, entry, limit)
            if kind == AUTOPATH:
                if self.autopath and self.local_pods.get(src) == entry.extra:
                    return self._autopath_cached(q, entry, limit) or self._autopath(q, entry, limit)
                return self._from_entry(q, entry, limit)
            return self._chase(q, entry, limit)
        now = monotonic()
        e = self.cache.get(q.key, now)
        if e is not None:
            self.stats["cache_hits"] += 1
            if e.second != int(now - e.stored):
                e.hits += 1
                self.cache.touch(q.key)
            if self.prefetch and self.cache.wants_prefetch(e, now):
                e.prefetching = True
                self.stats["prefetches"] += 1
                self._spawn(self._refresh(q.key, q.lname, q.qtype, q.qclass))
            return self._from_cache(q, e, limit)
        return self._forward(q, limit)

    # ------------------------------------------------------------ upstream

    async def _fetch(self, key: bytes, lname: bytes, qtype: int, qclass: int) -> CacheEntry:
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self.stats["forwarded"] += 1
            resp = await self.upstream.query(lname, qtype, qclass)
            entry, cacheable = entry_from_response(resp, lname, monotonic(), self.cache.max_ttl,
                                                   self.cache.max_negative_ttl)
            entry.fast = fast_safe(key[-4:])
            if cacheable:
                self.cache.put(key, entry)
            fut.set_result(entry)
            return entry
        except BaseException as e:
            err = e if isinstance(e, UpstreamError) else UpstreamError(repr(e))
            if isinstance(e, wire.WireError | struct.error | IndexError):
                err = UpstreamError(f"malformed upstream answer: {e}")
            fut.set_exception(err)
            fut.exception()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise err from None
        finally:
            self._inflight.pop(key, None)

    async def _refresh(self, key: bytes, lname: bytes, qtype: int, qclass: int) -> None:
        with contextlib.suppress(UpstreamError):
            await self._fetch(key, lname, qtype, qclass)

    async def _forward(self, q: Query, limit: int) -> bytes:
        try:
            e = await self._fetch(q.key, q.lname, q.qtype, q.qclass)
        except UpstreamError as err:
            log.debug("forwarding %s failed: %s", wire.wire_to_text(q.qname), err)
            return self._error(q, SERVFAIL, limit)
        return self._from_cache(q, e, limit)

    async def resolve(self, lname: bytes, qtype: int, depth: int = 0) -> Result:
        """Records for a lower-case wire name: from the index, the cache or upstream.
        Raises UpstreamError when upstream is needed and fails."""
        res = self.index.resolve(lname, qtype)
        if res is not None:
            ans, _ = res
            fix = [(lname if o is None else o, t, c, ttl, rd) for o, t, c, ttl, rd in ans.answer]
            result = Result(ans.rcode, fix, list(ans.authority), list(ans.additional), True)
            if ans.chase is not None and depth < MAX_CHASE:
                try:
                    more = await self.resolve(ans.chase, qtype, depth + 1)
                except UpstreamError:
                    return result
                result.answer += more.answer
                result.authority = more.authority
                result.additional = more.additional
                result.rcode = more.rcode
                result.aa = result.aa and more.aa
            return result
        key = lname + struct.pack("!HH", qtype, IN)
        now = monotonic()
        e = self.cache.get(key, now)
        if e is None:
            e = await self._fetch(key, lname, qtype, IN)
            now = monotonic()
        an, ns, ar = e.records(lname, now)
        if e.rcode not in (NOERROR, NXDOMAIN):
            raise UpstreamError(f"upstream answered rcode {e.rcode}")
        result = Result(e.rcode, an, ns, ar, False)
        # an upstream that stops at a CNAME (local data, some forwarders): follow the chain
        target = _dangling_cname(an, lname, qtype)
        if target is not None and depth < MAX_CHASE:
            try:
                more = await self.resolve(target, qtype, depth + 1)
            except UpstreamError:
                return result
            result.answer += more.answer
            result.authority, result.additional, result.rcode = more.authority, more.additional, more.rcode
        return result

    async def _chase(self, q: Query, entry: ZoneEntry, limit: int) -> bytes:
        """ExternalName: the CNAME plus the target's records."""
        result = await self.resolve(q.lname, q.qtype)
        body, _ = wire.render(q.lname, result.answer, result.authority, result.additional)
        flags = (AA if result.aa else 0) | result.rcode
        return self._assemble(q, flags, (len(result.answer), len(result.authority), len(result.additional)),
                              body, limit)

