"""SQLite watches wake when another process commits (inotify on the store's directory),
end at once on close(), and still deliver, by polling, where inotify cannot be had.

The wake-up tests set the safety poll to an hour: a watch that delivers then was woken by
the commit itself, not by the timer."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from tests.store.conftest import WatchReader

from podnet.store import sqlite as sqlite_store
from podnet.store import wakeup
from podnet.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(120)

PREFIX = "/wake/"

# One short-lived writer process, as a CNI invocation is: open, write, close, exit.
WRITER = """
import sqlite3, sys
from podnet.store.sqlite import SQLiteStore
path, key, value, truncate = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "truncate"
store = SQLiteStore(path)
store.put(key, {"v": value})
store.close()
if truncate:  # checkpoint everything and cut the -wal file to nothing: its next commit starts it anew
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
"""


def write_in_child(path: str, key: str, value: str, truncate: bool = False) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path, key, value, "truncate" if truncate else "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID
            proc.wait()
    assert proc.returncode == 0, err


def values(events) -> list[tuple[str, str]]:
    return [(ev.key, ev.value["v"]) for ev in events]


@pytest.fixture
def no_safety_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "WATCH_SAFETY_POLL_SECONDS", 3600.0)


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "store.db")


def test_watch_wakes_on_a_commit_of_another_process(path: str, no_safety_poll) -> None:
    store = SQLiteStore(path)
    reader = WatchReader(store, PREFIX, store.revision() + 1)
    try:
        for i in range(3):
            write_in_child(path, f"{PREFIX}k{i}", f"v{i}")
            reader.wait_for(i + 1)
        store.put("/other/k", {"v": "not watched"})  # same file, other prefix: woken, nothing delivered
        write_in_child(path, f"{PREFIX}k0", "again")
        assert values(reader.wait_for(4)) == [(f"{PREFIX}k0", "v0"), (f"{PREFIX}k1", "v1"),
                                              (f"{PREFIX}k2", "v2"), (f"{PREFIX}k0", "again")]
        assert [ev.type for ev in reader.events] == ["ADDED", "ADDED", "ADDED", "MODIFIED"]
    finally:
        store.close()
        reader._thread.join(10)


def test_close_ends_a_blocked_watch(path: str, no_safety_poll, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = threading.Event()

    class ObservedWakeup(wakeup.FileWakeup):
        def wait(self, timeout: float) -> bool:
            if timeout >= 3600:
                blocked.set()  # the watch checked for close() and goes to sleep for the hour
            return super().wait(timeout)

    monkeypatch.setattr(sqlite_store, "FileWakeup", ObservedWakeup)
    store = SQLiteStore(path)
    reader = WatchReader(store, PREFIX, store.revision() + 1)
    try:
        assert blocked.wait(30), "the watch never went to sleep"
    finally:
        store.close()
    reader._thread.join(10)
    assert not reader._thread.is_alive(), "close() left the watch blocked"
    assert reader.error is None and reader.events == []


def test_watch_delivers_across_the_wal_removed_and_made_anew(path: str, no_safety_poll) -> None:
    write_in_child(path, f"{PREFIX}before", "v0")
    # Every connection closed: the last one out checkpointed the -wal file and removed it.
    assert not os.path.exists(path + "-wal")
    store = SQLiteStore(path)
    reader = WatchReader(store, PREFIX, 1)
    try:
        reader.wait_for(1)
        # A writer that truncates the -wal file after its commit, then writers that start it again.
        write_in_child(path, f"{PREFIX}k1", "v1", truncate=True)
        reader.wait_for(2)
        assert os.path.getsize(path + "-wal") == 0
        write_in_child(path, f"{PREFIX}k2", "v2")
        write_in_child(path, f"{PREFIX}k3", "v3")
        assert values(reader.wait_for(4)) == [(f"{PREFIX}before", "v0"), (f"{PREFIX}k1", "v1"),
                                              (f"{PREFIX}k2", "v2"), (f"{PREFIX}k3", "v3")]
    finally:
        store.close()
        reader._thread.join(10)


def test_without_inotify_watches_poll(path: str, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    def no_instances(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(wakeup, "INotify", no_instances)
    monkeypatch.setattr(sqlite_store, "_no_inotify_logged", False)
    caplog.set_level(logging.DEBUG, logger=sqlite_store.__name__)
    store = SQLiteStore(path)
    readers = [WatchReader(store, PREFIX, store.revision() + 1) for _ in range(2)]
    try:
        write_in_child(path, f"{PREFIX}k", "v")
        for reader in readers:
            assert values(reader.wait_for(1)) == [(f"{PREFIX}k", "v")]
    finally:
        store.close()
        for reader in readers:
            reader._thread.join(10)
    assert not any(r._thread.is_alive() for r in readers), "close() left a polling watch running"
    notes = [r.getMessage() for r in caplog.records if "no inotify" in r.getMessage()]
    assert len(notes) == 1 and path in notes[0], notes  # once per process, naming the store


def test_wakeup_ignores_other_files_of_the_directory(tmp_path) -> None:
    waker = wakeup.FileWakeup(str(tmp_path), {"store.db", "store.db-wal"})
    try:
        (tmp_path / "unrelated").write_text("x")
        (tmp_path / "store.db-shm").write_text("x")
        assert waker.wait(0.2) is False
        db = sqlite3.connect(tmp_path / "store.db")  # creates and writes the database file
        db.execute("CREATE TABLE t (x)")
        db.close()
        assert waker.wait(30) is True
        stopper = threading.Thread(target=waker.stop)
        stopper.start()
        stopper.join(10)
        assert waker.wait(3600) is False  # stopped: every wait ends at once
    finally:
        waker.close()
