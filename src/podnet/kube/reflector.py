"""List, then watch, one kind of the Kubernetes API: podnet's own reflector (client-go's
tools/cache/reflector.go in semantics; the Python clients get 410 wrong).

  1. LIST in pages (limit/continue) at one resourceVersion. An expired continue token starts
     the list over. The listed objects are diffed against what was known: new or changed ones
     are reported ADDED/MODIFIED, known ones the list no longer has DELETED (they went while
     nobody watched), unchanged ones not at all.
  2. WATCH from the list's resourceVersion with bookmarks; each event (and bookmark) moves the
     resourceVersion on. A stream that ends (the server's timeout) is watched again from there.
  3. 410 Gone (an ERROR event or a response): the history is compacted: list again (1).
     Connection failures, a stream cut inside an event, 5xx: watch (or list) again after a
     backoff (exponential with jitter, capped; reset by a watch that delivered something).

The handler gets batches: `on_events(reflector, events, resource_version, relist)`; a batch
from a list is complete (every change the list implies), so a consumer can write it at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from podnet.kube.client import ApiError, Gone, KubeClient, NotFound, Resource, StreamCut, Unreachable

log = logging.getLogger("podnet.kube")


@dataclass(frozen=True)
class Change:
    type: str  # ADDED MODIFIED DELETED
    key: str  # <namespace>/<name> or <name>
    object: dict | None  # the API object (the last one known for DELETED, if any)


def object_key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Backoff:
    def __init__(self, initial: float = 0.8, cap: float = 30.0, factor: float = 2.0, jitter: float = 0.2):
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.current = 0.0

    def next(self) -> float:
        self.current = self.initial if not self.current else min(self.cap, self.current * self.factor)
        return self.current * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.current = 0.0


Handler = Callable[["Reflector", list[Change], str, bool], None]


class Reflector:
    def __init__(self, client: KubeClient, resource: Resource, handler: Handler, *, page_size: int = 500,
                 watch_timeout: tuple[int, int] = (300, 600), backoff: Backoff | None = None,
                 stopping: threading.Event | None = None, keep_objects: bool = True):
        self.client = client
        self.resource = resource
        self.handler = handler
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.stopping = stopping or threading.Event()
        self.keep_objects = keep_objects
        self.known: dict[str, str] = {}  # key -> resourceVersion
        self.objects: dict[str, dict] = {}  # key -> last object (keep_objects)
        self._rv = ""
        self.progress = threading.Condition()  # notified whenever resource_version moves
        self.synced = threading.Event()  # the first list was handed on
        self.lists = 0
        self.unserved = False  # the API server does not serve this kind (a CRD not installed)
        self.unserved_recheck = 30.0
        self.watches = 0
        self.gone = 0

    @property
    def resource_version(self) -> str:
        return self._rv

    @resource_version.setter
    def resource_version(self, rv: str) -> None:
        with self.progress:
            self._rv = rv
            self.progress.notify_all()

    @property
    def name(self) -> str:
        return self.resource.plural

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        need_list = True
        while not self.stopping.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                    if self.unserved:  # nothing to watch: list again later (a CRD may be installed)
                        need_list = True
                        if self.stopping.wait(self.unserved_recheck):
                            return
                        continue
                started = time.monotonic()
                if not self.watch_once() and time.monotonic() - started < 1.0 and self._pause():
                    return  # a server that ends every watch at once is not asked again in a tight loop
            except Gone as e:
                self.gone += 1
                log.info("watch of %s: %s; listing again", self.name, e.message or "410 Gone")
                need_list = True
                if self.gone > 1 and self._pause():  # a storm of 410s: relist, but not in a tight loop
                    return
                continue
            except (Unreachable, StreamCut, ApiError) as e:
                what = "list" if need_list else "watch"
                log.warning("%s of %s failed: %s; again in a moment", what, self.name, e)
                if self._pause():
                    return
                continue
            self.gone = 0

    def _pause(self) -> bool:
        """Wait out the backoff; True if stopping meanwhile."""
        return self.stopping.wait(self.backoff.next())

    def stop(self) -> None:
        self.stopping.set()

    # ------------------------------------------------------------ list

    def relist(self) -> None:
        listed: dict[str, dict] = {}
        cont = None
        rv = ""
        restarts = 0
        while True:
            try:
                page = self.client.list(self.resource, limit=self.page_size, **({"continue": cont} if cont else {}))
            except NotFound:
                if cont is not None:
                    raise
                if not self.unserved:
                    log.info("the API server does not serve %s (%s): none of them, for now", self.name,
                             self.resource.api_version)
                self.unserved = True
                page = {"metadata": {}, "items": []}
            except Gone:
                if cont is None or restarts >= 3:
                    raise
                restarts += 1  # the snapshot of the first page is compacted: list from the start
                log.info("list of %s: the snapshot expired between pages; listing again", self.name)
                listed.clear()
                cont = None
                continue
            else:
                self.unserved = False
            meta = page.get("metadata") or {}
            if not rv:
                rv = str(meta.get("resourceVersion") or "")
            for item in page.get("items") or ():
                if isinstance(item, dict):
                    item.setdefault("kind", self.resource.kind)
                    item.setdefault("apiVersion", self.resource.api_version)
                    listed[object_key(item)] = item
            cont = meta.get("continue")
            if not cont:
                break
        changes = []
        for key, obj in listed.items():
            orv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if key not in self.known:
                changes.append(Change("ADDED", key, obj))
            elif self.known[key] != orv:
                changes.append(Change("MODIFIED", key, obj))
        for key in self.known.keys() - listed.keys():
            changes.append(Change("DELETED", key, self.objects.get(key)))
        self.known = {k: str((o.get("metadata") or {}).get("resourceVersion") or "") for k, o in listed.items()}
        if self.keep_objects:
            self.objects = listed
        self.resource_version = rv
        self.lists += 1
        self.handler(self, changes, rv, True)
        self.synced.set()

    # ------------------------------------------------------------ watch

    def watch_once(self) -> bool:
        """One watch until the server ends it; whether it delivered an event."""
        timeout = random.randint(*self.watch_timeout)
        self.watches += 1
        delivered = False
        for ev in self.client.watch(self.resource, self.resource_version, timeout_seconds=timeout):
            if self.stopping.is_set():
                return delivered
            kind = ev.get("type")
            obj = ev.get("object")
            if not isinstance(obj, dict):
                log.warning("watch of %s: a %s event without an object; ignored", self.name, kind)
                continue
            if kind == "ERROR":
                raise ApiError.from_status(obj)
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if kind == "BOOKMARK":
                if rv:
                    self.resource_version = rv
                delivered = True
                self.backoff.reset()
                continue
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                log.warning("watch of %s: unknown event type %r; ignored", self.name, kind)
                continue
            obj.setdefault("kind", self.resource.kind)
            obj.setdefault("apiVersion", self.resource.api_version)
            key = object_key(obj)
            if kind == "DELETED":
                self.known.pop(key, None)
                self.objects.pop(key, None)
            else:
                self.known[key] = rv
                if self.keep_objects:
                    self.objects[key] = obj
            if rv:
                self.resource_version = rv
            self.handler(self, [Change(kind, key, obj)], rv, False)
            if not delivered:
                delivered = True
                self.backoff.reset()
        return delivered
