"""podnet.io/scheduler with real packets on every Service backend that does it: source
hash keeps a client on one endpoint, weights show in the share of connections, a change of
weights or endpoints is an element update; what a backend cannot do balances at random
(the agent's report of it: tests/unit/test_agent_services.py). The topology and drivers
are test_services_dataplane's."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.kernel.nsutil import PYTHON, in_ns, namespaces
from tests.kernel.test_services_dataplane import BACKENDS, Topology, endpoint, names, service, slice_

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SOURCES = [f"10.10.0.{40 + i}" for i in range(16)]  # extra client addresses, on the client's own interface

# Runs in the client namespace: `count` connections from each source address, the backend each reached.
SOURCED = r"""
import json, socket, sys
target, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
out = {}
for src in sys.argv[3].split(","):
    got = out[src] = []
    for _ in range(count):
        s = socket.socket(); s.settimeout(2)
        try:
            s.bind((src, 0)); s.connect((target, port))
            got.append((s.makefile().readline().split() or ["closed"])[0])
        except OSError as e:
            got.append(f"error {e}")
        finally:
            s.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module", params=["nft", "ebpf", "iptables-nft"])
def topo(request):
    if request.param.startswith("iptables") and not shutil.which(request.param):
        pytest.skip(f"needs {request.param}")
    with namespaces() as ns:
        t = Topology(ns, request.param)
        try:
            for ip in SOURCES:
                in_ns(t.client, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            yield t
        finally:
            t.close()


def annotated(body: dict, **annotations: str) -> dict:
    body["metadata"]["annotations"] = {f"podnet.io/{k}": v for k, v in annotations.items()}
    return body


def from_sources(topo, target: str, port: int, count: int) -> dict[str, list[str]]:
    out = in_ns(topo.client, PYTHON, "-c", SOURCED, target, str(port), ",".join(SOURCES), str(count),
                timeout=60)
    return json.loads(out.stdout)


def element_update(topo, r: dict) -> None:
    """The change went in as elements (iptables: kube-proxy's full rewrite, by design)."""
    assert r["sent"], r
    if topo.backend.startswith("iptables"):
        return
    assert not r["full"], r
    if topo.backend == "nft":
        lines = [x for x in r["script"].splitlines() if x.strip()]
        assert lines and all(x.startswith(("add element", "delete element")) for x in lines), r["script"]


def four() -> list[dict]:
    return [endpoint("b1"), endpoint("b2"), endpoint("b3"), endpoint("b4")]


def test_source_hash_keeps_each_client_on_one_backend_and_spreads_clients(topo):
    if topo.backend.startswith("iptables"):
        pytest.skip("iptables has no source hash: balanced at random (tests/unit/test_services_schedulers.py)")
    objs = [annotated(service("sh", "10.96.6.1"), scheduler="sh"), slice_("sh", four(), ports=[{"port": 8080}]),
            service("rnd", "10.96.6.9"), slice_("rnd", four(), ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    hashed = from_sources(topo, "10.96.6.1", 80, 6)
    assert all(len(set(got)) == 1 and got[0] in BACKENDS for got in hashed.values()), hashed
    assert len({got[0] for got in hashed.values()}) >= 2, hashed  # 16 clients on one of 4: p = 4**-15
    # the same clients without the annotation are spread (the check above can fail)
    spread = from_sources(topo, "10.96.6.9", 80, 6)
    assert any(len(set(got)) > 1 for got in spread.values()), spread
    if topo.backend == "nft":  # the table deleted behind the applier's back and rebuilt: the same choices
        in_ns(topo.node, "nft", "delete", "table", "ip", "podnet-svc")
        r = topo.driver.apply(objs, resync=True)  # (the agent's resync, after its check found it)
        assert r["full"] and r["reason"] == "table missing", r
        assert {src: got[0] for src, got in from_sources(topo, "10.96.6.1", 80, 2).items()} == \
            {src: got[0] for src, got in hashed.items()}
    # an endpoint fewer: an element update; each client again on one backend
    objs[1] = slice_("sh", four()[:3], ports=[{"port": 8080}])
    element_update(topo, topo.driver.apply(objs))
    again = from_sources(topo, "10.96.6.1", 80, 4)
    assert all(len(set(got)) == 1 and got[0] in ("b1", "b2", "b3") for got in again.values()), again


def shares(topo, target: str, light: str) -> list[str]:
    """Connections until the light backend was seen (at most 1 000, in runs of 100)."""
    got: list[str] = []
    while light not in got and len(got) < 1000:
        got += names(topo.probe(target, 80, count=100))
    return got


def test_weights_share_the_connections_and_a_change_is_an_element_update(topo):
    b1, b2 = BACKENDS["b1"], BACKENDS["b2"]
    objs = [annotated(service("wrr", "10.96.6.2"), scheduler="wrr", weights=f"{b1}=1,{b2}=9"),
            slice_("wrr", [endpoint("b1"), endpoint("b2")], ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    got = shares(topo, "10.96.6.2", "b1")
    # b2's share is 0.9: over n >= 100 connections 0.7 is >= 6.6 sigma below it (and 4 above an even split)
    assert set(got) == {"b1", "b2"} and got.count("b2") >= 0.7 * len(got), (got.count("b2"), len(got))
    annotated(objs[0], scheduler="wrr", weights=f"{b1}=9,{b2}=1")
    element_update(topo, topo.driver.apply(objs))
    got = shares(topo, "10.96.6.2", "b2")
    assert set(got) == {"b1", "b2"} and got.count("b1") >= 0.7 * len(got), (got.count("b1"), len(got))
    # weight 0 takes no new flows; an endpoint added (weight 1) is an element update too
    annotated(objs[0], scheduler="wrr", weights=f"{b1}=0,{b2}=1")
    objs[1] = slice_("wrr", [endpoint("b1"), endpoint("b2"), endpoint("b3")], ports=[{"port": 8080}])
    element_update(topo, topo.driver.apply(objs))
    got = shares(topo, "10.96.6.2", "b3")
    assert set(got) == {"b2", "b3"}, got


def test_least_connection_where_the_backend_cannot_count_balances_at_random(topo):
    if topo.backend == "ebpf":
        pytest.skip("the eBPF backend does least connection (test_services_ebpf.py)")
    objs = [annotated(service("lc", "10.96.6.3"), scheduler="lc"), slice_("lc", four(), ports=[{"port": 8080}])]
    topo.driver.apply(objs)
    got = shares(topo, "10.96.6.3", "b4")
    assert set(got) == set(BACKENDS), got
