"""EtcdStore's listings against a real etcd member: many pages, each asked for before the
one before is decoded, all from one snapshot; a sink that fails, a connection lost, a
closed store and a snapshot compacted in the middle: every key once, or the error, no
thread left and the store usable."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from podnet.store import etcd
from podnet.store.base import Compacted, Op, StoreUnavailable
from podnet.store.etcd import EtcdStore

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd binary not installed"),
    pytest.mark.timeout(120),
]

KEYS = 200
PAGE = 7  # 29 pages


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


class RangeRequests:
    """The range requests of one prefix as they leave, on whichever connection; `before_send`
    runs before each one goes out."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.sent: list[tuple[etcd._Connection, dict]] = []
        self.before_send = lambda n: None

    def revisions(self) -> list[str | None]:
        return [request.get("revision") for _, request in self.sent]


@pytest.fixture
def ranges(listed, monkeypatch) -> RangeRequests:
    seen = RangeRequests(listed[2])
    real_send = etcd._Connection.send

    def send(conn, path, body, token=None):
        if path == etcd.RANGE:
            request = json.loads(body)
            if etcd._unb64(request["key"]).decode().startswith(seen.prefix) and "range_end" in request:
                seen.before_send(len(seen.sent) + 1)
                seen.sent.append((conn, request))
        return real_send(conn, path, body, token)

    monkeypatch.setattr(etcd._Connection, "send", send)
    return seen


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


def test_the_next_page_is_asked_for_before_the_sink_takes_this_one(listed, ranges):
    store, other, prefix, rev = listed
    asked = []
    before = threads()
    assert store.stream(prefix, lambda r: asked.append(len(ranges.sent))) == rev
    assert threads() == before  # pipelined: no thread
    pages = -(-KEYS // PAGE)
    assert len(ranges.sent) == pages
    # while the sink takes page n (n from 1), page n+1 has been asked for; the last asks nothing more
    assert asked == [min(i // PAGE + 2, pages) for i in range(KEYS)]
    assert ranges.revisions() == [None] + [str(rev)] * (pages - 1)


def test_a_listing_of_one_page_asks_once(listed, ranges):
    store, other, prefix, rev = listed
    store.page_size = KEYS
    got = []
    assert store.stream(prefix, got.append) == rev
    assert len(got) == KEYS and len(ranges.sent) == 1


def test_a_lost_connection_between_pages_asks_for_the_page_again(listed, ranges):
    store, other, prefix, rev = listed
    got = []

    def sink(record) -> None:
        got.append(record.key)
        if len(got) in (PAGE + 1, 10 * PAGE + 3):  # the listing's connection dies under a pipelined request
            ranges.sent[-1][0].sock.shutdown(socket.SHUT_RDWR)

    assert store.stream(prefix, sink) == rev
    assert got == [f"{prefix}{i:03d}" for i in range(KEYS)]
    assert set(ranges.revisions()[1:]) == {str(rev)}


def test_a_listing_of_nested_keys_asks_group_by_group_and_gives_every_key_once(etcd1_cluster, monkeypatch):
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    keys = ([f"{prefix}a"] + [f"{prefix}a/{i:02d}" for i in range(9)] + [f"{prefix}a0"]
            + [f"{prefix}b/{n}/{i}" for n in "xyz" for i in range(5)] + [f"{prefix}c/0", f"{prefix}d"])
    store = EtcdStore(etcd1_cluster.endpoints, page_size=4)
    try:
        rev = store.txn([Op.create(k, {"k": k}) for k in reversed(keys)])
        sent = RangeRequests(prefix)
        real_send = etcd._Connection.send

        def send(conn, path, body, token=None):
            if path == etcd.RANGE:
                sent.sent.append((conn, json.loads(body)))
            return real_send(conn, path, body, token)

        monkeypatch.setattr(etcd._Connection, "send", send)
        got = []
        assert store.stream(prefix, got.append) == rev
        assert [r.key for r in got] == sorted(keys)
        assert [r.value["k"] for r in got] == sorted(keys)
        ends = [etcd._unb64(request["range_end"]).decode() for _, request in sent.sent]
        # after the first page, each request ends with the group its first key is in
        assert f"{prefix}a0" in ends and f"{prefix}b0" in ends
        for _, request in sent.sent[1:]:
            first = etcd._unb64(request["key"]).decode()[len(prefix):]
            end = etcd._unb64(request["range_end"]).decode()
            assert end == (f"{prefix}{first.split('/')[0]}0" if "/" in first else prefix[:-1] + "0")
    finally:
        store.close()


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


def test_a_store_closed_between_pages_raises_and_leaves_no_thread(listed):
    store, other, prefix, rev = listed
    got = []

    def sink(record) -> None:
        got.append(record.key)
        if len(got) == 3 * PAGE:
            store.close()

    before = threads()
    with pytest.raises(StoreUnavailable, match="is closed"):
        store.stream(prefix, sink)
    assert threads() == before
    assert got == [f"{prefix}{i:03d}" for i in range(4 * PAGE)]  # the page already answered, no more


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


def test_a_list_whose_snapshot_is_compacted_starts_over_at_a_newer_revision(listed, ranges):
    store, other, prefix, rev = listed

    def before_send(n: int) -> None:
        if n == 3:  # before the first attempt's third page goes out
            other.compact(other.delete(f"{prefix}{0:03d}"))

    ranges.before_send = before_send
    before = threads()
    records, at = store.list(prefix)
    assert threads() == before
    assert at == rev + 1
    assert [r.key for r in records] == [f"{prefix}{i:03d}" for i in range(1, KEYS)]
    revisions = ranges.revisions()
    # the first attempt: pages 1 and 2, page 3 refused (pipelined, then through the store's call);
    # then every page again from the newest snapshot
    assert revisions[:4] == [None, str(rev), str(rev), str(rev)]
    assert revisions[4] is None and set(revisions[5:]) == {str(rev + 1)}
    assert len(revisions) == 4 + -(-(KEYS - 1) // PAGE)
