"""The agent decodes stored Pods straight into the records its dataplanes keep, without
the models: the records must say what the models would say, and a stored value with the
wrong shape is skipped and reported, never fatal."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podnet.agent.cache import ObjectCache
from podnet.agent.records import pod_record
from podnet.dns.index import ClusterIndex
from podnet.model.objects import Pod
from podnet.policy.model import LiveInputs, pod_info
from podnet.store.base import Event
from podnet.store.objects import ObjectEvent, stored_form

names = st.sampled_from(["a", "web", "api-1"])
ipv4 = st.sampled_from(["10.1.0.5", "10.1.0.6"])
ipv6 = st.sampled_from(["fd00::5", "fd00::6"])


@st.composite
def pods(draw) -> Pod:
    status: dict = {}
    if draw(st.booleans()):
        status["podIP"] = draw(st.one_of(ipv4, ipv6))
    if draw(st.booleans()):
        status["podIPs"] = [{"ip": ip} for ip in draw(st.lists(st.one_of(ipv4, ipv6), max_size=2))]
    if draw(st.booleans()):
        status["phase"] = draw(st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]))
    containers = [{"name": f"c{i}", "ports": [
        {"containerPort": draw(st.integers(1, 65535)), **({"name": draw(names)} if draw(st.booleans()) else {}),
         **({"protocol": draw(st.sampled_from(["TCP", "UDP"]))} if draw(st.booleans()) else {})}
        for _ in range(draw(st.integers(0, 2)))]} for i in range(draw(st.integers(0, 2)))]
    spec: dict = {"containers": containers}
    if draw(st.booleans()):
        spec["nodeName"] = draw(st.sampled_from(["node-1", "node-2"]))
    if draw(st.booleans()):
        spec["hostNetwork"] = draw(st.booleans())
    meta: dict = {"name": draw(names), "labels": draw(st.dictionaries(names, names, max_size=3))}
    if draw(st.booleans()):
        meta["namespace"] = draw(st.sampled_from(["default", "prod"]))
    return Pod.model_validate({"metadata": meta, "spec": spec, "status": status})


@settings(max_examples=300, deadline=None)
@given(pods())
def test_a_pod_record_says_what_the_model_says(pod):
    from_model = pod_info(pod)
    record = pod_record(stored_form(pod))
    assert record == from_model
    assert (record.ips, record.key, record.label_map) == (from_model.ips, from_model.key, from_model.label_map)


def pod_value(**status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "prod", "labels": {"app": "a"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}]}]}, "status": status}


def test_policy_and_dns_take_the_same_record():
    cache = ObjectCache(records=True)
    ev = cache.apply(Event("ADDED", "/podnet/objects/Pod/prod/p", pod_value(podIP="10.1.0.5", podIPs=[
        {"ip": "10.1.0.5"}, {"ip": "fd00::5"}]), 7))
    assert ev.object.ip == "10.1.0.5" and ev.object.ips == ("10.1.0.5", "fd00::5")
    live = LiveInputs("node-1")
    assert live.on_event("Pod", ev.object.key, ev.object)
    inputs, _ = live.take()
    assert inputs.pods["prod/p"] is ev.object
    index = ClusterIndex(zone="cluster.local", node_name="node-1", pod_records="verified")
    index.apply_event(ev)
    assert index.local_pods == {"10.1.0.5": "prod", "fd00::5": "prod"}
    index.apply_event(ObjectEvent("DELETED", None, ev.key, 8))
    assert index.local_pods == {}


@pytest.mark.parametrize("bad, field", [
    ({"metadata": {"namespace": "prod"}}, "field 'name' missing"),
    ({"spec": {"containers": "c"}}, ""),
    ({"spec": {"containers": [{"ports": [{"name": "http", "containerPort": "eighty"}]}]}}, "eighty"),
    ({"status": {"podIPs": [{"address": "10.1.0.5"}]}}, "field 'ip' missing"),
])
def test_a_pod_without_the_shape_is_skipped_and_named(bad, field, caplog):
    value = pod_value(podIP="10.1.0.5")
    for part, content in bad.items():
        value[part] = {**value[part], **content} if part != "metadata" else content
    cache = ObjectCache(records=True)
    with caplog.at_level(logging.WARNING, logger="podnet.agent"):
        ev = cache.apply(Event("MODIFIED", "/podnet/objects/Pod/prod/p", value, 9))
    assert (ev.type, ev.object) == ("DELETED", None)
    assert "skipping /podnet/objects/Pod/prod/p: stored Pod does not have the expected shape" in caplog.text
    assert field in caplog.text


SLICES = [
    {"addressType": "IPv4", "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "UDP"}],
     "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": False, "serving": True, "terminating": True},
                    "nodeName": "node-1", "hostname": "Web-0"},
                   {"addresses": ["10.1.0.5"]}]},
    {"addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.9"], "targetRef": {"kind": "Pod", "name": "p"}}]},
    {"addressType": "IPv6", "ports": [], "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": True}}]},
    {"addressType": "FQDN", "endpoints": [{"addresses": ["db.example.org"]}]},
]


@pytest.mark.parametrize("body", SLICES)
def test_a_slice_record_from_the_store_is_the_one_from_the_model(body):
    from podnet.model.objects import EndpointSlice
    from podnet.model.records import SliceRecord, slice_record_of
    from podnet.services.compiler import SliceInfo

    sl = EndpointSlice.model_validate({"metadata": {"name": "web-x", "namespace": "prod", "resourceVersion": "42",
                                                    "labels": {"kubernetes.io/service-name": "web"}}, **body})
    ev = ObjectCache(records=True).apply(Event("ADDED", "/podnet/objects/EndpointSlice/prod/web-x",
                                               stored_form(sl), 42))
    assert isinstance(ev.object, SliceRecord)
    from_model = slice_record_of(sl)
    assert {k: getattr(ev.object, k) for k in SliceRecord.__slots__} == \
        {k: getattr(from_model, k) for k in SliceRecord.__slots__}
    stored, model = SliceInfo(ev.object, "node-1"), SliceInfo(sl, "node-1")
    assert {k: getattr(stored, k) for k in SliceInfo.__slots__} == {k: getattr(model, k) for k in SliceInfo.__slots__}


def test_a_slice_without_the_shape_is_skipped_and_named(caplog):
    value = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s"},
             "addressType": "IPv4", "endpoints": [{"addresses": []}]}
    with caplog.at_level(logging.WARNING, logger="podnet.agent"):
        ev = ObjectCache(records=True).apply(Event("ADDED", "/podnet/objects/EndpointSlice/default/s", value, 3))
    assert (ev.type, ev.object) == ("DELETED", None)
    assert "stored EndpointSlice does not have the expected shape: an endpoint without addresses" in caplog.text


@st.composite
def services(draw) -> dict:
    """A Service as a user or the API server writes it: defaults left out or spelt out."""
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", None]))
    spec: dict = {}
    if kind:
        spec["type"] = kind
    ports = []
    for i in range(draw(st.integers(1, 3))):
        p: dict = {"name": f"p{i}", "port": 80 + i}
        if draw(st.booleans()):
            p["protocol"] = draw(st.sampled_from(["TCP", "UDP"]))
        target = draw(st.sampled_from([None, 8080 + i, "http"]))
        if target is not None:
            p["targetPort"] = target
        if kind in ("NodePort", "LoadBalancer") and draw(st.booleans()):
            p["nodePort"] = 30000 + i
        ports.append(p)
    spec["ports"] = ports
    spec["clusterIP"] = draw(st.sampled_from(["10.96.0.10", "None"]))
    if spec["clusterIP"] != "None" and draw(st.booleans()):
        spec["clusterIPs"] = [spec["clusterIP"]]
    if draw(st.booleans()):
        spec["sessionAffinity"] = draw(st.sampled_from(["None", "ClientIP"]))
        if draw(st.booleans()):
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 60}} if draw(st.booleans()) else {}
    if kind in ("NodePort", "LoadBalancer") and draw(st.booleans()):
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
        if spec["externalTrafficPolicy"] == "Local" and draw(st.booleans()):
            spec["healthCheckNodePort"] = 32000
    if draw(st.booleans()):
        spec["internalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    if draw(st.booleans()):
        spec["externalIPs"] = ["192.0.2.7"]
    if kind == "LoadBalancer" and draw(st.booleans()):
        spec["loadBalancerSourceRanges"] = [draw(st.sampled_from(["10.0.0.0/8", "10.1.2.3/16", " 192.0.2.0/24"]))]
    if draw(st.booleans()):
        spec["publishNotReadyAddresses"] = draw(st.booleans())
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": draw(st.sampled_from(["default", "prod"]))}, "spec": spec}
    if kind == "LoadBalancer" and draw(st.booleans()):
        body["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}, {"hostname": "lb.example"}]}}
    return body


@settings(max_examples=300, deadline=None)
@given(services())
def test_a_service_record_from_the_store_says_what_the_model_says(body):
    """The agent decodes stored Services without the model: every field the Service
    compiler and DNS read, with the defaults the model applies, must be the model's."""
    from podnet.model.objects import Service
    from podnet.model.records import ServiceRecord

    svc = Service.model_validate(body)
    ev = ObjectCache(records=True).apply(Event("ADDED", f"/podnet/objects/Service/{svc.namespace}/web", body, 7))
    rec = ev.object
    assert isinstance(rec, ServiceRecord)
    spec = svc.spec
    affinity = spec.session_affinity_config.client_ip.timeout_seconds if spec.session_affinity == "ClientIP" else None
    assert (rec.namespace, rec.name, rec.version, rec.type, rec.cluster_ip, rec.headless) == \
        (svc.namespace, "web", "7", spec.type, spec.cluster_ip, spec.headless)
    assert rec.cluster_ips == tuple(spec.cluster_ips or ())
    assert rec.ports == tuple((p.name, p.protocol, p.port, p.node_port, p.target_port) for p in spec.ports)
    assert (rec.external_policy, rec.internal_policy, rec.affinity, rec.health_check_node_port,
            rec.publish_not_ready) == (spec.external_traffic_policy, spec.internal_traffic_policy, affinity,
                                       spec.health_check_node_port, spec.publish_not_ready_addresses)
    assert rec.external_ips == tuple(spec.external_ips)
    assert rec.source_ranges == tuple(spec.load_balancer_source_ranges)
    assert rec.lb_ips == tuple(i.ip for i in svc.status.load_balancer.ingress if i.ip)


