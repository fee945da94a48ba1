"""EtcdStore's listings against a real etcd member: many pages, each read while the one
before is decoded, all from one snapshot; a sink that fails, a page that fails and a
snapshot compacted in the middle leave no thread behind and the store usable."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from podnet.store.base import Compacted, Op, StoreUnavailable
from podnet.store.etcd import EtcdStore

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd binary not installed"),
    pytest.mark.timeout(120),
]

KEYS = 200
PAGE = 7  # 29 pages: many more than the pages read ahead


class SinkFailed(Exception):
    pass


@pytest.fixture
def listed(etcd1_cluster) -> Iterator[tuple[EtcdStore, EtcdStore, str, int]]:
    """(a store with small pages, another client, a prefix holding KEYS keys, their revision)."""
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    store = EtcdStore(etcd1_cluster.endpoints, page_size=PAGE)
    other = EtcdStore(etcd1_cluster.endpoints)
    try:
        rev = other.txn([Op.create(f"{prefix}{i:03d}", {"i": i}) for i in range(KEYS)])
        yield store, other, prefix, rev
    finally:
        store.close()
        other.close()


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_stream_of_many_pages_gives_every_key_once_in_order_from_one_snapshot(listed):
    store, other, prefix, rev = listed
    got = []

    def sink(record) -> None:
        got.append(record)
        if len(got) == 1:  # the pages still to come must not show these writes
            other.txn([Op.delete(f"{prefix}{i:03d}") for i in range(100, 110)]
                      + [Op.put(f"{prefix}{i:03d}", {"i": -1}) for i in range(150, 160)]
                      + [Op.put(prefix + "100a", {"i": -2})])

    before = threads()
    at = store.stream(prefix, sink)
    assert threads() == before
    assert at == rev
    assert [r.key for r in got] == [f"{prefix}{i:03d}" for i in range(KEYS)]
    assert [r.value["i"] for r in got] == list(range(KEYS))
    assert all(r.revision == rev for r in got)
    records, now = store.list(prefix)  # a new listing sees the writes
    assert now == rev + 1 and len(records) == KEYS - 10 + 1


def test_the_next_page_is_read_while_the_sink_takes_this_one(listed):
    store, other, prefix, rev = listed
    real_call = store._call
    calls = []

    def call(path, request, **kw):
        calls.append(request)
        return real_call(path, request, **kw)

    store._call = call
    before = threads()
    during = []

    def sink(record) -> None:
        if not during:  # the first page's first record: the second page is asked for meanwhile
            deadline = time.monotonic() + 10
            while len(calls) < 2:
                assert time.monotonic() < deadline, "the second page was not asked for while the first was taken"
                time.sleep(0.01)
            during.append(threads() - before)

    assert store.stream(prefix, sink) == rev
    assert len(during[0]) == 1  # one thread reads ahead, and it is gone after
    assert threads() == before
    assert [c.get("revision") for c in calls] == [None] + [str(rev)] * (len(calls) - 1)


def test_a_listing_of_one_page_starts_no_thread(listed):
    store, other, prefix, rev = listed
    store.page_size = KEYS
    before = threads()
    during = []
    assert store.stream(prefix, lambda r: during.append(threads() - before)) == rev
    assert len(during) == KEYS and not any(during)


@pytest.mark.parametrize("fail_at", [1, PAGE * 3 + 2, KEYS])
def test_a_failing_sink_leaves_no_thread_and_the_store_usable(listed, fail_at):
    store, other, prefix, rev = listed
    seen = []

    def sink(record) -> None:
        seen.append(record.key)
        if len(seen) == fail_at:
            raise SinkFailed(record.key)

    before = threads()
    with pytest.raises(SinkFailed):
        store.stream(prefix, sink)
    assert threads() == before
    assert len(seen) == fail_at
    assert store.get(f"{prefix}{KEYS - 1:03d}").value == {"i": KEYS - 1}
    assert store.put(prefix + "after", {"ok": True}) == rev + 1
    records, at = store.list(prefix)
    assert at == rev + 1 and len(records) == KEYS + 1


def test_a_failing_page_raises_its_error_and_leaves_no_thread(listed):
    store, other, prefix, rev = listed
    real_call = store._call
    calls = []

    def call(path, request, **kw):
        calls.append(request)
        if len(calls) == 5:
            raise StoreUnavailable("etcd 127.0.0.1:1: no answer (page 5)")
        return real_call(path, request, **kw)

    store._call = call
    got = []
    before = threads()
    with pytest.raises(StoreUnavailable, match=r"no answer \(page 5\)"):
        store.stream(prefix, lambda r: got.append(r.key))
    assert threads() == before
    assert got == [f"{prefix}{i:03d}" for i in range(4 * PAGE)]  # the pages before it, all of them
    del store._call
    assert len(store.list(prefix)[0]) == KEYS


def test_a_snapshot_compacted_while_streaming_raises_compacted(listed):
    store, other, prefix, rev = listed
    got = []

    def sink(record) -> None:
        got.append(record)
        if len(got) == 1:  # later pages ask for rev, which this drops
            other.compact(other.put(prefix + "new", {}))

    before = threads()
    with pytest.raises(Compacted) as err:
        store.stream(prefix, sink)
    assert threads() == before
    assert err.value.revision == rev
    assert len(got) < KEYS
    assert [r.key for r in got] == [f"{prefix}{i:03d}" for i in range(len(got))]
    got.clear()
    assert store.stream(prefix, got.append) == rev + 1  # listing again: the new snapshot, complete
    assert len(got) == KEYS + 1


def test_a_list_whose_snapshot_is_compacted_starts_over_at_a_newer_revision(listed):
    store, other, prefix, rev = listed
    real_call = store._call
    calls = []

    def call(path, request, **kw):
        calls.append(request)
        if len(calls) == 3:  # between pages 2 and 3 of the first attempt
            other.compact(other.delete(f"{prefix}{0:03d}"))
        return real_call(path, request, **kw)

    store._call = call
    before = threads()
    records, at = store.list(prefix)
    assert threads() == before
    assert at == rev + 1
    assert [r.key for r in records] == [f"{prefix}{i:03d}" for i in range(1, KEYS)]
    assert {c.get("revision") for c in calls[1:3]} == {str(rev)}  # the first attempt, at the first snapshot
    assert "revision" not in calls[3]  # then every page again, from the newest
    assert {c.get("revision") for c in calls[4:]} == {str(rev + 1)}
    assert len(calls) == 3 + -(-(KEYS - 1) // PAGE)
