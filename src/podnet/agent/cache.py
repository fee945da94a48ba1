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
from podnet.store.objects import ObjectEvent, UndecodableObject, object_event, split_object_key

log = logging.getLogger("podnet.agent")

T = TypeVar("T", bound=KubeObject)


def record_event(kind: str, ev: Event) -> ObjectEvent:
    """The event with the object's record; one that does not decode (logged) reads as the
    object going away, as object_event does with the models."""
    try:
        return ObjectEvent(ev.type, decode_record(kind, ev.key, ev.value, ev.revision), ev.key, ev.revision)  # type: ignore[arg-type]
    except UndecodableObject as e:
        log.warning("skipping %s", e)
        return ObjectEvent("DELETED", None, ev.key, ev.revision)


def kind_of_key(key: str) -> str | None:
    parts = split_object_key(key)
    return parts[0] if parts else None


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
        if ev.key.startswith(BLOCKS):  # not kept here: the routes dataplane keeps what it needs
            return ObjectEvent(ev.type, None, ev.key, ev.revision, raw=ev.value if ev.type != "DELETED" else None)
        kind = kind_of_key(ev.key)
        if kind is None:
            return None
        if kind not in KINDS:
            if kind not in self._unknown_kinds:
                self._unknown_kinds.add(kind)
                log.warning("ignoring stored objects of unknown kind %r (first: %s)", kind, ev.key)
            return None
        if ev.type == "DELETED":
            typed = ObjectEvent("DELETED", None, ev.key, ev.revision)
        elif kind in self.records:
            typed = record_event(kind, ev)
        else:
            typed = object_event(ev)
        if kind in self.unkept:
            return typed
        with self._lock:
            bucket = self._objects.setdefault(kind, {})
            if typed.object is None:
                bucket.pop(ev.key, None)
            else:
                bucket[ev.key] = typed.object
        return typed

    def snapshot_state(self) -> dict[str, dict[str, KubeObject]]:
        with self._lock:
            return {kind: dict(objects) for kind, objects in self._objects.items()}

    def restore_state(self, state: dict[str, dict[str, KubeObject]]) -> list[ObjectEvent]:
        """Hold what snapshot_state() returned; the objects as ADDED events (for the
        dataplanes that are fed from events but keep nothing of their own)."""
        with self._lock:
            self._objects = {kind: dict(objects) for kind, objects in state.items()}
        return [ObjectEvent("ADDED", obj, key, 0) for objects in state.values() for key, obj in objects.items()]

    def fresh(self) -> ObjectCache:
        """An empty cache that decodes and keeps as this one does (for a relist)."""
        return ObjectCache(self.unkept, self.records)

    def list(self, cls: type[T]) -> list[T]:
        if cls.KIND in self.unkept:
            raise LookupError(f"{cls.KIND} objects are not kept in this cache (they are fed to their indexes)")
        with self._lock:
            return list(self._objects.get(cls.KIND, {}).values())  # type: ignore[arg-type]
