"""Sleeping until a file changes, or until told to stop: what wakes a SQLite watch when
another process commits, instead of polling the store every few milliseconds.

Linux inotify (through inotify_simple, a thin ctypes wrapper) on the files' directory, not on
the files themselves: SQLite removes the -wal file when the last connection closes and the
next one creates it anew, and a watch on a removed file ends with it. Events for other
files in the directory are read and dropped. An eventfd beside the inotify descriptor lets
another thread end a wait at once (stop()), so closing a store never waits out a timeout.
"""

from __future__ import annotations

import os
import select
import time

from inotify_simple import INotify
from inotify_simple import flags as inflags

# A commit writes the -wal file (a checkpoint writes the database file); a new -wal is
# created, or a file is moved into place. Not IN_CLOSE_WRITE: every SQLite connection, a
# reader's too, reports it on the -wal file when it closes, and it never carries news (the
# commit's own writes came first), so it would only wake every watch for nothing.
CHANGES = inflags.MODIFY | inflags.CREATE | inflags.MOVED_TO


class FileWakeup:
    """wait() returns True once one of `names` in `directory` changed since the last wait,
    False when the timeout passed or stop() was called. Raises OSError when inotify or the
    eventfd cannot be had (no inotify instances or watches left for this user)."""

    def __init__(self, directory: str, names: set[str]):
        self._names = frozenset(names)
        self._inotify = INotify()
        try:
            self._inotify.add_watch(directory, CHANGES | inflags.ONLYDIR)
            self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self._inotify.close()
            raise
        self._poller = select.poll()
        self._poller.register(self._inotify.fileno(), select.POLLIN)
        self._poller.register(self._stop, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = {fd for fd, _ in self._poller.poll(left * 1000)}
            if self._stop in ready:
                return False  # never read: every later wait ends at once too
            if self._inotify.fileno() in ready and self._relevant(self._inotify.read(timeout=0)):
                return True
        return False

    def _relevant(self, events) -> bool:
        # An overflowed queue (wd -1) may have dropped the event that mattered.
        return any(e.name in self._names or e.mask & inflags.Q_OVERFLOW for e in events)

    def stop(self) -> None:
        """End the current wait and every later one; safe from any thread."""
        os.eventfd_write(self._stop, 1)

    def close(self) -> None:
        self._inotify.close()
        os.close(self._stop)
