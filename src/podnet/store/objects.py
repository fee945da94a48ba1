"""Typed access to Kubernetes-shaped objects over any KeyValueStore.

Keys: /podnet/objects/<Kind>/<namespace>/<name> (namespaced) or
/podnet/objects/<Kind>/<name> (cluster-scoped). metadata.resourceVersion is the
key's store revision, so an update carries its own compare-and-swap condition.

A stored value that does not decode (a kind this version does not know, or one
that fails validation) never stops a reader: lists and watches skip it and log
it; `undecodable` names what a list skipped, and `delete_key` removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, TypeVar

import pydantic

from podnet.errors import PodnetError
from podnet.model.manifests import explain, field_path
from podnet.model.objects import KINDS, KubeObject
from podnet.model.selectors import LabelSelector
from podnet.store.base import Event, KeyValueStore, Op, Record

OBJECTS_PREFIX = "/podnet/objects/"

log = logging.getLogger("podnet.store")

T = TypeVar("T", bound=KubeObject)


def kind_prefix(cls: type[KubeObject], namespace: str | None = None) -> str:
    if namespace and cls.NAMESPACED:
        return f"{OBJECTS_PREFIX}{cls.KIND}/{namespace}/"
    return f"{OBJECTS_PREFIX}{cls.KIND}/"


def object_key(cls: type[KubeObject], name: str, namespace: str | None = None) -> str:
    if cls.NAMESPACED:
        return f"{OBJECTS_PREFIX}{cls.KIND}/{namespace or 'default'}/{name}"
    return f"{OBJECTS_PREFIX}{cls.KIND}/{name}"


def key_of(obj: KubeObject) -> str:
    return object_key(type(obj), obj.name, obj.namespace)


@lru_cache(maxsize=256)
def split_object_key(key: str) -> tuple[str, str | None, str] | None:
    """(kind, namespace, name) of an object key, /podnet/objects/<Kind>/[<namespace>/]<name>
    (namespace None for a cluster-scoped kind); None for any other key. (Cached: every
    dataplane asks about the key of each event in turn.)"""
    if not key.startswith(OBJECTS_PREFIX):
        return None
    parts = key[len(OBJECTS_PREFIX):].split("/")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return None


def stored_form(obj: KubeObject) -> dict:
    data = obj.to_dict()
    data["metadata"].pop("resourceVersion", None)  # the key's revision is the truth
    return data


class UndecodableObject(PodnetError):
    """A stored value that is not an object this version can read."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def decode(record: Record) -> KubeObject:
    """The typed object of a record; UndecodableObject if it is not one."""
    data = record.value
    kind = data.get("kind", "") if isinstance(data, dict) else None
    if kind is None:
        raise UndecodableObject(record.key, f"stored value is a {type(data).__name__}, not an object")
    cls = KINDS.get(kind)
    if cls is None:
        raise UndecodableObject(record.key, f"stored object has unknown kind {kind!r}")
    under = record.key[len(OBJECTS_PREFIX):].split("/", 1)[0] if record.key.startswith(OBJECTS_PREFIX) else kind
    if under != kind:
        raise UndecodableObject(record.key, f"stored object of kind {kind!r} under the keys of kind {under!r}")
    meta = data.get("metadata")
    meta = {**meta, "resourceVersion": str(record.revision)} if isinstance(meta, dict) else meta
    try:
        return cls.model_validate({**data, "metadata": meta})
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = field_path(err["loc"])
        raise UndecodableObject(record.key, "stored object does not validate: "
                                + (f"field {where}: " if where else "") + explain(err)) from None
    except ValueError as e:
        raise UndecodableObject(record.key, f"stored object does not validate: {e}") from None


def decode_or_report(record: Record) -> KubeObject | UndecodableObject:
    """The object, or (logged) why it cannot be read: for readers that skip bad objects."""
    try:
        return decode(record)
    except UndecodableObject as e:
        log.warning("skipping %s", e)
        return e


@dataclass
class Listing:
    objects: list = field(default_factory=list)
    revision: int = 0
    undecodable: list[UndecodableObject] = field(default_factory=list)


@dataclass(frozen=True)
class ObjectEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: KubeObject | None  # None for a DELETED whose last value is unknown
    key: str
    revision: int
    raw: dict | None = None  # the stored value, for records that are not objects (IPAM blocks)


