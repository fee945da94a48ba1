"""A lab's state directory and its state.json: the record of everything the lab made.

Each namespace, directory and process is written down *before* it is created,
so `lab down` can remove all of it after a crash or a half-finished `up`.
Processes are started through a shell that writes its own PID to a pidfile
before exec'ing the real program (the PID is then the program's), and are only
ever signalled after checking that the PID still has the recorded start time or,
for a process known only from its pidfile, a command line naming this lab's
directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from podnet.errors import PodnetError

DEFAULT_ROOT = "/run/podnet/lab"
STATE_FILE = "state.json"
# The store's etcd credentials (PODNET_ETCD_* variables), for every process the lab starts.
STORE_CREDENTIALS = "store-credentials.json"
NETNS_PREFIX = "pnl-"


def lab_root() -> Path:
    return Path(os.environ.get("PODNET_LAB_ROOT") or DEFAULT_ROOT)


def new_lab_id() -> str:
    """Short and unique enough for namespace names: pnl-<id>-<n> stays far below 15 characters."""
    return secrets.token_hex(3)


class LabState:
    def __init__(self, directory: Path, data: dict[str, Any]):
        self.dir = directory
        self.data = data
        self._lock_fd: int | None = None
        self.mutex = threading.RLock()  # pods are set up in parallel: one writer of data at a time

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, name: str, root: Path | None = None, **fields: Any) -> LabState:
        root = root or lab_root()
        root.mkdir(parents=True, exist_ok=True)
        directory = root / name
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            raise PodnetError(f"lab {name!r} already exists ({directory}): run `podnet lab down --name {name}` "
                              "first") from None
        st = cls(directory, {"name": name, "id": new_lab_id(), "phase": "starting", "created": time.time(),
                             "netns": [], "processes": [], "nodes": [], "pods": [], "objects": [], **fields})
        st.lock()
        st.save()
        return st

    @classmethod
    def open(cls, name: str, root: Path | None = None) -> LabState | None:
        directory = (root or lab_root()) / name
        try:
            data = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            if directory.is_dir():  # crashed between mkdir and the first save: nothing else was made
                return cls(directory, {"name": name, "id": "", "phase": "starting", "netns": [], "processes": [],
                                       "nodes": [], "pods": [], "objects": []})
            return None
        except json.JSONDecodeError as e:
            raise PodnetError(f"{directory / STATE_FILE}: not valid JSON ({e})") from None
        return cls(directory, data)

    def lock(self, wait: float = 30.0) -> None:
        """An exclusive lock on the state directory, so up/down of one lab never overlap."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise PodnetError(f"lab {self.name!r} is busy (another up or down holds {self.dir})") from None
                time.sleep(0.1)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def save(self) -> None:
        with self.mutex:
            tmp = self.dir / (STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / STATE_FILE)

    def save_store_credentials(self, env: dict[str, str]) -> None:
        """Variables that give the lab's processes the store's credentials, on every start of
        them: in a file only its owner (root) reads, never on a command line or in state.json."""
        if not env:
            return
        fd = os.open(self.dir / STORE_CREDENTIALS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(env, f)

    def store_env(self) -> dict[str, str]:
        try:
            return json.loads((self.dir / STORE_CREDENTIALS).read_text())
        except FileNotFoundError:
            return {}

    # ------------------------------------------------------------------ accessors

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def phase(self) -> str:
        return self.data.get("phase", "starting")

    def set(self, **fields: Any) -> None:
        with self.mutex:
            self.data.update(fields)
            self.save()

    def netns_name(self, suffix: str) -> str:
        return f"{NETNS_PREFIX}{self.id}-{suffix}"

    def record_netns(self, name: str) -> None:
        with self.mutex:
            if name not in self.data["netns"]:
                self.data["netns"].append(name)
                self.save()

    # ------------------------------------------------------------------ processes

    def start_process(self, key: str, argv: list[str], *, netns: str | None = None, log: Path | None = None,
                      env: dict[str, str] | None = None, **info: Any) -> dict[str, Any]:
        """Record, then start `argv` (inside `netns` if given), with the store's credentials in its
        environment; returns its record with the PID."""
        pidfile = self.dir / f"{key}.pid"
        log = log or self.dir / f"{key}.log"
        full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
        entry: dict[str, Any] = {"key": key, "argv": full, "command": list(argv), "pidfile": str(pidfile), "log": str(log),
                                 "pid": None, "starttime": None, "netns": netns, **info}
        with self.mutex:
            self.data["processes"] = [p for p in self.data["processes"] if p["key"] != key] + [entry]
            self.save()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$0"; exec "$@"', str(pidfile), *full],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.store_env(), **(env or {})},
            )
        with self.mutex:
            entry["pid"] = proc.pid
            entry["starttime"] = proc_starttime(proc.pid)
            self.save()
            _forget(proc)
        return entry

    def process(self, key: str) -> dict[str, Any] | None:
        return next((p for p in self.data["processes"] if p["key"] == key), None)

    def process_pid(self, entry: dict[str, Any]) -> int | None:
        """The PID if the process still runs and is the one this lab started; None otherwise."""
        pid = entry.get("pid")
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = int(Path(entry["pidfile"]).read_text().strip())
        if not pid:
            return None
        st = proc_starttime(pid)
        if st is None or proc_state(pid) == "Z":
            return None
        if entry.get("starttime") is not None:
            # PID and start time together name one process for good (a reused PID starts later);
            # the command line is no help here: it is briefly empty while the process execs.
            return pid if st == entry["starttime"] else None
        # Known only from its pidfile: it must carry this lab's directory on its command line.
        for _ in range(50):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                return None
            if cmdline:
                return pid if str(self.dir) in cmdline else None
            time.sleep(0.01)  # mid-exec
        return None

    def stop_process(self, entry: dict[str, Any], timeout: float = 3.0, first: int = signal.SIGTERM) -> bool:
        """`first` (SIGTERM; SIGKILL to crash it), then SIGKILL after `timeout`; True if it was running."""
        pid = self.process_pid(entry)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, first)
        if not _wait_gone(pid, entry, timeout):
            if self.process_pid(entry) == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, entry, 2.0)
        return True


def proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime in clock ticks


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_gone(pid: int, entry: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        st = proc_starttime(pid)
        if st is None or proc_state(pid) == "Z" or (entry.get("starttime") and st != entry["starttime"]):
            _reap(pid)
            return True
        time.sleep(0.02)
    return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


_STARTED: list[subprocess.Popen] = []


def _forget(proc: subprocess.Popen) -> None:
    # Keep the Popen alive (no "still running" warning at exit); reap finished ones.
    _STARTED.append(proc)
    for p in list(_STARTED):
        if p.poll() is not None:
            _STARTED.remove(p)


def all_labs(root: Path | None = None) -> list[str]:
    root = root or lab_root()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir())


@contextlib.contextmanager
def locked(st: LabState) -> Iterator[LabState]:
    st.lock()
    try:
        yield st
    finally:
        st.unlock()
