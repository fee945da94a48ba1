"""Record semantics of the cluster DNS index (Kubernetes DNS specification)."""

from __future__ import annotations

import pytest
from tests.support.dns import make_endpoint, make_pod, make_service, make_slice

from podnet.dns import wire
from podnet.dns.index import ClusterIndex
from podnet.model.objects import Namespace
from podnet.store.objects import ObjectEvent

NOERROR, NXDOMAIN = 0, 3


svc, eps, ep, pod = make_service, make_slice, make_endpoint, make_pod


def values(ans, section="answer"):
    return sorted(r[3] for r in ans.records(section))


def is_nxdomain(ans):
    return ans.rcode == NXDOMAIN and not ans.answer and [r[1] for r in ans.records("authority")] == ["SOA"]


def is_nodata(ans):
    return ans.rcode == NOERROR and not ans.answer and [r[1] for r in ans.records("authority")] == ["SOA"]


@pytest.fixture
def idx():
    i = ClusterIndex()
    i.apply(svc("web", ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]))
    i.apply(svc("plain", cluster_ip="10.96.0.11", ports=[{"port": 8080}]))
    i.apply(svc("db", cluster_ip="None", ports=[{"name": "pg", "port": 5432}]))
    i.apply(eps("db-a", "db", [ep("10.244.0.5", "db-0"), ep("10.244.0.6"), ep("10.244.0.7", "db-2", ready=False)],
                ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}]))
    return i


# ---------------------------------------------------------------- ClusterIP


def test_clusterip_a_record(idx):
    ans = idx.lookup("web.prod.svc.cluster.local", "A")
    assert ans.rcode == NOERROR
    assert ans.records() == [("@", "A", 5, "10.96.0.10")]
    assert not ans.authority


def test_ipv4_only_name_gives_nodata_for_aaaa(idx):
    assert is_nodata(idx.lookup("web.prod.svc.cluster.local", "AAAA"))
    assert is_nodata(idx.lookup("web.prod.svc.cluster.local", "TXT"))


def test_srv_for_named_ports_only(idx):
    ans = idx.lookup("_http._tcp.web.prod.svc.cluster.local", "SRV")
    assert ans.records() == [("@", "SRV", 5, "0 100 80 web.prod.svc.cluster.local.")]
    assert ans.records("additional") == [("web.prod.svc.cluster.local.", "A", 5, "10.96.0.10")]
    udp = idx.lookup("_dns._udp.web.prod.svc.cluster.local", "SRV")
    assert values(udp) == ["0 100 53 web.prod.svc.cluster.local."]
    # wrong protocol, unknown port, unnamed port: no such name
    assert is_nxdomain(idx.lookup("_http._udp.web.prod.svc.cluster.local", "SRV"))
    assert is_nxdomain(idx.lookup("_nope._tcp.web.prod.svc.cluster.local", "SRV"))
    assert is_nxdomain(idx.lookup("_tcp.plain.prod.svc.cluster.local", "SRV"))
    # the SRV name exists, so other types are NODATA
    assert is_nodata(idx.lookup("_http._tcp.web.prod.svc.cluster.local", "A"))


def test_protocol_label_is_an_empty_non_terminal(idx):
    assert is_nodata(idx.lookup("_tcp.web.prod.svc.cluster.local", "SRV"))
    assert is_nodata(idx.lookup("_udp.web.prod.svc.cluster.local", "A"))
    assert is_nxdomain(idx.lookup("_sctp.web.prod.svc.cluster.local", "SRV"))


def test_clusterip_has_no_endpoint_names(idx):
    assert is_nxdomain(idx.lookup("10-244-0-5.web.prod.svc.cluster.local", "A"))
    assert is_nxdomain(idx.lookup("a.b.web.prod.svc.cluster.local", "A"))


def test_ptr_for_cluster_ip(idx):
    ans = idx.lookup("10.0.96.10.in-addr.arpa", "PTR")
    assert ans.records() == [("@", "PTR", 5, "web.prod.svc.cluster.local.")]
    assert idx.lookup("99.0.96.10.in-addr.arpa", "PTR") is None  # not ours: forwarded


def test_dual_stack_service():
    i = ClusterIndex()
    i.apply(svc("ds", cluster_ip="10.96.0.20", clusterIPs=["10.96.0.20", "fd00::20"]))
    assert values(i.lookup("ds.prod.svc.cluster.local", "A")) == ["10.96.0.20"]
    assert values(i.lookup("ds.prod.svc.cluster.local", "AAAA")) == ["fd00::20"]
    ptr6 = wire.wire_to_text(wire.reverse_name(wire.rdata_a("fd00::20")))
    assert values(i.lookup(ptr6, "PTR")) == ["ds.prod.svc.cluster.local."]


