"""The policy compiler: shared sets, bounded chains, small diffs, hashed names, bad input."""

from __future__ import annotations

import re

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.policy_cases import make_namespace, make_pod

from podnet.model.objects import NetworkPolicy
from podnet.policy.applier import PolicyChanges, render_diff
from podnet.policy.compiler import PolicyCompiler, compile_policy, render_full
from podnet.policy.evaluate import reference_allowed, walk
from podnet.policy.model import InputCache, canonical_selector


def pol(name: str, spec: dict, ns: str = "x") -> NetworkPolicy:
    return NetworkPolicy.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def pod(key: str, ip: str, labels: dict | None = None, **kw):
    p = make_pod(key, labels, **kw)
    return p.model_copy(update={"status": p.status.model_copy(update={"pod_ip": ip})})


def world(n: int = 20):
    pods = [pod(f"x/p{i}", f"10.1.0.{i + 1}", {"app": "web" if i % 2 else "db", "i": str(i)}) for i in range(n)]
    nss = [make_namespace("x"), make_namespace("y")]
    return pods, nss


def compile_(pods, nss, pols, local=None):
    local = [p.status.pod_ip for p in pods] if local is None else local
    inp = InputCache().inputs(pods, nss, pols, local)
    return inp, compile_policy(inp)


FROM_WEB = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}


def test_equal_selectors_share_one_set():
    pods, nss = world()
    same = {"podSelector": {}, "ingress": [{"from": [
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}}]}]}
    _, st1 = compile_(pods, nss, [pol("a", FROM_WEB), pol("b", same)])
    addr_sets = [s for s in st1.sets.values() if s.kind == "addr"]
    assert len(addr_sets) == 1
    assert addr_sets[0].elements == {f"10.1.0.{i + 1}" for i in range(20) if i % 2}
    assert canonical_selector(pol("a", FROM_WEB).spec.ingress[0].from_[0].pod_selector) == (("app", "In", ("web",)),)


def test_chains_do_not_grow_with_pods_times_peers():
    pods, nss = world(200)
    pols = [pol(f"p{i}", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"i": str(j)}}} for j in range(i, i + 5)]}]}) for i in range(30)]
    _, state = compile_(pods, nss, pols)
    # 30 policy chains, one group chain (all web pods share the same 30 policies), 2 base chains
    assert len(state.policy_chains) == 30 and len(state.groups) == 1
    assert state.chain_count() == 33
    assert len(state.dispatch["ingress"]) == 100


def test_a_pod_joining_a_selector_is_one_element():
    pods, nss = world()
    comp, cache = PolicyCompiler(), InputCache()
    local = ["10.1.0.1"]  # only x/p0 (a db pod) is on this node
    before = comp.compile(cache.inputs(pods, nss, [pol("a", FROM_WEB)], local))
    pods[4] = pod("x/p4", "10.1.0.5", {"app": "web", "i": "4"})  # a db pod becomes a web pod
    after = comp.compile(cache.inputs(pods, nss, [pol("a", FROM_WEB)], local))
    ch = PolicyChanges()
    script = render_diff(before, after, ch)
    assert script.strip().splitlines() == [f"add element ip podnet-policy {next(iter(after.sets))} {{ 10.1.0.5 }}"]
    assert ch.elements_added == 1 and ch.chains_rewritten == 0


def test_a_label_change_of_a_local_pod_is_a_few_elements():
    pods, nss = world()
    comp, cache = PolicyCompiler(), InputCache()
    pols = [pol("a", {**FROM_WEB, "podSelector": {"matchLabels": {"app": "web"}}})]
    local = [p.status.pod_ip for p in pods]
    before = comp.compile(cache.inputs(pods, nss, pols, local))
    pods[0] = pod("x/p0", "10.1.0.1", {"app": "web", "i": "0"})  # db -> web: selected now, and a peer
    after = comp.compile(cache.inputs(pods, nss, pols, local))
    ch = PolicyChanges()
    render_diff(before, after, ch)
    assert (ch.elements_added, ch.dispatch_changed, ch.chains_added, ch.chains_rewritten) == (1, 1, 0, 0)


def test_no_user_text_reaches_nft_syntax():
    pods, nss = world()
    p = pol("weird-name.with.dots", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"secretlabel": "value-x"}}}], "ports": [{"port": "my-http"}]}]})
    _, state = compile_(pods, nss, [p])
    script = render_full(state)
    for text in ("weird", "secretlabel", "value-x", "my-http", "app", "web"):
        assert text not in script
    for name in re.findall(r"@(\w+)", script):
        assert re.fullmatch(r"[scnl]_[0-9a-f]{16}|(ingress|egress)_dispatch", name)


