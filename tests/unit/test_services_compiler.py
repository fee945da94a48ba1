"""Services + EndpointSlices -> desired frontends, without a kernel."""

from __future__ import annotations

from podnet.model.objects import EndpointSlice, Pod, Service
from podnet.services.compiler import collapse_v4, compile_services
from podnet.services.model import Backend, Frontend, HealthCheck, ServiceConfig

NODE = "n1"


def svc(name="web", ns="default", **spec) -> Service:
    spec.setdefault("ports", [{"port": 80, "targetPort": 8080}])
    spec.setdefault("clusterIP", "10.96.0.10")
    status = spec.pop("status", {})
    return Service.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": status})


def ep(ip, node=NODE, ready=None, serving=None, terminating=None, pod=None):
    cond = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None}
    out = {"addresses": [ip], "conditions": cond, "nodeName": node}
    if pod:
        out["targetRef"] = {"kind": "Pod", "name": pod}
    return out


_SEQ = iter(range(1_000_000))


def eps(service="web", *endpoints, ns="default", ports=None, name=None, address_type="IPv4") -> EndpointSlice:
    body = {
        "metadata": {"name": name or f"{service}-{next(_SEQ)}", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": list(endpoints),
    }
    if ports is not None:
        body["ports"] = ports
    return EndpointSlice.model_validate(body)


def compile_(services, slices, **kw):
    return compile_services(services, slices, NODE, kw.pop("node_ips", ["192.168.1.10"]), **kw)


def test_clusterip_balances_over_ready_endpoints_in_a_stable_order():
    st = compile_([svc()], [eps("web", ep("10.1.0.30"), ep("10.1.0.4"), ep("10.1.0.20", ready=False))])
    (rule,) = st.rules
    assert rule.frontend == Frontend("10.96.0.10", "tcp", 80)
    assert rule.kind == "ClusterIP" and not rule.masquerade and rule.affinity_timeout is None
    assert rule.backends == (Backend("10.1.0.4", 8080), Backend("10.1.0.30", 8080))  # numeric, not text, order
    assert rule.service == "default/web:"


def test_terminating_endpoints_serve_only_when_nothing_is_ready():
    terminating = ep("10.1.0.5", ready=False, serving=True, terminating=True)
    gone = ep("10.1.0.6", ready=False, serving=False, terminating=True)
    st = compile_([svc()], [eps("web", terminating, gone)])
    assert st.rules[0].backends == (Backend("10.1.0.5", 8080),)
    st = compile_([svc()], [eps("web", terminating, ep("10.1.0.7"))])
    assert st.rules[0].backends == (Backend("10.1.0.7", 8080),)
    st = compile_([svc()], [eps("web", gone)])
    assert st.rules[0].backends == () and st.rules[0].no_endpoints == "reject"


def test_no_endpoints_rejects_and_only_matching_slices_count():
    other_ns = eps("web", ep("10.1.0.9"), ns="other")
    other_svc = eps("db", ep("10.1.0.8"))
    st = compile_([svc()], [other_ns, other_svc])
    assert st.rules[0].backends == () and st.rules[0].no_endpoints == "reject"


def test_multiple_ports_protocols_and_named_target_ports_per_endpoint():
    s = svc(ports=[
        {"name": "http", "port": 80, "targetPort": "web"},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "sig", "port": 9000, "protocol": "SCTP", "targetPort": 9000},
    ])
    # the two pods expose their "web" port on different numbers: two slices
    a = eps("web", ep("10.1.0.1"), name="web-a", ports=[
        {"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "sig", "port": 9000, "protocol": "SCTP"}])
    b = eps("web", ep("10.1.0.2"), name="web-b", ports=[
        {"name": "http", "port": 9090}, {"name": "dns", "port": 5353, "protocol": "UDP"}])
    st = compile_([s], [a, b])
    by_fe = st.frontends
    assert by_fe[Frontend("10.96.0.10", "tcp", 80)].backends == (Backend("10.1.0.1", 8080), Backend("10.1.0.2", 9090))
    assert by_fe[Frontend("10.96.0.10", "udp", 53)].backends == (Backend("10.1.0.1", 5353), Backend("10.1.0.2", 5353))
    # slice b does not list the SCTP port: its endpoint is not a backend of that port
    assert by_fe[Frontend("10.96.0.10", "sctp", 9000)].backends == (Backend("10.1.0.1", 9000),)
    assert by_fe[Frontend("10.96.0.10", "tcp", 80)].service == "default/web:http"


def test_named_target_port_falls_back_to_the_pod_when_the_slice_has_no_ports():
    s = svc(ports=[{"port": 80, "targetPort": "web"}])
    pod = Pod.model_validate({"metadata": {"name": "p1"}, "spec": {"containers": [
        {"name": "c", "ports": [{"name": "web", "containerPort": 7070}]}]}})
    st = compile_([s], [eps("web", ep("10.1.0.1", pod="p1"), ep("10.1.0.2", pod="unknown"))], pods=[pod])
    assert st.rules[0].backends == (Backend("10.1.0.1", 7070),)


def test_duplicate_endpoints_across_slices_are_one_backend():
    st = compile_([svc()], [eps("web", ep("10.1.0.1", ready=False), name="a"), eps("web", ep("10.1.0.1"), name="b")])
    assert st.rules[0].backends == (Backend("10.1.0.1", 8080),)


def test_nodeport_is_masqueraded_under_cluster_policy():
    s = svc(type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}])
    st = compile_([s], [eps("web", ep("10.1.0.1", node="n2"))])
    np = st.rule(Frontend(None, "tcp", 30080))
    assert np is not None and np.kind == "NodePort" and np.masquerade
    assert np.backends == (Backend("10.1.0.1", 8080),)
    assert st.node_ips == ("192.168.1.10",)


def test_external_traffic_policy_local_uses_local_endpoints_keeps_source_and_drops_without():
    s = svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
            ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}})
    local, remote = ep("10.1.0.1"), ep("10.1.0.2", node="n2")
    st = compile_([s], [eps("web", local, remote)])
    np = st.rule(Frontend(None, "tcp", 30080))
    lb = st.rule(Frontend("203.0.113.7", "tcp", 80))
    cip = st.rule(Frontend("10.96.0.10", "tcp", 80))
    assert np.backends == lb.backends == (Backend("10.1.0.1", 8080),)
    assert not np.masquerade and not lb.masquerade
    assert len(cip.backends) == 2  # ClusterIP traffic still uses every endpoint
    assert st.health_checks == (HealthCheck(32000, "default", "web", 1),)
    # no local endpoint: external traffic is dropped (not rejected), the health check says 0
    st = compile_([s], [eps("web", remote)])
    np = st.rule(Frontend(None, "tcp", 30080))
    assert np.backends == () and np.no_endpoints == "drop"
    assert st.health_checks[0].local_endpoints == 0
    # no endpoint anywhere: reject
    st = compile_([s], [])
    assert st.rule(Frontend(None, "tcp", 30080)).no_endpoints == "reject"


