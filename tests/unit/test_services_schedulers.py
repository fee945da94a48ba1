"""podnet.io/scheduler rendered by the nftables and iptables backends (the packets are in
tests/kernel/test_services_schedulers.py): which slots and sets a frontend fills, the
limits, what each backend cannot do."""

from __future__ import annotations

import re

from podnet.services import nftables as nt
from podnet.services.iptables import render
from podnet.services.iptables import scheduler_problem as iptables_problem
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState
from podnet.services.nftables.schedulers import scheduler_problem as nft_problem


def rule(ip, *backends, scheduler="", weights=(), short=(), port=80, **kw) -> FrontendRule:
    return FrontendRule(Frontend(ip, "tcp", port), "default/web:", "ClusterIP" if ip else "NodePort",
                        tuple(Backend(b, 8080) for b in backends), scheduler=scheduler, weights=tuple(weights),
                        short_circuit=tuple(Backend(b, 8080) for b in short), **kw)


def slots(els: nt.Elements, name: str) -> list[str]:
    """A slot map's endpoints in slot order."""
    kv = els.get(name, {})
    return [kv[k].split(" . ")[0] for k in sorted(kv, key=lambda k: int(k.rpartition(" . ")[2]))]


def test_source_hash_is_one_element_more_and_the_same_slots():
    plain = nt.rule_elements(rule("10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3"))
    hashed = nt.rule_elements(rule("10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3", scheduler="sh"))
    assert hashed == {**plain, "sh_ips": {"10.96.0.1 . tcp . 80": None}}
    assert nt.rule_elements(rule(None, "10.1.0.1", scheduler="sh"))["sh_nodeports"] == {"tcp . 80": None}
    assert "sh_ips" not in nt.rule_elements(rule("10.96.0.1", scheduler="sh"))  # nothing to choose from
    # the leaf the tree leads to hashes for the frontends of @sh_ips, with a fixed seed
    first, second = nt.Layout(0x4000).chains()["svc_3"]
    assert re.fullmatch(r"ip daddr \. meta l4proto \. th dport @sh_ips dnat ip to .* jhash ip saddr mod 3 "
                        r"seed 0x[0-9a-f]+ map @backends_3", first), first
    assert "numgen random mod 3" in second


def test_weights_are_repeated_slots_over_their_common_divisor():
    els = nt.rule_elements(rule("10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3", scheduler="wrr",
                                weights=[("10.1.0.1", 100), ("10.1.0.2", 900), ("10.1.0.3", 0)]))
    assert slots(els, "backends_10") == ["10.1.0.1"] + ["10.1.0.2"] * 9  # 1:9, weight 0 no slot
    assert set(els["svc_bit0"]) == set(els["svc_bit3"]) == {"10.96.0.1 . tcp . 80"}  # the tree's leaf for 10
    # a listed weight of 2 against unlisted endpoints (1 each)
    els = nt.rule_elements(rule("10.96.0.1", "10.1.0.1", "10.1.0.2", scheduler="wrr", weights=[("10.1.0.2", 2)]))
    assert slots(els, "backends_3") == ["10.1.0.1", "10.1.0.2", "10.1.0.2"]
    # every weight 0: no new flows, as a frontend whose endpoints are elsewhere (drop)
    els = nt.rule_elements(rule("10.96.0.1", "10.1.0.1", scheduler="wrr", weights=[("10.1.0.1", 0)],
                                no_endpoints="drop"))
    assert els.get("drop_ips") == {"10.96.0.1 . tcp . 80": None} and "service_ips" not in els


def test_a_weight_change_is_an_element_delta_of_that_frontend():
    other = rule("10.96.0.9", "10.1.0.9")
    old = ServiceState([rule("10.96.0.1", "10.1.0.1", "10.1.0.2", scheduler="wrr", weights=[("10.1.0.2", 9)]), other])
    new = ServiceState([rule("10.96.0.1", "10.1.0.1", "10.1.0.2", scheduler="wrr", weights=[("10.1.0.2", 3)]), other])
    gone, come = nt.state_delta(old, new)
    # 10 slots (N-1 = 0b1001) -> 4 (0b11): bit 0 stays
    assert set(gone) == {"backends_10", "svc_bit3"} and set(come) == {"backends_4", "svc_bit1"}
    assert slots(come, "backends_4") == ["10.1.0.1"] + ["10.1.0.2"] * 3
    assert not any("10.96.0.9" in k for part in (gone, come) for kv in part.values() for k in kv)


