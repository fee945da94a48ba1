"""Services with more endpoints than the tier tree covers: the compiler keeps their
slots, and a change is element changes in proportion to it (no rebuild, no rewrite of
the Service's other slots). The kernel side: tests/kernel/test_services_large.py."""

from __future__ import annotations

import random

from podnet.model.objects import EndpointSlice, Service
from podnet.services import nftables as nt
from podnet.services.compiler import ServiceCompiler, _changes, kept_order
from podnet.services.model import LARGE_ABOVE, Backend, Frontend, FrontendRule, ServiceConfig, ServiceState

FE = Frontend("10.96.0.10", "tcp", 80)


def backends(n: int, start: int = 0) -> tuple[Backend, ...]:
    return tuple(Backend(f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}", 8080) for i in range(start, start + n))


def changed_slots(a: tuple, b: tuple) -> int:
    return sum(1 for i in range(max(len(a), len(b))) if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None))


def test_kept_order_moves_only_the_slots_a_change_needs():
    old = backends(1000)
    assert kept_order(old, tuple(sorted(old))) is old  # the same endpoints: the same slots
    new = tuple(sorted((*old[1:], Backend("10.200.0.1", 8080))))  # one replaced (in address order it moves far)
    kept = kept_order(old, new)
    assert sorted(kept) == sorted(new) and changed_slots(old, kept) == 1 and kept[0] == Backend("10.200.0.1", 8080)
    grown = kept_order(old, tuple(sorted((*old, Backend("10.200.0.1", 8080)))))
    assert grown[:1000] == old and len(grown) == 1001  # one more: a slot at the end
    shrunk = kept_order(old, old[:400] + old[401:])
    assert changed_slots(old, shrunk) == 2 and shrunk[400] == old[999]  # the last moves into the gap
    mixed = tuple(sorted((*old[10:], *backends(30, 5000))))
    assert changed_slots(old, kept_order(old, mixed)) == 30  # 10 replaced, 20 added


def test_kept_order_from_the_changes_found_at_the_ends_is_the_same_as_from_a_full_pass():
    rng = random.Random(3)
    pool = backends(3000)
    raw = tuple(pool[:1200])
    kept = tuple(sorted(raw))
    for _ in range(200):
        items = list(raw)
        for _ in range(rng.randrange(1, 6)):
            op = rng.random()
            if op < 0.4 and items:
                items.pop(rng.randrange(len(items)))
            elif op < 0.8:
                items.insert(rng.randrange(len(items) + 1), rng.choice(pool[1200:]))
            else:
                items[rng.randrange(len(items))] = rng.choice(pool[1200:])
        new = tuple(dict.fromkeys(items))  # distinct, as compiled
        changes = _changes(raw, new)
        assert changes == (set(new) - set(raw), set(raw) - set(new))
        fast = kept_order(kept, new, changes)
        assert fast == kept_order(kept, new) and sorted(fast) == sorted(new)
        assert changed_slots(kept, fast) <= len(changes[0]) + 2 * len(changes[1])
        raw, kept = new, fast


