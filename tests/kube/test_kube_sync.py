"""kube-sync against the fake API server and a SQLite store: only the dataplane fields reach the
store, in the shape `podnet apply` writes; status noise writes nothing; objects deleted while it
was away go; invalid podnet objects never reach the store and get an Event and a status
condition naming the field; one replica leads (Lease) and another takes over; a deposed leader's
writes are fenced; a ready agent's Node gets NetworkUnavailable=False."""

from __future__ import annotations

import pytest

from podnet.kube.client import KubeClient, KubeConfig
from podnet.kube.sync import Reporter, StoreWriter
from podnet.store import open_store
from podnet.store.layout import AGENTS
from podnet.store.objects import OBJECTS_PREFIX
from tests.kube.conftest import stored


def full_pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "shop", "labels": {"app": "web"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}" * 100,
                        "podnet.io/ippools": "[\"default\"]"},
        "managedFields": [{"manager": "kubectl", "operation": "Update"}], "finalizers": ["x/y"]},
        "spec": {"nodeName": "node-1", "restartPolicy": "Always", "serviceAccountName": "default",
                 "volumes": [{"name": "v", "emptyDir": {}}], "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "web", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                                 "resources": {"limits": {"cpu": "1"}},
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}}


def test_reflects_only_the_dataplane_fields(api, crds, start, store_url):
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}})
    api.create(full_pod("web-1"))
    api.patch_status("v1", "Pod", "web-1", "shop", {
        "phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}], "hostIP": "10.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}], "containerStatuses": [{"name": "web", "ready": True}]})
    api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    api.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {
        "name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True}, "nodeName": "node-1",
                       "deprecatedTopology": {"a": "b"}, "hints": {"forZones": [{"name": "a"}]}}]})
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.244.0.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                           "conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kernelVersion": "6"}}})
    api.create({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "default"},
                "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})
    sync = start()
    assert sync.synced.wait(30)
    pod = stored(store_url, "Pod")["shop/web-1"]
    assert pod["metadata"] == {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                               "annotations": {"podnet.io/ippools": "[\"default\"]"},
                               "uid": api.get("v1", "Pod", "web-1", "shop")["metadata"]["uid"]}
    assert pod["spec"]["containers"] == [{"name": "web", "ports": [{"name": "http", "containerPort": 8080,
                                                                     "protocol": "TCP"}]}]
    assert pod["status"] == {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}],
                             "hostIP": "10.0.0.1"}
    svc = stored(store_url, "Service")["shop/web"]
    assert svc["spec"]["clusterIP"] == api.get("v1", "Service", "web", "shop")["spec"]["clusterIP"]
    eps = stored(store_url, "EndpointSlice")["shop/web-abc"]
    assert eps["endpoints"][0] == {"addresses": ["10.244.0.5"], "conditions": {"ready": True}, "nodeName": "node-1"}
    assert stored(store_url, "Node")["node-1"]["status"] == {"addresses": [{"type": "InternalIP",
                                                                            "address": "10.0.0.1"}]}
    assert stored(store_url, "Namespace")["shop"]["metadata"]["labels"] == {
        "team": "a", "kubernetes.io/metadata.name": "shop"}
    assert stored(store_url, "IPPool")["default"]["spec"]["cidr"] == "10.244.0.0/16"
    # the agents' decoders read it as they read what `podnet apply` writes
    from podnet.agent.records import pod_record
    assert pod_record(pod).ip == "10.244.0.5" and pod_record(pod).node == "node-1"

    # Status noise (conditions, container statuses) changes no dataplane field: nothing is written.
    with open_store(store_url, create=False) as kv:
        before = kv.revision()
    unchanged = sync.writer.stats.unchanged
    api.patch_status("v1", "Pod", "web-1", "shop", {"conditions": [{"type": "Ready", "status": "False"}]})
    assert sync.wait(lambda: sync.writer.stats.unchanged > unchanged, 20)
    with open_store(store_url, create=False) as kv:
        assert kv.revision() == before
    # A label change is written.
    api.apply({**full_pod("web-1"), "metadata": {**full_pod("web-1")["metadata"], "labels": {"app": "db"}}})
    assert sync.wait(lambda: stored(store_url, "Pod")["shop/web-1"]["metadata"]["labels"] == {"app": "db"}, 20)


