"""One worker thread per dataplane, and the store revision the node is programmed up to.

A worker syncs its dataplane when an event marked it dirty, at most once per
`min_interval` (a burst coalesces into the next sync; a lone change goes at once,
kube-proxy's minSyncPeriod), and every `resync_interval` runs verify() and a full
sync, so drift heals within one resync period. A failed sync is retried after
`retry_interval` and reported until one succeeds.

`SyncProgress` answers "which store revision is every dataplane programmed up to":
a dataplane with nothing pending is at the newest revision seen; one with work
pending is at the revision it last finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from podnet.agent.contract import Dataplane, DataplaneMetrics

log = logging.getLogger("podnet.agent")


class SyncProgress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen_rev = 0
        self.workers: list[DataplaneWorker] = []

    def saw(self, rev: int, dirty: Iterable[DataplaneWorker] = ()) -> None:
        """Revision `rev` was fed to every index; mark the workers it concerns (one step, so
        that a worker taking its work sees both or neither)."""
        marked = []
        with self.lock:
            self.seen_rev = max(self.seen_rev, rev)
            for w in dirty:
                w.dirty = True
                marked.append(w)
        for w in marked:
            w.wake.set()

    def synced_rev(self) -> int:
        with self.lock:
            return min((w.done_rev if (w.dirty or w.running) else self.seen_rev for w in self.workers),
                       default=self.seen_rev)


class DataplaneWorker:
    def __init__(self, dataplane: Dataplane, progress: SyncProgress, metrics: DataplaneMetrics,
                 min_interval: float = 0.05, resync_interval: float = 60.0, retry_interval: float = 1.0,
                 on_synced: Callable[[], None] = lambda: None):
        self.dataplane = dataplane
        self.name = dataplane.name
        self.progress = progress
        self.metrics = metrics
        self.min_interval = min_interval
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self.on_synced = on_synced
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.dirty = False
        self.running = False
        self.done_rev = 0
        self.error: str | None = None
        self.last_full = time.monotonic()
        self._last_sync_end = 0.0
        self._thread: threading.Thread | None = None
        progress.workers.append(self)

    # -- control

    def mark(self) -> None:
        with self.progress.lock:
            self.dirty = True
        self.wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"sync-{self.name}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- one sync

    def run_once(self, full: bool) -> bool:
        """Take the pending work and sync (after verify() when full); True if it succeeded."""
        with self.progress.lock:
            self.dirty = False
            self.running = True
            rev = self.progress.seen_rev
        started = time.monotonic()
        ok = False
        try:
            if full:
                self.last_full = started
                drift = self.dataplane.verify()
                if drift:
                    log.warning("%s: kernel state changed behind podnet's back, repairing: %s",
                                self.name, "; ".join(drift[:5]) + (f" (+{len(drift) - 5} more)" if len(drift) > 5 else ""))
            else:
                drift = []
            summary = self.dataplane.sync(full)
            ok = True
        except Exception as e:  # a kernel or store error: report it, retry
            self.error = str(e) or type(e).__name__
            log.error("%s sync failed: %s (will retry)", self.name, self.error)
            self.metrics.record_sync(self.name, time.monotonic() - started, "error")
        finally:
            with self.progress.lock:
                self.running = False
                if ok:
                    self.done_rev = rev
                else:
                    self.dirty = True
            self._last_sync_end = time.monotonic()
        if not ok:
            return False
        self.error = None
        if drift:
            self.metrics.record_drift(self.name)
        seconds = time.monotonic() - started
        self.metrics.record_sync(self.name, seconds, "changed" if summary else "unchanged")
        if summary:
            log.info("%s: %s in %.1f ms", self.name, summary, seconds * 1000)
        self.on_synced()
        return True

    # -- the loop

    def _loop(self) -> None:
        while not self.stopping.is_set():
            due = self.last_full + self.resync_interval
            wait = due - time.monotonic()
            if self.error is not None:
                wait = min(wait, self._last_sync_end + self.retry_interval - time.monotonic())
            elif self.dirty:
                wait = min(wait, self._last_sync_end + self.min_interval - time.monotonic())
            if wait > 0:
                self.wake.wait(wait)
                self.wake.clear()
                if self.stopping.is_set():
                    break
                if self.dirty and time.monotonic() < self._last_sync_end + self.min_interval:
                    continue  # coalesce: the next turn waits out the rest of the interval
            full = time.monotonic() >= self.last_full + self.resync_interval
            if full or self.dirty or self.error is not None:
                self.run_once(full)
