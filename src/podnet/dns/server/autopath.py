"""Server-side search (autopath, as CoreDNS).

For a query from a known local pod for ``<name>.<its ns>.svc.<zone>`` that does
not exist, the server walks the rest of the pod's search path itself and answers
with a CNAME from the asked name to the first name that exists, plus that name's
records. The composed answer is kept while everything it was made of (rendered
zone answers, upstream cache entries) is unchanged, and the fast path serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

from podnet.dns import wire
from podnet.dns.cache import CacheEntry, ResponseCache
from podnet.dns.index import ClusterIndex
from podnet.dns.server.entries import ZoneEntry
from podnet.dns.server.query import Query, fast_safe
from podnet.dns.server.slowpath import Result
from podnet.dns.upstream import UpstreamError
from podnet.dns.wire import CNAME, IN, NOERROR, NXDOMAIN


@dataclass(slots=True, eq=False)  # read on the fast path: see ZoneEntry
class Composed:
    """An autopath answer composed by a walk, and what it was made of."""

    answer: CacheEntry  # the CNAME from the asked name plus the found name's records, rendered
    asked: ZoneEntry  # the asked name's own (NXDOMAIN) entry when the walk ran
    zone_deps: tuple[tuple[bytes, ZoneEntry], ...]  # rendered zone answers the walk consulted
    ext_deps: tuple[tuple[bytes, CacheEntry], ...]  # upstream cache entries the walk consulted


class Autopath:
    """DNSServer's autopath (a mixin; the state is DNSServer's)."""

    index: ClusterIndex
    cache: ResponseCache
    stats: dict[str, int]
    prefetch: bool
    host_search: list[list[bytes]]
    _ap_cache: dict[bytes, Composed]

    def search_path(self, namespace: str) -> list[list[bytes]]:
        """The pod's search path after its first element, as label lists (last: the bare name)."""
        zone = list(self.index.zone_labels)
        return [[b"svc", *zone], zone, *self.host_search, []]

    def _autopath_ready(self, key: bytes, asked: ZoneEntry) -> CacheEntry | None:
        """For the fast path: the composed autopath answer for key, rendered and valid now."""
        ap = self._ap_cache.get(key)
        if ap is None or ap.asked is not asked:
            return None
        composed = ap.answer
        now = monotonic()
        if now >= composed.valid_until and not composed.retick(now):
            return None
        responses = self.index.responses
        for k, e in ap.zone_deps:
            if responses.get(k) is not e:
                return None
        entries = self.cache.entries
        for k, e in ap.ext_deps:
            if entries.get(k) is not e or now >= e.fresh_until:
                return None  # gone, or due for a prefetch: the slow path deals with it
        self.stats["autopath"] += 1
        return composed

    def _autopath_cached(self, q: Query, entry: ZoneEntry, limit: int) -> bytes | None:
        """A composed autopath answer from an earlier walk, if everything it was made of is unchanged.

        An entry lists the rendered zone answers and upstream cache entries its walk
        consulted; it is valid while each is still the very object in its cache (any
        index change drops zone answers, any refresh replaces cache entries) and
        fresh. A dependency about to expire is prefetched, as on a direct hit.
        """
        ap = self._ap_cache.get(q.key)
        if ap is None:
            return None
        composed = ap.answer
        now = monotonic()
        responses = self.index.responses
        if now >= composed.expires or responses.get(q.key) is not ap.asked:
            return None
        for k, e in ap.zone_deps:
            if responses.get(k) is not e:
                return None
        entries = self.cache.entries
        for k, e in ap.ext_deps:
            if entries.get(k) is not e or now >= e.expires:
                return None
            if self.prefetch and now >= e.fresh_until and not e.prefetching and e.ttl > 2:
                e.prefetching = True
                self.stats["prefetches"] += 1
                self._spawn(self._refresh(k, k[:-4], q.qtype, q.qclass))
        self.stats["autopath"] += 1
        return self._from_cache(q, composed, limit)

    async def _autopath(self, q: Query, entry: ZoneEntry, limit: int) -> bytes:
        ns = entry.extra
        labels = wire.wire_labels(q.qname)
        base = labels[:len(labels) - 2 - len(self.index.zone_labels)]
        tc = q.key[-4:]
        zone_deps: list[tuple[bytes, ZoneEntry]] = []
        ext_deps: list[tuple[bytes, CacheEntry]] = []
        cacheable = True
        for suffix in self.search_path(ns):
            if not base and not suffix:
                continue
            cand_labels = base + suffix
            if sum(len(x) + 1 for x in cand_labels) + 1 > wire.MAX_NAME:
                continue
            cand = wire.labels_to_wire(cand_labels)
            lower = cand.lower()
            key = lower + tc
            if self.index.is_ours(lower):
                zentry = self._zone_entry_for(lower, q.qtype, key)
                if zentry is None or self.index.responses.get(key) is not zentry:
                    cacheable = False
                else:
                    zone_deps.append((key, zentry))
                if zentry is not None and zentry.meta.rcode == NXDOMAIN:
                    continue
            try:
                res = await self.resolve(lower, q.qtype)
            except UpstreamError:
                cacheable = False
                continue
            if not self.index.is_ours(lower):
                e = self.cache.entries.get(key)
                if e is None or (res.rcode == NOERROR and len(res.answer) != len(e.sections[0])):
                    cacheable = False  # not cached upstream, or a CNAME chain followed further
                else:
                    ext_deps.append((key, e))
            if res.rcode != NOERROR:
                continue
            ttl = min((rr_ttl for _, _, _, rr_ttl, _ in res.answer), default=self.index.ttl)
            answer = [(None, CNAME, IN, ttl, cand), *res.answer]
            body, _ = wire.render(q.lname, answer, res.authority, res.additional)
            self.stats["autopath"] += 1
            if cacheable:
                self._remember_autopath(q, entry, answer, res, zone_deps, ext_deps)
            return self._assemble(q, NOERROR, (len(answer), len(res.authority), len(res.additional)), body, limit)
        self.stats["autopath_miss"] += 1
        return self._from_entry(q, entry, limit)

    def _remember_autopath(self, q: Query, asked: ZoneEntry, answer: list, res: Result,
                           zone_deps: list, ext_deps: list) -> None:
        if self.index.responses.get(q.key) is not asked:
            return
        now = monotonic()
        if ext_deps:
            life = min(e.expires for _, e in ext_deps) - now
        else:
            life = float(self.index.ttl)
        if life < 1:
            return
        # records with absolute owners, except the CNAME (owned by the question)
        composed = CacheEntry(NOERROR, (answer, list(res.authority), list(res.additional)), int(life), now, 0.0)
        composed.fast = fast_safe(q.key[-4:])  # the fast path serves it only after _autopath_ready
        composed.stat = wire.answer_stat(NOERROR, q.key[-4:])
        composed.render(q.lname, now)
        if len(self._ap_cache) >= self.cache.max_entries:
            self._ap_cache.clear()
        self._ap_cache[q.key] = Composed(composed, asked, tuple(zone_deps), tuple(ext_deps))