# ---------------------------------------------------------------- headless


def test_headless_a_per_ready_endpoint(idx):
    ans = idx.lookup("db.prod.svc.cluster.local", "A")
    assert values(ans) == ["10.244.0.5", "10.244.0.6"]


def test_headless_hostname_records(idx):
    assert values(idx.lookup("db-0.db.prod.svc.cluster.local", "A")) == ["10.244.0.5"]
    # no hostname: named by its dashed address
    assert values(idx.lookup("10-244-0-6.db.prod.svc.cluster.local", "A")) == ["10.244.0.6"]
    # not ready: no record
    assert is_nxdomain(idx.lookup("db-2.db.prod.svc.cluster.local", "A"))
    assert is_nodata(idx.lookup("db-0.db.prod.svc.cluster.local", "AAAA"))


def test_headless_srv_per_endpoint_and_port(idx):
    ans = idx.lookup("_pg._tcp.db.prod.svc.cluster.local", "SRV")
    assert values(ans) == ["0 50 5432 10-244-0-6.db.prod.svc.cluster.local.",
                           "0 50 5432 db-0.db.prod.svc.cluster.local."]
    assert sorted((r[0], r[3]) for r in ans.records("additional")) == [
        ("10-244-0-6.db.prod.svc.cluster.local.", "10.244.0.6"), ("db-0.db.prod.svc.cluster.local.", "10.244.0.5")]


def test_headless_srv_n_times_m():
    i = ClusterIndex()
    i.apply(svc("h", cluster_ip="None", ports=[{"name": "a", "port": 1}, {"name": "b", "port": 2}]))
    i.apply(eps("h-1", "h", [ep(f"10.1.0.{n}", f"h-{n}") for n in range(1, 4)],
                ports=[{"name": "a", "port": 1001}, {"name": "b", "port": 1002}]))
    for port, number in (("a", 1001), ("b", 1002)):
        ans = i.lookup(f"_{port}._tcp.h.prod.svc.cluster.local", "SRV")
        assert values(ans) == [f"0 33 {number} h-{n}.h.prod.svc.cluster.local." for n in range(1, 4)]


def test_headless_without_ready_endpoints_is_nxdomain():
    i = ClusterIndex()
    i.apply(svc("h", cluster_ip="None"))
    assert is_nxdomain(i.lookup("h.prod.svc.cluster.local", "A"))
    i.apply(eps("h-1", "h", [ep("10.1.0.1", ready=False)]))
    assert is_nxdomain(i.lookup("h.prod.svc.cluster.local", "A"))
    assert is_nxdomain(i.lookup("_http._tcp.h.prod.svc.cluster.local", "SRV"))
    i.apply(eps("h-1", "h", [ep("10.1.0.1", ready=True)]))
    assert values(i.lookup("h.prod.svc.cluster.local", "A")) == ["10.1.0.1"]


def test_publish_not_ready_addresses():
    i = ClusterIndex()
    i.apply(svc("h", cluster_ip="None", publishNotReadyAddresses=True))
    i.apply(eps("h-1", "h", [ep("10.1.0.1", ready=False)]))
    assert values(i.lookup("h.prod.svc.cluster.local", "A")) == ["10.1.0.1"]


def test_headless_ptr_for_ready_endpoints(idx):
    assert values(idx.lookup("5.0.244.10.in-addr.arpa", "PTR")) == ["db-0.db.prod.svc.cluster.local."]
    assert values(idx.lookup("6.0.244.10.in-addr.arpa", "PTR")) == ["10-244-0-6.db.prod.svc.cluster.local."]
    assert idx.lookup("7.0.244.10.in-addr.arpa", "PTR") is None  # not ready


def test_endpoint_in_two_headless_services_has_two_ptrs():
    i = ClusterIndex()
    for name in ("a", "b"):
        i.apply(svc(name, cluster_ip="None"))
        i.apply(eps(f"{name}-1", name, [ep("10.1.0.1", "x")]))
    assert values(i.lookup("1.0.1.10.in-addr.arpa", "PTR")) == ["x.a.prod.svc.cluster.local.",
                                                                 "x.b.prod.svc.cluster.local."]
    i.remove_key("Service", "prod", "a")
    assert values(i.lookup("1.0.1.10.in-addr.arpa", "PTR")) == ["x.b.prod.svc.cluster.local."]


def test_ipv6_headless_endpoints():
    i = ClusterIndex()
    i.apply(svc("h6", cluster_ip="None"))
    i.apply(eps("h6-1", "h6", [ep("fd00::5")], address_type="IPv6"))
    assert values(i.lookup("h6.prod.svc.cluster.local", "AAAA")) == ["fd00::5"]
    assert is_nodata(i.lookup("h6.prod.svc.cluster.local", "A"))
    name = "fd00-0000-0000-0000-0000-0000-0000-0005.h6.prod.svc.cluster.local"
    assert values(i.lookup(name, "AAAA")) == ["fd00::5"]