def test_internal_traffic_policy_local():
    s = svc(internalTrafficPolicy="Local")
    st = compile_([s], [eps("web", ep("10.1.0.1"), ep("10.1.0.2", node="n2"))])
    assert st.rules[0].backends == (Backend("10.1.0.1", 8080),)
    st = compile_([s], [eps("web", ep("10.1.0.2", node="n2"))])
    assert st.rules[0].backends == () and st.rules[0].no_endpoints == "drop"


def test_external_ips_and_load_balancer_source_ranges():
    s = svc(type="LoadBalancer", externalIPs=["198.51.100.5"],
            loadBalancerSourceRanges=["10.0.0.0/8", "10.1.0.0/16", "192.0.2.1/32", "2001:db8::/32"],
            ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})
    st = compile_([s], [eps("web", ep("10.1.0.1"))])
    ext = st.rule(Frontend("198.51.100.5", "tcp", 80))
    lb = st.rule(Frontend("203.0.113.7", "tcp", 80))
    assert ext.kind == "ExternalIP" and ext.masquerade and ext.source_ranges == ()
    assert lb.kind == "LoadBalancer" and lb.source_ranges == ("10.0.0.0/8", "192.0.2.1/32")


def test_session_affinity_timeout_on_every_frontend():
    s = svc(type="NodePort", sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}])
    st = compile_([s], [eps("web", ep("10.1.0.1"))])
    assert {r.affinity_timeout for r in st.rules} == {60}
    st = compile_([svc(sessionAffinity="ClientIP")], [eps("web", ep("10.1.0.1"))])
    assert st.rules[0].affinity_timeout == 10800


