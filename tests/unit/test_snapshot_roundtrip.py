"""What a restarted agent takes back from its snapshot (pickled, as on disk) compiles on as
if it had never stopped: policy from its restored indexes and pending changes, Services
from their restored rules, with the state digest the kernel's table is compared with."""

from __future__ import annotations

import pickle

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.test_policy_compiler import WORLD, _events, _objects, build_world
from tests.unit.test_services_compiler import NODE, ep, eps, svc

import podnet.agent.snapshot  # noqa: F401 - registers how records' shared mappings pickle
from podnet.policy.compiler import LivePolicyCompiler, compile_policy
from podnet.policy.model import InputCache, LiveInputs
from podnet.services import nftables as nt
from podnet.services.compiler import ServiceCompiler, SliceInfo
from podnet.services.model import ServiceConfig


def through_disk(obj):
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def local_pods(pods):
    return [p.model_copy(update={"spec": p.spec.model_copy(update={
        "node_name": "n1" if i % 2 else "n2"})}) for i, p in enumerate(pods)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WORLD, min_size=2, max_size=4), st.integers(0, 2), st.booleans())
def test_policy_restored_from_a_snapshot_compiles_as_if_it_never_stopped(worlds, stop_after, pending):
    live, comp, before = LiveInputs("n1"), LivePolicyCompiler(), {}
    stop_after = min(stop_after, len(worlds) - 2)
    for i, w in enumerate(worlds):
        pods, nss, pols, _ = build_world(w)
        pods = local_pods(pods)
        after = _objects(pods, nss, pols)
        _events(live, before, after)
        before = after
        if i == stop_after and pending:  # stopped with events not yet compiled
            live, comp = restored(live, comp)
        comp.compile_live(live)
        if i == stop_after and not pending:  # stopped with everything compiled
            live, comp = restored(live, comp)
        state, _ = comp.compile_live(live)
        local_ips = [p.status.pod_ip for p in pods if p.spec.node_name == "n1" and not p.spec.host_network]
        assert state == compile_policy(InputCache().inputs(pods, nss, pols, local_ips))


def restored(live: LiveInputs, comp: LivePolicyCompiler) -> tuple[LiveInputs, LivePolicyCompiler]:
    held = through_disk({"live": live.snapshot(), "compiler": comp.snapshot()})
    live2, comp2 = LiveInputs("n1"), LivePolicyCompiler()
    comp2.restore(held["compiler"])
    live2.restore(held["live"], compiled=True)
    return live2, comp2


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WORLD)
def test_policy_inputs_alone_compile_whole_after_a_restore(w):
    pods, nss, pols, _ = build_world(w)
    pods = local_pods(pods)
    live = LiveInputs("n1")
    _events(live, {}, _objects(pods, nss, pols))
    live2 = LiveInputs("n1")
    live2.restore(through_disk(live.snapshot()), compiled=False)  # a compiler that starts from nothing
    state, _ = LivePolicyCompiler().compile_live(live2)
    local_ips = [p.status.pod_ip for p in pods if p.spec.node_name == "n1" and not p.spec.host_network]
    assert state == compile_policy(InputCache().inputs(pods, nss, pols, local_ips))


def test_services_restored_from_a_snapshot_give_the_same_state_and_digest():
    config = ServiceConfig(service_cidrs=("10.96.0.0/12",))
    c = ServiceCompiler(NODE, ["192.168.1.10"], config)
    for i in range(20):
        c.set_service(svc(f"s{i}", clusterIP=f"10.96.0.{10 + i}", healthCheckNodePort=30000 + i,
                          type="LoadBalancer", externalTrafficPolicy="Local",
                          ports=[{"port": 80, "targetPort": 8080, "nodePort": 31000 + i}]))
        c.set_slice(SliceInfo(eps(f"s{i}", *(ep(f"10.1.{i}.{j}") for j in range(1, 4)), name=f"s{i}-a"), NODE))
    c.state()
    c.set_slice(SliceInfo(eps("s3", ep("10.1.3.9"), name="s3-a"), NODE))  # pending at the stop
    want = c.state()
    counts: dict[str, int] = {}
    digest = nt.state_digest(want, counts)

    c2 = ServiceCompiler(NODE, ["192.168.1.10"], config)
    c2.restore(through_disk(c.snapshot()))
    got = c2.state()
    assert got.rules == want.rules and got.health_checks == want.health_checks and want.health_checks
    got_counts: dict[str, int] = {}
    assert nt.state_digest(got, got_counts) == digest and got_counts == counts
    c2.delete_service("default", "s5")  # and it goes on from there
    assert {r.service for r in c2.state().rules} == {r.service for r in want.rules} - {"default/s5:"}


def test_slotted_records_come_back_slot_for_slot_unset_ones_unset():
    from podnet.model.slots import PickledBySlots
    from podnet.policy.model import PodInfo

    plain = PodInfo("ns", "a", "10.0.0.1", (("app", "x"),), (("http", "TCP", 80),), node="n1")
    several = PodInfo("ns", "b", "10.0.0.2", (), (), ips=("10.0.0.2", "fd00::2"))
    records = [plain, several, SliceInfo(eps("s", ep("10.1.0.1"), ep("10.1.0.2", ready=False), name="s-a"), NODE)]
    for record in records:
        back = through_disk(record)
        assert isinstance(record, PickledBySlots) and type(back) is type(record)
        for name in type(record).__slots__:
            assert getattr(back, name, "unset") == getattr(record, name, "unset"), name
    assert through_disk(several).ips == several.ips == ("10.0.0.2", "fd00::2") and through_disk(plain).ips == plain.ips