# ---------------------------------------------------------------- ExternalName, pods, zone


def test_external_name_is_a_cname_to_chase():
    i = ClusterIndex()
    i.apply(svc("ext", type="ExternalName", externalName="www.Example.test."))
    ans = i.lookup("ext.prod.svc.cluster.local", "A")
    assert ans.records() == [("@", "CNAME", 5, "www.example.test.")]
    assert ans.chase == wire.name_to_wire("www.example.test")
    assert i.lookup("ext.prod.svc.cluster.local", "CNAME").chase is None
    assert is_nxdomain(i.lookup("x.ext.prod.svc.cluster.local", "A"))


def test_pod_records_insecure_verified_disabled():
    i = ClusterIndex()
    i.apply(pod("p", "10.244.1.7"))
    assert values(i.lookup("1-2-3-4.prod.pod.cluster.local", "A")) == ["1.2.3.4"]
    assert is_nodata(i.lookup("1-2-3-4.prod.pod.cluster.local", "AAAA"))
    assert is_nxdomain(i.lookup("1-2-3-4.nons.pod.cluster.local", "A"))  # namespace unknown
    assert is_nxdomain(i.lookup("1-2-3-999.prod.pod.cluster.local", "A"))
    assert is_nodata(i.lookup("prod.pod.cluster.local", "A"))
    v = ClusterIndex(pod_records="verified")
    v.apply(pod("p", "10.244.1.7"))
    assert values(v.lookup("10-244-1-7.prod.pod.cluster.local", "A")) == ["10.244.1.7"]
    assert is_nxdomain(v.lookup("1-2-3-4.prod.pod.cluster.local", "A"))
    v.remove_key("Pod", "prod", "p")
    assert is_nxdomain(v.lookup("10-244-1-7.prod.pod.cluster.local", "A"))
    d = ClusterIndex(pod_records="disabled")
    d.apply(pod("p", "10.244.1.7"))
    assert is_nxdomain(d.lookup("10-244-1-7.prod.pod.cluster.local", "A"))


def test_no_ptr_for_pod_ips():
    # the specification has PTRs for ClusterIPs and headless endpoints only
    i = ClusterIndex()
    i.apply(pod("p", "10.244.1.7"))
    assert i.lookup("7.1.244.10.in-addr.arpa", "PTR") is None


def test_schema_version_apex_and_empty_non_terminals(idx):
    assert idx.lookup("dns-version.cluster.local", "TXT").records() == [("@", "TXT", 5, '"1.1.0"')]
    assert is_nodata(idx.lookup("dns-version.cluster.local", "A"))
    soa = idx.lookup("cluster.local", "SOA").records()
    assert soa[0][1] == "SOA" and soa[0][3].startswith("ns.dns.cluster.local. hostmaster.cluster.local. ")
    assert idx.lookup("cluster.local", "NS").records() == [("@", "NS", 5, "ns.dns.cluster.local.")]
    assert is_nodata(idx.lookup("cluster.local", "A"))
    assert is_nodata(idx.lookup("svc.cluster.local", "A"))
    assert is_nodata(idx.lookup("prod.svc.cluster.local", "A"))  # a namespace: exists only as a parent
    assert is_nxdomain(idx.lookup("nons.svc.cluster.local", "A"))
    assert is_nxdomain(idx.lookup("nothing.prod.svc.cluster.local", "A"))
    assert is_nxdomain(idx.lookup("whatever.cluster.local", "A"))
    assert idx.lookup("www.example.com", "A") is None  # not ours


def test_negative_answers_carry_the_soa_with_the_ttl():
    i = ClusterIndex(ttl=30)
    ans = i.lookup("nothing.svc.cluster.local", "A")
    (name, rtype, ttl, value), = ans.records("authority")
    assert (name, rtype, ttl) == ("cluster.local.", "SOA", 30)
    assert value.endswith(" 30")  # SOA minimum = negative TTL
    i.apply(svc("web"))
    assert i.lookup("web.prod.svc.cluster.local").records()[0][2] == 30


def test_namespace_objects_make_namespaces_exist():
    i = ClusterIndex()
    assert is_nxdomain(i.lookup("empty.svc.cluster.local", "A"))
    i.apply(Namespace.model_validate({"metadata": {"name": "empty"}}))
    assert is_nodata(i.lookup("empty.svc.cluster.local", "A"))
    i.remove_key("Namespace", None, "empty")
    assert is_nxdomain(i.lookup("empty.svc.cluster.local", "A"))