def test_headless_external_name_unallocated_and_ipv6_are_skipped():
    headless = svc("h", clusterIP="None")
    ext = Service.model_validate({"metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "a.b"}})
    unallocated = svc("u", clusterIP=None)
    v6 = svc("v6", clusterIP="fd00::10")
    st = compile_([headless, ext, unallocated, v6],
                  [eps("h", ep("10.1.0.1")), eps("v6", ep("fd00::1"), address_type="IPv6")])
    assert st.rules == ()


def test_two_services_on_one_frontend_first_by_name_wins():
    a, b = svc("a"), svc("b")
    st = compile_([b, a], [eps("a", ep("10.1.0.1")), eps("b", ep("10.1.0.2"))])
    assert len(st.rules) == 1 and st.rules[0].service == "default/a:"


def test_config_and_state_equality():
    cfg = ServiceConfig(service_cidrs=("10.96.0.0/16", "10.96.128.0/17", "fd00::/108"))
    one = compile_([svc()], [eps("web", ep("10.1.0.1"))], config=cfg)
    two = compile_([svc()], [eps("web", ep("10.1.0.1"))], config=cfg)
    assert one == two and hash(one.rules) == hash(two.rules)
    assert one.service_cidrs == ("10.96.0.0/16",)
    assert collapse_v4(["10.0.0.1/32", "10.0.0.0/31", "bad"]) == ("10.0.0.0/31",)


def test_incremental_compiler_matches_the_pure_function_and_reuses_rules():
    from podnet.services.compiler import ServiceCompiler

    services = [svc(f"s{i}", clusterIP=f"10.96.0.{i + 1}") for i in range(5)]
    slices = [eps(f"s{i}", ep(f"10.1.0.{i + 1}"), name=f"s{i}-a") for i in range(5)]
    c = ServiceCompiler(NODE, ["192.168.1.10"])
    for s in services:
        c.set_service(s)
    for sl in slices:
        c.set_slice(sl)
    first = c.state()
    assert first == compile_(services, slices) and c.recompiled == 5
    assert c.state() is first and c.recompiled == 0  # nothing changed: the same state object
    # one endpoint change: one Service recompiled, the others' rules are the same objects
    changed = eps("s2", ep("10.1.0.99"), name="s2-a")
    c.set_slice(changed)
    second = c.state()
    assert c.recompiled == 1
    assert second == compile_(services, [*slices[:2], changed, *slices[3:]])
    assert second.rule(Frontend("10.96.0.1", "tcp", 80)) is first.rule(Frontend("10.96.0.1", "tcp", 80))
    # a second Service on the same frontend waits behind the first by name, and takes over when it goes
    clash = svc("a-first", clusterIP="10.96.0.5")
    c.set_service(clash)
    assert c.state().rule(Frontend("10.96.0.5", "tcp", 80)).service == "default/a-first:"
    c.delete_service("default", "a-first")
    assert c.state().rule(Frontend("10.96.0.5", "tcp", 80)).service == "default/s4:"
    c.delete_slice("default", "s2-a")
    c.delete_service("default", "s0")
    assert c.state() == compile_(services[1:], [s for s in slices if s.name not in ("s2-a",)])
    # whole lists work too
    c2 = ServiceCompiler(NODE, ["192.168.1.10"])
    assert c2.compile(services, slices) == first
    assert c2.compile(services[:3], slices) == compile_(services[:3], slices)


def test_compiler_states_carry_what_changed_so_diffs_cost_the_change():
    from podnet.services import nftables as nt
    from podnet.services.compiler import ServiceCompiler

    c = ServiceCompiler(NODE)
    for i in range(50):
        c.set_service(svc(f"s{i}", clusterIP=f"10.96.0.{i + 1}"))
        c.set_slice(eps(f"s{i}", ep(f"10.1.0.{i + 1}"), name=f"s{i}-a"))
    one = c.state()
    c.set_slice(eps("s7", ep("10.1.0.200"), name="s7-a"))
    two = c.state()
    assert two.changed_since(one) == {Frontend("10.96.0.8", "tcp", 80)}
    assert two.changed_since(two) is None
    assert nt.state_delta(one, two) == nt.diff(nt.elements(one), nt.elements(two))


def test_the_first_clusterip_frontend_owns_the_address_and_affinity_keys_follow_the_endpoint_choice():
    s = svc(type="LoadBalancer", externalIPs=["198.51.100.1"], sessionAffinity="ClientIP",
            externalTrafficPolicy="Local",
            ports=[{"name": "a", "port": 80, "targetPort": 8080, "nodePort": 30080},
                   {"name": "b", "port": 81, "targetPort": 8080, "nodePort": 30081}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}})
    st = compile_services([s], [eps("web", ep("10.1.0.1", node="n2"), ep("10.1.0.2", node="n2"),
                                    ports=[{"name": "a", "port": 8080}, {"name": "b", "port": 8080}])], NODE)
    owners = [r.frontend for r in st.rules if r.owns_cluster_ip]
    assert owners == [Frontend("10.96.0.10", "tcp", 80)]  # one owner per address: the first port's
    by_port: dict[int, set[int]] = {}
    for r in st.rules:
        assert r.affinity_key
        if r.kind != "ClusterIP":
            by_port.setdefault(r.frontend.port if r.frontend.ip else r.frontend.port - 30000, set()).add(r.affinity_key)
            # Local, no local endpoint: dropped for external clients, every endpoint for this node's pods
            assert r.backends == () and r.no_endpoints == "drop"
            assert r.short_circuit == (Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080))
        else:
            assert r.short_circuit == ()
    assert all(len(keys) == 1 for keys in by_port.values()) and by_port[80] != by_port[81]
    cluster = {r.frontend.port: r.affinity_key for r in st.rules if r.kind == "ClusterIP"}
    assert cluster[80] not in by_port[80]  # ClusterIP: every endpoint; the others: local ones only
    # one policy for both: one key per port across every frontend
    s = s.model_copy(update={"spec": s.spec.model_copy(update={"external_traffic_policy": "Cluster"})})
    st = compile_services([s], [eps("web", ep("10.1.0.1", node="n2"),
                                    ports=[{"name": "a", "port": 8080}, {"name": "b", "port": 8080}])], NODE)
    keys: dict[int, set[int]] = {}
    for r in st.rules:
        port = r.frontend.port if r.frontend.ip else r.frontend.port - 30000
        keys.setdefault(port, set()).add(r.affinity_key)
        assert r.short_circuit == ()
    assert [len(v) for v in keys.values()] == [1, 1] and keys[80] != keys[81]
