"""The node DNS server's metrics, read from its plain counters when scraped.

The UDP fast path answers a query in a few microseconds; a prometheus_client
Counter.inc() with labels per packet would cost more than the answer's own
bookkeeping. So the server only adds 1 to an integer in a list (fast path) or a
dict (slow path), and this collector turns them into metric families at scrape time:

    podnet_dns_queries_total{type,result}    answers by question type (A, AAAA, SRV, PTR, ...,
                                             other) and rcode (NOERROR, NXDOMAIN, SERVFAIL, ...)
    podnet_dns_requests_total{proto}         queries received over udp and tcp
    podnet_dns_path_total{path}              UDP queries answered by the fast path, or taken by the slow one
    podnet_dns_cache_hits_total              answers from the cache of upstream answers
    podnet_dns_cache_misses_total            names forwarded upstream (not in the cache)
    podnet_dns_cache_entries                 upstream answers cached now
    podnet_dns_upstream_queries_total        queries sent to upstream resolvers (prefetches included)
    podnet_dns_autopath_total{result}        server-side search for local pods: hit | miss
    podnet_dns_prefetches_total              cached answers refreshed before they expired
    podnet_dns_dropped_total                 messages not answered (not a query, too short)
    podnet_dns_truncated_total               UDP answers cut to fit (TC set)
    podnet_dns_errors_total                  queries whose handling failed (answered SERVFAIL)
    podnet_dns_zone_answers                  rendered answers of the cluster zone held now
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
         35: "NAPTR", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 9: "NOTAUTH"}


def type_name(qtype: int) -> str:
    return TYPES.get(qtype, "other")


def rcode_name(rcode: int) -> str:
    return RCODES.get(rcode, "other")


class DnsMetrics:
    """A prometheus_client collector over one DNSServer's counters."""

    def __init__(self, server) -> None:
        self.server = server

    def describe(self) -> list:
        return []

    def answers(self) -> tuple[dict[tuple[str, str], int], int]:
        """(type name, rcode name) -> answers, and the fast path's answers from the cache."""
        s = self.server
        out: dict[tuple[str, str], int] = {}
        cache_hits = 0
        for counts, cached in ((s.fast_zone, False), (s.fast_cached, True)):
            for i, n in enumerate(list(counts)):
                if n:
                    key = (type_name(i & 255), rcode_name(i >> 8))
                    out[key] = out.get(key, 0) + n
                    if cached:
                        cache_hits += n
        for (qtype, rcode), n in list(s.slow_answers.items()):
            key = (type_name(qtype), rcode_name(rcode))
            out[key] = out.get(key, 0) + n
        return out, cache_hits

    def collect(self) -> Iterator[Metric]:
        s = self.server
        st = dict(s.stats)
        answers, fast_cache_hits = self.answers()
        queries = CounterMetricFamily("podnet_dns_queries", "DNS answers by question type and rcode.",
                                      labels=["type", "result"])
        for (t, r), n in sorted(answers.items()):
            queries.add_metric([t, r], n)
        yield queries
        requests = CounterMetricFamily("podnet_dns_requests", "DNS queries received, by transport.",
                                       labels=["proto"])
        requests.add_metric(["udp"], st["udp"])
        requests.add_metric(["tcp"], st["tcp"])
        yield requests
        path = CounterMetricFamily("podnet_dns_path", "UDP queries answered by the fast path, or taken by the "
                                   "slow path.", labels=["path"])
        path.add_metric(["fast"], st["fast"])
        path.add_metric(["slow"], st["slow"])
        yield path
        yield CounterMetricFamily("podnet_dns_cache_hits", "Answers served from the cache of upstream answers.",
                                  value=st["cache_hits"] + fast_cache_hits)
        yield CounterMetricFamily("podnet_dns_cache_misses", "Names outside the cluster forwarded upstream "
                                  "(not in the cache).", value=st["forwarded"])
        yield GaugeMetricFamily("podnet_dns_cache_entries", "Upstream answers in the cache.",
                                value=len(s.cache.entries))
        yield CounterMetricFamily("podnet_dns_upstream_queries", "Queries sent to upstream resolvers.",
                                  value=s.upstream.queries)
        autopath = CounterMetricFamily("podnet_dns_autopath", "Server-side search for local pods' queries.",
                                       labels=["result"])
        autopath.add_metric(["hit"], st["autopath"])
        autopath.add_metric(["miss"], st["autopath_miss"])
        yield autopath
        yield CounterMetricFamily("podnet_dns_prefetches", "Cached answers refreshed before they expired.",
                                  value=st["prefetches"])
        yield CounterMetricFamily("podnet_dns_dropped", "Messages not answered.", value=st["dropped"])
        yield CounterMetricFamily("podnet_dns_truncated", "UDP answers truncated to fit.", value=st["truncated"])
        yield CounterMetricFamily("podnet_dns_errors", "Queries whose handling failed.", value=st["errors"])
        yield GaugeMetricFamily("podnet_dns_zone_answers", "Rendered answers of the cluster zone held.",
                                value=len(s.index.responses))