def test_host_network_and_unaddressed_pods_are_never_selected():
    pods, nss = world(4)
    pods.append(pod("x/host", "10.1.0.200", {"app": "web"}, host_network=True))
    pods.append(pod("x/pending", "10.1.0.201", {"app": "web"}).model_copy(
        update={"status": pods[0].status.model_copy(update={"pod_ip": None})}))
    inp, state = compile_(pods, nss, [pol("a", {**FROM_WEB, "podSelector": {}})], local=["10.1.0.200", "10.1.0.1"])
    assert "10.1.0.200" not in state.dispatch["ingress"]
    assert all("10.1.0.200" not in s.elements for s in state.sets.values())
    assert inp.pods["x/pending"].ip is None


def test_unresolvable_named_port_and_ipv6_block_grant_nothing():
    pods, nss = world(4)
    pols = [pol("a", {"podSelector": {}, "ingress": [
        {"ports": [{"port": "nowhere"}]},
        {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]},
    ]})]
    inp, state = compile_(pods, nss, pols)
    for src in ("10.1.0.2", "192.0.2.1"):
        for port in (80, 81, 1):
            assert not walk(state, src, "10.1.0.1", "TCP", port).allowed
            assert not reference_allowed(inp, src, "10.1.0.1", "TCP", port)


@pytest.mark.parametrize("spec, message", [
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "non-empty values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}, "takes no values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]}}, "operator"),
    ({"podSelector": {"matchLabels": {"bad key!": "x"}}}, "label key"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]},
     "not inside"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]},
     "strictly smaller"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "below port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}, "protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}, "out of range"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "must set one of"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"},
                                                "podSelector": {}}]}]}, "not both"),
])
def test_bad_policies_are_rejected_by_the_model(spec, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        pol("bad", spec)


# ------------------------------------------------------------------ random worlds

LABELS = st.dictionaries(st.sampled_from(["app", "tier", "env"]), st.sampled_from(["a", "b", "c"]), max_size=2)
SELECTOR = st.one_of(
    st.just({}),
    LABELS.map(lambda d: {"matchLabels": d} if d else {}),
    st.tuples(st.sampled_from(["app", "tier", "env"]), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
              st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)).map(
        lambda t: {"matchExpressions": [{"key": t[0], "operator": t[1],
                                         **({"values": t[2]} if t[1] in ("In", "NotIn") else {})}]}),
)
PEER = st.one_of(
    SELECTOR.map(lambda s: {"podSelector": s}),
    SELECTOR.map(lambda s: {"namespaceSelector": s}),
    st.tuples(SELECTOR, SELECTOR).map(lambda t: {"podSelector": t[0], "namespaceSelector": t[1]}),
    st.sampled_from([{"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.0/30"]}},
                     {"ipBlock": {"cidr": "10.1.0.4/30"}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]),
)
PORT = st.sampled_from([
    {"port": 80}, {"port": 81, "protocol": "UDP"}, {"port": 80, "endPort": 81}, {"protocol": "TCP"},
    {"port": "serve-80-tcp"}, {"port": "serve-81-tcp"}, {"port": "web"}, {"port": "serve-80-udp", "protocol": "UDP"},
])
RULE = st.fixed_dictionaries({}, optional={"peers": st.lists(PEER, max_size=2), "ports": st.lists(PORT, max_size=2)})
POLICY = st.fixed_dictionaries({
    "ns": st.sampled_from(["x", "y"]), "sel": SELECTOR,
    "types": st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
    "ingress": st.none() | st.lists(RULE, max_size=2), "egress": st.none() | st.lists(RULE, max_size=2),
})


def build_policy(i: int, d: dict) -> NetworkPolicy:
    def rules(rs, key):
        return [{**({key: r["peers"]} if "peers" in r else {}), **({"ports": r["ports"]} if "ports" in r else {})}
                for r in rs]
    spec: dict = {"podSelector": d["sel"]}
    if d["types"]:
        spec["policyTypes"] = d["types"]
    if d["ingress"] is not None:
        spec["ingress"] = rules(d["ingress"], "from")
    if d["egress"] is not None:
        spec["egress"] = rules(d["egress"], "to")
    return pol(f"p{i}", spec, d["ns"])


POD = st.fixed_dictionaries({"ns": st.sampled_from(["x", "y"]), "labels": LABELS, "web": st.sampled_from([None, 80, 81]),
                             "host": st.booleans()})
WORLD = st.fixed_dictionaries({
    "pods": st.lists(POD, min_size=1, max_size=6),
    "ns_labels": st.fixed_dictionaries({"x": LABELS, "y": LABELS}),
    "policies": st.lists(POLICY, max_size=4),
    "local": st.integers(0, 63),
})


