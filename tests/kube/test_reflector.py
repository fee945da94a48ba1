"""podnet's reflector against the fake API server: list in pages, watch from the list's
resourceVersion with bookmarks, 410 -> relist with what vanished meanwhile reported as
deleted, a stream cut inside an event, an API server down at start, backoff."""

from __future__ import annotations

import queue
import threading

import pytest

from podnet.kube.client import KubeClient, KubeConfig, Resource
from podnet.kube.reflector import Backoff, Reflector
from tests.support.fake_apiserver import FakeApiServer

PODS = Resource("", "v1", "pods", "Pod", True)


def pod(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"containers": [{"name": "c"}]}}


class Recorder:
    """The reflector's handler: every batch, and a queue to wait on (no sleeps)."""

    def __init__(self) -> None:
        self.batches: queue.Queue = queue.Queue()
        self.state: dict[str, str] = {}  # key -> resourceVersion, as a consumer would keep it

    def __call__(self, r: Reflector, changes: list, rv: str, relist: bool) -> None:
        for ch in changes:
            if ch.type == "DELETED":
                self.state.pop(ch.key, None)
            else:
                self.state[ch.key] = ch.object["metadata"]["resourceVersion"]
        self.batches.put((relist, [(c.type, c.key) for c in changes]))

    def next(self, timeout: float = 20.0) -> tuple[bool, list]:
        return self.batches.get(timeout=timeout)

    def until(self, pred, timeout: float = 20.0) -> list:  # noqa: ANN001
        seen = []
        while True:
            b = self.next(timeout)
            seen.append(b)
            if pred(b):
                return seen


@pytest.fixture
def client(api, kubeconfig):
    c = KubeClient(KubeConfig.load(kubeconfig))
    yield c
    c.close()


def run(reflector: Reflector) -> threading.Thread:
    t = threading.Thread(target=reflector.run, daemon=True)
    t.start()
    return t


def stop(reflector: Reflector, t: threading.Thread) -> None:
    reflector.stop()
    reflector.client.close()
    t.join(20)
    assert not t.is_alive()


def test_lists_in_pages_then_watches_from_the_lists_version(api, client):
    for i in range(7):
        api.create(pod(f"p{i}"))
    rec = Recorder()
    r = Reflector(client, PODS, rec, page_size=3, backoff=Backoff(0.05, 0.2))
    t = run(r)
    try:
        relist, changes = rec.next()
        assert relist and sorted(changes) == [("ADDED", f"default/p{i}") for i in range(7)]
        api.create(pod("p7"))
        api.delete("v1", "Pod", "p0", "default")
        seen = rec.until(lambda b: ("DELETED", "default/p0") in b[1])
        assert [c for _, cs in seen for c in cs] == [("ADDED", "default/p7"), ("DELETED", "default/p0")]
        assert r.lists == 1 and api.stats.requests[("list", "pods")] == 3  # three pages, one list
    finally:
        stop(r, t)


def test_bookmarks_move_the_version_on(api, client):
    rec = Recorder()
    r = Reflector(client, PODS, rec, backoff=Backoff(0.05, 0.2))
    t = run(r)
    try:
        rec.next()
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})  # not a pod
        target = str(api.rv)
        with r.progress:
            r.progress.wait_for(lambda: int(r.resource_version or 0) >= int(target), timeout=20)
        assert int(r.resource_version) >= int(target)  # a bookmark, no pod event
        assert rec.batches.empty()
    finally:
        stop(r, t)


def test_410_relists_and_reports_what_vanished_as_deleted(api, client):
    for name in ("a", "b", "c"):
        api.create(pod(name))
    rec = Recorder()
    r = Reflector(client, PODS, rec, backoff=Backoff(0.05, 0.2))
    t = run(r)
    try:
        rec.next()
        # While the watch is gone (dropped), b goes and d comes, and the history is compacted.
        api.faults.expire_watches = 1
        api.drop_watches()
        with api.lock:
            api.delete("v1", "Pod", "b", "default")
            api.create(pod("d"))
            api.patch_status("v1", "Pod", "c", "default", {"phase": "Running"})
            api.compact()
        seen = rec.until(lambda b: b[0])
        relist, changes = seen[-1]
        watched = [c for rl, cs in seen[:-1] for c in cs]
        relisted = sorted(changes)
        # whatever the dropped watch did not deliver, the relist did: b deleted, d added, c modified
        assert set(watched) | set(relisted) >= {("DELETED", "default/b"), ("ADDED", "default/d"),
                                                 ("MODIFIED", "default/c")}
        assert ("ADDED", "default/a") not in relisted  # unchanged: not reported again
        assert rec.state == {k: v["metadata"]["resourceVersion"] for k, v in
                             ((f"default/{o['metadata']['name']}", o) for o in api.objects("v1", "Pod"))}
    finally:
        stop(r, t)


def test_a_410_storm_relists_with_backoff_and_recovers(api, client):
    api.create(pod("a"))
    rec = Recorder()
    r = Reflector(client, PODS, rec, backoff=Backoff(0.02, 0.1))
    api.faults.expire_watches = 5
    t = run(r)
    try:
        rec.until(lambda b: b[0])
        with api.changed:
            api.changed.wait_for(lambda: api.faults.expire_watches == 0, timeout=20)
        api.create(pod("after-storm"))
        rec.until(lambda b: ("ADDED", "default/after-storm") in b[1])
        assert r.lists >= 5
    finally:
        stop(r, t)


def test_a_stream_cut_inside_an_event_loses_nothing(api, client):
    rec = Recorder()
    r = Reflector(client, PODS, rec, backoff=Backoff(0.02, 0.1))
    t = run(r)
    try:
        rec.next()
        api.faults.cut_watches = 1
        api.create(pod("x"))  # its event is cut in half: the reflector watches again from before it
        api.create(pod("y"))
        seen = rec.until(lambda b: ("ADDED", "default/y") in b[1])
        assert [c for _, cs in seen for c in cs] == [("ADDED", "default/x"), ("ADDED", "default/y")]
    finally:
        stop(r, t)


def test_an_api_server_down_at_start(tmp_path):
    api = FakeApiServer(bookmark_interval=0.2, workdir=str(tmp_path / "api"))
    try:
        api.start()
        port = api.port
        api.create(pod("early"))
        kc = api.kubeconfig(str(tmp_path / "kubeconfig"))
        api.stop()
        client = KubeClient(KubeConfig.load(kc))
        rec = Recorder()
        r = Reflector(client, PODS, rec, backoff=Backoff(0.02, 0.1))
        t = run(r)
        try:
            api.port = port
            api.start()  # up again on the same port
            relist, changes = rec.next()
            assert relist and changes == [("ADDED", "default/early")]
        finally:
            stop(r, t)
    finally:
        api.close()


def test_backoff_grows_to_its_cap_and_resets():
    b = Backoff(initial=1.0, cap=8.0, jitter=0.0)
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0
