"""The embedded store: one SQLite file in WAL mode, shared safely by many processes.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single
writer lock before reading the revision counter, so conditional writes from
concurrent CNI invocations serialise and none is lost. A change log (one row per
key change, tagged with its revision) feeds watches. A watch sleeps until the store's
files change (inotify, store/wakeup.py), then asks `PRAGMA data_version`, which only
changes when another connection commits, whether there is news: a commit in another
process reaches it at once, and an idle watch costs two checks a second.

Faults are StoreUnavailable errors of one line naming the file: a writer lock held
elsewhere for longer than BUSY_TIMEOUT ("store PATH is locked by another writer"), and
SQLite's own error otherwise (a full disk, a read-only file system), never a traceback.
When SQLite has already rolled a transaction back (it does on a full disk), no ROLLBACK
is issued on top of it: that would hide the real error behind "no transaction is active".

The file a store opened is the file it uses: every write and every revision() checks that
the path still names that file (device and inode), and fails with StoreUnavailable once it
was deleted or replaced. A process would otherwise write to a deleted file while others
use a new one at the same path, and two stores would hand out the same addresses. A store
opened with create=False refuses a path where no file exists instead of making an empty
store there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from podnet.store import codec
from podnet.store.base import (
    Compacted,
    Event,
    KeyValueStore,
    NotFound,
    Op,
    Record,
    StoreUnavailable,
    check_expect,
)
from podnet.store.wakeup import FileWakeup

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL,
    type TEXT NOT NULL, value TEXT, PRIMARY KEY (rev, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0), ('store_id', abs(random()));
"""

# History kept for watches; older change-log rows are dropped every COMPACT_EVERY revisions.
HISTORY_KEPT = 200_000
COMPACT_EVERY = 5_000
# A watch waits for a file change at most this long before it checks the store anyway: a
# notification missed (a file system without inotify, or written from another host) costs
# latency, never an event.
WATCH_SAFETY_POLL_SECONDS = 0.5
# A commit writes the -wal file a moment before it shows (SQLite then updates the index in
# shared memory, which inotify does not see): a wake that found no news looks again this
# soon, then ever less often up to the safety poll.
WATCH_RECHECK_SECONDS = 0.001
# A watch reads the log at most once per this interval: a lone commit goes at once, a burst
# (hundreds of commits a second) is read a few commits at a time instead of one read each.
WATCH_MIN_INTERVAL_SECONDS = 0.005
# Without inotify (none left for this user: fs.inotify.max_user_instances), watches poll.
WATCH_POLL_SECONDS = 0.02
_no_inotify_logged = False
# Seconds a write waits for the writer lock another process holds (and an open for a new
# file's first write), then fails naming the store: writes take milliseconds, so a lock
# held this long is a stuck or long-running writer, not contention.
BUSY_TIMEOUT = float(os.environ.get("PODNET_STORE_BUSY_TIMEOUT") or 10.0)


# One writer lock per database file and process. SQLite admits one writer at a time;
# a connection that finds the lock taken sleeps in its busy handler (1, 2, 5, 10, ...
# ms), so threads of one process writing through their own connections (the CNI
# server's requests) would wait far longer than the writes take. They queue here
# instead; other processes still meet SQLite's own lock.
_WRITERS: dict[str, threading.Lock] = {}
_WRITERS_LOCK = threading.Lock()


def _writer_lock(path: str) -> threading.Lock:
    key = os.path.realpath(path)
    with _WRITERS_LOCK:
        lock = _WRITERS.get(key)
        if lock is None:
            lock = _WRITERS[key] = threading.Lock()
        return lock


def prefix_end(prefix: str) -> str:
    return prefix + "\U0010ffff"


