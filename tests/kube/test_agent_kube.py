"""The agent's side of the Kubernetes source: a CNI ADD waits (bounded) for a Pod the store does
not know yet, and the agent records that its node is ready for kube-sync."""

from __future__ import annotations

import threading

import pytest

from podnet.agent.readiness import report_ready
from podnet.cni.errors import CNIError
from podnet.cni.podwait import wait_for_pod
from podnet.store import open_store
from podnet.store.layout import AGENTS

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"}, "spec": {}}


@pytest.fixture
def kv(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/s.db", create=True)
    yield store
    store.close()


def test_an_add_waits_for_the_pod_to_arrive(kv, tmp_path):
    done = threading.Event()
    result: list = []

    def add() -> None:
        with open_store(f"sqlite://{tmp_path}/s.db", create=False) as own:
            result.append(wait_for_pod(own, "shop", "web", 30.0))
        done.set()

    t = threading.Thread(target=add)
    t.start()
    assert not done.is_set()  # nothing to find yet
    kv.put("/podnet/objects/Pod/shop/web", POD)
    t.join(30)
    assert done.is_set() and result[0] < 30.0


def test_an_add_gives_up_with_try_again_later(kv):
    with pytest.raises(CNIError) as e:
        wait_for_pod(kv, "shop", "ghost", 0.05)
    assert e.value.code == 11 and "shop/ghost is not in podnet's store" in e.value.msg


def test_a_ready_agent_says_so_in_the_store(kv):
    report_ready(kv, "node-1", 42)
    rec = kv.get(f"{AGENTS}node-1")
    assert rec.value["ready"] is True and rec.value["revision"] == 42


def test_an_add_tells_a_deleted_or_replaced_pod_from_one_still_there(kv):
    from podnet.cni.podwait import ABSENT, deleted_since, pod_uid

    assert pod_uid(kv, "shop", "web") is ABSENT
    assert not deleted_since(kv, "shop", "web", ABSENT)  # not in the store at the start: not looked for
    kv.put("/podnet/objects/Pod/shop/web", {**POD, "metadata": {**POD["metadata"], "uid": "u1"}})
    uid = pod_uid(kv, "shop", "web")
    assert uid == "u1" and not deleted_since(kv, "shop", "web", uid)
    kv.put("/podnet/objects/Pod/shop/web", {**POD, "metadata": {**POD["metadata"], "uid": "u2"}})
    assert deleted_since(kv, "shop", "web", uid)  # made again under its name
    kv.delete("/podnet/objects/Pod/shop/web")
    assert deleted_since(kv, "shop", "web", uid)
