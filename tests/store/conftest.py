"""Fixtures for the store suite: one set of tests, run against every backend.

Backends: `sqlite` (a fresh file per test), `etcd1` (one member), `etcd3`
(three members) and `etcd1-tls` (one member over TLS with client-certificate auth,
and user auth on: every call carries a token). Each etcd cluster is started once per
session and shared, so every test works under its own unique key prefix.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from tests.support.etcd import EtcdCluster

from podnet.store import open_store
from podnet.store.base import (
    AlreadyExists,
    Conflict,
    Event,
    KeyValueStore,
    NotFound,
    Op,
    Record,
)
from podnet.store.etcd import EtcdStore
from podnet.store.objects import ObjectStore
from podnet.store.sqlite import SQLiteStore

HAVE_ETCD = shutil.which("etcd") is not None
needs_etcd = pytest.mark.skipif(not HAVE_ETCD, reason="etcd binary not installed")

# ---------------------------------------------------------------- clusters


def _etcd(size: int, **options: bool) -> Iterator[EtcdCluster]:
    if not HAVE_ETCD:
        pytest.skip("etcd binary not installed")
    cluster = EtcdCluster(size, die_with_parent=True, **options)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd1_cluster() -> Iterator[EtcdCluster]:
    yield from _etcd(1)


@pytest.fixture(scope="session")
def etcd3_cluster() -> Iterator[EtcdCluster]:
    yield from _etcd(3)


@pytest.fixture(scope="session")
def etcd1_tls_cluster() -> Iterator[EtcdCluster]:
    """TLS with --client-cert-auth, and auth enabled: a `podnet` user that may use every key."""
    yield from _etcd(1, tls=True, auth=True)


# ---------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    url: str
    cluster: EtcdCluster | None = None

    @property
    def is_etcd(self) -> bool:
        return self.cluster is not None

    @property
    def env(self) -> dict[str, str]:
        """Environment that gives another process this backend's credentials."""
        return self.cluster.credentials.environment() if self.cluster is not None else {}

    def open(self, member: int = 0) -> KeyValueStore:
        """A new store object; for etcd, one that talks to `member` first."""
        if self.cluster is None:
            return open_store(self.url)
        eps = self.cluster.endpoints
        k = member % len(eps)
        return EtcdStore(eps[k:] + eps[:k], tls=self.cluster.tls, credentials=self.cluster.credentials)

    def compact_through(self, store: KeyValueStore, revision: int) -> None:
        """Drop history up to and including `revision`: revision+1 becomes the oldest kept."""
        if isinstance(store, SQLiteStore):
            store.compact(revision)
        elif isinstance(store, EtcdStore):
            store.compact(revision + 1)  # etcd keeps the compaction revision itself
        else:
            raise TypeError(f"no compaction for {type(store).__name__}")


BACKENDS = [
    "sqlite",
    pytest.param("etcd1", marks=[pytest.mark.etcd, needs_etcd]),
    pytest.param("etcd3", marks=[pytest.mark.etcd, needs_etcd]),
    pytest.param("etcd1-tls", marks=[pytest.mark.etcd, needs_etcd]),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path) -> Backend:
    name = request.param
    if name == "sqlite":
        return Backend(name, f"sqlite://{tmp_path}/store.db")
    cluster: EtcdCluster = request.getfixturevalue(f"{name.replace('-', '_')}_cluster")
    return Backend(name, cluster.url, cluster)


@pytest.fixture
def kv(backend: Backend) -> Iterator[KeyValueStore]:
    store = backend.open()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses (the etcd clusters are shared)."""
    return f"/podnet-test/{uuid.uuid4().hex[:12]}/"


# ---------------------------------------------------------------- watching with timeouts


class WatchReader:
    """Consumes a watch on a thread so a test can wait for events with a deadline
    instead of blocking forever on a broken watch."""

    def __init__(self, store: KeyValueStore, prefix: str, start_revision: int, previous: bool = True):
        self.store = store
        self.prefix = prefix
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._gen = store.watch(prefix, start_revision, previous=previous)
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._gen:
                with self._cond:
                    if self._stopping:
                        break
                    self.events.append(event)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            with self._cond:
                self.error = e
                self._cond.notify_all()
        finally:
            self._gen.close()
            with self._cond:
                self._cond.notify_all()

    def wait_until(self, done: Callable[[list[Event]], bool], timeout: float = 15.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.events):
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"watch of {self.prefix}: timed out; got {self.events}")
                self._cond.wait(left)
            return list(self.events)

    def wait_for(self, n: int, timeout: float = 15.0) -> list[Event]:
        return self.wait_until(lambda evs: len(evs) >= n, timeout)

    def wait_error(self, timeout: float = 15.0) -> BaseException:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"watch of {self.prefix}: no error within {timeout}s; got {self.events}")
                self._cond.wait(left)
            return self.error

    def stop(self, waker: KeyValueStore | None) -> None:
        """Stop the thread: it leaves at its next event, which `waker` provides."""
        with self._cond:
            self._stopping = True
        if self._thread.is_alive() and waker is not None:
            try:
                waker.put(self.prefix + "~stop", {"stop": True})
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._thread.join(10)


@pytest.fixture
def watch_reader(backend: Backend) -> Iterator[Callable[..., WatchReader]]:
    readers: list[WatchReader] = []
    waker = backend.open()

    def start(store: KeyValueStore, prefix: str, start_revision: int, previous: bool = True) -> WatchReader:
        reader = WatchReader(store, prefix, start_revision, previous)
        readers.append(reader)
        return reader

    try:
        yield start
    finally:
        for reader in readers:
            reader.stop(waker)
        waker.close()


# ---------------------------------------------------------------- prefixing wrapper


class PrefixedStore(KeyValueStore):
    """Every key of `inner` under `root`: lets ObjectStore tests (which use fixed keys)
    share an etcd cluster. `before_txn`, if set, runs just before each transaction."""

    def __init__(self, inner: KeyValueStore, root: str):
        self.inner = inner
        self.root = root.rstrip("/")
        self.url = inner.url
        self.before_txn: Callable[[], None] | None = None

    def _out(self, key: str) -> str:
        assert key.startswith(self.root)
        return key[len(self.root):]

    def _record(self, r: Record) -> Record:
        return dataclasses.replace(r, key=self._out(r.key))

    def get(self, key: str) -> Record | None:
        r = self.inner.get(self.root + key)
        return self._record(r) if r else None

    def list(self, prefix: str) -> tuple[list[Record], int]:
        records, rev = self.inner.list(self.root + prefix)
        return [self._record(r) for r in records], rev

    def txn(self, ops: list[Op]) -> int:
        if self.before_txn is not None:
            hook, self.before_txn = self.before_txn, None
            hook()
        try:
            return self.inner.txn([dataclasses.replace(op, key=self.root + op.key) for op in ops])
        except Conflict as e:
            raise Conflict(self._out(e.key), e.expected, e.actual) from None
        except (AlreadyExists, NotFound) as e:
            raise type(e)(self._out(e.key)) from None

    def watch(self, prefix: str, start_revision: int, previous: bool = True) -> Iterator[Event]:
        for ev in self.inner.watch(self.root + prefix, start_revision, previous):
            yield dataclasses.replace(ev, key=self._out(ev.key))

    def revision(self) -> int:
        return self.inner.revision()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def objects(kv: KeyValueStore, prefix: str) -> ObjectStore:
    """An ObjectStore whose keys all live under this test's prefix."""
    return ObjectStore(PrefixedStore(kv, prefix))
