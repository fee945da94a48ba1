"""The agent's local copy of the store, kept current by one watch (an informer).

One consistent list of everything under /podnet/ at start, then every event is
applied here; dataplane syncs read this copy instead of the store, so the store
sees one watch per node, not a list per sync.
"""

from __future__ import annotations

import threading
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
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, KubeObject]] = {}  # kind -> key -> object
        self._blocks: dict[str, dict] = {}  # IPAM block records, raw

    def load(self, records: list[Record]) -> list[ObjectEvent]:
        """Fill from a full list; returns the objects as ADDED events (for event-fed indexes)."""
        events = [self.apply(Event("ADDED", r.key, r.value, r.revision)) for r in records]
        return [e for e in events if e is not None]

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
        with self._lock:
            bucket = self._objects.setdefault(kind, {})
            if obj is None:
                bucket.pop(ev.key, None)
            else:
                bucket[ev.key] = obj
        return ObjectEvent(ev.type, obj, ev.key, ev.revision)

    def list(self, cls: type[T]) -> list[T]:
        with self._lock:
            return list(self._objects.get(cls.KIND, {}).values())  # type: ignore[arg-type]

    def blocks(self) -> list[dict]:
        with self._lock:
            return list(self._blocks.values())