def test_objects_deleted_while_it_was_away_are_deleted(api, crds, start, store_url):
    for name in ("a", "b"):
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    first = start("one")
    assert first.synced.wait(30)
    assert {"a", "b"} <= set(stored(store_url, "Namespace"))
    first.stop()
    first.elector.leading.wait(0)  # stopped
    api.delete("v1", "Namespace", "b")
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}})
    api.compact()
    second = start("two")
    assert second.synced.wait(30)
    assert second.wait(lambda: "b" not in stored(store_url, "Namespace"), 20)
    assert {"a", "c"} <= set(stored(store_url, "Namespace"))


def test_invalid_podnet_objects_never_reach_the_store(api, kubeconfig, crds, start, store_url):
    # The schema takes blockSize 20-128 for either family; podnet refuses /40 for IPv4.
    api.create({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "bad"},
                "spec": {"cidr": "10.10.0.0/16", "blockSize": 40}})
    sync = start()
    assert sync.synced.wait(30)
    assert "bad" not in stored(store_url, "IPPool")

    def condition() -> dict | None:
        pool = api.get("podnet.io/v1", "IPPool", "bad")
        return next((c for c in (pool.get("status") or {}).get("conditions") or () if c["type"] == "Accepted"), None)

    with api.changed:
        assert api.changed.wait_for(lambda: condition() is not None, 20)
    cond = condition()
    assert cond["status"] == "False" and "blockSize 40 is out of range" in cond["message"]
    events = [e for e in api.objects("v1", "Event") if e["involvedObject"]["name"] == "bad"]
    assert events and events[0]["type"] == "Warning" and "field spec: blockSize 40" in events[0]["message"]
    # Fixed: it reaches the store and its condition turns True.
    pool = api.get("podnet.io/v1", "IPPool", "bad")
    pool["spec"]["blockSize"] = 26
    api.apply(pool)
    assert sync.wait(lambda: "bad" in stored(store_url, "IPPool"), 20)
    with api.changed:
        assert api.changed.wait_for(lambda: (condition() or {}).get("status") == "True", 20)


def test_one_replica_leads_and_another_takes_over(api, crds, start, store_url):
    a = start("a")
    assert a.synced.wait(30)
    b = start("b")
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "during-a"}})
    assert a.wait(lambda: "during-a" in stored(store_url, "Namespace"), 20)
    assert not b.elector.leading.is_set()
    lease = api.get("coordination.k8s.io/v1", "Lease", "podnet-kube-sync", "kube-system")
    assert lease["spec"]["holderIdentity"] == "a"
    a.stop()  # releases the Lease: b takes over
    assert b.synced.wait(30)
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "during-b"}})
    assert b.wait(lambda: "during-b" in stored(store_url, "Namespace"), 20)
    lease = api.get("coordination.k8s.io/v1", "Lease", "podnet-kube-sync", "kube-system")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] >= 1


def test_a_deposed_leader_cannot_write(api, kubeconfig, store_url):
    from podnet.kube.sync import Deposed
    from podnet.store.base import Op

    client = KubeClient(KubeConfig.load(kubeconfig))
    reporter = Reporter(client, "x", enabled=False)
    with open_store(store_url) as kv1, open_store(store_url) as kv2:
        old = StoreWriter(kv1, "old", 1, reporter)
        old.take_fence()
        new = StoreWriter(kv2, "new", 2, reporter)
        new.take_fence()
        with pytest.raises(Deposed):
            old.commit([Op.put(f"{OBJECTS_PREFIX}Namespace/late", {"kind": "Namespace"})])
        assert kv1.get(f"{OBJECTS_PREFIX}Namespace/late") is None


