"""Stored objects that do not decode (an unknown kind, a value that fails validation):
skipped and reported by every reader, never fatal, and removable from the CLI."""

from __future__ import annotations

import logging

import pytest

from podnet.agent.cache import ObjectCache
from podnet.cli.main import main
from podnet.ipam import IPAM
from podnet.model.objects import IPPool, Node, Service
from podnet.services.clusterip import CLUSTERIP_PREFIX
from podnet.store.base import Event
from podnet.store.objects import ObjectStore, UndecodableObject, key_of, stored_form
from podnet.store.sqlite import SQLiteStore

UNKNOWN_KEY = "/podnet/objects/Frobnicator/default/x"
UNKNOWN = {"apiVersion": "example.io/v9", "kind": "Frobnicator", "metadata": {"name": "x", "namespace": "default"}}
BAD_KEY = "/podnet/objects/Service/default/bad"
BAD = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "default"},
       "spec": {"ports": "80"}}
SVC = ("apiVersion: v1\nkind: Service\nmetadata: {name: good}\n"
       "spec: {ports: [{port: 80}], selector: {app: web}}\n")


def good_service(name: str = "good") -> Service:
    return Service.model_validate({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}})


@pytest.fixture
def kv(tmp_path, monkeypatch):
    monkeypatch.setenv("PODNET_STORE", f"sqlite://{tmp_path}/podnet.db")
    store = SQLiteStore(str(tmp_path / "podnet.db"))
    yield store
    store.close()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def poison(kv):
    kv.put(UNKNOWN_KEY, UNKNOWN)
    kv.put(BAD_KEY, BAD)


# ---------------------------------------------------------------- decoding


def test_decode_names_the_key_and_the_field(kv):
    poison(kv)
    with pytest.raises(UndecodableObject) as e:
        ObjectStore(kv).get(Service, "bad")
    assert str(e.value) == (f"{BAD_KEY}: stored object does not validate: field spec.ports: "
                            "input should be a valid list (got '80')")
    kv.put("/podnet/objects/Service/default/odd", {**UNKNOWN, "metadata": {"name": "odd"}})
    listing = ObjectStore(kv).scan(Service)
    assert listing.objects == []
    assert sorted(b.key for b in listing.undecodable) == [BAD_KEY, "/podnet/objects/Service/default/odd"]


def test_lists_and_watches_skip_what_does_not_decode(kv, caplog):
    store = ObjectStore(kv)
    store.apply([good_service()])
    poison(kv)
    with caplog.at_level(logging.WARNING, logger="podnet.store"):
        assert [s.name for s in store.list(Service)] == ["good"]
    assert f"skipping {BAD_KEY}: stored object does not validate" in caplog.text
    start = kv.revision()
    kv.put(key_of(good_service()), {**BAD, "metadata": {"name": "good", "namespace": "default"}})
    kv.put(key_of(good_service("other")), stored_form(good_service("other")))
    events = store.watch(Service, start + 1)
    first, second = next(events), next(events)
    assert (first.type, first.object, first.key) == ("DELETED", None, key_of(good_service()))
    assert second.type == "ADDED" and second.object.name == "other"


# ---------------------------------------------------------------- the agent's cache


def test_agent_cache_loads_past_unknown_kinds_and_bad_objects(kv, caplog):
    ObjectStore(kv).apply([good_service(), Node.model_validate({"metadata": {"name": "n1"}})])
    poison(kv)
    records, _ = kv.list("/podnet/")
    cache = ObjectCache(unkept=("Service",))
    seen = []
    with caplog.at_level(logging.WARNING):
        cache.load(records, seen.append)
    assert [n.name for n in cache.list(Node)] == ["n1"]
    assert sorted((e.type, e.object.name if e.object else None) for e in seen) == [
        ("ADDED", "good"), ("ADDED", "n1"), ("DELETED", None)]
    assert "unknown kind 'Frobnicator'" in caplog.text and BAD_KEY in caplog.text
    # A kept object that turns bad is gone from the cache, as a fresh list would show it.
    node_key = "/podnet/objects/Node/n1"
    typed = cache.apply(Event("MODIFIED", node_key, {"apiVersion": "v1", "kind": "Node",
                                                     "metadata": {"name": "n1"}, "spec": "x"}, 99))
    assert typed.type == "DELETED" and typed.object is None and cache.list(Node) == []
    assert cache.apply(Event("MODIFIED", UNKNOWN_KEY, UNKNOWN, 100)) is None


def test_ipam_allocates_past_a_bad_pool(kv):
    ObjectStore(kv).apply([IPPool.model_validate({"metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/24"}})])
    kv.put("/podnet/objects/IPPool/broken", {"apiVersion": "podnet.io/v1", "kind": "IPPool",
                                             "metadata": {"name": "broken"}, "spec": {"cidr": "nope"}})
    assert IPAM(kv).allocate("h", "n1").pool == "p"


# ---------------------------------------------------------------- the CLI


def test_get_lists_the_good_objects_and_warns_naming_the_bad_key(kv, tmp_path, capsys):
    (tmp_path / "svc.yaml").write_text(SVC)
    assert run(capsys, "apply", "-f", str(tmp_path / "svc.yaml"))[0] == 0
    poison(kv)
    code, out, err = run(capsys, "get", "svc")
    assert code == 0 and "good" in out and "bad" not in out
    assert err.strip() == (f"warning: skipped {BAD_KEY}: stored object does not validate: field spec.ports: "
                           f"input should be a valid list (got '80') (remove it with `podnet delete --key {BAD_KEY}`)")
    code, _, err = run(capsys, "get", "svc", "bad")
    assert code == 1 and "Traceback" not in err and f"podnet delete --key {BAD_KEY}" in err
    # Applying a valid Service over the bad one repairs it.
    (tmp_path / "fix.yaml").write_text(SVC.replace("good", "bad"))
    assert run(capsys, "apply", "-f", str(tmp_path / "fix.yaml"))[1].strip() == "Service/default/bad configured"


def test_delete_removes_a_bad_object_by_kind_and_name_and_by_key(kv, tmp_path, capsys):
    poison(kv)
    kv.put(CLUSTERIP_PREFIX + "10.96.0.7", {"service": "default/bad", "created": 0})
    code, out, err = run(capsys, "delete", "svc", "bad")
    assert code == 0, err
    assert out.strip().startswith(f"{BAD_KEY} deleted (it could not be read: stored object does not validate")
    assert kv.get(BAD_KEY) is None and kv.get(CLUSTERIP_PREFIX + "10.96.0.7") is None
    code, out, _ = run(capsys, "delete", "--key", UNKNOWN_KEY)
    assert code == 0 and out.startswith(f"{UNKNOWN_KEY} deleted") and kv.get(UNKNOWN_KEY) is None
    code, _, err = run(capsys, "delete", "--key", UNKNOWN_KEY)
    assert code == 1 and err.strip() == f"error: {UNKNOWN_KEY}: not found"
    code, _, err = run(capsys, "delete", "--key", "/podnet/ipam/blocks/10.0.0.0-26")
    assert code == 1 and "is not an object key" in err