def service() -> Service:
    return Service.model_validate({"metadata": {"name": "big", "namespace": "default", "resourceVersion": "1"},
                                   "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}})


def slice_(i: int, ips: list[str], version: str = "1") -> EndpointSlice:
    return EndpointSlice.model_validate({
        "metadata": {"name": f"big-{i}", "namespace": "default", "resourceVersion": version,
                     "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip]} for ip in ips]})


def slices_of(n: int, per: int = 1000) -> list[list[str]]:
    ips = [b.ip for b in backends(n)]
    return [ips[i:i + per] for i in range(0, n, per)]


def elements_count(delta: tuple[nt.Elements, nt.Elements]) -> int:
    return sum(len(kv) for part in delta for kv in part.values())


def test_a_service_of_many_slices_changes_by_the_endpoints_that_changed():
    c = ServiceCompiler("n1", config=ServiceConfig(service_cidrs=("10.96.0.0/12",)))
    c.set_service(service())
    parts = slices_of(5000)
    for i, ips in enumerate(parts):
        c.set_slice(slice_(i, ips))
    s1 = c.state()
    r1 = s1.rule(FE)
    assert len(r1.backends) == 5000 and nt.elements(s1)["large_ips"] == {"10.96.0.10 . tcp . 80": "goto svc_large5000"}
    d1 = nt.state_digest(s1)

    # one endpoint replaced by one far away in address order: one slot
    parts[2][17] = "10.250.0.1"
    c.set_slice(slice_(2, parts[2], "2"))
    s2 = c.state()
    delta = nt.state_delta(s1, s2)
    assert delta == ({"backends_large": {f"10.96.0.10 . tcp . 80 . {2017}": "10.1.7.225 . 8080"}},
                     {"backends_large": {f"10.96.0.10 . tcp . 80 . {2017}": "10.250.0.1 . 8080"}})
    assert delta == nt.diff(nt.elements(s1), nt.elements(s2))
    d2 = nt.digest_delta(d1, s1, s2)
    assert d2 == nt.state_digest(s2) != d1

    # one endpoint gone: its slot takes the last one, the frontend goes to the chain of 4999
    gone_ip = parts[0].pop(5)
    c.set_slice(slice_(0, parts[0], "3"))
    s3 = c.state()
    delta = nt.state_delta(s2, s3)
    assert delta == nt.diff(nt.elements(s2), nt.elements(s3)) and elements_count(delta) == 5  # 2 slots, goto
    assert delta[1]["large_ips"] == {"10.96.0.10 . tcp . 80": "goto svc_large4999"}
    assert Backend(gone_ip, 8080) not in s3.rule(FE).backends
    assert nt.digest_delta(d2, s2, s3) == nt.state_digest(s3)

    # a whole slice added: its endpoints at the end, nothing else moves
    parts.append([f"10.99.{i // 256}.{i % 256}" for i in range(1000)])
    c.set_slice(slice_(5, parts[5]))
    s4 = c.state()
    delta = nt.state_delta(s3, s4)
    assert s4.rule(FE).backends[:4999] == s3.rule(FE).backends and elements_count(delta) == 1000 + 2
    assert nt.digest_delta(nt.state_digest(s3), s3, s4) == nt.state_digest(s4)


def test_growing_past_the_tree_and_back_and_the_short_circuit():
    small = FrontendRule(FE, "default/big:", "ClusterIP", backends(LARGE_ABOVE))
    large = small._replace(backends=backends(LARGE_ABOVE + 1))
    np_local = FrontendRule(Frontend(None, "tcp", 30080), "default/big:", "NodePort", backends(3),
                            short_circuit=backends(LARGE_ABOVE + 10))
    states = [ServiceState([small]), ServiceState([large, np_local]), ServiceState([small, np_local._replace(
        short_circuit=backends(LARGE_ABOVE + 11))]), ServiceState([])]
    els = nt.elements(states[1])
    assert els["short_circuit_nodeports"] == {"tcp . 30080": "goto np_large_sc266"}
    assert len(els["nodeport_backends_large_sc"]) == 266 and len(els["nodeport_backends_3"]) == 3
    assert nt.state_chains(states[1]) == {"svc_large257", "np_large_sc266"}
    assert nt.large_chain_refs(states[2]) == {"np_large_sc267": 1}
    for a in states:
        for b in states:
            assert nt.state_delta(a, b) == nt.diff(nt.elements(a), nt.elements(b))
            assert nt.digest_delta(nt.state_digest(a), a, b) == nt.state_digest(b)


def test_random_changes_keep_the_delta_and_the_digest_exact():
    rng = random.Random(7)
    pool = backends(3000)
    c = ServiceCompiler("n1")
    c.set_service(service())
    current = [list(pool[i:i + 600]) for i in range(0, 1800, 600)]
    for i, eps in enumerate(current):
        c.set_slice(slice_(i, [b.ip for b in eps]))
    prev = c.state()
    digest = nt.state_digest(prev)
    for step in range(30):
        i = rng.randrange(3)
        eps = current[i]
        for _ in range(rng.randrange(1, 4)):
            if eps and rng.random() < 0.5:
                eps.pop(rng.randrange(len(eps)))
            else:
                eps.append(rng.choice(pool))
        c.set_slice(slice_(i, sorted({b.ip for b in eps}), str(step + 2)))
        now = c.state()
        assert nt.state_delta(prev, now) == nt.diff(nt.elements(prev), nt.elements(now))
        digest = nt.digest_delta(digest, prev, now)
        assert digest == nt.state_digest(now)
        assert elements_count(nt.state_delta(prev, now)) <= 2 * 3 * 2 + 2
        prev = now


def test_the_first_state_keeps_the_slots_the_kernel_has():
    c = ServiceCompiler("n1")
    c.set_service(service())
    ips = [b.ip for b in backends(600)]
    c.set_slice(slice_(0, ips))
    kernel = tuple(reversed(backends(600)))  # as an earlier agent left them
    c.keep_slots({FE: (kernel, ())})
    assert c.state().rule(FE).backends == kernel
    ips.pop(300)  # later changes keep them too: the gap takes the last slot's endpoint
    c.set_slice(slice_(0, ips, "2"))
    after = c.state().rule(FE).backends
    assert changed_slots(kernel, after) == 2 and after[299] == kernel[599]
