"""ClusterIP and NodePort allocation on a real (temporary) SQLite store."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from podnet.errors import ValidationError
from podnet.model.objects import Namespace, Service
from podnet.services.clusterip import (
    CLUSTERIP_PREFIX,
    NODEPORT_PREFIX,
    allocate_cluster_ips,
    gc_allocations,
    release_service,
)
from podnet.store import open_store
from podnet.store.objects import ObjectStore

CIDR = "10.96.0.0/24"


@pytest.fixture
def url(tmp_path):
    return "sqlite://" + str(tmp_path / "podnet.db")


@pytest.fixture
def kv(url):
    s = open_store(url)
    yield s
    s.close()


def svc(name, ns="default", **spec) -> Service:
    spec.setdefault("ports", [{"port": 80}])
    return Service.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def test_services_without_cluster_ip_get_unique_ones_and_others_pass_through(kv):
    ns = Namespace.model_validate({"metadata": {"name": "shop"}})
    objs = [ns, svc("a"), svc("b"), svc("c", ns="shop")]
    out = allocate_cluster_ips(objs, kv, CIDR)
    assert out[0] is ns
    ips = [o.spec.cluster_ip for o in out[1:]]
    assert len(set(ips)) == 3
    for o, ip in zip(out[1:], ips, strict=True):
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(CIDR)
        assert ip not in ("10.96.0.0", "10.96.0.1", "10.96.0.255")
        assert o.spec.cluster_ips == [ip]
        rec = kv.get(CLUSTERIP_PREFIX + ip)
        assert rec is not None and rec.value["service"] == f"{o.namespace}/{o.name}"


def test_reapply_keeps_the_stored_address_and_ports(kv):
    first = allocate_cluster_ips([svc("web", type="NodePort")], kv, CIDR)
    ObjectStore(kv).apply(first)
    again = allocate_cluster_ips([svc("web", type="NodePort")], kv, CIDR)
    assert again[0].spec.cluster_ip == first[0].spec.cluster_ip
    assert again[0].spec.ports[0].node_port == first[0].spec.ports[0].node_port
    assert 30000 <= first[0].spec.ports[0].node_port <= 32767
    with pytest.raises(ValidationError, match="spec.clusterIP: is immutable"):
        allocate_cluster_ips([svc("web", type="NodePort", clusterIP="10.96.0.77")], kv, CIDR)


def test_explicit_addresses_and_ports_are_reserved_and_checked(kv):
    out = allocate_cluster_ips([svc("a", clusterIP="10.96.0.50", type="NodePort",
                                    ports=[{"port": 80, "nodePort": 30080}])], kv, CIDR)
    assert out[0].spec.cluster_ip == "10.96.0.50" and kv.get(NODEPORT_PREFIX + "30080") is not None
    with pytest.raises(ValidationError) as e:
        allocate_cluster_ips([svc("b", clusterIP="10.96.0.50")], kv, CIDR)
    assert "Service/default/b: field spec.clusterIP: 10.96.0.50 is already allocated to Service default/a" == str(e.value)
    with pytest.raises(ValidationError, match=r"spec.ports\[0\].nodePort: 30080 is already allocated"):
        allocate_cluster_ips([svc("b", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])], kv, CIDR)
    with pytest.raises(ValidationError, match="not in the service CIDR"):
        allocate_cluster_ips([svc("c", clusterIP="10.97.0.1")], kv, CIDR)
    with pytest.raises(ValidationError, match="outside the NodePort range"):
        allocate_cluster_ips([svc("d", type="NodePort", ports=[{"port": 80, "nodePort": 8080}])], kv, CIDR)


def test_headless_external_name_and_health_check_ports(kv):
    ext = Service.model_validate({"metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "a.b"}})
    headless = svc("h", clusterIP="None")
    lb = svc("lb", type="LoadBalancer", externalTrafficPolicy="Local",
             ports=[{"name": "a", "port": 80}, {"name": "b", "port": 443}])
    out = allocate_cluster_ips([ext, headless, lb], kv, CIDR)
    assert out[0] is ext and out[1].spec.cluster_ip == "None"
    ports = {p.node_port for p in out[2].spec.ports} | {out[2].spec.health_check_node_port}
    assert len(ports) == 3 and all(30000 <= p <= 32767 for p in ports)


def test_a_full_range_is_a_clear_error(kv):
    allocate_cluster_ips([svc(f"s{i}") for i in range(5)], kv, "10.96.0.0/29")  # .2 to .6
    with pytest.raises(ValidationError, match="no free address in the service CIDR 10.96.0.0/29"):
        allocate_cluster_ips([svc("one-too-many")], kv, "10.96.0.0/29")


def test_concurrent_applies_never_share_an_address(url):
    results: dict[str, str] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(3)

    def worker(tag: str) -> None:
        store = open_store(url)
        try:
            barrier.wait()
            out = allocate_cluster_ips([svc(f"{tag}-{i}") for i in range(4)], store, "10.96.0.0/28")
            for o in out:
                results[o.name] = o.spec.cluster_ip
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12 and len(set(results.values())) == 12


def test_release_and_gc(kv):
    out = allocate_cluster_ips([svc("a", type="NodePort"), svc("b"), svc("c")], kv, CIDR, now=1000.0)
    ObjectStore(kv).apply(out[:2])  # "c" was reserved but its apply never landed
    assert release_service(kv, out[0]) == 2  # its address and its NodePort
    assert gc_allocations(kv, grace=600, now=1100.0) == []  # still within the grace period
    freed = gc_allocations(kv, grace=600, now=5000.0)
    assert freed == [CLUSTERIP_PREFIX + out[2].spec.cluster_ip]  # b is in use and stays
