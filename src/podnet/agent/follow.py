"""List, then watch, the store (an informer): the one loop that keeps a local cache and
the event-fed dataplanes current, used by the agent and the standalone DNS server.

After a compacted watch history (or any relist) every dataplane is reloaded from a
fresh list: begin_reload(), every listed object as an event, end_reload(the keys
listed), so that what was deleted during the gap goes too. A watch that fails is retried after a
pause, from the last revision seen; the store's history covers the gap or says
Compacted, which relists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import ALL_KEYS, AllKeys, Dataplane, kind_of
from podnet.agent.snapshot import Snapshot
from podnet.store.base import Compacted, Event, KeyValueStore, Record, StoreUnavailable
from podnet.store.layout import SHARED
from podnet.store.objects import ObjectEvent

log = logging.getLogger("podnet.agent")


class StoreFollower:
    def __init__(self, cache: ObjectCache, dataplanes: Sequence[Dataplane],
                 on_change: Callable[[int, list[Dataplane]], None] = lambda rev, dirty: None,
                 prefix: str = SHARED, retry_interval: float = 1.0):
        """`on_change(rev, dataplanes)`: revision `rev` is in the cache and the indexes, and
        these dataplanes must sync (all of them after a reload)."""
        self.cache = cache
        self.dataplanes = list(dataplanes)
        self.on_change = on_change
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch_kv: KeyValueStore | None = None  # the watch's own connection, closed by stop()
        self._takers: dict[str | None, list[Dataplane]] = {}  # kind -> the dataplanes its events go to
        self._fed = False  # the dataplanes were fed (a list began, or an event): they may hold objects
        # the store revision the cache and every dataplane hold (0: none, or a list under way)
        self.revision = 0

    def relist(self, kv: KeyValueStore, attempts: int = 5) -> int:
        """Load everything under the prefix, as one consistent snapshot streamed page by
        page to the dataplanes (no whole listing in memory); its revision. The cache is
        replaced when the list is complete; a list cut short (the snapshot compacted
        away) starts over, and a failed one deletes nothing."""
        for _ in range(attempts):
            fresh = self.cache.fresh()
            first = not self._fed  # nothing was fed before: nothing can be gone
            self._fed = True  # from here on the dataplanes hold what this list feeds them
            listed: set[str] | AllKeys = ALL_KEYS if first else set()
            self.revision = 0
            for dp in self.dataplanes:
                dp.begin_reload()

            add = None if isinstance(listed, AllKeys) else listed.add

            def take(r: Record, fresh: ObjectCache = fresh, add: Callable[[str], None] | None = add) -> None:
                key = r.key
                if add is not None:
                    add(key)
                kind = kind_of(key)  # once, for the cache and the dataplanes
                typed = fresh.apply_change("ADDED", key, r.value, r.revision, kind)
                self._feed(typed if typed is not None else ObjectEvent("ADDED", None, key, r.revision), kind)

            try:
                rev = kv.stream(self.prefix, take)
            except Compacted:
                log.warning("the store compacted the snapshot being listed; listing again")
                continue
            self.cache.adopt(fresh)
            for dp in self.dataplanes:
                dp.end_reload(listed)
            self.revision = rev
            self.on_change(rev, self.dataplanes)
            return rev
        raise StoreUnavailable(f"listing {self.prefix}: the snapshot was compacted under every attempt")

    def snapshot(self) -> Snapshot | None:
        """What the cache and every dataplane hold, at the revision they hold it (None
        while a list is under way). Call it with the watch stopped."""
        if not self.revision:
            return None
        return Snapshot(self.revision, self.cache.snapshot_state(),
                        {dp.name: dp.snapshot() for dp in self.dataplanes})

    def restore(self, snap: Snapshot) -> int:
        """Hold what `snap` holds instead of a first list; its revision (watch from the next).
        The cache's objects go as events to the dataplanes (those that keep none of their own
        learn them so)."""
        self._fed = True
        for ev in self.cache.restore_state(snap.cache):
            self._feed(ev)
        for dp in self.dataplanes:
            state = snap.dataplanes.get(dp.name)
            if state is not None:
                dp.restore(state)
        self.revision = snap.revision
        self.on_change(snap.revision, self.dataplanes)
        return snap.revision

    def _feed(self, ev: ObjectEvent, kind: str | None = None) -> list[Dataplane]:
        """One event to every dataplane of its kind (`kind`: kind_of(ev.key) if the caller
        has it); one failing does not keep it from the others."""
        dirty = []
        if kind is None:
            kind = kind_of(ev.key)
        takers = self._takers.get(kind)
        if takers is None:  # the contract: a dataplane that names kinds gets only their events
            takers = self._takers[kind] = [dp for dp in self.dataplanes if not dp.kinds or kind in dp.kinds]
        for dp in takers:
            try:
                if dp.on_event(ev):
                    dirty.append(dp)
            except Exception as e:  # a bug or an odd object: report it, keep the watch going
                log.error("%s: the %s dataplane failed on it: %s", ev.key, dp.name, e)
                dirty.append(dp)  # its next sync starts from what it has
        return dirty

    def apply(self, ev: Event) -> None:
        self._fed = True
        typed = self.cache.apply(ev)
        dirty = self._feed(typed if typed is not None else ObjectEvent(ev.type, None, ev.key, ev.revision))
        if self.revision:
            self.revision = ev.revision
        self.on_change(ev.revision, dirty)

    def watch(self, open_kv: Callable[[], KeyValueStore], start_rev: int) -> None:
        """Follow the store from `start_rev` until stop(); a watch blocks, so it gets its own
        connection from `open_kv`, which stop() closes: that ends a watch blocked waiting for
        events, so the thread returns and no connection is left open."""
        kv = open_kv()
        with self._lock:
            if self.stopping.is_set():
                kv.close()
                return
            self._watch_kv = kv
        rev = start_rev
        try:
            while not self.stopping.is_set():
                try:
                    for ev in kv.watch(self.prefix, rev, previous=False):  # deletions go by key
                        rev = ev.revision + 1
                        self.apply(ev)
                        if self.stopping.is_set():
                            return
                except Compacted:
                    log.warning("watch history compacted; reloading from a fresh list")
                    rev = self.relist(kv) + 1
                except Exception as e:  # the store went away: retry from where it stopped
                    log.warning("watch failed (%s); retrying", e)
                    self.stopping.wait(self.retry_interval)
        finally:
            with self._lock:
                self._watch_kv = None
            kv.close()

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            kv = self._watch_kv
        if kv is not None:
            kv.close()  # ends the blocked watch; watch() closes it again on its way out
