"""Random bytes and mutated queries never crash the server: an answer, FORMERR, or silence."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.dns import make_endpoint, make_service, make_slice

from podnet.dns.index import ClusterIndex
from podnet.dns.server import DNSServer, parse_query


def _index() -> ClusterIndex:
    i = ClusterIndex()
    i.apply(make_service("web"))
    i.apply(make_service("db", cluster_ip="None", ports=[{"name": "pg", "port": 5432}]))
    i.apply(make_slice("db-a", "db", [make_endpoint(f"10.244.0.{n}", f"db-{n}") for n in range(1, 40)],
                       ports=[{"name": "pg", "port": 5432}]))
    return i


SEEDS = [
    dns.message.make_query("web.prod.svc.cluster.local", "A").to_wire(),
    dns.message.make_query("WEB.prod.svc.cluster.local", "A", use_edns=0, payload=1232).to_wire(),
    dns.message.make_query("_pg._tcp.db.prod.svc.cluster.local", "SRV", use_edns=0, want_dnssec=True).to_wire(),
    dns.message.make_query("db.prod.svc.cluster.local", "A", use_edns=False).to_wire(),
    dns.message.make_query("10.0.96.10.in-addr.arpa", "PTR").to_wire(),
    dns.message.make_query("nothing.prod.svc.cluster.local", "AAAA").to_wire(),
    dns.message.make_query("www.example.test", "A").to_wire(),  # forwarded: no upstream -> SERVFAIL
]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "count"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "count" and len(data) >= 12:
            struct.pack_into("!H", data, draw(st.sampled_from([4, 6, 8, 10])), draw(st.integers(0, 65535)))
    return bytes(data)


packets = st.one_of(st.binary(max_size=600), mutated())


def check_reply(query: bytes, reply: bytes | None) -> None:
    if reply is None:
        return
    assert len(reply) >= 12
    assert reply[:2] == query[:2], "the reply carries the query's ID"
    assert reply[2] & 0x80, "QR set"
    assert not query[2] & 0x80, "responses are never answered"
    msg = dns.message.from_wire(reply, ignore_trailing=False)  # well-formed
    assert msg.rcode() in (0, 1, 2, 3, 4, 5, 9, 16)


@pytest.fixture(scope="module")
def handler():
    server = DNSServer(_index(), [("127.0.0.1", 0)], upstream_timeout=0.2)
    loop = asyncio.new_event_loop()

    def handle(data: bytes, udp: bool = True) -> bytes | None:
        out = server._handle(data, "127.0.0.1", udp=udp)
        if out is not None and not isinstance(out, bytes):
            out = loop.run_until_complete(out)
        return out

    yield server, handle
    loop.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets, st.booleans())
def test_handler_never_raises(handler, data, udp):
    server, handle = handler
    reply = handle(data, udp)
    check_reply(data, reply)
    if reply is not None and udp:
        assert len(reply) <= 1232
    assert server.stats["errors"] == 0


@settings(max_examples=300, deadline=None)
@given(packets)
def test_our_parser_agrees_with_dnspython_on_accepted_queries(data):
    try:
        q = parse_query(data)
    except Exception:  # noqa: BLE001 - declining is fine: dnspython gets it
        return
    msg = dns.message.from_wire(data)
    assert len(msg.question) == 1
    assert msg.question[0].name.to_wire() == q.qname
    assert (msg.question[0].rdtype, msg.question[0].rdclass) == (q.qtype, q.qclass)


def test_fuzzing_the_live_socket_keeps_it_serving():
    """The fast path lives in the UDP reader: throw everything at the real socket."""
    import random

    rnd = random.Random(1234)
    server = DNSServer(_index(), [("127.0.0.1", 0)], upstream_timeout=0.2)
    server.start_thread()
    try:
        port = server.addresses[0][1]
        probe = dns.message.make_query("web.prod.svc.cluster.local", "A")
        probe.id = 0xBEEF
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for n in range(3000):
                seed = bytearray(rnd.choice(SEEDS))
                for _ in range(rnd.randint(1, 4)):
                    if seed and rnd.random() < 0.7:
                        seed[rnd.randrange(len(seed))] = rnd.randrange(256)
                    else:
                        seed = seed[:rnd.randrange(len(seed) + 1)]
                if rnd.random() < 0.2:
                    seed = bytearray(rnd.randbytes(rnd.randrange(40)))
                s.sendto(bytes(seed), ("127.0.0.1", port))
                if n % 100 == 99:  # still alive? drain until our probe comes back
                    s.sendto(probe.to_wire(), ("127.0.0.1", port))
                    while True:
                        reply = s.recv(65535)
                        assert reply[2] & 0x80
                        if reply[:2] == b"\xbe\xef":
                            assert dns.message.from_wire(reply).answer
                            break
        assert server.stats["errors"] == 0
        assert server.stats["fast"] > 0
    finally:
        server.stop_thread()
