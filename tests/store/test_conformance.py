"""The KeyValueStore contract (podnet.store.base), checked on every backend."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from podnet.model.objects import Namespace, Node, Pod, Service
from podnet.model.selectors import LabelSelector
from podnet.store import reopen
from podnet.store.base import AlreadyExists, Compacted, Conflict, NotFound, Op
from podnet.store.objects import ObjectStore, object_key

# A broken watch would block forever: fail well before the global timeout instead.
pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------- single keys


def test_get_missing_is_none(kv, prefix):
    assert kv.get(prefix + "nope") is None


def test_create_then_get(kv, prefix):
    rev = kv.create(prefix + "a", {"n": 1, "nested": {"list": [1, "two", None]}})
    rec = kv.get(prefix + "a")
    assert rec is not None
    assert rec.key == prefix + "a"
    assert rec.value == {"n": 1, "nested": {"list": [1, "two", None]}}
    assert rec.revision == rec.create_revision == rev
    assert kv.revision() == rev


def test_create_twice_is_already_exists(kv, prefix):
    rev = kv.create(prefix + "a", {"n": 1})
    with pytest.raises(AlreadyExists) as err:
        kv.create(prefix + "a", {"n": 2})
    assert err.value.key == prefix + "a"
    assert kv.get(prefix + "a").value == {"n": 1}
    assert kv.revision() == rev  # a failed transaction writes nothing


def test_update_with_right_revision(kv, prefix):
    created = kv.create(prefix + "a", {"n": 1})
    updated = kv.update(prefix + "a", {"n": 2}, created)
    assert updated > created
    rec = kv.get(prefix + "a")
    assert rec.value == {"n": 2}
    assert rec.revision == updated
    assert rec.create_revision == created


def test_update_with_stale_revision_is_conflict(kv, prefix):
    first = kv.create(prefix + "a", {"n": 1})
    second = kv.update(prefix + "a", {"n": 2}, first)
    with pytest.raises(Conflict) as err:
        kv.update(prefix + "a", {"n": 3}, first)
    assert (err.value.key, err.value.expected, err.value.actual) == (prefix + "a", first, second)
    assert kv.get(prefix + "a").value == {"n": 2}


def test_update_of_missing_key_is_not_found(kv, prefix):
    with pytest.raises(NotFound) as err:
        kv.update(prefix + "missing", {"n": 1}, 5)
    assert err.value.key == prefix + "missing"
    assert kv.get(prefix + "missing") is None


def test_put_creates_and_overwrites(kv, prefix):
    first = kv.put(prefix + "a", {"n": 1})
    second = kv.put(prefix + "a", {"n": 2})
    rec = kv.get(prefix + "a")
    assert (rec.value, rec.revision, rec.create_revision) == ({"n": 2}, second, first)


def test_delete_with_right_revision(kv, prefix):
    rev = kv.create(prefix + "a", {"n": 1})
    deleted = kv.delete(prefix + "a", rev)
    assert deleted > rev
    assert kv.get(prefix + "a") is None


def test_delete_with_wrong_revision_is_conflict(kv, prefix):
    rev = kv.create(prefix + "a", {"n": 1})
    with pytest.raises(Conflict) as err:
        kv.delete(prefix + "a", rev + 1000)
    assert (err.value.key, err.value.expected, err.value.actual) == (prefix + "a", rev + 1000, rev)
    assert kv.get(prefix + "a").value == {"n": 1}


def test_delete_unconditional(kv, prefix):
    kv.create(prefix + "a", {"n": 1})
    kv.delete(prefix + "a")
    assert kv.get(prefix + "a") is None


def test_delete_of_missing_key(kv, prefix):
    kv.create(prefix + "other", {"n": 1})
    # Unconditional: a no-op, not an error.
    kv.delete(prefix + "missing")
    assert kv.get(prefix + "missing") is None
    # Conditional: the key was expected to exist.
    with pytest.raises(NotFound) as err:
        kv.delete(prefix + "missing", 3)
    assert err.value.key == prefix + "missing"
    assert kv.get(prefix + "other").value == {"n": 1}


def test_revisions_increase_per_write(kv, prefix):
    revs = [kv.put(prefix + f"k{i}", {"i": i}) for i in range(5)]
    assert revs == sorted(set(revs))
    assert kv.revision() == revs[-1]


# ---------------------------------------------------------------- transactions


def test_txn_is_all_or_nothing(kv, prefix):
    kv.create(prefix + "exists", {"n": 1})
    c_rev = kv.create(prefix + "c", {"n": 1})
    kv.create(prefix + "d", {"n": 1})
    before = kv.revision()
    with pytest.raises(AlreadyExists) as err:
        kv.txn([
            Op.create(prefix + "new", {"n": 1}),
            Op.update(prefix + "c", {"n": 2}, c_rev),
            Op.create(prefix + "exists", {"n": 2}),
            Op.delete(prefix + "d"),
        ])
    assert err.value.key == prefix + "exists"
    assert kv.get(prefix + "new") is None
    assert kv.get(prefix + "exists").value == {"n": 1}
    assert kv.get(prefix + "c").value == {"n": 1}
    assert kv.get(prefix + "d").value == {"n": 1}
    assert kv.revision() == before


def test_txn_error_names_first_failing_key(kv, prefix):
    a = kv.create(prefix + "a", {"n": 1})
    kv.update(prefix + "a", {"n": 2}, a)
    kv.create(prefix + "b", {"n": 1})
    ops = [
        Op.create(prefix + "fresh", {"n": 1}),  # fine
        Op.update(prefix + "a", {"n": 3}, a),  # stale: the first failure
        Op.create(prefix + "b", {"n": 2}),  # would fail too
        Op.delete(prefix + "gone", 7),  # and so would this
    ]
    with pytest.raises(Conflict) as err:
        kv.txn(ops)
    assert err.value.key == prefix + "a"
    assert err.value.expected == a
    assert err.value.actual == kv.get(prefix + "a").revision
    with pytest.raises(AlreadyExists) as err2:
        kv.txn(ops[2:])
    assert err2.value.key == prefix + "b"
    with pytest.raises(NotFound) as err3:
        kv.txn(ops[3:] + ops[:1])
    assert err3.value.key == prefix + "gone"
    assert kv.get(prefix + "fresh") is None


def test_txn_has_one_revision(kv, prefix, watch_reader):
    kv.create(prefix + "c", {"n": 1})
    kv.create(prefix + "d", {"n": 1})
    start = kv.revision() + 1
    rev = kv.txn([
        Op.create(prefix + "a", {"n": 1}),
        Op.put(prefix + "b", {"n": 1}),
        Op.delete(prefix + "c"),
        Op.update(prefix + "d", {"n": 2}, kv.get(prefix + "d").revision),
    ])
    assert rev == start
    assert kv.revision() == rev
    assert {r.key: r.revision for r in kv.list(prefix)[0]} == {
        prefix + "a": rev, prefix + "b": rev, prefix + "d": rev
    }
    events = watch_reader(kv, prefix, start).wait_for(4)
    assert {(e.type, e.key, e.revision) for e in events} == {
        ("ADDED", prefix + "a", rev), ("ADDED", prefix + "b", rev),
        ("DELETED", prefix + "c", rev), ("MODIFIED", prefix + "d", rev),
    }


# ---------------------------------------------------------------- listing


def test_list_prefix_sorted_without_neighbours(kv, prefix):
    inside = [prefix + "a/" + k for k in ("z", "b", "a", "m/n", "é", "0")]
    outside = [prefix + "ab/1", prefix + "a", prefix + "a0", prefix + "b/1", prefix[:-1] + "x"]
    keys = inside + outside
    random.shuffle(keys)
    for k in keys:
        kv.create(k, {"k": k})
    records, rev = kv.list(prefix + "a/")
    assert [r.key for r in records] == sorted(inside, key=lambda k: k.encode())
    assert all(r.value == {"k": r.key} for r in records)
    assert rev == kv.revision()
    assert kv.list(prefix + "nothing/") == ([], rev)


def test_list_revision_is_a_snapshot(kv, prefix):
    kv.create(prefix + "a", {"n": 1})
    records, rev = kv.list(prefix)
    assert [r.revision for r in records] == [rev]
    later = kv.put(prefix + "b", {"n": 1})
    records2, rev2 = kv.list(prefix)
    assert rev2 == later > rev
    assert [r.key for r in records2] == [prefix + "a", prefix + "b"]


def test_list_many_keys(kv, prefix):
    kv.txn([Op.create(prefix + f"k{i:03d}", {"i": i}) for i in range(120)])
    if hasattr(kv, "page_size"):
        kv.page_size = 16  # several pages
    records, rev = kv.list(prefix)
    assert [r.value["i"] for r in records] == list(range(120))
    assert {r.revision for r in records} == {rev}


def test_stream_delivers_the_list_page_by_page_from_one_snapshot(kv, prefix):
    kv.txn([Op.create(prefix + f"k{i:03d}", {"i": i}) for i in range(120)])
    if hasattr(kv, "page_size"):
        kv.page_size = 16  # several pages
    got: list = []
    written_meanwhile: list[int] = []
    writer = reopen(kv)  # another client (a connection in a read transaction cannot write)

    def sink(r) -> None:
        got.append(r)
        if len(got) == 20:  # a write in the middle of the listing is not part of its snapshot
            written_meanwhile.append(writer.put(prefix + "k050", {"i": -1}))

    rev = kv.stream(prefix, sink)
    assert [r.value["i"] for r in got] == list(range(120))
    assert written_meanwhile and rev < written_meanwhile[0]
    assert kv.stream(prefix + "nothing/", got.append) == kv.revision()
    writer.close()


# ---------------------------------------------------------------- watching


def _history(kv, prefix):
    """Writes a small history under prefix (and a neighbour); returns (start, expected events)."""
    neighbour = prefix[:-1] + "x/k"
    start = kv.put(prefix + "a", {"v": 1})
    r_a2 = kv.update(prefix + "a", {"v": 2}, start)
    r_b = kv.create(prefix + "b", {"v": 1})
    kv.put(neighbour, {"v": 1})
    r_del = kv.delete(prefix + "a", r_a2)
    r_txn = kv.txn([Op.put(prefix + "c", {"v": 1}), Op.delete(prefix + "b")])
    r_again = kv.create(prefix + "a", {"v": 3})
    expected = [
        ("ADDED", prefix + "a", {"v": 1}, start),
        ("MODIFIED", prefix + "a", {"v": 2}, r_a2),
        ("ADDED", prefix + "b", {"v": 1}, r_b),
        ("DELETED", prefix + "a", {"v": 2}, r_del),
        ("ADDED", prefix + "c", {"v": 1}, r_txn),
        ("DELETED", prefix + "b", {"v": 1}, r_txn),
        ("ADDED", prefix + "a", {"v": 3}, r_again),
    ]
    return start, expected


def _tuples(events):
    return [(e.type, e.key, e.value, e.revision) for e in events]


def _in_order(events):
    """Events sorted by revision, and within one revision by key (order inside a txn is free)."""
    return sorted(_tuples(events), key=lambda t: (t[3], t[1]))


def test_watch_replays_history_in_order(kv, prefix, watch_reader):
    start, expected = _history(kv, prefix)
    events = watch_reader(kv, prefix, start).wait_for(len(expected))
    revs = [e.revision for e in events]
    assert revs == sorted(revs)
    assert _in_order(events) == sorted(expected, key=lambda t: (t[3], t[1]))
    # From the middle of the history: only what happened since.
    mid = expected[3][3]
    events = watch_reader(kv, prefix, mid).wait_for(4)
    assert _in_order(events) == sorted(expected[3:], key=lambda t: (t[3], t[1]))


def test_watch_without_previous_values_still_names_every_deletion(kv, prefix, watch_reader):
    start, expected = _history(kv, prefix)
    events = watch_reader(kv, prefix, start, previous=False).wait_for(len(expected))
    got = sorted(((e.type, e.key, e.revision) for e in events), key=lambda t: (t[2], t[1]))
    assert got == sorted(((t, k, r) for t, k, _, r in expected), key=lambda t: (t[2], t[1]))
    # the new value of every other event is there; a deletion's last value may be left out
    assert all(e.value is not None for e in events if e.type != "DELETED")


def test_watch_then_live_events(kv, prefix, watch_reader):
    start, expected = _history(kv, prefix)
    reader = watch_reader(kv, prefix, start)
    reader.wait_for(len(expected))
    live = kv.update(prefix + "c", {"v": 2}, kv.get(prefix + "c").revision)
    events = reader.wait_for(len(expected) + 1)
    assert _tuples(events[-1:]) == [("MODIFIED", prefix + "c", {"v": 2}, live)]
    assert len(events) == len(expected) + 1


def test_watch_from_now(backend, kv, prefix, watch_reader):
    kv.put(prefix + "before", {"n": 0})
    reader = watch_reader(kv, prefix, 0)
    # Keep writing until the watch demonstrably delivers, then write one more.
    ticks = []
    deadline = time.monotonic() + 15
    while not reader.events:
        assert time.monotonic() < deadline, "watch from now delivered nothing"
        ticks.append(prefix + f"tick{len(ticks):04d}")
        kv.put(ticks[-1], {"n": len(ticks)})
        time.sleep(0.05)
    last = kv.put(prefix + "after", {"n": -1})
    events = reader.wait_until(lambda evs: evs[-1].key == prefix + "after")
    keys = [e.key for e in events]
    assert prefix + "before" not in keys
    first = ticks.index(keys[0])
    assert keys == ticks[first:] + [prefix + "after"]  # a gapless run of what came after "now"
    assert events[-1].revision == last
    if backend.is_etcd:
        assert first == 0  # etcd fixes "now" when watch() is called


def test_watch_sees_writes_of_other_store_and_process(backend, kv, prefix, watch_reader):
    start = kv.revision() + 1
    reader = watch_reader(kv, prefix, start)
    other = backend.open(member=1)  # on etcd3: another member
    try:
        r1 = other.create(prefix + "from-other-store", {"by": "store"})
    finally:
        other.close()
    code = (
        "import sys\n"
        "from podnet.store import open_store\n"
        "s = open_store(sys.argv[1])\n"
        "print(s.create(sys.argv[2], {'by': 'process'}))\n"
        "s.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, backend.url, prefix + "from-process"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **backend.env},
    )
    assert out.returncode == 0, out.stderr
    r2 = int(out.stdout)
    events = reader.wait_for(2)
    assert _tuples(events) == [
        ("ADDED", prefix + "from-other-store", {"by": "store"}, r1),
        ("ADDED", prefix + "from-process", {"by": "process"}, r2),
    ]


def test_watch_resume_after_close(kv, prefix):
    revs = [kv.put(prefix + f"k{i % 3}", {"i": i}) for i in range(10)]
    seen = []
    gen = kv.watch(prefix, revs[0])
    for event in gen:
        seen.append(event)
        if len(seen) == 4:
            break
    gen.close()
    more = [kv.put(prefix + f"k{i % 3}", {"i": i}) for i in range(10, 13)]
    gen = kv.watch(prefix, seen[-1].revision + 1)
    try:
        for event in gen:
            seen.append(event)
            if len(seen) == 13:
                break
    finally:
        gen.close()
    assert [e.revision for e in seen] == revs + more
    assert [e.value["i"] for e in seen] == list(range(13))
    assert [e.type for e in seen] == ["ADDED"] * 3 + ["MODIFIED"] * 10


def test_close_ends_a_blocked_watch(backend, prefix):
    """close() ends the store's watches, so a thread blocked in one returns (the agent's
    stop relies on it to close every connection it opened)."""
    store, writer = backend.open(), backend.open()
    seen, got, ended = [], threading.Event(), threading.Event()

    def consume() -> None:
        for event in store.watch(prefix, start):
            seen.append(event)
            got.set()
        ended.set()

    start = writer.revision() + 1
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        writer.put(prefix + "a", {"n": 1})
        assert got.wait(15), "the watch delivered nothing"
        assert not ended.is_set()  # blocked, waiting for more
    finally:
        store.close()
        writer.close()
    assert ended.wait(10), "close() did not end the watch"
    thread.join(10)
    assert [e.key for e in seen] == [prefix + "a"]


def test_watch_of_compacted_history(backend, kv, prefix, watch_reader):
    revs = [kv.put(prefix + "k", {"i": i}) for i in range(5)]
    backend.compact_through(kv, revs[2])
    err = watch_reader(kv, prefix, revs[1]).wait_error()
    assert isinstance(err, Compacted)
    assert err.revision == revs[1]
    assert err.compact_revision == revs[2] + 1
    events = watch_reader(kv, prefix, revs[2] + 1).wait_for(2)
    assert [(e.revision, e.value) for e in events] == [(revs[3], {"i": 3}), (revs[4], {"i": 4})]


# ---------------------------------------------------------------- ObjectStore


def pod(name, ns="default", **labels):
    return Pod(metadata={"name": name, "namespace": ns, "labels": labels})


def test_objects_list_by_kind_namespace_and_selector(objects):
    for p in (pod("a", "ns1", app="web", tier="front"), pod("b", "ns1", app="db"),
              pod("c", "ns2", app="web"), pod("d", "ns10", app="web")):
        objects.create(p)
    objects.create(Node(metadata={"name": "n1", "labels": {"app": "web"}}))
    objects.create(Service.model_validate({"metadata": {"name": "svc", "namespace": "ns1"},
                                           "spec": {"ports": [{"port": 80}]}}))
    objects.create(Namespace(metadata={"name": "ns1"}))

    def refs(objs):
        return [o.ref for o in objs]

    assert refs(objects.list(Pod)) == ["Pod/ns1/a", "Pod/ns1/b", "Pod/ns10/d", "Pod/ns2/c"]
    assert refs(objects.list(Pod, "ns1")) == ["Pod/ns1/a", "Pod/ns1/b"]  # not ns10
    assert refs(objects.list(Node)) == ["Node/n1"]
    assert refs(objects.list(Service)) == ["Service/ns1/svc"]
    assert refs(objects.list(Namespace)) == ["Namespace/ns1"]
    web = LabelSelector.parse("app=web")
    assert refs(objects.list(Pod, selector=web)) == ["Pod/ns1/a", "Pod/ns10/d", "Pod/ns2/c"]
    assert refs(objects.list(Pod, "ns1", LabelSelector.parse("app in (web,db),tier!=front"))) == ["Pod/ns1/b"]
    assert refs(objects.list(Pod, selector=LabelSelector())) == refs(objects.list(Pod))
    pods, rev = objects.list_at(Pod)
    assert rev == objects.kv.revision()


def test_objects_create_and_cas_update(objects):
    rev = objects.create(pod("a", app="web"))
    with pytest.raises(AlreadyExists):
        objects.create(pod("a", app="other"))
    current = objects.get(Pod, "a", "default")
    assert current.metadata.resource_version == str(rev)
    assert current.labels == {"app": "web"}
    new_rev = objects.update(current.with_meta(labels={"app": "db"}))
    assert objects.get(Pod, "a", "default").metadata.resource_version == str(new_rev)
    with pytest.raises(Conflict) as err:
        objects.update(current.with_meta(labels={"app": "stale"}))  # resourceVersion is old
    assert err.value.key == object_key(Pod, "a", "default")
    assert objects.get(Pod, "a", "default").labels == {"app": "db"}
    objects.delete(Pod, "a", "default", new_rev)
    assert objects.get(Pod, "a", "default") is None


def test_objects_apply_reports_and_uses_one_revision(objects):
    objects.create(pod("same", app="web"))
    objects.create(pod("changed", app="web"))
    rev, outcome = objects.apply([pod("same", app="web"), pod("changed", app="db"), pod("new")])
    assert outcome == [("Pod/default/same", "unchanged"), ("Pod/default/changed", "configured"),
                       ("Pod/default/new", "created")]
    assert objects.get(Pod, "changed").metadata.resource_version == str(rev)
    assert objects.get(Pod, "new").metadata.resource_version == str(rev)
    assert objects.get(Pod, "same").metadata.resource_version != str(rev)


@pytest.mark.parametrize("race", ["update", "create"])
def test_objects_apply_is_all_or_nothing(objects, race):
    objects.create(pod("x", app="v1"))
    objects.create(pod("y", app="v1"))
    racer = ObjectStore(objects.kv)

    def concurrent_change():  # lands between apply's reads and its transaction
        if race == "update":
            racer.update(objects.get(Pod, "y").with_meta(labels={"app": "racer"}))
        else:
            racer.create(pod("z", app="racer"))

    objects.kv.before_txn = concurrent_change
    before = objects.kv.revision()
    expected_error = Conflict if race == "update" else AlreadyExists
    with pytest.raises(expected_error) as err:
        objects.apply([pod("x", app="v2"), pod("y", app="v2"), pod("z", app="v2"), pod("w", app="v2")])
    assert err.value.key == object_key(Pod, "y" if race == "update" else "z", "default")
    assert objects.kv.revision() == before + 1  # only the racer's write
    assert objects.get(Pod, "x").labels == {"app": "v1"}
    assert objects.get(Pod, "w") is None
    if race == "update":
        assert objects.get(Pod, "y").labels == {"app": "racer"}
        assert objects.get(Pod, "z") is None
    else:
        assert objects.get(Pod, "y").labels == {"app": "v1"}
        assert objects.get(Pod, "z").labels == {"app": "racer"}