def test_eTP_local_short_circuit_slots_are_weighted_and_dropped_when_they_choose_the_same():
    weights = [("10.1.0.1", 2), ("10.1.0.2", 0)]
    local = rule("203.0.113.1", "10.1.0.1", short=("10.1.0.1", "10.1.0.2"), scheduler="wrr", weights=weights)
    els = nt.rule_elements(local)
    assert slots(els, "backends_1") == ["10.1.0.1"] and "short_circuit_ips" not in els  # 2:0 over its gcd is 1
    weights = [("10.1.0.1", 2), ("10.1.0.2", 1)]
    els = nt.rule_elements(local._replace(weights=tuple(weights)))
    assert slots(els, "backends_1") == ["10.1.0.1"] and slots(els, "backends_3") == ["10.1.0.1"] * 2 + ["10.1.0.2"]
    assert els["short_circuit_ips"] == {"203.0.113.1 . tcp . 80": "goto svc_3"}


def test_what_nftables_cannot_do_balances_at_random_and_says_why():
    many = [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(257)]
    assert nft_problem(rule("10.96.0.1", "10.1.0.1", scheduler="lc")).startswith(
        "podnet.io/scheduler lc is not available on the nftables backend")
    big_sh = rule("10.96.0.1", *many, scheduler="sh")
    assert nft_problem(big_sh) == ("podnet.io/scheduler sh is available on the nftables backend up to 256 "
                                   "endpoints, 10.96.0.1:80/tcp has 257; balanced at random")
    assert "sh_ips" not in nt.rule_elements(big_sh)
    heavy = rule("10.96.0.1", "10.1.0.1", "10.1.0.2", scheduler="wrr", weights=[("10.1.0.1", 300)])
    assert nft_problem(heavy) == (
        "podnet.io/weights: the weights of the 2 endpoints of 10.96.0.1:80/tcp add up to 301 (divided by their "
        "greatest common divisor; an endpoint not listed weighs 1), more than the nftables backend's 256; "
        "balanced at random")
    assert slots(nt.rule_elements(heavy), "backends_2") == ["10.1.0.1", "10.1.0.2"]  # random over the endpoints
    assert nft_problem(heavy._replace(weights=(("10.1.0.1", 300), ("10.1.0.2", 100)))) == ""  # 3:1
    assert nft_problem(rule("10.96.0.1", "10.1.0.1", scheduler="wrr")) == nft_problem(rule("10.96.0.1")) == ""


def test_iptables_weights_are_probabilities_and_source_hash_is_refused():
    st = ServiceState([rule("10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3", scheduler="wrr",
                            weights=[("10.1.0.1", 1), ("10.1.0.2", 0), ("10.1.0.3", 3)])])
    probabilities = re.findall(r"--probability (\S+)", render(st).text)
    assert probabilities == ["0.2500000000"]  # 10.1.0.1: 1 of 4; 10.1.0.2 none; 10.1.0.3 the rest
    random = render(ServiceState([rule("10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3")])).text
    assert re.findall(r"--probability (\S+)", random) == ["0.3333333333", "0.5000000000"]
    zero = render(ServiceState([rule("10.96.0.1", "10.1.0.1", scheduler="wrr", weights=[("10.1.0.1", 0)],
                                     no_endpoints="drop")])).text
    assert "-d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DROP" in zero and "KUBE-SVC-" not in zero
    assert iptables_problem(rule("10.96.0.1", "10.1.0.1", scheduler="wrr")) == ""
    assert iptables_problem(rule("10.96.0.1", "10.1.0.1", scheduler="sh")) == (
        "podnet.io/scheduler sh is not available on the iptables backend (iptables has no source-hash choice but "
        "xt_HMARK, which overwrites the packet mark that carries the masquerade bit); balanced at random "
        "(--service-proxy ebpf has it)")
