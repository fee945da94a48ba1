"""ServiceCompiler states share one live frontend index yet read as snapshots; the
compiler keeps compact records, not the objects it was fed."""

from __future__ import annotations

import gc
import weakref

from podnet.model.objects import EndpointSlice, Service
from podnet.services.compiler import ServiceCompiler, ServiceInfo, SliceInfo, compile_services
from podnet.services.model import Backend, Frontend, ServiceConfig, ServiceState

NODE = "n1"
CONFIG = ServiceConfig(service_cidrs=("10.96.0.0/16",))


def svc(name: str, ip: str, rv: str = "1", **spec) -> Service:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return Service.model_validate({"metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
                                   "spec": {"clusterIP": ip, **spec}})


def eps(name: str, service: str, addrs: list[str], rv: str = "1", node: str = "n2") -> EndpointSlice:
    return EndpointSlice.model_validate({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [a], "nodeName": node} for a in addrs]})


def fe(i: int) -> Frontend:
    return Frontend(f"10.96.0.{i}", "tcp", 80)


def fed(n: int = 20) -> tuple[ServiceCompiler, list[Service], list[EndpointSlice]]:
    services = [svc(f"s{i}", f"10.96.0.{i}") for i in range(1, n + 1)]
    slices = [eps(f"s{i}-a", f"s{i}", [f"10.1.0.{i}"]) for i in range(1, n + 1)]
    c = ServiceCompiler(NODE, ["192.168.1.10"], CONFIG)
    for s in services:
        c.set_service(s)
    for sl in slices:
        c.set_slice(sl)
    return c, services, slices


def pure(services, slices) -> ServiceState:
    return compile_services(services, slices, NODE, ["192.168.1.10"], CONFIG)


def test_an_older_state_still_reads_as_it_was():
    c, services, slices = fed()
    one = c.state()
    snapshot = dict(one.frontends.items())
    c.set_slice(eps("s3-a", "s3", ["10.1.0.99"], rv="2"))
    c.delete_service("default", "s4")
    c.set_service(svc("s21", "10.96.0.21"))
    two = c.state()
    c.set_slice(eps("s3-a", "s3", ["10.1.0.98"], rv="3"))
    three = c.state()
    # every state reads as what it was when made
    assert dict(one.frontends.items()) == snapshot and len(one.frontends) == len(snapshot)
    assert set(one.frontends) == set(snapshot) and set(one.rules) == set(snapshot.values())
    assert one.rule(fe(3)).backends == (Backend("10.1.0.3", 8080),)
    assert one.rule(fe(4)) is not None and fe(4) in one.frontends and one.rule(fe(21)) is None
    assert two.rule(fe(3)).backends == (Backend("10.1.0.99", 8080),) and two.rule(fe(4)) is None
    assert three.rule(fe(3)).backends == (Backend("10.1.0.98", 8080),)
    assert one == pure(services, slices)
    assert three == pure([s for s in services if s.name != "s4"] + [svc("s21", "10.96.0.21")],
                         [s for s in slices if s.name != "s3-a"] + [eps("s3-a", "s3", ["10.1.0.98"])])
    assert one != two and two != three and one != three
    # what changed, from any older state (a superset at most), in proportion to the change
    assert two.changed_since(one) == {fe(3), fe(4), fe(21)}
    assert three.changed_since(two) == {fe(3)}
    assert fe(3) in three.changed_since(one) and fe(1) not in three.changed_since(one)
    assert one.changed_since(three) is None  # newer than self: unknown
    assert three.previous == {fe(3): two.rule(fe(3))} and three.base is two


def test_a_sync_touches_the_change_not_the_cluster():
    c, _, _ = fed(200)
    one = c.state()
    c.set_slice(eps("s7-a", "s7", ["10.1.0.77"], rv="2"))
    two = c.state()
    assert c.recompiled == 1
    assert two.frontends is not one.frontends
    assert one._over == {fe(7): one.rule(fe(7))}  # the old state holds only the changed frontend
    assert two.rule(fe(8)) is one.rule(fe(8))


def test_recompiling_to_the_same_rules_keeps_the_state():
    c, services, slices = fed()
    one = c.state()
    c.set_service(svc("s5", "10.96.0.5", rv="2"))  # a new version, same content
    c.set_slice(eps("s5-a", "s5", ["10.1.0.5"], rv="2"))
    assert c.state() is one and c.recompiled == 1
    # whole lists: unchanged resourceVersions are not even recompiled
    assert c.compile([*services[:4], svc("s5", "10.96.0.5", rv="2"), *services[5:]],
                     [*slices[:4], eps("s5-a", "s5", ["10.1.0.5"], rv="2"), *slices[5:]]) is one
    assert c.recompiled == 0


def test_states_no_one_holds_are_not_kept_up_to_date():
    c, _, _ = fed()
    one = c.state()
    ref = weakref.ref(one)
    for i, ip in enumerate(("10.1.0.99", "10.1.0.98")):
        c.set_slice(eps("s3-a", "s3", [ip], rv=str(i + 2)))
        c.state()
        if i == 0:
            del one
    gc.collect()
    assert ref() is None  # only the current state keeps its base, one state back
    assert sum(r() is not None for r in c._states) == 2


