"""StoreFollower.stop(): the watch thread returns and closes its connection, also when
it is blocked waiting for events (nothing changes in the store)."""

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
