"""The compiled policy state as eBPF map contents (policy/ebpf/maps.py): ipBlocks minus
except as prefixes, rules packed as the C program reads them, a change converting only
the sets and groups it touched, and numbering that does not depend on the process."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

from tests.support.policy_cases import make_namespace, make_pod

from podnet.model.objects import NetworkPolicy
from podnet.policy.compiler import PolicyCompiler
from podnet.policy.ebpf import maps as m
from podnet.policy.model import CidrPeer, InputCache


def pol(name: str, spec: dict, ns: str = "x") -> NetworkPolicy:
    return NetworkPolicy.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def pod(key: str, ip: str, labels: dict, ports: list | None = None):
    p = make_pod(key, labels, ports=ports if ports is not None else [])
    return p.model_copy(update={"status": p.status.model_copy(update={"pod_ip": ip})})


def test_an_ipblock_minus_its_excepts_is_exactly_its_prefixes():
    peer = CidrPeer("10.0.0.0/16", ("10.0.3.0/24", "10.0.200.128/25"))
    nets = [ipaddress.ip_network(p) for e in peer.ranges() for p in m.prefixes(e)]
    for probe in ("10.0.0.1", "10.0.2.255", "10.0.3.0", "10.0.3.255", "10.0.4.0", "10.0.200.127",
                  "10.0.200.128", "10.0.200.255", "10.0.255.255", "10.1.0.0", "9.255.255.255"):
        inside = sum(ipaddress.ip_address(probe) in n for n in nets)
        assert inside == int(peer.contains(probe)), probe  # once if admitted, never if excepted


def test_rules_are_packed_as_the_program_reads_them():
    pods = [pod("x/a", "10.1.0.1", {"app": "web"}, ports=[{"name": "http", "containerPort": 8080}]),
            pod("x/b", "10.1.0.2", {"app": "client"})]
    spec = {"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"port": 80, "endPort": 90}, {"port": "http"}, {"protocol": "UDP"}]},
                        {}]}
    inp = InputCache().inputs(pods, [make_namespace("x")], [pol("p", spec)], ["10.1.0.1", "10.1.0.2"])
    state = PolicyCompiler().compile(inp)
    want = m.MapContents().build(state, inp.local_ips)
    (rules,) = want.groups.values()
    got = [m.MapRule.unpack(r) for r in rules]
    assert [(r.proto, r.flags & ~m.ANY_PEER, r.lo, r.hi) for r in got] == [
        (6, m.RANGE, 80, 90), (6, m.NAMED, 0, 0), (17, 0, 0, 0), (0, m.ANY_PORT, 0, 0)]
    assert got[-1].flags & m.ANY_PEER and not got[0].flags & m.ANY_PEER
    # the named port resolves on the local pod: (set, 10.1.0.1, 8080) is in the ports map
    assert m.port_key(got[1].port_set, "10.1.0.1", 8080) in want.ports
    # the selected pod is isolated for ingress only; the other local pod has its open entry
    assert want.pods[m.pod_key("10.1.0.1")] == m.POD_VALUE.pack(next(iter(want.groups)), 0)
    assert want.pods[m.pod_key("10.1.0.2")] == m.POD_VALUE.pack(0, 0)
    assert m.peer_key(got[0].peer_set, "10.1.0.2/32") in want.peers


def test_a_label_change_converts_only_what_it_touched():
    pods = [pod(f"x/p{i}", f"10.1.0.{i + 1}", {"app": f"a{i % 4}"}) for i in range(40)]
    pols = [pol(f"p{j}", {"podSelector": {"matchLabels": {"app": f"a{j}"}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"a{(j + 1) % 4}"}}}]}]})
            for j in range(4)]
    cache, compiler, contents = InputCache(), PolicyCompiler(), m.MapContents()
    local = [p.status.pod_ip for p in pods[:10]]
    first = contents.build(compiler.compile(cache.inputs(pods, [make_namespace("x")], pols, local)), local)
    before = dict(contents._sets)
    pods[20] = pods[20].with_meta(labels={"app": "a1"})  # a0 -> a1: leaves one set, joins another
    second = contents.build(compiler.compile(cache.inputs(pods, [make_namespace("x")], pols, local)), local)
    changed = [n for n, v in contents._sets.items() if before[n][0] is not v[0]]
    assert len(changed) == 2
    assert len(set(second.peers.items()) ^ set(first.peers.items())) == 2  # one element out, one in
    assert second.groups == first.groups and second.pods == first.pods


def test_numbers_are_the_same_in_every_process():
    code = "from podnet.policy.ebpf.maps import object_id; print(object_id('gi_0123456789abcdef'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == m.object_id("gi_0123456789abcdef") != 0
