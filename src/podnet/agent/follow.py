"""List, then watch, the store (an informer): the one loop that keeps a local cache and
the event-fed dataplanes current, used by the agent and the standalone DNS server.

After a compacted watch history (or any relist) every dataplane is reloaded from a
fresh list: begin_reload(), every listed object as an event, end_reload(), so that
what was deleted during the gap goes too. A watch that fails is retried after a
pause, from the last revision seen; the store's history covers the gap or says
Compacted, which relists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane
from podnet.store.base import Compacted, Event, KeyValueStore
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

    def relist(self, kv: KeyValueStore) -> int:
        """Load everything under the prefix, as one consistent list; its revision."""
        records, rev = kv.list(self.prefix)
        for dp in self.dataplanes:
            dp.begin_reload()
        try:
            self.cache.reload(records, self._feed)
        finally:
            for dp in self.dataplanes:
                dp.end_reload()
        del records
        self.on_change(rev, self.dataplanes)
        return rev

    def _feed(self, ev: ObjectEvent) -> list[Dataplane]:
        """One event to every dataplane; one failing does not keep it from the others."""
        dirty = []
        for dp in self.dataplanes:
            try:
                if dp.on_event(ev):
                    dirty.append(dp)
            except Exception as e:  # a bug or an odd object: report it, keep the watch going
                log.error("%s: the %s dataplane failed on it: %s", ev.key, dp.name, e)
                dirty.append(dp)  # its next sync starts from what it has
        return dirty

    def apply(self, ev: Event) -> None:
        typed = self.cache.apply(ev)
        dirty = self._feed(typed if typed is not None else ObjectEvent(ev.type, None, ev.key, ev.revision))
        self.on_change(ev.revision, dirty)

    def watch(self, open_kv: Callable[[], KeyValueStore], start_rev: int) -> None:
        """Follow the store from `start_rev` until stop(); a watch blocks, so it gets its own
        connection from `open_kv`."""
        kv = open_kv()
        rev = start_rev
        try:
            while not self.stopping.is_set():
                try:
                    for ev in kv.watch(self.prefix, rev):
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
            kv.close()

    def stop(self) -> None:
        self.stopping.set()
