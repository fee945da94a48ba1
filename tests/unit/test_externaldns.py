"""External DNS without a DNS server: names and TTLs, the TXT registry's format and name
mapping (ExternalDNS's own cases), the Service source, the planner and its policies,
and the provider's messages (prerequisites, batching, the split of a refused batch)."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdatatype
import dns.update
import pytest

from podnet.externaldns.endpoint import Endpoint, check_dns_name, parse_duration, parse_ttl
from podnet.externaldns.plan import DomainFilter, calculate
from podnet.externaldns.registry import NameMapper, RRset, format_labels, parse_labels, read_zone
from podnet.externaldns.rfc2136 import DNSServerError, RFC2136Provider, ServerConfig, effect, txt_rdata
from podnet.externaldns.source import Problem, ServiceSource, SourceOptions, service_endpoints
from podnet.model.objects import EndpointSlice, Node, Service
from podnet.store.objects import ObjectEvent, key_of

H = "external-dns.kubernetes.io/"


def svc(name="web", ns="prod", type_="LoadBalancer", ann=None, ingress=(), **spec) -> Service:
    body = {"type": type_, "ports": spec.pop("ports", [{"port": 80}]), **spec}
    if type_ == "ExternalName":
        body.pop("ports")
    return Service.model_validate({
        "metadata": {"name": name, "namespace": ns, "annotations": ann or {}},
        "spec": body, "status": {"loadBalancer": {"ingress": list(ingress)}}})


def node(name, internal=None, external=None, unschedulable=False) -> Node:
    addrs = ([{"type": "InternalIP", "address": internal}] if internal else []) + \
        ([{"type": "ExternalIP", "address": external}] if external else [])
    return Node.model_validate({"metadata": {"name": name}, "spec": {"unschedulable": unschedulable},
                                "status": {"addresses": addrs}})


def eslice(name, service, eps, ns="prod", address_type="IPv4") -> EndpointSlice:
    return EndpointSlice.model_validate({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type, "endpoints": eps})


def ep(ip, ready=True, hostname=None, node_name=None) -> dict:
    out: dict = {"addresses": [ip], "conditions": {"ready": ready}}
    if hostname:
        out["hostname"] = hostname
    if node_name:
        out["nodeName"] = node_name
    return out


# ---------------------------------------------------------------- names, TTLs


def test_dns_names():
    assert check_dns_name("Web.Example.ORG.") == "web.example.org"
    assert check_dns_name("*.apps.example.org") == "*.apps.example.org"
    assert check_dns_name("_http._tcp.example.org") == "_http._tcp.example.org"
    for bad, why in [("we b.example.org", "character ' '"), ("web!.example.org", "character '!'"),
                     ("-web.example.org", "start or end with '-'"), ("a..b", "empty label"),
                     ("wéb.example.org", "xn--"), ("x" * 64 + ".org", "at most 63"),
                     (("a" * 60 + ".") * 5 + "org", "at most 253"), ("web.*.org", "character '*'")]:
        with pytest.raises(ValueError, match=why.replace("*", r"\*").replace("(", r"\(")):
            check_dns_name(bad)


def test_ttls_and_durations():
    assert parse_ttl("300") == 300
    assert parse_ttl("5m") == 300
    assert parse_ttl("1h30m") == 5400
    assert parse_ttl("1.5s") == 1  # the fraction is dropped, as ExternalDNS does
    assert parse_duration("1m") == 60.0
    assert parse_duration("0.2") == 0.2
    for bad in ("ten", "", "5 m", "-3", "0", "99999999999"):
        with pytest.raises(ValueError):
            parse_ttl(bad)


# ---------------------------------------------------------------- the TXT registry


def test_labels_are_externaldns_format():
    assert format_labels("ctl-a", "service/prod/web") == \
        "heritage=external-dns,external-dns/owner=ctl-a,external-dns/resource=service/prod/web"
    assert parse_labels('"heritage=external-dns,external-dns/owner=x,external-dns/resource=service/a/b"') == \
        {"owner": "x", "resource": "service/a/b"}
    assert parse_labels("heritage=other,external-dns/owner=x") is None
    assert parse_labels("v=spf1 -all") is None


@pytest.mark.parametrize(("mapper", "name", "rtype", "txt"), [
    (NameMapper(), "foo.example.com", "A", "a-foo.example.com"),
    (NameMapper(), "foo.example.com", "AAAA", "aaaa-foo.example.com"),
    (NameMapper(), "foo.example.com", "CNAME", "cname-foo.example.com"),
    (NameMapper("%{record_type}-"), "foo.example.com", "A", "a-foo.example.com"),
    (NameMapper("", "-%{record_type}"), "foo.example.com", "CNAME", "foo-cname.example.com"),
    (NameMapper("txt-", "", "wild"), "*.example.com", "A", "txt-a-wild.example.com"),
    (NameMapper("", ".foo.bar"), "example.com", "A", "a-example.foo.bar.com"),
])
def test_name_mapper_matches_externaldns(mapper, name, rtype, txt):
    assert mapper.txt_name(name, rtype) == txt
    assert mapper.endpoint_name(txt) == (name, rtype)


def test_name_mapper_reading():
    m = NameMapper()
    assert m.endpoint_name("web.example.com") == ("web.example.com", "")  # the old format
    assert m.endpoint_name("ptr-2.49.168.192.in-addr.arpa") == ("2.49.168.192.in-addr.arpa", "PTR")
    assert NameMapper("", ".foo.bar").endpoint_name("a-example.foo") is None
    with pytest.raises(ValueError, match="mutually exclusive"):
        NameMapper("pre-", "-suf")


def _txt(*values: str) -> RRset:
    texts = tuple(values)
    return RRset(300, tuple(txt_rdata(v).to_text() for v in texts), texts)


def test_read_zone_new_format_first_old_format_kept_readable():
    me = format_labels("me", "service/prod/web")
    other = format_labels("other", "service/x/y")
    view = read_zone("example.org", {
        ("web.example.org", "A"): RRset(300, ("192.0.2.1",)),
        ("a-web.example.org", "TXT"): _txt(me),
        ("old.example.org", "A"): RRset(300, ("192.0.2.2",)),
        ("old.example.org", "AAAA"): RRset(300, ("2001:db8::2",)),
        ("old.example.org", "TXT"): _txt("v=spf1 -all", other),
        ("human.example.org", "A"): RRset(300, ("192.0.2.3",)),
    }, NameMapper())
    assert view.owners[("web.example.org", "A")].owner == "me"
    assert view.owners[("old.example.org", "A")].owner == "other"  # the old format
    assert view.owners[("old.example.org", "A")].old_format
    assert ("old.example.org", "AAAA") not in view.owners  # never for AAAA (as ExternalDNS)
    assert ("human.example.org", "A") not in view.owners
    # the prerequisite holds every string at the TXT name, not only the registry's
    assert len(view.owners[("old.example.org", "A")].txt_rrset) == 2


# ---------------------------------------------------------------- the Service source


def test_load_balancer_targets():
    s = svc(ann={H + "hostname": "web.example.org, www.example.org", H + "ttl": "60"},
            ingress=[{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}, {"hostname": "lb.cloud.example"}])
    got = service_endpoints(s, [], [])
    assert {(e.name, e.type, e.targets, e.ttl, e.resource) for e in got} == {
        ("web.example.org", "A", ("192.0.2.10",), 60, "service/prod/web"),
        ("web.example.org", "AAAA", ("2001:db8::10",), 60, "service/prod/web"),
        ("www.example.org", "A", ("192.0.2.10",), 60, "service/prod/web"),
        ("www.example.org", "AAAA", ("2001:db8::10",), 60, "service/prod/web"),
    }  # the hostname is dropped: addresses and a CNAME cannot share a name
    only_host = svc(ann={H + "hostname": "web.example.org"}, ingress=[{"hostname": "LB.cloud.example."}])
    assert [(e.type, e.targets) for e in service_endpoints(only_host, [], [])] == [("CNAME", ("lb.cloud.example",))]
    ext = svc(ann={H + "hostname": "web.example.org"}, externalIPs=["198.51.100.7"], ingress=[{"ip": "192.0.2.10"}])
    assert [e.targets for e in service_endpoints(ext, [], [])] == [("198.51.100.7",)]
    pending = svc(ann={H + "hostname": "web.example.org"})
    assert service_endpoints(pending, [], []) == []
    assert service_endpoints(svc(ingress=[{"ip": "192.0.2.10"}]), [], []) == []  # no hostname annotation


def test_internal_hostname_and_cluster_ip():
    s = svc(type_="ClusterIP", clusterIP="10.96.0.10",
            ann={H + "hostname": "web.example.org", H + "internal-hostname": "web.internal.example.org"})
    assert [(e.name, e.targets) for e in service_endpoints(s, [], [])] == \
        [("web.internal.example.org", ("10.96.0.10",))]
    assert {(e.name, e.targets) for e in service_endpoints(s, [], [], SourceOptions(publish_internal=True))} == \
        {("web.internal.example.org", ("10.96.0.10",)), ("web.example.org", ("10.96.0.10",))}
    lb = svc(clusterIP="10.96.0.11", ann={H + "internal-hostname": "lb.internal.example.org"},
             ingress=[{"ip": "192.0.2.10"}])
    assert [e.targets for e in service_endpoints(lb, [], [])] == [("10.96.0.11",)]


def test_node_port_targets():
    nodes = [node("n1", "10.0.0.1"), node("n2", "10.0.0.2", "203.0.113.2"), node("n3", "10.0.0.3", "203.0.113.3",
                                                                               unschedulable=True)]
    s = svc(type_="NodePort", ann={H + "hostname": "np.example.org"},
            ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    got = {e.key: e for e in service_endpoints(s, [], nodes)}
    assert got[("np.example.org", "A")].targets == ("203.0.113.2",)  # ExternalIPs win; unschedulable left out
    assert got[("_web._tcp.np.example.org", "SRV")].targets == ("0 50 30080 np.example.org",)
    private = svc(type_="NodePort", ann={H + "hostname": "np.example.org", H + "access": "private"},
                  ports=[{"port": 80, "nodePort": 30080}])
    assert service_endpoints(private, [], nodes)[0].targets == ("10.0.0.1", "10.0.0.2")
    local = svc(type_="NodePort", ann={H + "hostname": "np.example.org", H + "access": "private"},
                externalTrafficPolicy="Local", ports=[{"port": 80, "nodePort": 30080}])
    slices = [eslice("web-1", "web", [ep("10.244.1.5", node_name="n1"), ep("10.244.2.5", ready=False,
                                                                          node_name="n2")])]
    assert service_endpoints(local, slices, nodes)[0].targets == ("10.0.0.1",)


def test_headless_targets():
    s = svc(type_="ClusterIP", clusterIP="None", ann={H + "hostname": "db.example.org"})
    slices = [eslice("db-1", "web", [ep("10.244.1.5", hostname="db-0"), ep("10.244.2.5", hostname="db-1"),
                                     ep("10.244.3.5", ready=False, hostname="db-2")]),
              eslice("db-2", "web", [ep("fd00::5")], address_type="IPv6")]
    got = {(e.name, e.type): e.targets for e in service_endpoints(s, slices, [])}
    assert got == {("db.example.org", "A"): ("10.244.1.5", "10.244.2.5"),
                   ("db.example.org", "AAAA"): ("fd00::5",),
                   ("db-0.db.example.org", "A"): ("10.244.1.5",),
                   ("db-1.db.example.org", "A"): ("10.244.2.5",)}
    not_ready = {(e.name, e.type) for e in service_endpoints(s, slices, [], SourceOptions(always_publish_not_ready=True))}
    assert ("db-2.db.example.org", "A") in not_ready


def test_external_name_and_target_annotation():
    s = svc(type_="ExternalName", externalName="backend.example.net", ann={H + "hostname": "alias.example.org"})
    assert [(e.type, e.targets) for e in service_endpoints(s, [], [])] == [("CNAME", ("backend.example.net",))]
    t = svc(ann={H + "hostname": "web.example.org", H + "target": "198.51.100.1,198.51.100.2"},
            ingress=[{"ip": "192.0.2.10"}])
    assert service_endpoints(t, [], [])[0].targets == ("198.51.100.1", "198.51.100.2")


@pytest.mark.parametrize(("ann", "message"), [
    ({H + "hostname": "we b!.example.org"}, "annotation external-dns.kubernetes.io/hostname: 'we b!.example.org'"),
    ({H + "hostname": "web.example.org", H + "ttl": "ten"}, "annotation external-dns.kubernetes.io/ttl: 'ten' is "
                                                            "not a TTL"),
    ({H + "hostname": "web.example.org", H + "target": "a b"}, "annotation external-dns.kubernetes.io/target"),
    ({H + "hostname": "web.example.org", H + "target": "1.2.3.4,lb.example.net"}, "mixes addresses and hostnames"),
    ({H + "internal-hostname": "x_-.example.org"}, "internal-hostname"),
])
def test_bad_annotations_name_the_annotation(ann, message):
    with pytest.raises(Problem, match=message.replace(".", r"\.").replace("!", "!")):
        service_endpoints(svc(ann=ann, ingress=[{"ip": "192.0.2.10"}]), [], [])


def test_source_follows_events_and_reports_problems_per_service():
    src = ServiceSource()
    good = svc("good", ann={H + "hostname": "good.example.org"}, ingress=[{"ip": "192.0.2.1"}])
    bad = svc("bad", ann={H + "hostname": "bad.example.org", H + "ttl": "soon"}, ingress=[{"ip": "192.0.2.2"}])
    head = svc("db", type_="ClusterIP", clusterIP="None", ann={H + "hostname": "db.example.org"})
    for i, o in enumerate([good, bad, head], 1):
        assert src.on_event(ObjectEvent("ADDED", o, key_of(o), i))
    rev, eps, problems = src.snapshot()
    assert [e.name for e in eps] == ["good.example.org"]
    assert list(problems) == ["service/prod/bad"] and "ttl" in problems["service/prod/bad"][0]
    s = eslice("db-1", "db", [ep("10.244.1.9")])
    assert src.on_event(ObjectEvent("ADDED", s, key_of(s), 4))
    unrelated = eslice("other-1", "other", [ep("10.244.1.10")])
    assert not src.on_event(ObjectEvent("ADDED", unrelated, key_of(unrelated), 5))
    _, eps, _ = src.snapshot()
    assert sorted((e.name, e.targets) for e in eps) == [("db.example.org", ("10.244.1.9",)),
                                                         ("good.example.org", ("192.0.2.1",))]
    # a change outside what it reads (a label) changes nothing
    relabelled = good.with_meta(labels={"team": "a"})
    assert not src.on_event(ObjectEvent("MODIFIED", relabelled, key_of(good), 6))
    assert src.on_event(ObjectEvent("DELETED", None, key_of(good), 7))
    assert [e.name for e in src.snapshot()[1]] == ["db.example.org"]


# ---------------------------------------------------------------- the plan

M = NameMapper()


def E(name, targets, rtype="A", ttl=None, resource="service/prod/web") -> Endpoint:  # noqa: N802
    return Endpoint(name, rtype, tuple(targets), ttl, resource)


def zone(records: dict, owners: dict | None = None):
    rrsets = {k: RRset(300, tuple(v)) for k, v in records.items()}
    for (name, rtype), (owner, resource) in (owners or {}).items():
        rrsets[(M.txt_name(name, rtype), "TXT")] = _txt(format_labels(owner, resource))
    return read_zone("example.org", rrsets, M)


def plan_of(desired, view, policy="sync", **kw):
    return calculate(desired, view, owner_id="me", mapper=M, policy=policy, **kw)


def test_plan_create_update_delete():
    view = zone({("keep.example.org", "A"): ["192.0.2.1"], ("move.example.org", "A"): ["192.0.2.2"],
                 ("gone.example.org", "A"): ["192.0.2.3"]},
                {("keep.example.org", "A"): ("me", "service/prod/web"),
                 ("move.example.org", "A"): ("me", "service/prod/web"),
                 ("gone.example.org", "A"): ("me", "service/prod/gone")})
    p = plan_of([E("keep.example.org", ["192.0.2.1"]), E("move.example.org", ["192.0.2.20"]),
                 E("new.example.org", ["192.0.2.4"], ttl=60)], view)
    got = {(c.action, c.name) for c in p.changes}
    assert got == {("update", "move.example.org"), ("delete", "gone.example.org"), ("create", "new.example.org")}
    create = next(c for c in p.changes if c.action == "create")
    assert (create.ttl, create.txt_name, create.owner_txt) == (60, "a-new.example.org", None)
    assert create.txt_value == format_labels("me", "service/prod/web")
    assert p.conflicts == []


def test_plan_ttl_compared_only_when_set():
    view = zone({("web.example.org", "A"): ["192.0.2.1"]}, {("web.example.org", "A"): ("me", "service/prod/web")})
    assert plan_of([E("web.example.org", ["192.0.2.1"])], view).changes == []  # no ttl annotation: kept
    [c] = plan_of([E("web.example.org", ["192.0.2.1"], ttl=30)], view).changes
    assert (c.action, c.ttl) == ("update", 30)


def test_plan_never_touches_other_owners_or_hand_made_records():
    view = zone({("theirs.example.org", "A"): ["192.0.2.1"], ("human.example.org", "A"): ["192.0.2.2"],
                 ("orphan.example.org", "A"): ["192.0.2.3"]},
                {("theirs.example.org", "A"): ("them", "service/x/y")})
    p = plan_of([E("theirs.example.org", ["192.0.2.9"]), E("human.example.org", ["192.0.2.9"]),
                 E("human.example.org", ["2001:db8::9"], rtype="AAAA")], view)
    assert p.changes == []
    described = sorted(c.describe("me") for c in p.conflicts)
    assert "owned by owner 'them' (service/x/y)" in described[2]
    assert all("this controller is owner 'me'" in d for d in described)
    assert sum("made outside ExternalDNS" in d for d in described) == 2  # the A, and the AAAA beside a hand-made A
    # nothing desired: only this owner's records could go, and there are none
    assert plan_of([], view).changes == []


def test_plan_policies():
    view = zone({("old.example.org", "A"): ["192.0.2.1"], ("chg.example.org", "A"): ["192.0.2.2"]},
                {("old.example.org", "A"): ("me", "service/prod/old"),
                 ("chg.example.org", "A"): ("me", "service/prod/web")})
    desired = [E("chg.example.org", ["192.0.2.20"]), E("new.example.org", ["192.0.2.3"])]
    acts = {pol: sorted(c.action for c in plan_of(desired, view, pol).changes)
            for pol in ("sync", "upsert-only", "create-only")}
    assert acts == {"sync": ["create", "delete", "update"], "upsert-only": ["create", "update"],
                    "create-only": ["create"]}
    assert plan_of(desired, view, "create-only").held_back == 2


def test_plan_holds_a_broken_service_and_filters_domains():
    view = zone({("web.example.org", "A"): ["192.0.2.1"]}, {("web.example.org", "A"): ("me", "service/prod/web")})
    assert plan_of([], view, hold=lambda r: r == "service/prod/web").changes == []
    assert plan_of([], view, domain_filter=DomainFilter(("other.org",))).changes == []
    assert plan_of([], view, domain_filter=DomainFilter((), ("example.org",))).changes == []
    assert [c.action for c in plan_of([], view, domain_filter=DomainFilter(("example.org",))).changes] == ["delete"]


def test_plan_recreates_own_records_and_migrates_old_format():
    me = format_labels("me", "service/prod/web")
    view = read_zone("example.org", {
        ("a-gone.example.org", "TXT"): _txt(me),  # the records were deleted by hand; the claim is still ours
        ("old.example.org", "A"): RRset(300, ("192.0.2.1",)),
        ("old.example.org", "TXT"): _txt(me),  # old format
    }, M)
    p = plan_of([E("gone.example.org", ["192.0.2.5"]), E("old.example.org", ["192.0.2.1"])], view)
    by = {c.name: c for c in p.changes}
    assert by["gone.example.org"].action == "create" and by["gone.example.org"].owner_txt is not None
    mig = by["old.example.org"]
    assert (mig.action, mig.txt_name, mig.owner_txt.old_format) == ("update", "a-old.example.org", True)


def test_plan_merges_services_wanting_one_name():
    p = plan_of([E("web.example.org", ["192.0.2.2"], resource="service/b/web"),
                 E("web.example.org", ["192.0.2.1"], resource="service/a/web")], zone({}))
    [c] = p.changes
    assert (c.targets, c.resource) == (("192.0.2.1", "192.0.2.2"), "service/a/web")


# ---------------------------------------------------------------- the provider's messages


class FakeServer:
    """Answers UPDATEs: a prerequisite on `taken` names fails (YXRRSET), an update of a
    `broken` name fails the message (SERVFAIL), the rest succeeds."""

    def __init__(self, taken=(), broken=()):
        self.taken = set(taken)
        self.broken = set(broken)
        self.sent: list[dns.update.UpdateMessage] = []

    def __call__(self, msg):
        msg.to_wire()  # rendered as a send would (a message over 64 KiB raises TooBig here)
        self.sent.append(msg)
        resp = dns.message.make_response(msg)
        names = {rrset.name.to_text(omit_final_dot=True) for rrset in msg.prerequisite}
        updated = {rrset.name.to_text(omit_final_dot=True) for rrset in msg.update}
        resp.set_rcode(dns.rcode.YXRRSET if names & self.taken else
                       dns.rcode.SERVFAIL if updated & self.broken else dns.rcode.NOERROR)
        return resp


def provider(fake, batch=50) -> RFC2136Provider:
    return RFC2136Provider(ServerConfig("127.0.0.1", ("example.org",), insecure=True, batch_size=batch), send=fake)


def test_messages_carry_ownership_prerequisites():
    view = zone({("web.example.org", "A"): ["192.0.2.1"]}, {("web.example.org", "A"): ("me", "service/prod/web")})
    p = plan_of([E("web.example.org", ["192.0.2.2"]), E("new.example.org", ["192.0.2.3"])], view)
    fake = FakeServer()
    result = provider(fake).apply("example.org", p.changes)
    assert result.messages == 2 and len(result.applied) == 2  # the update first, then the create
    upd, create = fake.sent
    pre = {(r.name.to_text(), r.rdclass, r.rdtype) for r in upd.prerequisite}
    assert pre == {("a-web.example.org.", dns.rdataclass.IN, dns.rdatatype.TXT)}  # value-dependent: class IN
    txt = [r for r in upd.prerequisite][0]
    assert [b"".join(rd.strings).decode() for rd in txt] == [format_labels("me", "service/prod/web")]
    pre = {(r.name.to_text(), r.rdclass, r.rdtype) for r in create.prerequisite}
    assert pre == {("new.example.org.", dns.rdataclass.NONE, dns.rdatatype.A),
                   ("new.example.org.", dns.rdataclass.NONE, dns.rdatatype.CNAME),
                   ("a-new.example.org.", dns.rdataclass.NONE, dns.rdatatype.TXT)}


def test_batches_and_the_split_of_a_refused_batch():
    desired = [E(f"s{i}.example.org", [f"192.0.2.{i}"]) for i in range(1, 101)]
    p = plan_of(desired, zone({}))
    fake = FakeServer()
    result = provider(fake, batch=50).apply("example.org", p.changes)
    assert (result.messages, len(result.applied), result.lost) == (2, 100, [])
    # two names taken by someone else meanwhile: found by halving, everything else lands
    fake = FakeServer(taken={"s7.example.org", "s70.example.org"})
    prov = provider(fake, batch=50)
    prov.holder = lambda c: "owned by owner 'them'"  # no server to ask
    result = prov.apply("example.org", p.changes)
    assert sorted(c.name for c, _ in result.lost) == ["s7.example.org", "s70.example.org"]
    assert len(result.applied) == 98
    assert result.messages <= 2 + 2 * 2 * 6  # two batches, each halved down to one change: ~2 log2(50) more


def test_effect_tracks_what_an_update_did():
    view = zone({("web.example.org", "A"): ["192.0.2.1"]}, {("web.example.org", "A"): ("me", "service/prod/web")})
    p = plan_of([E("web.example.org", ["192.0.2.2"], resource="service/prod/web2")], view)
    rrsets = dict(view.records)
    for c in p.changes:
        effect(rrsets, c)
    after = read_zone("example.org", rrsets, M)
    assert after.records[("web.example.org", "A")].values == ("192.0.2.2",)
    assert after.owners[("web.example.org", "A")].resource == "service/prod/web2"
    assert plan_of([E("web.example.org", ["192.0.2.2"], resource="service/prod/web2")], after).changes == []


def test_a_batch_too_big_for_one_message_is_halved():
    desired = [E(f"service-with-a-long-name-{i}.example.org", [f"192.0.{i // 250}.{i % 250}"]) for i in range(1000)]
    p = plan_of(desired, zone({}))
    fake = FakeServer()
    result = provider(fake, batch=1000).apply("example.org", p.changes)
    assert len(result.applied) == 1000 and 2 < result.messages <= 8
    assert all(len(m.to_wire()) <= 65535 for m in fake.sent)


def test_a_change_the_server_fails_does_not_hold_up_the_others():
    p = plan_of([E(f"s{i}.example.org", [f"192.0.2.{i}"]) for i in range(1, 41)], zone({}))
    result = provider(FakeServer(broken={"s9.example.org"}), batch=20).apply("example.org", p.changes)
    assert len(result.applied) == 39
    [(change, why, _)] = result.failed
    assert change.name == "s9.example.org" and why.startswith("SERVFAIL")
    # a server failing everything: the first batch tells, nothing more is sent
    fake = FakeServer(broken={f"s{i}.example.org" for i in range(1, 41)})
    with pytest.raises(DNSServerError, match="failed with SERVFAIL"):
        provider(fake, batch=20).apply("example.org", p.changes)
    assert len(fake.sent) == 2 * 20 - 1
