"""Wire format helpers: names, reverse names, the compressing renderer."""

from __future__ import annotations

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.message
import dns.rrset

from podnet.dns import wire
from podnet.dns.wire import CNAME, IN, SOA, SRV, A


def test_names_round_trip():
    w = wire.name_to_wire("Web.prod.svc.cluster.local.")
    assert w == b"\x03Web\x04prod\x03svc\x07cluster\x05local\x00"
    assert wire.wire_to_text(w) == "Web.prod.svc.cluster.local."
    assert wire.name_to_wire(".") == b"\x00"
    with pytest.raises(wire.WireError):
        wire.name_to_wire("a" * 64 + ".com")
    with pytest.raises(wire.WireError):
        wire.name_to_wire(".".join(["abcdefg"] * 40))


def test_reverse_names():
    assert wire.wire_to_text(wire.reverse_name(bytes([10, 96, 0, 1]))) == "1.0.96.10.in-addr.arpa."
    labels = wire.wire_labels(wire.reverse_name(bytes([10, 96, 0, 1])))
    assert wire.reverse_to_packed(labels) == bytes([10, 96, 0, 1])
    six = wire.rdata_a("fd00::1")
    assert wire.reverse_to_packed(wire.wire_labels(wire.reverse_name(six))) == six
    assert wire.reverse_to_packed([b"01", b"0", b"96", b"10", b"in-addr", b"arpa"]) is None
    assert wire.reverse_to_packed([b"256", b"0", b"96", b"10", b"in-addr", b"arpa"]) is None


def test_rendered_sections_compress_and_parse():
    qname = wire.name_to_wire("_http._tcp.web.prod.svc.cluster.local")
    target = wire.name_to_wire("web.prod.svc.cluster.local")
    zone = wire.name_to_wire("cluster.local")
    soa = wire.rdata_soa(wire.name_to_wire("ns.dns.cluster.local"), wire.name_to_wire("hostmaster.cluster.local"),
                         1, 2, 3, 4, 5)
    body, ttl_offsets = wire.render(
        qname, [(None, SRV, IN, 5, wire.rdata_srv(0, 100, 80, target))], [(zone, SOA, IN, 5, soa)],
        [(target, A, IN, 5, bytes([10, 96, 0, 10])), (wire.name_to_wire("x.example"), CNAME, IN, 7, target)])
    msg = wire.header(7, wire.QR | wire.AA, 1, 1, 1, 2) + qname + b"\x00\x21\x00\x01" + body
    parsed = dns.message.from_wire(msg)
    assert [str(r) for r in parsed.answer] == ["_http._tcp.web.prod.svc.cluster.local. 5 IN SRV 0 100 80 "
                                               "web.prod.svc.cluster.local."]
    assert str(parsed.authority[0]).startswith("cluster.local. 5 IN SOA ns.dns.cluster.local.")
    assert [str(r) for r in parsed.additional] == ["web.prod.svc.cluster.local. 5 IN A 10.96.0.10",
                                                   "x.example. 7 IN CNAME web.prod.svc.cluster.local."]
    assert len(ttl_offsets) == 4
    # compression: the zone suffix of the question is reused (the SRV target must be written out once)
    assert body.count(b"\x07cluster\x05local") == 1
    # the SRV target itself is written in full (RFC 2782), later names point at it
    assert target in body


def test_parse_records_decompresses():
    q = dns.message.make_query("a.example", "MX")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("a.example.", 60, "IN", "MX", "10 mail.a.example."))
    data = r.to_wire()
    recs, _ = wire.parse_records(data, 12 + len(wire.name_to_wire("a.example")) + 4, 1)
    owner, rtype, rclass, ttl, rdata, _ = recs[0]
    assert (owner, rtype, ttl) == (wire.name_to_wire("a.example"), 15, 60)
    assert rdata == b"\x00\x0a" + wire.name_to_wire("mail.a.example")