class ObjectStore:
    def __init__(self, kv: KeyValueStore):
        self.kv = kv

    def get(self, cls: type[T], name: str, namespace: str | None = None) -> T | None:
        rec = self.kv.get(object_key(cls, name, namespace))
        return decode(rec) if rec else None  # type: ignore[return-value]

    def readable(self, cls: type[T], name: str, namespace: str | None = None) -> T | None:
        """The object, or None if it is absent or does not decode (logged): for writers
        that replace what is stored, a value that cannot be read is as good as none."""
        rec = self.kv.get(object_key(cls, name, namespace))
        got = decode_or_report(rec) if rec else None
        return None if isinstance(got, UndecodableObject) else got  # type: ignore[return-value]

    def list(
        self,
        cls: type[T],
        namespace: str | None = None,
        selector: LabelSelector | None = None,
    ) -> list[T]:
        return self.list_at(cls, namespace, selector)[0]

    def list_at(
        self, cls: type[T], namespace: str | None = None, selector: LabelSelector | None = None
    ) -> tuple[list[T], int]:
        """Objects and the store revision they were read at (to start a watch from)."""
        found = self.scan(cls, namespace, selector)
        for bad in found.undecodable:
            log.warning("skipping %s", bad)
        return found.objects, found.revision

    def scan(self, cls: type[KubeObject], namespace: str | None = None,
             selector: LabelSelector | None = None) -> Listing:
        """The objects of a kind, and (not logged: the caller reports them) the stored
        values under its keys that do not decode."""
        records, rev = self.kv.list(kind_prefix(cls, namespace))
        out = Listing(revision=rev)
        for r in records:
            try:
                obj = decode(r)
            except UndecodableObject as e:
                out.undecodable.append(e)
                continue
            if selector is None or selector.matches(obj.labels):
                out.objects.append(obj)
        return out

    def create(self, obj: KubeObject) -> int:
        return self.kv.create(key_of(obj), stored_form(obj))

    def update(self, obj: KubeObject) -> int:
        """Compare-and-swap on metadata.resourceVersion (raises Conflict if stale)."""
        rv = obj.metadata.resource_version
        if not rv:
            raise PodnetError(f"{obj.ref}: update needs metadata.resourceVersion (read the object first)")
        return self.kv.update(key_of(obj), stored_form(obj), int(rv))

    def delete(self, cls: type[KubeObject], name: str, namespace: str | None = None,
               revision: int | None = None) -> int:
        return self.kv.delete(object_key(cls, name, namespace), revision)

    def delete_key(self, key: str) -> KubeObject | UndecodableObject | None:
        """Delete the stored value at an object key, whether or not it decodes.

        Returns what was deleted (the object, or why it could not be read), None if
        nothing was there."""
        if not key.startswith(OBJECTS_PREFIX) or key == OBJECTS_PREFIX:
            raise PodnetError(f"{key!r} is not an object key: expected {OBJECTS_PREFIX}<Kind>/[<namespace>/]<name>")
        rec = self.kv.get(key)
        if rec is None:
            return None
        try:
            gone: KubeObject | UndecodableObject = decode(rec)
        except UndecodableObject as e:
            gone = e
        self.kv.delete(key, rec.revision)
        return gone

    def apply(self, objects: Iterable[KubeObject]) -> tuple[int, list[tuple[str, str]]]:
        """Create or replace every object in one transaction: all land or none does.

        Returns the revision and (ref, "created"|"configured"|"unchanged") per object.
        Each write is conditioned on the revision read here, so a concurrent change
        makes the whole apply fail with Conflict rather than be overwritten.
        """
        ops: list[Op] = []
        outcome: list[tuple[str, str]] = []
        for obj in objects:
            key = key_of(obj)
            current = self.kv.get(key)
            new = stored_form(obj)
            if current is None:
                ops.append(Op.create(key, new))
                outcome.append((obj.ref, "created"))
            elif _same(current.value, new):
                outcome.append((obj.ref, "unchanged"))
            else:
                ops.append(Op.update(key, new, current.revision))
                outcome.append((obj.ref, "configured"))
        rev = self.kv.txn(ops) if ops else self.kv.revision()
        return rev, outcome

    def delete_all(self, objects: Iterable[KubeObject]) -> tuple[int, list[tuple[str, str]]]:
        """Delete every listed object in one transaction; missing ones are reported, not errors."""
        ops, outcome = [], []
        for obj in objects:
            current = self.kv.get(key_of(obj))
            if current is None:
                outcome.append((obj.ref, "not found"))
            else:
                ops.append(Op.delete(key_of(obj), current.revision))
                outcome.append((obj.ref, "deleted"))
        rev = self.kv.txn(ops) if ops else self.kv.revision()
        return rev, outcome

    def watch(self, cls: type[KubeObject] | None, start_revision: int) -> Iterator[ObjectEvent]:
        prefix = kind_prefix(cls) if cls else OBJECTS_PREFIX
        for ev in self.kv.watch(prefix, start_revision):
            yield object_event(ev)


def object_event(ev: Event) -> ObjectEvent:
    """The typed event. A value that does not decode (logged) reads as the object going
    away: a list at the same revision would not show it either."""
    if ev.value is None:
        return ObjectEvent(ev.type, None, ev.key, ev.revision)
    obj = decode_or_report(Record(ev.key, ev.value, ev.revision, 0))
    if isinstance(obj, UndecodableObject):
        return ObjectEvent("DELETED", None, ev.key, ev.revision)
    return ObjectEvent(ev.type, obj, ev.key, ev.revision)


def _same(stored: dict, new: dict) -> bool:
    old = {**stored, "metadata": {k: v for k, v in stored.get("metadata", {}).items() if k != "resourceVersion"}}
    return old == new
