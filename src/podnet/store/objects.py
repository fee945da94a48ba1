"""Typed access to Kubernetes-shaped objects over any KeyValueStore.

Keys: /podnet/objects/<Kind>/<namespace>/<name> (namespaced) or
/podnet/objects/<Kind>/<name> (cluster-scoped). metadata.resourceVersion is the
key's store revision, so an update carries its own compare-and-swap condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import pydantic

from podnet.errors import PodnetError
from podnet.model.objects import KINDS, KubeObject
from podnet.model.selectors import LabelSelector
from podnet.store.base import Event, KeyValueStore, Op, Record

OBJECTS_PREFIX = "/podnet/objects/"

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


def stored_form(obj: KubeObject) -> dict:
    data = obj.to_dict()
    data["metadata"].pop("resourceVersion", None)  # the key's revision is the truth
    return data


def decode(record: Record) -> KubeObject:
    data = record.value
    cls = KINDS.get(data.get("kind", ""))
    if cls is None:
        raise PodnetError(f"{record.key}: stored object has unknown kind {data.get('kind')!r}")
    meta = {**data.get("metadata", {}), "resourceVersion": str(record.revision)}
    try:
        return cls.model_validate({**data, "metadata": meta})
    except pydantic.ValidationError as e:
        raise PodnetError(f"{record.key}: stored object does not validate: {e.errors()[0]['msg']}") from None


@dataclass(frozen=True)
class ObjectEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: KubeObject | None  # None for a DELETED whose last value is unknown
    key: str
    revision: int


class ObjectStore:
    def __init__(self, kv: KeyValueStore):
        self.kv = kv

    def get(self, cls: type[T], name: str, namespace: str | None = None) -> T | None:
        rec = self.kv.get(object_key(cls, name, namespace))
        return decode(rec) if rec else None  # type: ignore[return-value]

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
        records, rev = self.kv.list(kind_prefix(cls, namespace))
        objs = [decode(r) for r in records]
        if selector is not None:
            objs = [o for o in objs if selector.matches(o.labels)]
        return objs, rev  # type: ignore[return-value]

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
            yield _object_event(ev)


def _object_event(ev: Event) -> ObjectEvent:
    obj = decode(Record(ev.key, ev.value, ev.revision, 0)) if ev.value is not None else None
    return ObjectEvent(ev.type, obj, ev.key, ev.revision)


def _same(stored: dict, new: dict) -> bool:
    old = {**stored, "metadata": {k: v for k, v in stored.get("metadata", {}).items() if k != "resourceVersion"}}
    return old == new
