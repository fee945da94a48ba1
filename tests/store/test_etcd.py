"""EtcdStore against real etcd members: failover, unknown outcomes, watches across a member
kill, and the EtcdCluster helper itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from tests.support.etcd import EtcdCluster, EtcdError, free_ports

from podnet.store import open_store
from podnet.store.base import Op, StoreUnavailable
from podnet.store.etcd import EtcdStore

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd binary not installed"),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster of this module's own (its tests kill members)."""
    c = EtcdCluster(3, die_with_parent=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster3(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    yield cluster
    for i, pid in enumerate(cluster.pids()):  # bring back whatever a test killed
        if pid is None:
            cluster.restart_member(i)


def rotated(endpoints: list[str], first: int) -> list[str]:
    return endpoints[first:] + endpoints[:first]


# ---------------------------------------------------------------- helper cluster


def test_cluster_basics(cluster3, tmp_path):
    assert len(cluster3.endpoints) == 3
    assert cluster3.url == "etcd://" + ",".join(cluster3.endpoints)
    store = open_store(cluster3.url)
    try:
        assert isinstance(store, EtcdStore)
        assert store.endpoints == cluster3.endpoints
        assert store.status()["leader"] not in (None, "0")
    finally:
        store.close()
    assert 0 <= cluster3.leader() < 3


def test_cluster_stop_cleans_up():
    with EtcdCluster(1, die_with_parent=True) as c:
        base, pid = c.base_dir, c.pids()[0]
        assert os.path.exists(os.path.join(base, "m0", "etcd.log"))
        store = EtcdStore(c.endpoints)
        try:
            store.put("/x", {"n": 1})
        finally:
            store.close()
    assert not os.path.exists(base)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not just signalled


def test_cluster_start_failure_shows_the_log(tmp_path):
    with pytest.raises(EtcdError) as err:
        EtcdCluster(1, str(tmp_path), extra_args=["--no-such-flag"], die_with_parent=True)
    assert "no-such-flag" in str(err.value)
    assert (tmp_path / "m0" / "etcd.log").exists()


# ---------------------------------------------------------------- failover


def test_no_endpoint_answers(tmp_path):
    dead = [f"127.0.0.1:{p}" for p in free_ports(2)]
    store = EtcdStore(dead)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            store.get("/x")
        assert all(ep in str(err.value) for ep in dead)
        with pytest.raises(StoreUnavailable) as err:
            store.create("/x", {})
        assert "unknown" not in str(err.value)  # it never left this host
        assert time.monotonic() - started < 5
    finally:
        store.close()


class FakeMember:
    """An HTTP endpoint that reads each request, then misbehaves as told:
    "drop" closes the connection without answering; otherwise it answers with that JSON error."""

    def __init__(self, behaviour: str | dict):
        self.behaviour = behaviour
        self.requests: list[tuple[str, dict]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                while True:
                    line = f.readline()
                    if not line:
                        break
                    path = line.split()[1].decode()
                    length = 0
                    while (header := f.readline()) not in (b"\r\n", b"\n", b""):
                        name, _, value = header.decode().partition(":")
                        if name.lower() == "content-length":
                            length = int(value)
                    self.requests.append((path, json.loads(f.read(length) or b"{}")))
                    if self.behaviour == "drop":
                        break
                    body = json.dumps(self.behaviour).encode()
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_member():
    fakes: list[FakeMember] = []

    def make(behaviour):
        fakes.append(FakeMember(behaviour))
        return fakes[-1]

    yield make
    for f in fakes:
        f.close()


def test_txn_whose_connection_dies_after_sending_has_unknown_outcome(etcd1_cluster, fake_member):
    fake = fake_member("drop")
    store = EtcdStore([fake.endpoint, *etcd1_cluster.endpoints])
    key = f"/podnet-test/{uuid.uuid4().hex[:12]}/k"
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.create(key, {"n": 1})
        assert "unknown" in str(err.value)
        assert [p for p, _ in fake.requests] == ["/v3/kv/txn"]
        # Not retried on the real member behind the scenes:
        assert EtcdStore(etcd1_cluster.endpoints).get(key) is None
        # Reads are retried: this one fails on the fake and succeeds on the real member.
        assert store.get(key) is None
        assert [p for p, _ in fake.requests] == ["/v3/kv/txn", "/v3/kv/range"]
        assert store.create(key, {"n": 2}) > 0
    finally:
        store.close()


@pytest.mark.parametrize("message, retried", [
    ("etcdserver: no leader", True),  # rejected before being proposed: safe elsewhere
    ("etcdserver: too many requests", True),
    ("etcdserver: request timed out", False),  # proposed, maybe applied
    ("etcdserver: request timed out, possibly due to previous leader failure", False),
])
def test_txn_server_errors(etcd1_cluster, fake_member, message, retried):
    fake = fake_member({"error": message, "message": message, "code": 14})
    store = EtcdStore([fake.endpoint, *etcd1_cluster.endpoints])
    key = f"/podnet-test/{uuid.uuid4().hex[:12]}/k"
    try:
        if retried:
            rev = store.create(key, {"n": 1})
            assert store.get(key).revision == rev
        else:
            with pytest.raises(StoreUnavailable) as err:
                store.create(key, {"n": 1})
            assert "unknown" in str(err.value) and message in str(err.value)
            assert store.get(key) is None  # reads fail over
        assert len([p for p, _ in fake.requests if p == "/v3/kv/txn"]) == 1
    finally:
        store.close()


def test_write_storm_survives_leader_kill(cluster3):
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    eps = cluster3.endpoints
    victim = cluster3.leader()
    writers = 6
    acked: list[dict[str, tuple[dict, int]]] = [{} for _ in range(writers)]
    unknown: list[list[str]] = [[] for _ in range(writers)]
    failures: list[BaseException] = []
    stop = threading.Event()

    def write(w: int) -> None:
        store = EtcdStore(rotated(eps, w % 3))  # two writers start on each member
        try:
            i = 0
            while not stop.is_set():
                key, value = f"{prefix}w{w}/{i:05d}", {"w": w, "i": i}
                try:
                    acked[w][key] = (value, store.create(key, value))
                except StoreUnavailable:
                    unknown[w].append(key)
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)
        finally:
            store.close()

    def wait_for(condition, what: str, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert not failures, failures
            assert time.monotonic() < deadline, f"timed out waiting for {what}: acked {[len(a) for a in acked]}"
            time.sleep(0.05)

    threads = [threading.Thread(target=write, args=(w,), daemon=True) for w in range(writers)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(a) >= 10 for a in acked), "writes before the kill")
        cluster3.kill_member(victim)
        at_kill = [len(a) for a in acked]
        wait_for(lambda: all(len(a) >= n + 20 for a, n in zip(acked, at_kill, strict=True)),
                 "every writer to go on after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)

    survivor = (victim + 1) % 3
    reader = EtcdStore([eps[survivor]])
    try:
        records, _ = reader.list(prefix)
    finally:
        reader.close()
    stored = {r.key: (r.value, r.revision) for r in records}
    for w in range(writers):
        for key, (value, rev) in acked[w].items():
            assert stored.get(key) == (value, rev), f"acknowledged write {key} lost or changed"
    allowed = {k for a in acked for k in a} | {k for u in unknown for k in u}
    assert set(stored) <= allowed

    # The killed member comes back with the same data.
    cluster3.restart_member(victim)
    back = EtcdStore([eps[victim]])
    try:
        again, _ = back.list(prefix)
    finally:
        back.close()
    assert {r.key: (r.value, r.revision) for r in again} == stored


def test_watch_survives_member_kill(cluster3):
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    eps = cluster3.endpoints
    watched = (cluster3.leader() + 1) % 3  # a follower
    writer = EtcdStore(rotated(eps, (watched + 1) % 3))
    watcher = EtcdStore(rotated(eps, watched))
    events = []
    try:
        start = writer.put(prefix + "k", {"i": 0})
        revs = [start] + [writer.put(prefix + "k", {"i": i}) for i in range(1, 10)]
        gen = watcher.watch(prefix, start)
        for event in gen:
            events.append(event)
            if len(events) == 10:
                break
        cluster3.kill_member(watched)
        revs += [writer.txn([Op.put(prefix + "k", {"i": i})]) for i in range(10, 20)]
        for event in gen:  # the same iterator: it reconnects to a surviving member
            events.append(event)
            if len(events) == 20:
                break
        gen.close()
    finally:
        writer.close()
        watcher.close()
    assert [e.revision for e in events] == revs
    assert [e.value["i"] for e in events] == list(range(20))
    assert [e.type for e in events] == ["ADDED"] + ["MODIFIED"] * 19


def test_list_pages_come_from_one_snapshot(etcd1_cluster):
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    store = EtcdStore(etcd1_cluster.endpoints, page_size=5)
    other = EtcdStore(etcd1_cluster.endpoints)
    try:
        rev = store.txn([Op.create(f"{prefix}{i:02d}", {"i": i}) for i in range(20)])
        calls = []
        real_call = store._call

        def call(path, request, **kw):
            calls.append(request)
            doc = real_call(path, request, **kw)
            if len(calls) == 1:  # between the first and the second page
                other.txn([Op.delete(f"{prefix}{i:02d}") for i in range(10, 15)] + [Op.put(prefix + "99", {})])
            return doc

        store._call = call
        records, at = store.list(prefix)
        assert calls  # the writes came after the first page (the later ones: tests/store/test_etcd_list.py)
        assert at == rev
        assert [r.value["i"] for r in records] == list(range(20))
        del store._call
        records, at = store.list(prefix)
        assert at == rev + 1 and len(records) == 16
    finally:
        store.close()
        other.close()


def test_close_ends_a_blocked_watch(etcd1_cluster):
    store = EtcdStore(etcd1_cluster.endpoints)
    prefix = f"/podnet-test/{uuid.uuid4().hex[:12]}/"
    seen, ended = [], threading.Event()

    def consume():
        for event in store.watch(prefix, 0):
            seen.append(event)
        ended.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        store.put(prefix + "a", {"n": 1})
        deadline = time.monotonic() + 15
        while not seen:
            assert time.monotonic() < deadline, "watch delivered nothing"
            time.sleep(0.02)
        assert not ended.is_set()  # blocked, waiting for more
    finally:
        store.close()
    assert ended.wait(10), "close() did not end the watch"
    assert [e.key for e in seen] == [prefix + "a"]
