"""The agent's local copy of the store, kept current by one watch (an informer).

One consistent list of everything under /podnet/ at start, then every event is
applied here; dataplane syncs read this copy instead of the store, so the store
sees one watch per node, not a list per sync.

Kinds that event-fed indexes keep in their own compact form (Services and
EndpointSlices: the Service compiler and the DNS index) can be left out
(`unkept`): they are decoded and handed on as events, not stored here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from podnet.ipam.keys import BLOCKS
from podnet.model.objects import KubeObject
from podnet.store.base import Event, Record
from podnet.store.objects import OBJECTS_PREFIX, ObjectEvent, decode

T = TypeVar("T", bound=KubeObject)


def kind_of_key(key: str) -> str | None:
    if key.startswith(OBJECTS_PREFIX):
        return key[len(OBJECTS_PREFIX):].split("/", 1)[0]
    return None


class ObjectCache:
    def __init__(self, unkept: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, KubeObject]] = {}  # kind -> key -> object
        self._blocks: dict[str, dict] = {}  # IPAM block records, raw
        self.unkept = frozenset(unkept)  # kinds decoded and handed on, not stored

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

    def apply(self, ev: Event) -> ObjectEvent | None:
        """Apply one store event; returns it typed if it concerned a Kubernetes-shaped object."""
        if ev.key.startswith(BLOCKS):
            with self._lock:
                if ev.type == "DELETED":
                    self._blocks.pop(ev.key, None)
                elif ev.value is not None:
                    self._blocks[ev.key] = ev.value
            return None
        kind = kind_of_key(ev.key)
        if kind is None:
            return None
        obj = None
        if ev.type != "DELETED" and ev.value is not None:
            obj = decode(Record(ev.key, ev.value, ev.revision, 0))
        if kind in self.unkept:
            return ObjectEvent(ev.type, obj, ev.key, ev.revision)
        with self._lock:
            bucket = self._objects.setdefault(kind, {})
            if obj is None:
                bucket.pop(ev.key, None)
            else:
                bucket[ev.key] = obj
        return ObjectEvent(ev.type, obj, ev.key, ev.revision)

    def list(self, cls: type[T]) -> list[T]:
        if cls.KIND in self.unkept:
            raise LookupError(f"{cls.KIND} objects are not kept in this cache (they are fed to their indexes)")
        with self._lock:
            return list(self._objects.get(cls.KIND, {}).values())  # type: ignore[arg-type]

    def blocks(self) -> list[dict]:
        with self._lock:
            return list(self._blocks.values())