@pytest.mark.parametrize("unwell", [False, True], ids=["api-well", "api-briefly-unwell"])
def test_a_ready_agent_makes_its_node_network_available(api, crds, start, store_url, unwell):
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    if unwell:  # the condition's patch fails twice: nothing else would ask again, so it is retried
        api.faults.fail_next = [("patch", 503), ("patch", 500)]
    sync = start()
    assert sync.synced.wait(30)
    with open_store(store_url, create=False) as kv:
        kv.put(f"{AGENTS}node-1", {"ready": True})

    def network() -> dict | None:
        node = api.get("v1", "Node", "node-1")
        return next((c for c in node["status"].get("conditions") or () if c["type"] == "NetworkUnavailable"), None)

    with api.changed:
        assert api.changed.wait_for(lambda: network() is not None, 20)
    assert network()["status"] == "False" and network()["reason"] == "PodnetIsUp"
    assert [c["type"] for c in api.get("v1", "Node", "node-1")["status"]["conditions"]] == [
        "Ready", "NetworkUnavailable"]  # merged by type, the kubelet's condition kept
    assert api.faults.fail_next == []


def test_queued_watch_events_are_written_in_one_transaction_and_in_order(api, kubeconfig, store_url):
    """A transaction per watch event capped kube-sync at what the store commits per second (a
    3-member etcd: fewer than 200), so a burst of EndpointSlice changes queued behind it."""
    from podnet.kube.reflector import Change
    from podnet.kube.sync import _Batch
    from podnet.model.objects import Namespace

    def ns(name: str, team: str) -> dict:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": team}}}

    reporter = Reporter(KubeClient(KubeConfig.load(kubeconfig)), "x", enabled=False)
    with open_store(store_url) as kv:
        writer = StoreWriter(kv, "w", 1, reporter)
        writer.take_fence()
        writer.apply(_Batch(Namespace, [Change("ADDED", "gone", ns("gone", "a"))]))
        before = writer.stats.txns
        events = [_Batch(Namespace, [Change("ADDED", f"ns-{i}", ns(f"ns-{i}", "a"))]) for i in range(50)]
        events += [_Batch(Namespace, [Change("MODIFIED", "ns-3", ns("ns-3", "b"))]),  # later wins
                   _Batch(Namespace, [Change("DELETED", "ns-4", ns("ns-4", "a"))]),  # made and gone
                   _Batch(Namespace, [Change("DELETED", "gone", ns("gone", "a"))])]
        writer.apply(*events)
        assert writer.stats.txns - before == 1
    names = stored(store_url, "Namespace")
    assert len(names) == 49 and "ns-4" not in names and "gone" not in names
    with open_store(store_url, create=False) as kv:
        assert kv.get(f"{OBJECTS_PREFIX}Namespace/ns-3").value["metadata"]["labels"] == {"team": "b"}


def test_an_invalid_core_object_keeps_its_last_valid_version(api, crds, start, store_url):
    """A Service podnet refuses (a port out of range: the fake API server checks custom resources
    only, so it lets it through as a server of another version might): not written, the store
    keeps the version before, a Warning Event names the field; once fixed it is written."""
    api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"ports": [{"port": 80}]}})
    sync = start()
    assert sync.synced.wait(30)
    assert stored(store_url, "Service")["default/web"]["spec"]["ports"][0]["port"] == 80

    def events() -> list[dict]:
        return [e for e in api.objects("v1", "Event") if e["involvedObject"].get("kind") == "Service"]

    svc = api.get("v1", "Service", "web", "default")
    svc["spec"]["ports"][0] = {**svc["spec"]["ports"][0], "port": 0, "targetPort": 0}
    api.apply(svc)
    with api.changed:
        assert api.changed.wait_for(lambda: events(), 20)
    [event] = events()
    assert event["type"] == "Warning" and event["reason"] == "InvalidObject"
    assert "field spec.ports[0].port: port 0 is out of range" in event["message"], event["message"]
    assert stored(store_url, "Service")["default/web"]["spec"]["ports"][0]["port"] == 80  # the last valid one
    svc = api.get("v1", "Service", "web", "default")
    svc["spec"]["ports"][0] = {**svc["spec"]["ports"][0], "port": 8080, "targetPort": 8080}
    api.apply(svc)
    assert sync.wait(lambda: stored(store_url, "Service")["default/web"]["spec"]["ports"][0]["port"] == 8080, 20)
