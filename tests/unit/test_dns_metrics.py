"""The node DNS server's metrics: answers counted by question type and rcode on the fast
path, the slow path and TCP, and cache hits, read by the collector at scrape time."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.message
import dns.query
import dns.rcode
from prometheus_client.parser import text_string_to_metric_families
from tests.support.dns import Unbound
from tests.support.dns import make_service as svc

from podnet.dns.index import ClusterIndex
from podnet.dns.server import DNSServer
from podnet.dns.server.metrics import DnsMetrics
from podnet.dns.server.query import question_type
from podnet.metrics import text


def scrape(server) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text([DnsMetrics(server)])):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def queries(m: dict, qtype: str, result: str) -> float:
    return m.get(("podnet_dns_queries_total", (("result", result), ("type", qtype))), 0)


def ask(server, name, rdtype="A", tcp=False, **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    fn = dns.query.tcp if tcp else dns.query.udp
    return fn(q, "127.0.0.1", port=server.addresses[0][1], timeout=5)


@pytest.fixture
def server():
    index = ClusterIndex()
    index.apply(svc("web", ports=[{"name": "http", "port": 80}]))
    s = DNSServer(index, [("127.0.0.1", 0)])
    s.start_thread()
    yield s
    s.stop_thread()


def test_question_type_of_a_message():
    q = dns.message.make_query("web.prod.svc.cluster.local", "SRV").to_wire()
    assert question_type(q) == 33
    assert question_type(q[:12]) == 0
    assert question_type(b"") == 0


def test_fast_and_slow_answers_are_counted_by_type_and_result(server):
    before = scrape(server)
    name = "web.prod.svc.cluster.local"
    for _ in range(3):  # the first renders the answer (slow path), the others splice it (fast path)
        assert ask(server, name).rcode() == dns.rcode.NOERROR
    assert ask(server, name, use_edns=0).rcode() == dns.rcode.NOERROR  # fast path with an OPT record
    assert ask(server, "nothere.prod.svc.cluster.local", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, "nothere.prod.svc.cluster.local", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, name, "A", tcp=True).rcode() == dns.rcode.NOERROR
    after = scrape(server)
    assert queries(after, "A", "NOERROR") - queries(before, "A", "NOERROR") == 5
    assert queries(after, "AAAA", "NXDOMAIN") - queries(before, "AAAA", "NXDOMAIN") == 2
    assert after[("podnet_dns_path_total", (("path", "fast"),))] >= 3
    assert after[("podnet_dns_requests_total", (("proto", "tcp"),))] == 1
    assert after[("podnet_dns_zone_answers", ())] >= 2


def test_types_above_255_and_unknown_rcodes_are_other(server):
    ask(server, "web.prod.svc.cluster.local", "CAA")
    ask(server, "web.prod.svc.cluster.local", "CAA")  # the fast path too
    m = scrape(server)
    assert queries(m, "other", "NOERROR") == 2


@pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound")
def test_cache_hits_and_misses():
    records = ["example.test. 3600 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60",
               "www.example.test. 300 IN A 192.0.2.10"]
    with Unbound(records=records, zones=["example.test."], host="127.0.0.9") as up:
        s = DNSServer(ClusterIndex(), [("127.0.0.1", 0)], upstreams=[up.address])
        s.start_thread()
        try:
            for _ in range(4):
                assert ask(s, "www.example.test").rcode() == dns.rcode.NOERROR
            m = scrape(s)
        finally:
            s.stop_thread()
    assert m[("podnet_dns_cache_misses_total", ())] == 1
    assert m[("podnet_dns_cache_hits_total", ())] == 3
    assert m[("podnet_dns_upstream_queries_total", ())] >= 1
    assert m[("podnet_dns_cache_entries", ())] == 1
    assert queries(m, "A", "NOERROR") == 4