def test_the_compiler_and_dns_read_a_stored_service_as_the_model():
    """What the Service compiler and the DNS index make of a Service decoded from the store
    is what they make of the model."""
    from podnet.model.objects import Service
    from podnet.services.compiler import ServiceInfo

    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "loadBalancerSourceRanges": ["10.1.2.3/16"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}}}
    record = ObjectCache(records=True).apply(Event("ADDED", "/podnet/objects/Service/prod/web", body, 7)).object
    model = Service.model_validate({**body, "metadata": {**body["metadata"], "resourceVersion": "7"}})
    stored, modeled = ServiceInfo(record), ServiceInfo(model)
    assert stored.problem is None
    assert {k: getattr(stored, k) for k in ServiceInfo.__slots__} == \
        {k: getattr(modeled, k) for k in ServiceInfo.__slots__}
    assert (stored.affinity, stored.health_port, stored.lb_ips, stored.source_ranges) == \
        (10800, 32000, ("198.51.100.4",), ("10.1.0.0/16",))
    dns_stored, dns_model = ClusterIndex("cluster.local"), ClusterIndex("cluster.local")
    dns_stored.apply(record)
    dns_model.apply(model)
    assert dns_stored._svc == dns_model._svc
    assert dns_stored._svc["prod"]["web"][2]  # its named ports


def test_a_service_without_the_shape_is_skipped_and_named(caplog):
    value = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"name": "x"}]}}
    with caplog.at_level(logging.WARNING, logger="podnet.agent"):
        ev = ObjectCache(records=True).apply(Event("ADDED", "/podnet/objects/Service/default/web", value, 3))
    assert (ev.type, ev.object) == ("DELETED", None)
    assert "/podnet/objects/Service/default/web" in caplog.text
    assert "stored Service does not have the expected shape: field 'port' missing" in caplog.text
