"""The lab's EndpointSlice controller: slices planned against the ones that exist (at most
1000 endpoints each, only changed slices written), and the controller following a real
SQLite store, rewriting only the slices of the Services a change concerns."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from podnet.lab.endpointcontroller import run
from podnet.lab.endpoints import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME,
    endpoint_slices,
    plan_slices,
)
from podnet.model.objects import EndpointSlice, Node, Pod, Service
from podnet.store import open_store
from podnet.store.objects import ObjectStore


def pod(name: str, ip: str | None, labels: dict | None = None, node: str = "node-1", port: int = 8080,
        ns: str = "default", phase: str = "Running") -> Pod:
    return Pod.model_validate({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels if labels is not None else {"app": "web"},
                     "uid": f"uid-{name}"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})}})


def service(name: str = "web", selector: dict | None = None, ns: str = "default", target="http") -> Service:
    return Service.model_validate({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector if selector is not None else {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": target}]}})


def node(name: str, zone: str | None) -> Node:
    return Node.model_validate({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "labels": {"topology.kubernetes.io/zone": zone} if zone else {}}})


def many(n: int) -> list[Pod]:
    return [pod(f"p{i:05d}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(n)]


def stored(slices: list[EndpointSlice], rev: int = 7) -> list[EndpointSlice]:
    return [s.with_meta(resource_version=str(rev)) for s in slices]  # type: ignore[misc]


def plan(svc, pods, existing=(), zones=None, taken=lambda n: False):
    return plan_slices("default", "web", svc, pods, (zones or {}).get, existing, taken, "2024-01-01T00:00:00.000000Z")


# ---------------------------------------------------------------------- planning


def test_at_most_a_thousand_endpoints_per_slice_each_annotated():
    slices = plan(service(), many(2500)).create
    assert [len(s.endpoints) for s in slices] == [1000, 1000, 500]
    base = slices[0].name
    assert [s.name for s in slices] == [base, f"{base}-2", f"{base}-3"]
    for s in slices:
        assert s.metadata.labels == {SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY}
        assert s.metadata.annotations[TRIGGER_TIME] == "2024-01-01T00:00:00.000000Z"
        assert [(p.name, p.port) for p in s.ports] == [("http", 8080)]


def test_nothing_to_write_when_the_slices_already_say_it():
    pods = many(1500)
    existing = stored(plan(service(), pods).create)
    assert not plan(service(), pods, existing)


def test_a_pod_gone_or_added_rewrites_only_the_slice_that_holds_it_or_has_room():
    pods = many(2500)
    existing = stored(plan(service(), pods).create)
    gone = plan(service(), pods[:1200] + pods[1201:], existing)
    assert not gone.create and not gone.delete
    assert [s.name for s in gone.update] == [existing[1].name] and len(gone.update[0].endpoints) == 999
    assert gone.update[0].metadata.resource_version == "7"  # compare-and-swap on what was read
    added = plan(service(), [*pods, pod("zz", "10.200.0.1")], existing)
    assert [s.name for s in added.update] == [existing[2].name] and len(added.update[0].endpoints) == 501
    assert not added.create and not added.delete


def test_a_new_slice_when_every_slice_is_full_named_clear_of_others():
    pods = many(1000)
    existing = stored(plan(service(), pods).create)
    taken = {f"{existing[0].name}-2"}
    p = plan(service(), [*pods, pod("zz", "10.200.0.1")], existing, taken=taken.__contains__)
    assert not p.update and not p.delete
    assert [s.name for s in p.create] == [f"{existing[0].name}-3"]


def test_readiness_named_ports_node_and_zone():
    pods = [pod("a", "10.0.0.2", node="node-1"), pod("b", "10.0.0.3", node="node-2", port=9090),
            pod("pending", None, phase="Pending"), pod("other", "10.0.0.4", labels={"app": "db"}),
            pod("elsewhere", "10.0.0.5", ns="shop")]
    slices = plan(service(), pods, zones={"node-1": "a"}).create
    by_port = {s.ports[0].port: s for s in slices}
    assert set(by_port) == {8080, 9090}
    (a,) = by_port[8080].endpoints
    assert (a.target_ref.name, a.node_name, a.zone, a.conditions.is_ready) == ("a", "node-1", "a", True)
    (b,) = by_port[9090].endpoints
    assert (b.target_ref.name, b.node_name, b.zone) == ("b", "node-2", None)


def test_selector_change_moves_endpoints_and_a_service_without_pods_keeps_a_placeholder():
    pods = [pod("a", "10.0.0.2"), pod("b", "10.0.0.3", labels={"app": "blue"})]
    existing = stored(plan(service(), pods).create)
    moved = plan(service(selector={"app": "blue"}), pods, existing)
    assert [e.target_ref.name for s in moved.update for e in s.endpoints] == ["b"]
    empty = plan(service(selector={"app": "none"}), pods, existing)
    (placeholder,) = empty.create
    assert placeholder.endpoints == [] and not placeholder.ports and empty.delete == existing
    assert not plan(service(selector={"app": "none"}), pods, stored([placeholder]))


def test_a_deleted_service_or_one_without_selector_loses_its_slices():
    existing = stored(plan(service(), [pod("a", "10.0.0.2")]).create)
    assert plan(None, [], existing).delete == existing
    no_selector = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                          "spec": {"ports": [{"port": 80}]}})
    assert plan(no_selector, [], existing).delete == existing


def test_endpoint_slices_from_scratch():
    (s,) = endpoint_slices([service()], [pod("a", "10.0.0.2")], [node("node-1", "z1")])
    assert s.endpoints[0].zone == "z1" and TRIGGER_TIME in s.metadata.annotations


# ---------------------------------------------------------------------- the controller on a real store


class Controller:
    """The controller on its own thread over a SQLite store; `settle(rev)` waits on its synced file."""

    def __init__(self, tmp_path: Path):
        self.url = f"sqlite://{tmp_path}/podnet.db"
        self.store = ObjectStore(open_store(self.url))
        self.synced = tmp_path / "synced"
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            run(self.url, self.synced, None, self.stopping)
        except BaseException as e:  # reported by settle()
            self.errors.append(e)

    def settle(self, rev: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert not self.errors, self.errors
            try:
                if int(self.synced.read_text()) >= rev:
                    return
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"controller did not reach revision {rev}"
            time.sleep(0.02)  # poll interval of the synced file

    def slices(self, svc: str, ns: str = "default") -> dict[str, EndpointSlice]:
        return {s.name: s for s in self.store.list(EndpointSlice, ns) if s.service_name == svc}

    def names(self, svc: str, ns: str = "default") -> list[str]:
        return sorted(e.target_ref.name for s in self.slices(svc, ns).values() for e in s.endpoints)


@pytest.fixture
def ctl(tmp_path):
    c = Controller(tmp_path)
    yield c
    c.stopping.set()
    c.thread.join(timeout=20)
    assert not c.thread.is_alive()


def test_controller_follows_pods_services_and_nodes(ctl):
    s = ctl.store
    rev, _ = s.apply([node("node-1", "z1"), node("node-2", "z2"), pod("a", "10.0.0.2"),
                      pod("b", "10.0.0.3", labels={"app": "blue"}, node="node-2"),
                      pod("c", "10.0.1.2", ns="shop"), service(), service("cart", {"app": "web"}, ns="shop")])
    ctl.thread.start()
    ctl.settle(rev)
    assert ctl.names("web") == ["a"] and ctl.names("cart", "shop") == ["c"]
    (web,) = ctl.slices("web").values()
    assert web.endpoints[0].zone == "z1"
    cart_rv = next(iter(ctl.slices("cart", "shop").values())).metadata.resource_version

    # a selector change, then a new Service: only their slices are written
    rev, _ = s.apply([service(selector={"app": "blue"})])
    ctl.settle(rev)
    assert ctl.names("web") == ["b"]
    rev, _ = s.apply([service("blue", {"app": "blue"})])
    ctl.settle(rev)
    assert ctl.names("blue") == ["b"]
    assert next(iter(ctl.slices("cart", "shop").values())).metadata.resource_version == cart_rv

    # a pod added, relabelled, deleted
    rev, _ = s.apply([pod("d", "10.0.0.9", labels={"app": "blue"})])
    ctl.settle(rev)
    assert ctl.names("web") == ["b", "d"] == ctl.names("blue")
    rev, _ = s.apply([pod("d", "10.0.0.9", labels={"app": "web"})])
    ctl.settle(rev)
    assert ctl.names("web") == ["b"] and ctl.names("blue") == ["b"]
    rev = s.delete(Pod, "b", "default")
    ctl.settle(rev)
    assert ctl.names("web") == [] and ctl.names("blue") == []
    assert len(ctl.slices("web")) == 1  # the placeholder

    # a node's zone: the Services with pods on it
    rev, _ = s.apply([pod("e", "10.0.0.10", labels={"app": "blue"}, node="node-2")])
    ctl.settle(rev)
    rev, _ = s.apply([node("node-2", "z9")])
    ctl.settle(rev)
    assert {e.zone for sl in ctl.slices("blue").values() for e in sl.endpoints} == {"z9"}
    assert next(iter(ctl.slices("cart", "shop").values())).metadata.resource_version == cart_rv

    # a managed slice deleted by hand comes back; a deleted Service takes its slices
    (name,) = ctl.slices("blue")
    rev = s.delete(EndpointSlice, name, "default")
    ctl.settle(rev)
    assert ctl.names("blue") == ["e"]
    rev = s.delete(Service, "blue", "default")
    ctl.settle(rev)
    assert ctl.slices("blue") == {}
    assert next(iter(ctl.slices("cart", "shop").values())).metadata.resource_version == cart_rv


def test_controller_writes_nothing_when_nothing_changed(ctl):
    s = ctl.store
    rev, _ = s.apply([pod("a", "10.0.0.2"), service()])
    ctl.thread.start()
    ctl.settle(rev)
    (before,) = ctl.slices("web").values()
    # a change that is not in any endpoint (an annotation) concerns no slice
    rev = s.update(s.get(Pod, "a", "default").with_meta(annotations={"note": "x"}))
    ctl.settle(rev)
    (after,) = ctl.slices("web").values()
    assert after.metadata.resource_version == before.metadata.resource_version
    assert s.kv.revision() == rev
