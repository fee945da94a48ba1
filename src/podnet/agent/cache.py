"""The agent's local copy of the store, kept current by one watch (an informer).

One consistent list of everything under /podnet/ at start, then every event is
applied here; dataplane syncs read this copy instead of the store, so the store
sees one watch per node, not a list per sync.

Kinds that event-fed dataplanes keep in their own compact form (Services,
EndpointSlices, Pods, Namespaces, NetworkPolicies) can be left out (`unkept`): they
are decoded and handed on as events, not stored here. IPAM blocks are never kept:
they are handed on raw (ObjectEvent.raw) to the routes dataplane, which keeps a
compact record of each.

An object of a kind this version does not know is ignored (logged once per kind),
and one that does not decode is logged and read as deleted: neither stops the agent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from podnet.agent.records import DECODERS, decode_record
from podnet.ipam.keys import BLOCKS
from podnet.model.objects import KINDS, KubeObject
from podnet.store.base import Event, Record
from podnet.store.objects import OBJECTS_PREFIX, ObjectEvent, UndecodableObject, object_event

log = logging.getLogger("podnet.agent")

T = TypeVar("T", bound=KubeObject)
_KIND_AT = len(OBJECTS_PREFIX)


def record_event(kind: str, ev: Event) -> ObjectEvent:
    """The event with the object's record; one that does not decode (logged) reads as the
    object going away, as object_event does with the models."""
    return _record_event(kind, ev.type, ev.key, ev.value, ev.revision)


def _record_event(kind: str, type_: str, key: str, value: object, revision: int) -> ObjectEvent:
    try:
        return ObjectEvent(type_, decode_record(kind, key, value, revision), key, revision)  # type: ignore[arg-type]
    except UndecodableObject as e:
        log.warning("skipping %s", e)
        return ObjectEvent("DELETED", None, key, revision)


def kind_of_key(key: str) -> str | None:
    """The kind of an object key (split_object_key's first part, without splitting the
    whole key: asked of every event); None for any other key."""
    if not key.startswith(OBJECTS_PREFIX):
        return None
    end = key.find("/", _KIND_AT)
    # <Kind>/<name> or <Kind>/<namespace>/<name>, as split_object_key
    if end < 0 or key.count("/", end + 1) > 1:
        return None
    return key[_KIND_AT:end]


class ObjectCache:
    def __init__(self, unkept: Iterable[str] = (), records: bool | Iterable[str] = False) -> None:
        """`records`: hand on the kinds agent/records.py knows (True: all of them; or the
        kinds named) as their compact records (decoded without the models) instead of
        model objects; such kinds are never kept."""
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, KubeObject]] = {}  # kind -> key -> object
        self.records = frozenset(DECODERS) if records is True else frozenset(records or ()) & frozenset(DECODERS)
        self.unkept = frozenset(unkept) | self.records
        self._unknown_kinds: set[str] = set()  # already logged

    def load(self, records: list[Record], sink: Callable[[ObjectEvent], None] | None = None,
             ) -> list[ObjectEvent]:
        """Fill from a full list; the objects go to `sink` as ADDED events one by one (for
        event-fed indexes), or without a sink are returned as a list. The list of records
        is consumed (emptied as it is read) so that each raw record is freed once decoded."""
        events: list[ObjectEvent] = []
        for i, r in enumerate(records):
            records[i] = None  # type: ignore[call-overload]
            ev = self.apply(Event("ADDED", r.key, r.value, r.revision))
            if ev is None:
                continue
            if sink is not None:
                sink(ev)
            else:
                events.append(ev)
        records.clear()
        return events

    def adopt(self, fresh: ObjectCache) -> None:
        """Become what `fresh` holds (a complete new list), in place, so that every
        dataplane holding this cache sees the new contents."""
        with self._lock:
            self._objects = fresh._objects

    def apply(self, ev: Event) -> ObjectEvent | None:
        """Apply one store event; returns it typed if it concerned a Kubernetes-shaped object."""
        return self.apply_change(ev.type, ev.key, ev.value, ev.revision)

    def apply_change(self, type_: str, key: str, value: object, revision: int,
                     kind: str | None = None) -> ObjectEvent | None:
        """apply() of an event given by its parts; `kind`: kind_of_key(key) if the caller
        has it. (The first list hands on every object of the cluster: no Event made for
        each, and its kind found once.)"""
        if key.startswith(BLOCKS):  # not kept here: the routes dataplane keeps what it needs
            return ObjectEvent(type_, None, key, revision, raw=value if type_ != "DELETED" else None)  # type: ignore[arg-type]
        if kind is None:
            kind = kind_of_key(key)
            if kind is None:
                return None
        if kind not in KINDS:
            if kind not in self._unknown_kinds:
                self._unknown_kinds.add(kind)
                log.warning("ignoring stored objects of unknown kind %r (first: %s)", kind, key)
            return None
        if type_ == "DELETED":
            typed = ObjectEvent("DELETED", None, key, revision)
        elif kind in self.records:
            typed = _record_event(kind, type_, key, value, revision)
        else:
            typed = object_event(Event(type_, key, value, revision))  # type: ignore[arg-type]
        if kind in self.unkept:
            return typed
        with self._lock:
            bucket = self._objects.setdefault(kind, {})
            if typed.object is None:
                bucket.pop(key, None)
            else:
                bucket[key] = typed.object
        return typed

    def snapshot_state(self) -> dict[str, dict[str, KubeObject]]:
        with self._lock:
            return {kind: dict(objects) for kind, objects in self._objects.items()}

    def restore_state(self, state: dict[str, dict[str, KubeObject]]) -> list[ObjectEvent]:
        """Hold what snapshot_state() returned; the objects as ADDED events (for the
        dataplanes that are fed from events but keep nothing of their own)."""
        with self._lock:
            self._objects = state  # (loaded just now: nothing else holds it)
        return [ObjectEvent("ADDED", obj, key, 0) for objects in state.values() for key, obj in objects.items()]

    def fresh(self) -> ObjectCache:
        """An empty cache that decodes and keeps as this one does (for a relist)."""
        return ObjectCache(self.unkept, self.records)

    def list(self, cls: type[T]) -> list[T]:
        if cls.KIND in self.unkept:
            raise LookupError(f"{cls.KIND} objects are not kept in this cache (they are fed to their indexes)")
        with self._lock:
            return list(self._objects.get(cls.KIND, {}).values())  # type: ignore[arg-type]