def build_world(w: dict):
    from tests.support.policy_cases import default_ports

    pods = []
    for i, p in enumerate(w["pods"]):
        ports = default_ports() + ([{"name": "web", "containerPort": p["web"]}] if p["web"] else [])
        pods.append(pod(f"{p['ns']}/p{i}", f"10.1.0.{i + 1}", p["labels"], ports=ports,
                        host_network=p["host"] and i == 0))
    nss = [make_namespace(n, w["ns_labels"][n]) for n in ("x", "y")]
    pols = [build_policy(i, d) for i, d in enumerate(w["policies"])]
    local = [f"10.1.0.{i + 1}" for i in range(len(pods)) if w["local"] >> i & 1]
    return pods, nss, pols, local


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WORLD, min_size=1, max_size=4))
def test_incremental_equals_fresh_and_the_table_agrees_with_the_reference(worlds):
    comp, cache = PolicyCompiler(), InputCache()
    for w in worlds:
        pods, nss, pols, local = build_world(w)
        inp = cache.inputs(pods, nss, pols, local)
        state = comp.compile(inp)
        assert state == compile_policy(inp)
        # with every pod local, the walk of the table must equal the reference semantics
        full_inp = InputCache().inputs(pods, nss, pols, [p.status.pod_ip for p in pods])
        full = compile_policy(full_inp)
        ips = [p.status.pod_ip for p in pods] + ["192.0.2.7"]
        for s in ips:
            for d in ips:
                for proto, port in (("TCP", 80), ("TCP", 81), ("UDP", 81)):
                    assert walk(full, s, d, proto, port).allowed == reference_allowed(full_inp, s, d, proto, port), (
                        s, d, proto, port)


def _events(live, before: dict, after: dict) -> None:
    """Feed `live` the events that turn one world's objects into the next's."""
    for (kind, key), obj in after.items():
        live.on_event(kind, key, obj)
    for kind, key in before:
        if (kind, key) not in after:
            live.on_event(kind, key, None)


def _objects(pods, nss, pols) -> dict:
    out = {("Pod", f"{p.namespace}/{p.name}"): p for p in pods}
    out.update({("Namespace", n.name): n for n in nss})
    out.update({("NetworkPolicy", f"{p.namespace}/{p.name}"): p for p in pols})
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WORLD, min_size=1, max_size=5))
def test_event_fed_inputs_compiled_from_deltas_equal_a_fresh_compile(worlds):
    from podnet.policy.model import LiveInputs

    live, comp, before = LiveInputs("n1"), PolicyCompiler(), {}
    for w in worlds:
        pods, nss, pols, local = build_world(w)
        pods = [p.model_copy(update={"spec": p.spec.model_copy(update={
            "node_name": "n1" if p.status.pod_ip in local else "n2"})}) for p in pods]
        after = _objects(pods, nss, pols)
        _events(live, before, after)
        before = after
        inputs, delta = live.take()
        state = comp.compile(inputs, delta)
        local_ips = [p.status.pod_ip for p in pods if p.spec.node_name == "n1" and not p.spec.host_network]
        assert state == compile_policy(InputCache().inputs(pods, nss, pols, local_ips))


def test_event_fed_inputs_forget_what_a_reload_does_not_name():
    from podnet.policy.model import LiveInputs

    pods, nss = world(4)
    live = LiveInputs("n1")
    for p in pods:
        live.on_event("Pod", f"{p.namespace}/{p.name}", p)
    live.take()
    from podnet.store.objects import key_of

    for p in pods[:2]:
        live.on_event("Pod", f"{p.namespace}/{p.name}", p)
    live.end_reload({key_of(p) for p in pods[:2]})
    inputs, delta = live.take()
    assert sorted(inputs.pods) == ["x/p0", "x/p1"] and sorted(delta.pods) == ["x/p2", "x/p3"]


def test_ingress_named_ports_hold_only_this_nodes_pods_and_egress_ones_every_pod():
    from podnet.policy.compiler import named_set_name

    ports = [{"name": "http", "containerPort": 8080}]
    pods = [pod(f"x/p{i}", f"10.1.0.{i + 1}", {"app": "web"}, ports=ports) for i in range(6)]
    nss = [make_namespace("x")]
    pols = [pol("in", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
            pol("out", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]})]
    local = ["10.1.0.1", "10.1.0.2"]
    comp, cache = PolicyCompiler(), InputCache()
    state = comp.compile(cache.inputs(pods, nss, pols, local))
    ingress, egress = state.sets[named_set_name("http", "TCP", local=True)], state.sets[named_set_name("http", "TCP")]
    assert ingress.elements == {"10.1.0.1 . 8080", "10.1.0.2 . 8080"}
    assert len(egress.elements) == 6
    # a pod started on another node: the ingress set stays as it is, the egress one grows
    pods.append(pod("x/p9", "10.1.0.10", {"app": "web"}, ports=ports))
    after = comp.compile(cache.inputs(pods, nss, pols, local))
    assert after.sets[named_set_name("http", "TCP", local=True)] == ingress
    assert "10.1.0.10 . 8080" in after.sets[named_set_name("http", "TCP")].elements
    assert after == compile_policy(InputCache().inputs(pods, nss, pols, local))