def test_case_insensitive(idx):
    assert values(idx.lookup("WEB.Prod.SVC.Cluster.LOCAL", "A")) == ["10.96.0.10"]
    assert values(idx.lookup("_HTTP._Tcp.web.PROD.svc.cluster.local", "SRV")) == ["0 100 80 web.prod.svc.cluster.local."]
    assert values(idx.lookup("DB-0.db.prod.svc.cluster.local", "A")) == ["10.244.0.5"]


def test_custom_zone():
    i = ClusterIndex(zone="corp.k8s.", ttl=30)
    i.apply(svc("web"))
    assert values(i.lookup("web.prod.svc.corp.k8s", "A")) == ["10.96.0.10"]
    assert i.lookup("web.prod.svc.cluster.local", "A") is None


# ---------------------------------------------------------------- incremental updates


def test_service_change_is_visible_right_away(idx):
    assert values(idx.lookup("web.prod.svc.cluster.local")) == ["10.96.0.10"]
    idx.apply(svc("web", cluster_ip="10.96.0.99"))
    assert values(idx.lookup("web.prod.svc.cluster.local")) == ["10.96.0.99"]
    assert values(idx.lookup("99.0.96.10.in-addr.arpa", "PTR")) == ["web.prod.svc.cluster.local."]
    assert idx.lookup("10.0.96.10.in-addr.arpa", "PTR") is None
    assert is_nxdomain(idx.lookup("_dns._udp.web.prod.svc.cluster.local", "SRV"))  # port gone
    idx.remove_key("Service", "prod", "web")
    assert is_nxdomain(idx.lookup("web.prod.svc.cluster.local"))
    assert idx.lookup("99.0.96.10.in-addr.arpa", "PTR") is None


def test_slice_before_service_and_slice_updates():
    i = ClusterIndex()
    i.apply(eps("h-1", "h", [ep("10.1.0.1", "a")]))
    assert is_nxdomain(i.lookup("h.prod.svc.cluster.local"))
    i.apply(svc("h", cluster_ip="None"))
    assert values(i.lookup("h.prod.svc.cluster.local")) == ["10.1.0.1"]
    assert values(i.lookup("1.0.1.10.in-addr.arpa", "PTR")) == ["a.h.prod.svc.cluster.local."]
    i.apply(eps("h-2", "h", [ep("10.1.0.2", "b")]))
    assert values(i.lookup("h.prod.svc.cluster.local")) == ["10.1.0.1", "10.1.0.2"]
    i.apply(eps("h-1", "h", [ep("10.1.0.3", "a")]))
    assert values(i.lookup("a.h.prod.svc.cluster.local")) == ["10.1.0.3"]
    assert i.lookup("1.0.1.10.in-addr.arpa", "PTR") is None
    i.remove_key("EndpointSlice", "prod", "h-2")
    assert values(i.lookup("h.prod.svc.cluster.local")) == ["10.1.0.3"]
    i.remove_key("Service", "prod", "h")
    assert i.lookup("3.0.1.10.in-addr.arpa", "PTR") is None
    assert i.stats()["endpoint_slices"] == 1  # kept until deleted: the Service may come back


def test_store_events_feed_the_index():
    i = ClusterIndex()
    s = svc("web")
    i.apply_event(ObjectEvent("ADDED", s, "/podnet/objects/Service/prod/web", 2))
    assert values(i.lookup("web.prod.svc.cluster.local")) == ["10.96.0.10"]
    i.apply_event(ObjectEvent("DELETED", None, "/podnet/objects/Service/prod/web", 3))
    assert is_nxdomain(i.lookup("web.prod.svc.cluster.local"))


def test_rendered_responses_are_dropped_when_their_objects_change(idx):
    key = wire.name_to_wire("web.prod.svc.cluster.local") + b"\x00\x01\x00\x01"
    other = wire.name_to_wire("db.prod.svc.cluster.local") + b"\x00\x01\x00\x01"
    gen = idx.generation
    assert idx.cache_response(key, ("prod", "web"), "entry-web", gen)
    assert idx.cache_response(other, ("prod", "db"), "entry-db", gen)
    idx.apply(svc("web", cluster_ip="10.96.0.99"))
    assert key not in idx.responses and other in idx.responses
    # a response compiled before a change is not stored
    assert not idx.cache_response(key, ("prod", "web"), "stale", gen)


def test_local_pods_follow_pod_objects():
    i = ClusterIndex(node_name="n1")
    i.apply(pod("a", "10.244.0.5", ns="team"))
    i.apply(pod("b", "10.244.9.5", node="n2"))
    assert i.local_pods == {"10.244.0.5": "team"}
    i.remove_key("Pod", "team", "a")
    assert i.local_pods == {}


def test_unchanged_apply_is_a_no_op(idx):
    gen = idx.generation
    idx.apply(svc("web", ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]))
    assert idx.generation == gen
