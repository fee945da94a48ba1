"""StoreFollower: stop() ends the watch thread and closes its connection, also when it
is blocked waiting for events (nothing changes in the store); a relist forgets what it
no longer lists, the first list says nothing is gone."""

from __future__ import annotations

import threading

from podnet.agent.cache import ObjectCache
from podnet.agent.follow import StoreFollower
from podnet.store import open_store


def test_stop_ends_a_watch_waiting_for_events(tmp_path):
    url = f"sqlite://{tmp_path}/store.db"
    kv = open_store(url)
    kv.put("/podnet/objects/Namespace/x", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    follower = StoreFollower(ObjectCache(), [])
    rev = follower.relist(kv)
    opened, watching = [], threading.Event()

    def open_kv():
        opened.append(open_store(url, create=False))
        watching.set()
        return opened[-1]

    thread = threading.Thread(target=follower.watch, args=(open_kv, rev + 1), daemon=True)
    thread.start()
    try:
        assert watching.wait(10)
        follower.stop()
        thread.join(10)
        assert not thread.is_alive(), "stop() did not end the watch"
        assert opened[0]._closed
    finally:
        follower.stop()
        kv.close()


def test_stop_before_the_watch_starts(tmp_path):
    url = f"sqlite://{tmp_path}/store.db"
    open_store(url).close()
    follower = StoreFollower(ObjectCache(), [])
    follower.stop()
    opened = []
    follower.watch(lambda: opened.append(open_store(url, create=False)) or opened[-1], 1)  # returns at once
    assert opened[0]._closed


def _service(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


def _services_answered(index) -> list[str]:
    return sorted(name for kind, _, name in index.keys() if kind == "Service")


def test_a_relist_forgets_what_it_no_longer_lists_after_a_first_list(tmp_path):
    """The first list tells the dataplanes that nothing is gone (they held nothing); a later
    relist names what it listed, and what was deleted meanwhile goes."""
    from podnet.agent.contract import ALL_KEYS
    from podnet.agent.dataplanes import DnsDataplane
    from podnet.dns.index import ClusterIndex

    kv = open_store(f"sqlite://{tmp_path}/store.db")
    try:
        for name, ip in (("a", "10.96.0.10"), ("b", "10.96.0.11")):
            kv.put(f"/podnet/objects/Service/default/{name}", _service(name, ip))
        reloads = []

        class Recording(DnsDataplane):
            def end_reload(self, listed):
                reloads.append(listed)
                super().end_reload(listed)

        index = ClusterIndex()
        follower = StoreFollower(ObjectCache(records=True), [Recording(index)])
        follower.relist(kv)
        assert reloads == [ALL_KEYS] and _services_answered(index) == ["a", "b"]
        assert [r[3] for r in index.lookup("b.default.svc.cluster.local").records()] == ["10.96.0.11"]
        kv.delete("/podnet/objects/Service/default/b")
        follower.relist(kv)
        assert reloads[1] == {"/podnet/objects/Service/default/a"}
        assert _services_answered(index) == ["a"]
        assert index.lookup("b.default.svc.cluster.local").rcode == 3  # NXDOMAIN
    finally:
        kv.close()


def test_a_first_list_cut_short_is_not_taken_for_a_first_list_again(tmp_path):
    """A first list that the store compacted away half-way has fed the dataplanes already:
    the list that follows must name its keys, so that what only the cut one had goes."""
    from podnet.agent.dataplanes import DnsDataplane
    from podnet.dns.index import ClusterIndex
    from podnet.store.base import Compacted, Record

    kv = open_store(f"sqlite://{tmp_path}/store.db")
    try:
        kv.put("/podnet/objects/Service/default/a", _service("a", "10.96.0.10"))

        class CompactedOnce:
            """The real store, whose first list is cut short after an object since deleted."""

            def __init__(self):
                self.calls = 0

            def stream(self, prefix, fn):
                self.calls += 1
                if self.calls == 1:
                    fn(Record("/podnet/objects/Service/default/gone", _service("gone", "10.96.0.12"), 1, 1))
                    raise Compacted(1, 2)
                return kv.stream(prefix, fn)

        index = ClusterIndex()
        follower = StoreFollower(ObjectCache(records=True), [DnsDataplane(index)])
        follower.relist(CompactedOnce())
        assert _services_answered(index) == ["a"]
    finally:
        kv.close()


def test_a_dataplane_that_names_kinds_gets_only_their_events(tmp_path):
    from podnet.agent.contract import Dataplane

    kv = open_store(f"sqlite://{tmp_path}/store.db")
    try:
        kv.put("/podnet/objects/Service/default/a", _service("a", "10.96.0.10"))
        kv.put("/podnet/objects/Namespace/x", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})

        class Recording(Dataplane):
            def __init__(self, kinds):
                self.kinds = frozenset(kinds)
                self.seen = []

            def on_event(self, ev):
                self.seen.append(ev.key)
                return False

        namespaces, everything = Recording({"Namespace"}), Recording(())
        StoreFollower(ObjectCache(records=True), [namespaces, everything]).relist(kv)
        assert namespaces.seen == ["/podnet/objects/Namespace/x"]
        assert sorted(everything.seen) == ["/podnet/objects/Namespace/x", "/podnet/objects/Service/default/a"]
    finally:
        kv.close()
