"""The key-value contract every backend fulfils (checked by tests/store, on each backend).

The model is etcd v3's: one cluster-wide revision counter that every write (or
transaction) bumps by one; each key carries the revision of its last change
(`revision`, etcd's mod_revision) and of its creation. Conditional writes compare
a key's revision: expected 0 means "must not exist". Values are JSON objects.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from podnet.errors import PodnetError


class StoreError(PodnetError):
    pass


class NotFound(StoreError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(f"{key}: not found")


class AlreadyExists(StoreError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(f"{key}: already exists")


class Conflict(StoreError):
    """A compare-and-swap lost: the key changed since it was read."""

    def __init__(self, key: str, expected: int | None = None, actual: int | None = None):
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(f"{key}: changed concurrently (expected revision {expected}, found {actual})")


class Compacted(StoreError):
    """A watch asked for history the store no longer keeps: list again, then watch."""

    def __init__(self, revision: int, compact_revision: int):
        self.revision = revision
        self.compact_revision = compact_revision
        super().__init__(f"revision {revision} is compacted (oldest kept: {compact_revision}); relist and watch again")


class StoreUnavailable(StoreError):
    pass


@dataclass(frozen=True)
class Record:
    key: str
    value: dict[str, Any]
    revision: int  # revision of the last change to this key
    create_revision: int


@dataclass(frozen=True)
class Event:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    key: str
    value: dict[str, Any] | None  # the new value; for DELETED the last value if known, else None
    revision: int


@dataclass(frozen=True)
class Op:
    """One write in a transaction.

    expect: None = unconditional; 0 = key must not exist; n > 0 = key's revision must be n.
    """

    kind: Literal["put", "delete"]
    key: str
    value: dict[str, Any] | None = None
    expect: int | None = None

    @classmethod
    def create(cls, key: str, value: dict[str, Any]) -> Op:
        return cls("put", key, value, 0)

    @classmethod
    def update(cls, key: str, value: dict[str, Any], revision: int) -> Op:
        return cls("put", key, value, revision)

    @classmethod
    def put(cls, key: str, value: dict[str, Any]) -> Op:
        return cls("put", key, value, None)

    @classmethod
    def delete(cls, key: str, revision: int | None = None) -> Op:
        return cls("delete", key, None, revision)


class KeyValueStore(abc.ABC):
    """Revisioned key-value store. Implementations are safe for use by one thread;
    open one per thread or process (they are cheap)."""

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> Record | None: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> tuple[list[Record], int]:
        """All records under prefix, sorted by key, and the store revision they were read at."""

    def stream(self, prefix: str, sink: Callable[[Record], None]) -> int:
        """Every record under prefix, sorted by key, to `sink` one by one as they are read
        (backends read page by page, so a caller that keeps only what it needs never
        holds the whole listing); returns the revision they were all read at. If the
        store cannot keep one snapshot until the end (etcd compacted it meanwhile), this
        raises Compacted after some records were delivered: start over."""
        records, rev = self.list(prefix)
        for r in records:
            sink(r)
        return rev

    @abc.abstractmethod
    def txn(self, ops: list[Op]) -> int:
        """Apply all ops atomically or none. Returns the new store revision.

        Raises Conflict (revision mismatch), AlreadyExists (expect=0 on an existing key)
        or NotFound (delete/update of a missing key) naming the first failing key.
        A delete with expect=None of a missing key is a no-op, not an error.
        """

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int, previous: bool = True) -> Iterator[Event]:
        """Events under prefix with revision >= start_revision, in order, forever.

        The iterator blocks waiting for new events; it reconnects by itself after a
        lost connection, resuming after the last event it yielded, so no event is
        lost or repeated. Raises Compacted if start_revision is no longer kept.
        Call close() on the iterator (a generator) to stop it. `previous=False`: a
        DELETED event need not carry the last value (etcd then does not send every
        event's previous value too: half the bytes per change for a watcher that
        forgets deleted objects by key, as the node agents do).
        """

    @abc.abstractmethod
    def revision(self) -> int:
        """The store's current revision."""

    def identity(self) -> str:
        """Which store this is, for what a process keeps across its restarts (the agent's
        snapshot): a store made again at the same address must differ."""
        return self.url

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release the store's connections; its watches end (as if exhausted), so a thread
        blocked in one returns."""

    # Convenience wrappers over txn, so callers say what they mean.
    def create(self, key: str, value: dict[str, Any]) -> int:
        return self.txn([Op.create(key, value)])

    def update(self, key: str, value: dict[str, Any], revision: int) -> int:
        return self.txn([Op.update(key, value, revision)])

    def put(self, key: str, value: dict[str, Any]) -> int:
        return self.txn([Op.put(key, value)])

    def delete(self, key: str, revision: int | None = None) -> int:
        return self.txn([Op.delete(key, revision)])

    def __enter__(self) -> KeyValueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_expect(op: Op, current: int) -> None:
    """Raise the error an op's expectation gives against a key's current revision (0 = missing)."""
    if op.kind == "put":
        if op.expect == 0 and current:
            raise AlreadyExists(op.key)
        if op.expect and not current:
            raise NotFound(op.key)
        if op.expect and op.expect != current:
            raise Conflict(op.key, op.expect, current)
    else:
        if op.expect is not None and not current:
            raise NotFound(op.key)
        if op.expect and op.expect != current:
            raise Conflict(op.key, op.expect, current)