def _make_private(path: str) -> None:
    """The store holds every object of the cluster: readable by its owner only. A directory
    podnet creates for it is 0700 and the file 0600 (SQLite gives its -wal and -shm files
    the database file's mode); an existing file with wider permissions is narrowed. An
    existing directory (/tmp, /var/lib) is left as its owner set it. An existing file is
    never opened here: closing a descriptor of it would drop the POSIX locks SQLite holds
    on it through other connections of this process."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return
    except FileExistsError:
        pass
    except OSError:
        return  # not writable here: opening it reports the real problem
    try:
        st = os.stat(path)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            for f in (path, path + "-wal", path + "-shm"):
                if os.path.exists(f):
                    os.chmod(f, 0o600)
    except OSError:
        pass


class SQLiteStore(KeyValueStore):
    def __init__(self, path: str, *, history: int = HISTORY_KEPT, create: bool = True):
        self.path = path
        self.url = f"sqlite://{path}"
        self.history = history
        if not create and not os.path.exists(path):
            raise StoreUnavailable(f"store {path} does not exist (`podnet apply` creates it; --store or "
                                   "$PODNET_STORE names another)")
        _make_private(path)
        self._closed = False  # close() ends this store's watches too
        self._wakeups: set[FileWakeup] = set()  # of the watches blocked or running; close() stops them
        self._wakeups_lock = threading.Lock()
        self._db = self._connect()
        self.file_id = self._file_id()
        self._writer = _writer_lock(path)

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check_file(self) -> None:
        """Raise StoreUnavailable if the path no longer names the file this store opened."""
        now = self._file_id()
        if now != self.file_id:
            what = "deleted" if now is None else "replaced by another file"
            raise StoreUnavailable(f"store {self.path} was {what} after this process opened it: refusing to "
                                   "use either copy (restart the process to use the file at that path now)")

    def _connect(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            db = None
            try:
                os.makedirs(parent, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
                db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    # One script in one write transaction: concurrent first openers serialise.
                    db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
                return db
            except (OSError, sqlite3.Error) as e:
                if db is not None:
                    db.close()
                # Switching a new file to WAL needs an exclusive lock, and SQLite reports that
                # contention at once instead of waiting: concurrent first openers try again.
                if not _busy(e):
                    raise StoreUnavailable(f"cannot open store {self.path}: {e}{self._why()}") from None
                if time.monotonic() > deadline:
                    raise self._locked() from None
                time.sleep(random.uniform(0.005, 0.05))

    def _locked(self) -> StoreUnavailable:
        return StoreUnavailable(f"store {self.path} is locked by another writer "
                                f"(waited {BUSY_TIMEOUT:g} s; PODNET_STORE_BUSY_TIMEOUT sets how long)")

    def _fault(self, e: sqlite3.Error) -> StoreUnavailable:
        """The one-line error for what SQLite reported."""
        if _busy(e):
            return self._locked()
        return StoreUnavailable(f"store {self.path}: {e}{self._why()}")

    def _why(self) -> str:
        """What SQLite's message leaves out, when it is the file system."""
        try:
            if os.statvfs(os.path.dirname(os.path.abspath(self.path))).f_flag & os.ST_RDONLY:
                return " (the file system holding it is mounted read-only)"
        except OSError:
            pass
        return ""

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise self._fault(e) from None

    def close(self) -> None:
        """Close the connection, and end this store's watches (each wakes at once and
        closes its own connection), as etcd's close() does: a process that closes every
        store it opened leaves no connection behind, so the last one out checkpoints the
        WAL and removes it."""
        with self._wakeups_lock:
            self._closed = True
            for wakeup in self._wakeups:
                wakeup.stop()
        self._db.close()

    def revision(self) -> int:
        self.check_file()
        with self._faults():
            return self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    def identity(self) -> str:
        """The file's path and a random number drawn when the store was made (a store made
        again at the path has another; one made before the number existed gets it now)."""
        self.check_file()
        with self._faults():
            row = self._db.execute("SELECT value FROM meta WHERE name='store_id'").fetchone()
        if row is None:
            with self._writer, self._faults():
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', abs(random()))")
                row = self._db.execute("SELECT value FROM meta WHERE name='store_id'").fetchone()
        return f"sqlite:{os.path.realpath(self.path)}:{row[0]}"

    def get(self, key: str) -> Record | None:
        with self._faults():
            row = self._db.execute("SELECT value, mod_rev, create_rev FROM kv WHERE key=?", (key,)).fetchone()
        return Record(key, codec.loads(row[0]), row[1], row[2]) if row else None

    def list(self, prefix: str) -> tuple[list[Record], int]:
        db = self._db
        with self._faults():
            db.execute("BEGIN")  # one snapshot for the rows and the revision
            try:
                rows = db.execute(
                    "SELECT key, value, mod_rev, create_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (prefix, prefix_end(prefix)),
                ).fetchall()
                rev = db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
            finally:
                self._end_read()
        return [Record(k, codec.loads(v), m, c) for k, v, m, c in rows], rev

    def stream(self, prefix: str, sink: Callable[[Record], None], page: int = 2000) -> int:
        """One read transaction (a WAL snapshot), rows decoded a page at a time."""
        db = self._db
        with self._faults():
            db.execute("BEGIN")
            try:
                rev = db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                cur = db.execute(
                    "SELECT key, value, mod_rev, create_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (prefix, prefix_end(prefix)),
                )
                while rows := cur.fetchmany(page):
                    for k, v, m, c in rows:
                        sink(Record(k, codec.loads(v), m, c))
            finally:
                self._end_read()
        return rev

    def _end_read(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    def txn(self, ops: list[Op]) -> int:
        self.check_file()
        with self._writer, self._faults():
            return self._txn(ops)

    def _rollback(self) -> None:
        """Roll back the open transaction, unless SQLite already did (a full disk, an I/O
        error): then the error that made it do so is the one to report."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _txn(self, ops: list[Op]) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rev = db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0] + 1
            changes = []
            for op in ops:
                row = db.execute("SELECT mod_rev, create_rev, value FROM kv WHERE key=?", (op.key,)).fetchone()
                check_expect(op, row[0] if row else 0)
                changes.append((op, row))
            for seq, (op, row) in enumerate(changes):
                if op.kind == "put":
                    text = json.dumps(op.value, separators=(",", ":"))
                    db.execute(
                        "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)",
                        (op.key, text, row[1] if row else rev, rev),
                    )
                    db.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?)",
                               (rev, seq, op.key, "MODIFIED" if row else "ADDED", text))
                elif row:
                    db.execute("DELETE FROM kv WHERE key=?", (op.key,))
                    db.execute("INSERT INTO log VALUES (?, ?, ?, 'DELETED', ?)", (rev, seq, op.key, row[2]))
            db.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
            if rev % COMPACT_EVERY == 0 and rev > self.history:
                self._compact(rev - self.history)
            db.execute("COMMIT")
            return rev
        except BaseException:
            self._rollback()
            raise

    def _compact(self, upto: int) -> None:
        self._db.execute("DELETE FROM log WHERE rev <= ?", (upto,))
        self._db.execute("UPDATE meta SET value=? WHERE name='compacted'", (upto,))

    def compact(self, upto: int) -> None:
        """Drop change history up to and including revision `upto`."""
        with self._writer, self._faults():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._compact(upto)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def watch(self, prefix: str, start_revision: int, previous: bool = True) -> Iterator[Event]:
        # `previous` costs nothing here: the change log holds each deleted value anyway
        if self._closed:
            return
        db = self._connect()  # a watch blocks: it must not share the caller's connection
        wakeup = None
        try:
            wakeup = self._watch_wakeup()
            if start_revision <= 0:
                start_revision = db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0] + 1
            next_rev = start_revision
            last_version = None
            timeout = WATCH_SAFETY_POLL_SECONDS
            last_read = 0.0
            while not self._closed:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                if version == last_version:
                    if wakeup is None:
                        time.sleep(WATCH_POLL_SECONDS)
                    elif wakeup.wait(timeout):
                        timeout = WATCH_RECHECK_SECONDS
                        time.sleep(max(0.0, last_read + WATCH_MIN_INTERVAL_SECONDS - time.monotonic()))
                    else:
                        timeout = min(timeout * 2, WATCH_SAFETY_POLL_SECONDS)
                    continue
                last_version = version
                timeout = WATCH_SAFETY_POLL_SECONDS
                last_read = time.monotonic()
                db.execute("BEGIN")
                try:
                    compacted = db.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
                    if next_rev <= compacted:
                        raise Compacted(next_rev, compacted + 1)
                    rows = db.execute(
                        "SELECT rev, key, type, value FROM log WHERE rev >= ? AND key >= ? AND key < ?"
                        " ORDER BY rev, seq",
                        (next_rev, prefix, prefix_end(prefix)),
                    ).fetchall()
                    head = db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                finally:
                    db.execute("COMMIT")
                for rev, key, typ, value in rows:
                    yield Event(typ, key, codec.loads(value) if value is not None else None, rev)
                next_rev = max(next_rev, head + 1)
        finally:
            if wakeup is not None:
                with self._wakeups_lock:
                    self._wakeups.discard(wakeup)
                wakeup.close()
            db.close()

    def _watch_wakeup(self) -> FileWakeup | None:
        """What a watch sleeps on: changes of the database and its -wal file, or close().
        None when inotify cannot be had: the watch then polls."""
        global _no_inotify_logged
        real = os.path.realpath(self.path)  # SQLite names the -wal file after the resolved path
        try:
            wakeup = FileWakeup(os.path.dirname(real), {os.path.basename(real), os.path.basename(real) + "-wal"})
        except OSError as e:
            if not _no_inotify_logged:
                _no_inotify_logged = True
                log.debug("store %s: no inotify (%s); watches poll every %g s", self.path, e, WATCH_POLL_SECONDS)
            return None
        with self._wakeups_lock:
            if self._closed:
                wakeup.stop()  # closed before this watch began: it ends at its first wait
            self._wakeups.add(wakeup)
        return wakeup


def _busy(e: BaseException) -> bool:
    """SQLite's SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


__all__ = ["SQLiteStore", "NotFound"]
