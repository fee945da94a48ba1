"""The DNS server on loopback, with real clients (dnspython, dig, raw sockets) and
real upstream resolvers (unbound, dnsmasq) on 127.0.0.x."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from tests.support.dns import Dnsmasq, Unbound, free_port
from tests.support.dns import make_endpoint as ep
from tests.support.dns import make_service as svc
from tests.support.dns import make_slice as eps

from podnet.dns.index import ClusterIndex
from podnet.dns.server import DNSServer

needs_unbound = pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound")
needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig")

UPSTREAM_RECORDS = [
    "example.test. 3600 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60",
    "www.example.test. 300 IN A 192.0.2.10",
    "short.example.test. 4 IN A 192.0.2.11",
    "alias.example.test. 300 IN CNAME www.example.test.",
    "corp.test. 3600 IN SOA ns.corp.test. admin.corp.test. 1 3600 600 86400 30",
    "api.corp.test. 300 IN A 192.0.2.20",
]
POD = "127.0.0.42"  # a local pod of namespace "team" (queries are sent from this source)


def cluster_index() -> ClusterIndex:
    i = ClusterIndex()
    i.apply(svc("web", ports=[{"name": "http", "port": 80}]))
    i.apply(svc("db", cluster_ip="None", ports=[{"name": "pg", "port": 5432}]))
    i.apply(eps("db-a", "db", [ep("10.244.0.5", "db-0"), ep("10.244.0.6")],
                ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}]))
    i.apply(svc("big", cluster_ip="None"))
    i.apply(eps("big-a", "big", [ep(f"10.245.0.{n}") for n in range(1, 101)]))
    i.apply(svc("mid", cluster_ip="None"))
    i.apply(eps("mid-a", "mid", [ep(f"10.246.0.{n}") for n in range(1, 61)]))
    i.apply(svc("ext", ns="team", type="ExternalName", externalName="alias.example.test"))
    i.apply(svc("local", ns="team", cluster_ip="10.96.1.1"))
    return i


@pytest.fixture(scope="module")
def upstream():
    if shutil.which("unbound") is None:
        pytest.skip("needs unbound")
    with Unbound(records=UPSTREAM_RECORDS, zones=["example.test.", "corp.test."], host="127.0.0.9") as u:
        yield u


def start(index=None, **kw) -> DNSServer:
    s = DNSServer(index or cluster_index(), [("127.0.0.1", 0)], **kw)
    s.start_thread()
    return s


@pytest.fixture
def server(upstream):
    s = start(upstreams=[upstream.address], host_search=["corp.test"])
    s.add_local_pod(POD, "team")
    yield s
    s.stop_thread()


@pytest.fixture
def plain():
    s = start()
    yield s
    s.stop_thread()


def settled(server, key: str) -> int:
    """A counter once it has stopped moving: the server adds its counters after each
    receive batch, so they can trail the answers a client already has."""
    value, deadline = server.stats[key], time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if server.stats[key] == value:
            return value
        value = server.stats[key]
    return value


def ask(server, name, rdtype="A", tcp=False, src=None, **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    fn = dns.query.tcp if tcp else dns.query.udp
    return fn(q, "127.0.0.1", port=server.addresses[0][1], timeout=5, source=src)


def texts(msg, section="answer"):
    return sorted(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rr}"
                  for rrset in getattr(msg, section) for rr in rrset)


def raw(server, data: bytes, timeout=0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", server.addresses[0][1]))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


# ---------------------------------------------------------------- answers over UDP and TCP


def test_udp_answer_with_dnspython(plain):
    r = ask(plain, "web.prod.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR
    assert texts(r) == ["web.prod.svc.cluster.local. A 10.96.0.10"]
    assert r.answer[0].ttl == 5
    assert plain.stats["errors"] == 0


def test_repeated_queries_take_the_fast_path(plain):
    for _ in range(5):
        r = ask(plain, "web.prod.svc.cluster.local", use_edns=0)
        assert texts(r) == ["web.prod.svc.cluster.local. A 10.96.0.10"]
    assert settled(plain, "fast") >= 4


def test_question_case_is_echoed(plain):
    r = ask(plain, "WeB.PROD.svc.Cluster.Local")
    assert str(r.question[0].name) == "WeB.PROD.svc.Cluster.Local."
    assert str(r.answer[0].name) == "WeB.PROD.svc.Cluster.Local."
    r2 = ask(plain, "web.prod.svc.cluster.local")  # same cached answer, other case
    assert str(r2.answer[0].name) == "web.prod.svc.cluster.local."


def test_nxdomain_and_nodata_with_soa(plain):
    nx = ask(plain, "nothing.prod.svc.cluster.local")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert texts(nx, "authority")[0].startswith("cluster.local. SOA ns.dns.cluster.local.")
    nodata = ask(plain, "web.prod.svc.cluster.local", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and len(nodata.authority) == 1
    ent = ask(plain, "prod.svc.cluster.local")
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_tcp_several_queries_on_one_connection(plain):
    names = ["web.prod.svc.cluster.local", "db.prod.svc.cluster.local", "nothing.prod.svc.cluster.local"]
    with socket.create_connection(("127.0.0.1", plain.addresses[0][1]), timeout=5) as s:
        out = b""
        for i, n in enumerate(names):
            q = dns.message.make_query(n, "A")
            q.id = 100 + i
            w = q.to_wire()
            out += struct.pack("!H", len(w)) + w
        s.sendall(out)  # pipelined: all three before reading
        got = {}
        f = s.makefile("rb")
        for _ in names:
            (n,) = struct.unpack("!H", f.read(2))
            m = dns.message.from_wire(f.read(n))
            got[m.id] = m
    assert texts(got[100]) == ["web.prod.svc.cluster.local. A 10.96.0.10"]
    assert texts(got[101]) == ["db.prod.svc.cluster.local. A 10.244.0.5", "db.prod.svc.cluster.local. A 10.244.0.6"]
    assert got[102].rcode() == dns.rcode.NXDOMAIN


@needs_dig
def test_dig_output(plain):
    port = str(plain.addresses[0][1])

    def dig(*args):
        out = subprocess.run(["dig", "@127.0.0.1", "-p", port, "+time=3", "+tries=1", *args],
                             capture_output=True, text=True, timeout=20).stdout
        status = next(line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status:" in line)
        flags = next(line.split("flags: ")[1].split(";")[0].split() for line in out.splitlines() if "flags:" in line)
        answers = []
        section = None
        for line in out.splitlines():
            if line.startswith(";; ") and line.endswith("SECTION:"):
                section = line[3:-9]
            elif line and not line.startswith(";") and section == "ANSWER":
                answers.append(line.split())
        return status, flags, answers

    status, flags, answers = dig("_pg._tcp.db.prod.svc.cluster.local", "SRV")
    assert status == "NOERROR" and "aa" in flags
    assert sorted(a[3:] for a in answers) == [["SRV", "0", "50", "5432", "10-244-0-6.db.prod.svc.cluster.local."],
                                              ["SRV", "0", "50", "5432", "db-0.db.prod.svc.cluster.local."]]
    status, _, answers = dig("+tcp", "-x", "10.96.0.10")
    assert status == "NOERROR" and answers[0][-1] == "web.prod.svc.cluster.local."
    status, _, answers = dig("dns-version.cluster.local", "TXT")
    assert answers[0][-1] == '"1.1.0"'
    assert dig("+noedns", "nothing.prod.svc.cluster.local")[0] == "NXDOMAIN"


# ---------------------------------------------------------------- sizes and truncation


def test_truncation_over_udp_and_full_answer_over_tcp(plain):
    q = dns.message.make_query("big.prod.svc.cluster.local", "A", use_edns=False)
    r = dns.query.udp(q, "127.0.0.1", port=plain.addresses[0][1], timeout=5, ignore_trailing=True)
    assert r.flags & dns.flags.TC and not r.answer
    full = ask(plain, "big.prod.svc.cluster.local", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 100
    # dnspython's udp_with_fallback retries over TCP as a resolver would
    r2, used_tcp = dns.query.udp_with_fallback(q, "127.0.0.1", port=plain.addresses[0][1], timeout=5)
    assert used_tcp and len(r2.answer[0]) == 100


def test_edns_sizes(plain):
    port = plain.addresses[0][1]
    # 60 A records (~1 KB): too big for 512, fits the 1232 an EDNS client offers
    small = dns.query.udp(dns.message.make_query("mid.prod.svc.cluster.local", "A", use_edns=False),
                          "127.0.0.1", port=port, timeout=5)
    assert small.flags & dns.flags.TC
    edns = ask(plain, "mid.prod.svc.cluster.local", use_edns=0, payload=1232)
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 60
    assert edns.edns == 0 and edns.payload == 1232
    tiny = ask(plain, "mid.prod.svc.cluster.local", use_edns=0, payload=600)
    assert tiny.flags & dns.flags.TC
    # a client offering 4096 still gets at most 1232 over UDP (no fragments)
    huge = ask(plain, "big.prod.svc.cluster.local", use_edns=0, payload=4096)
    assert huge.flags & dns.flags.TC
    raw_resp = dns.query.udp(dns.message.make_query("big.prod.svc.cluster.local", "A", use_edns=0, payload=4096),
                             "127.0.0.1", port=port, timeout=5).to_wire()
    assert len(raw_resp) <= 1232


def test_do_bit_is_echoed(plain):
    r = ask(plain, "web.prod.svc.cluster.local", use_edns=0, want_dnssec=True)
    assert r.ednsflags & dns.flags.DO


# ---------------------------------------------------------------- malformed and unusual messages


def test_malformed_messages(plain):
    q = dns.message.make_query("web.prod.svc.cluster.local", "A")
    q.id = 0x4242
    good = q.to_wire()
    assert raw(plain, b"\x01\x02\x03") is None  # no header: silence
    r = raw(plain, good[:12] + b"\xff\xfe\xfd")  # a header, then garbage
    assert r is not None and r[:2] == b"\x42\x42" and r[3] & 0xF == dns.rcode.FORMERR and r[2] & 0x80
    resp = bytearray(good)
    resp[2] |= 0x80  # a response, not a query: never answered
    assert raw(plain, bytes(resp)) is None
    two = good[:4] + b"\x00\x02" + good[6:] + good[12:]  # qdcount 2
    r = raw(plain, two)
    assert r is not None and r[3] & 0xF == dns.rcode.FORMERR
    upd = bytearray(good)
    upd[2] = (upd[2] & 0x87) | (5 << 3)  # opcode UPDATE
    r = raw(plain, bytes(upd))
    assert r is not None and r[3] & 0xF == dns.rcode.NOTIMP
    assert plain.stats["errors"] == 0


def test_edns_version_chaos_class_and_zone_transfer(plain):
    r = ask(plain, "web.prod.svc.cluster.local", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS
    ch = dns.message.make_query("version.bind", "TXT", "CH")
    r = dns.query.udp(ch, "127.0.0.1", port=plain.addresses[0][1], timeout=5)
    assert r.rcode() == dns.rcode.REFUSED
    r = ask(plain, "cluster.local", "AXFR", tcp=True)
    assert r.rcode() == dns.rcode.REFUSED


# ---------------------------------------------------------------- live updates


def test_index_changes_are_served_right_away(plain):
    assert ask(plain, "new.prod.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN  # now cached
    plain.index.apply(svc("new", cluster_ip="10.96.7.7"))
    assert texts(ask(plain, "new.prod.svc.cluster.local")) == ["new.prod.svc.cluster.local. A 10.96.7.7"]
    plain.index.apply(svc("new", cluster_ip="10.96.7.8"))
    assert texts(ask(plain, "new.prod.svc.cluster.local")) == ["new.prod.svc.cluster.local. A 10.96.7.8"]
    plain.index.apply(eps("db-a", "db", [ep("10.244.0.9", "db-0")], ports=[{"name": "pg", "port": 5432}]))
    assert texts(ask(plain, "db.prod.svc.cluster.local")) == ["db.prod.svc.cluster.local. A 10.244.0.9"]
    plain.index.remove_key("Service", "prod", "new")
    assert ask(plain, "new.prod.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN


# ---------------------------------------------------------------- autopath


def test_autopath_to_a_cluster_name(server):
    # a pod in "team" resolving "web.prod": the first search candidate is web.prod.team.svc...
    r = ask(server, "web.prod.team.svc.cluster.local", src=POD)
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == ["web.prod.svc.cluster.local. A 10.96.0.10",
                        "web.prod.team.svc.cluster.local. CNAME web.prod.svc.cluster.local."]
    assert server.stats["autopath"] == 1


def test_autopath_to_external_names(server, upstream):
    r = ask(server, "www.example.test.team.svc.cluster.local", src=POD)
    assert texts(r) == ["www.example.test. A 192.0.2.10",
                        "www.example.test.team.svc.cluster.local. CNAME www.example.test."]
    # through a host search domain
    r = ask(server, "api.team.svc.cluster.local", src=POD)
    assert texts(r) == ["api.corp.test. A 192.0.2.20", "api.team.svc.cluster.local. CNAME api.corp.test."]
    # NODATA at the found name: CNAME plus the SOA, NOERROR
    r = ask(server, "www.example.test.team.svc.cluster.local", "AAAA", src=POD)
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == ["www.example.test.team.svc.cluster.local. CNAME www.example.test."]
    assert r.authority


def test_autopath_all_nxdomain_returns_the_first_reply(server):
    r = ask(server, "nosuch.team.svc.cluster.local", src=POD)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert texts(r, "authority")[0].startswith("cluster.local. SOA")
    assert server.stats["autopath_miss"] == 1


def test_no_autopath_for_unknown_sources_or_other_namespaces(server):
    assert ask(server, "web.prod.team.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    # the pod is in "team": prod.svc... is not its first search element
    assert ask(server, "web.other.prod.svc.cluster.local", src=POD).rcode() == dns.rcode.NXDOMAIN
    assert server.stats["autopath"] == 0


def test_autopath_can_be_switched_off(upstream):
    s = start(upstreams=[upstream.address], autopath=False)
    s.add_local_pod(POD, "team")
    try:
        assert ask(s, "web.prod.team.svc.cluster.local", src=POD).rcode() == dns.rcode.NXDOMAIN
    finally:
        s.stop_thread()


def test_search_path_order(server):
    labels = server.search_path("team")
    assert [b".".join(x).decode() for x in labels] == ["svc.cluster.local", "cluster.local", "corp.test", ""]


# ---------------------------------------------------------------- forwarding and the cache


def test_forwarded_and_cached(server, upstream):
    before = upstream.query_log().count("www.example.test. A")
    for _ in range(3):
        r = ask(server, "www.example.test")
        assert texts(r) == ["www.example.test. A 192.0.2.10"]
        assert not r.flags & dns.flags.AA
    r = ask(server, "WWW.Example.TEST")  # the cache is case-insensitive, the answer echoes the case
    assert texts(r) == ["WWW.Example.TEST. A 192.0.2.10"]
    assert upstream.query_log().count("www.example.test. A") == before + 1
    assert server.stats["forwarded"] == 1


def test_negative_answers_cached_for_the_soa_minimum(server, upstream):
    name = f"neg{time.monotonic_ns()}.example.test"
    r1 = ask(server, name)
    assert r1.rcode() == dns.rcode.NXDOMAIN
    assert r1.authority[0].ttl <= 60
    r2 = ask(server, name)
    assert r2.rcode() == dns.rcode.NXDOMAIN
    assert upstream.query_log().count(f"{name}. A") == 1


def test_ttls_count_down(server):
    name = "www.example.test"
    first = ask(server, name).answer[0].ttl
    time.sleep(1.2)
    later = ask(server, name).answer[0].ttl
    assert later < first <= 300


def test_upstream_failure_is_servfail():
    dead = ("127.0.0.1", free_port())  # nothing listens there
    s = start(upstreams=[dead], upstream_timeout=0.5)
    try:
        r = ask(s, "www.example.test")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert s.stats["servfail"] == 1
        # cluster names still answer
        assert ask(s, "web.prod.svc.cluster.local").rcode() == dns.rcode.NOERROR
    finally:
        s.stop_thread()


def test_no_upstream_is_servfail(plain):
    assert ask(plain, "www.example.test").rcode() == dns.rcode.SERVFAIL


def test_cache_size_is_bounded(upstream):
    s = start(upstreams=[upstream.address], cache_size=3)
    try:
        for n in range(6):
            ask(s, f"n{n}.example.test")
        assert len(s.cache) == 3
        assert s.cache.evictions == 3
    finally:
        s.stop_thread()


def test_upstream_connections_are_reused(upstream):
    s = start(upstreams=[upstream.address])
    try:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda n: ask(s, f"c{n}.example.test").rcode(), range(60)))
        assert set(results) == {dns.rcode.NXDOMAIN}
        up = s.upstream.upstreams[0]
        assert 1 <= len([c for c in up.conns if not c.closed]) <= 2
        assert s.upstream.queries == 60
    finally:
        s.stop_thread()


def test_hot_entries_are_prefetched_before_they_expire(upstream):
    s = start(upstreams=[upstream.address])
    try:
        # short.example.test has TTL 4: hot after hits in two different seconds; refreshed in its last second
        deadline = time.monotonic() + 7
        seen_ttls = []
        while time.monotonic() < deadline:
            r = ask(s, "short.example.test")
            seen_ttls.append(r.answer[0].ttl)
            time.sleep(0.2)
        assert s.stats["prefetches"] >= 1
        # the refresh came in before expiry: no answer ever had to wait for a miss after the first
        assert s.stats["forwarded"] >= 2
        assert min(seen_ttls) >= 0
        assert upstream.query_log().count("short.example.test. A") >= 2
    finally:
        s.stop_thread()


def test_external_name_service_is_chased_upstream(server):
    r = ask(server, "ext.team.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == ["alias.example.test. CNAME www.example.test.",
                        "ext.team.svc.cluster.local. CNAME alias.example.test.",
                        "www.example.test. A 192.0.2.10"]
    r = ask(server, "ext.team.svc.cluster.local", "CNAME")
    assert texts(r) == ["ext.team.svc.cluster.local. CNAME alias.example.test."]


def test_dnsmasq_as_upstream():
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq")
    with Dnsmasq(hosts=[("files.corp.test", "192.0.2.77")], domains=["corp.test"], host="127.0.0.10") as d:
        s = start(upstreams=[d.address])
        try:
            assert texts(ask(s, "files.corp.test")) == ["files.corp.test. A 192.0.2.77"]
            assert texts(ask(s, "files.corp.test")) == ["files.corp.test. A 192.0.2.77"]
            assert d.query_log().count("files.corp.test A") == 1
        finally:
            s.stop_thread()


def test_types_with_letter_bytes_never_share_a_fast_path_entry(plain):
    # the fast path lower-cases the question, type included: type 65 (HTTPS, byte 'A') must not
    # be served from an entry of type 97 (byte 'a') or the reverse
    from podnet.dns.server import fast_safe

    assert fast_safe(b"\x00\x01\x00\x01") and not fast_safe(b"\x00\x41\x00\x01") and not fast_safe(b"\x00\x61\x00\x01")
    for rdtype in (65, 97, 65, 97):
        r = ask(plain, "web.prod.svc.cluster.local", rdtype, use_edns=False)
        assert r.question[0].rdtype == rdtype and r.rcode() == dns.rcode.NOERROR and not r.answer
    fast_before = settled(plain, "fast")
    ask(plain, "web.prod.svc.cluster.local", 65, use_edns=False)
    assert settled(plain, "fast") == fast_before


def test_composed_autopath_answers_are_reused_until_a_part_changes(server, upstream):
    name = "web.prod.team.svc.cluster.local"
    first = ask(server, name, src=POD, use_edns=False)
    assert "web.prod.svc.cluster.local. A 10.96.0.10" in texts(first)
    fast = settled(server, "fast")
    for _ in range(3):
        assert texts(ask(server, name, src=POD, use_edns=False)) == texts(first)
    assert settled(server, "fast") == fast + 3  # served from the composed answer
    # the found Service changes: the composition is not reused
    server.index.apply(svc("web", cluster_ip="10.96.0.55"))
    assert "web.prod.svc.cluster.local. A 10.96.0.55" in texts(ask(server, name, src=POD))
    # the asked name itself comes to exist: a plain answer, no search
    server.index.apply(svc("prod", ns="team", cluster_ip="None"))
    server.index.apply(eps("prod-1", "prod", [ep("10.244.9.9", "web")], ns="team"))
    assert texts(ask(server, name, src=POD)) == [f"{name}. A 10.244.9.9"]


def test_composed_external_autopath_answer_costs_one_upstream_query(server, upstream):
    name = "www.example.test.team.svc.cluster.local"
    before = upstream.query_log().count("www.example.test. A")
    for _ in range(5):
        r = ask(server, name, src=POD)
        assert texts(r) == ["www.example.test. A 192.0.2.10", f"{name}. CNAME www.example.test."]
    assert upstream.query_log().count("www.example.test. A") == before + 1
    assert server.stats["autopath"] == 5
