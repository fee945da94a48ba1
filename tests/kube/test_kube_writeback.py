"""kube-sync and what the agents write into the store: the network-status annotation an agent
writes onto a Pod in the store is patched onto the API Pod once, the API Pod coming back with it
writes nothing (no loop), an API change of the Pod keeps the store's annotation, a Pod made again
under the same name starts without it; NetworkAttachmentDefinitions reach the store."""

from __future__ import annotations

import json

import pytest

from podnet.kube.crds import network_attachment_definition_crd
from podnet.multinet import ANNOTATION_STATUS
from podnet.multinet.status import write_status
from podnet.store import open_store
from podnet.store.objects import OBJECTS_PREFIX
from tests.kube.conftest import stored

ENTRIES = [{"name": "podnet", "interface": "eth0", "ips": ["10.244.0.5"], "default": True, "dns": {}},
           {"name": "shop/underlay", "interface": "net1", "ips": ["10.97.0.70"], "dns": {}}]


def pod(name: str, marker: str = "") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "shop", "labels": {"app": "db", **({"marker": marker} if marker else {})},
        "annotations": {"k8s.v1.cni.cncf.io/networks": "underlay"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "db", "image": "db"}]}}


def api_annotation(api, name: str) -> str | None:
    obj = api.get("v1", "Pod", name, "shop")
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(ANNOTATION_STATUS)


def store_record(store_url: str, name: str):
    with open_store(store_url, create=False) as kv:
        return kv.get(f"{OBJECTS_PREFIX}Pod/shop/{name}")


@pytest.fixture
def shop(api):
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})


def test_the_agents_network_status_reaches_the_api_pod_once(api, crds, shop, start, store_url):
    api.create(pod("db-1"))
    sync = start()
    assert sync.synced.wait(30)
    uid = api.get("v1", "Pod", "db-1", "shop")["metadata"]["uid"]
    # The agent's write, as its CNI handler makes it.
    with open_store(store_url, create=False) as kv:
        assert write_status(kv, "shop", "db-1", uid, ENTRIES)
    written = store_record(store_url, "db-1")
    text = written.value["metadata"]["annotations"][ANNOTATION_STATUS]
    with api.changed:
        assert api.changed.wait_for(lambda: api_annotation(api, "db-1") == text, 20)
    assert json.loads(api_annotation(api, "db-1"))[1]["interface"] == "net1"
    # The patched Pod comes back through the watch: nothing is written. A Pod created after the
    # patch reaches the store after the patched Pod's event (one watch, in order).
    api.create(pod("marker-1"))
    assert sync.wait(lambda: "shop/marker-1" in stored(store_url, "Pod"), 20)
    assert store_record(store_url, "db-1").revision == written.revision

    # A change of the API Pod (a label) keeps the store's annotation.
    api.apply({**pod("db-1"), "metadata": {**pod("db-1")["metadata"], "labels": {"app": "db", "tier": "1"},
                                          "annotations": {"k8s.v1.cni.cncf.io/networks": "underlay"}}})
    assert sync.wait(lambda: stored(store_url, "Pod")["shop/db-1"]["metadata"]["labels"].get("tier") == "1", 20)
    assert stored(store_url, "Pod")["shop/db-1"]["metadata"]["annotations"][ANNOTATION_STATUS] == text
    with api.changed:  # the apply dropped it from the API Pod: patched on again
        assert api.changed.wait_for(lambda: api_annotation(api, "db-1") == text, 20)

    # Made again under the same name: the old Pod's networks are not the new one's.
    api.delete("v1", "Pod", "db-1", "shop")
    assert sync.wait(lambda: "shop/db-1" not in stored(store_url, "Pod"), 20)
    api.create(pod("db-1"))
    new_uid = api.get("v1", "Pod", "db-1", "shop")["metadata"]["uid"]
    assert sync.wait(lambda: stored(store_url, "Pod").get("shop/db-1", {}).get("metadata", {}).get("uid")
                     == new_uid, 20)
    assert ANNOTATION_STATUS not in stored(store_url, "Pod")["shop/db-1"]["metadata"].get("annotations", {})
    assert api_annotation(api, "db-1") is None


def test_an_annotation_written_while_kube_sync_was_away_is_patched_on_its_return(
        api, crds, shop, start, store_url):
    api.create(pod("db-2"))
    first = start("one")
    assert first.synced.wait(30)
    first.stop()
    uid = api.get("v1", "Pod", "db-2", "shop")["metadata"]["uid"]
    with open_store(store_url, create=False) as kv:
        assert write_status(kv, "shop", "db-2", uid, ENTRIES)
    second = start("two")
    assert second.synced.wait(30)
    with api.changed:
        assert api.changed.wait_for(lambda: api_annotation(api, "db-2") is not None, 20)
    assert json.loads(api_annotation(api, "db-2")) == ENTRIES


def test_network_attachment_definitions_reach_the_store(api, crds, shop, start, store_url):
    api.create(network_attachment_definition_crd())
    config = '{"cniVersion": "1.0.0", "type": "macvlan", "master": "data0", "ipam": {"type": "dhcp"}}'
    api.create({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": "underlay", "namespace": "shop"}, "spec": {"config": config}})
    sync = start()
    assert sync.synced.wait(30)
    assert sync.wait(lambda: "shop/underlay" in stored(store_url, "NetworkAttachmentDefinition"), 30)
    assert stored(store_url, "NetworkAttachmentDefinition")["shop/underlay"]["spec"]["config"] == config
    api.delete("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition", "underlay", "shop")
    assert sync.wait(lambda: "shop/underlay" not in stored(store_url, "NetworkAttachmentDefinition"), 20)


def test_a_failed_patch_is_tried_again(api, crds, shop, start, store_url):
    api.create(pod("db-3"))
    sync = start()
    assert sync.synced.wait(30)
    api.faults.fail_next = [("patch", 503), ("patch", 500)]  # an API server that is briefly unwell
    uid = api.get("v1", "Pod", "db-3", "shop")["metadata"]["uid"]
    with open_store(store_url, create=False) as kv:
        assert write_status(kv, "shop", "db-3", uid, ENTRIES)
    with api.changed:
        assert api.changed.wait_for(lambda: api_annotation(api, "db-3") is not None, 30)
    assert api.faults.fail_next == []