def test_the_compiler_keeps_compact_records_not_objects():
    c = ServiceCompiler(NODE, ["192.168.1.10"], CONFIG)
    s, sl = svc("web", "10.96.0.10"), eps("web-1", "web", ["10.1.0.2", "10.1.0.1"], node=NODE)
    refs = [weakref.ref(s), weakref.ref(sl)]
    c.set_service(s)
    c.set_slice(sl)
    del s, sl
    gc.collect()
    assert [r() for r in refs] == [None, None]
    info = c.service_info("default", "web")
    assert isinstance(info, ServiceInfo) and info.version == "1"
    held = c.slice_info("default", "web-1")
    assert isinstance(held, SliceInfo) and held.backends == (Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080))
    assert c.state().rule(Frontend("10.96.0.10", "tcp", 80)).backends == held.backends


def test_local_policy_and_publish_not_ready_take_the_long_way_with_the_same_result():
    s = svc("web", "10.96.0.10", type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=32000,
            publishNotReadyAddresses=True,
            ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}])
    sl = EndpointSlice.model_validate({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.1.0.3"], "nodeName": NODE, "conditions": {"ready": False}},
                      {"addresses": ["10.1.0.1"], "nodeName": "n2"}]})
    c = ServiceCompiler(NODE, ["192.168.1.10"], CONFIG)
    st = c.compile([s], [sl])
    assert st == pure([s], [sl])
    assert st.rule(Frontend(None, "tcp", 30080)).backends == (Backend("10.1.0.3", 8080),)
    assert st.rule(Frontend("10.96.0.10", "tcp", 80)).backends == (Backend("10.1.0.1", 8080),
                                                                  Backend("10.1.0.3", 8080))
    assert st.health_checks[0].local_endpoints == 1


def test_random_changes_agree_with_the_pure_function_and_old_states_stay_snapshots():
    import random

    rnd = random.Random(7)
    c = ServiceCompiler(NODE, ["192.168.1.10"], CONFIG)
    services: dict[str, Service] = {}
    slices: dict[str, EndpointSlice] = {}
    held: list[tuple[ServiceState, dict]] = []  # states kept by someone, with what they read as when made
    rv = iter(range(2, 1_000_000))

    def random_service(name: str) -> Service:
        kind = rnd.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        ports = [{"name": "http", "port": 80, "targetPort": 8080}]
        if rnd.random() < 0.3:
            ports.append({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353})
        spec: dict = {"type": kind, "ports": ports}
        if kind != "ClusterIP":
            for i, p in enumerate(ports):
                p["nodePort"] = 30000 + rnd.randrange(5) * 2 + i  # NodePorts clash across Services
            if rnd.random() < 0.4:
                spec["externalTrafficPolicy"] = "Local"
                spec["healthCheckNodePort"] = 32000 + rnd.randrange(3)
        if rnd.random() < 0.2:
            spec["internalTrafficPolicy"] = "Local"
        if rnd.random() < 0.2:
            spec["externalIPs"] = [f"198.51.100.{rnd.randrange(3)}"]
        return svc(name, f"10.96.0.{rnd.randrange(1, 12)}", rv=str(next(rv)), **spec)  # ClusterIPs clash too

    def random_slice(name: str, service: str) -> EndpointSlice:
        endpoints = []
        for _ in range(rnd.randrange(0, 4)):
            cond = rnd.choice([{}, {"ready": False}, {"ready": False, "serving": True, "terminating": True}])
            endpoints.append({"addresses": [f"10.1.0.{rnd.randrange(1, 9)}"], "conditions": cond,
                              "nodeName": rnd.choice([NODE, "n2"])})
        ports = [{"name": "http", "port": rnd.choice([8080, 8081])}, {"name": "dns", "port": 5353,
                                                                     "protocol": "UDP"}]
        return EndpointSlice.model_validate({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": str(next(rv)),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints})

    for step in range(300):
        for _ in range(rnd.randrange(1, 4)):
            op = rnd.random()
            name = f"s{rnd.randrange(8)}"
            if op < 0.35:
                services[name] = random_service(name)
                c.set_service(services[name])
            elif op < 0.45 and name in services:
                del services[name]
                c.delete_service("default", name)
            elif op < 0.85:
                sl_name = f"{name}-{rnd.randrange(2)}"
                slices[sl_name] = random_slice(sl_name, name)
                c.set_slice(slices[sl_name])
            else:
                sl_name = f"{name}-{rnd.randrange(2)}"
                slices.pop(sl_name, None)
                c.delete_slice("default", sl_name)
        state = c.state()
        assert state == pure(services.values(), slices.values()), step
        snapshot = dict(state.frontends.items())
        for old, seen in held:
            assert dict(old.frontends.items()) == seen and len(old.frontends) == len(seen), step
            assert {r.frontend for r in old.rules} == set(seen)
            hint = state.changed_since(old)
            if hint is not None:
                differ = {fe for fe in {*seen, *snapshot} if seen.get(fe) != snapshot.get(fe)}
                assert differ <= hint, step
        if rnd.random() < 0.3:
            held.append((state, snapshot))
        if len(held) > 4:
            held.pop(rnd.randrange(len(held)))
