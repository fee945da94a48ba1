"""BIRD, run for one node: its files, its process, its configuration.

Files live in one directory (the agent's: `<CNI socket>.bird/`), owned by BIRD's user:

    bird.conf          the configuration BIRD runs (root:bird 0640: it may hold passwords)
    bird.conf.new      a candidate, checked with `bird -p -c` before it replaces bird.conf
    bird.conf.refused  the last candidate BIRD refused (never loaded), for a look
    bird.conf.loaded   the sha256 of the text BIRD loaded last (start or `configure`)
    bird.ctl           the control socket (what `birdc -s` talks to)
    bird.pid, bird.log

BIRD is started in the caller's network namespace (or a named one: the lab's routers)
as a daemon of its own (`bird -R`:
graceful-restart recovery on every start, so a restart keeps the kernel's routes and
its peers keep forwarding while it comes back), and drops to user `bird` keeping
only CAP_NET_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE and CAP_NET_BROADCAST. It
outlives the agent: a restarted agent finds it by its pid file and control socket
and reloads it only if the configuration it renders differs from what BIRD loaded.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

from podnet.bgp.control import BirdError, command, wait_answers
from podnet.errors import PodnetError

log = logging.getLogger("podnet.bgp")

BIRD_USER = "bird"
START_TIMEOUT = 10.0


class ConfigRefused(PodnetError):
    """`bird -p` refused a configuration: it was not loaded; BIRD runs the previous one."""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Bird:
    def __init__(self, run_dir: str | Path, binary: str | None = None, user: str | None = BIRD_USER,
                 netns: str | None = None):
        self.dir = Path(run_dir)
        self.netns = netns
        self.binary = binary or shutil.which("bird") or "/usr/sbin/bird"
        self.conf = self.dir / "bird.conf"
        self.candidate = self.dir / "bird.conf.new"
        self.refused = self.dir / "bird.conf.refused"
        self.loaded = self.dir / "bird.conf.loaded"
        self.ctl = str(self.dir / "bird.ctl")
        self.pid_file = self.dir / "bird.pid"
        self.log_file = str(self.dir / "bird.log")
        self.user = user if user and os.geteuid() == 0 and _exists(user) else None
        if self.user and not _searchable(self.dir.parent, self.user):
            log.warning("BIRD runs as root (with all its capabilities): user %s cannot reach %s; make its "
                        "parent directories searchable (o+x) to run BIRD unprivileged", self.user, self.dir)
            self.user = None
        self.starts = 0  # BIRD processes this object started

    # -- files

    def prepare(self) -> None:
        """The directory, writable by BIRD's user (its pid file, socket and log go there)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.user:
            ids = pwd.getpwnam(self.user)
            os.chown(self.dir, ids.pw_uid, ids.pw_gid)
        os.chmod(self.dir, 0o750)

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if self.user:
            os.chown(tmp, 0, pwd.getpwnam(self.user).pw_gid)
        os.replace(tmp, path)

    def loaded_digest(self) -> str | None:
        try:
            return self.loaded.read_text().strip() or None
        except FileNotFoundError:
            return None

    # -- configuration

    def check(self, text: str) -> None:
        """Write `text` as the candidate and have BIRD parse it; ConfigRefused (with BIRD's
        words) if it does not take it."""
        self.prepare()
        self._write(self.candidate, text)
        proc = subprocess.run([self.binary, "-p", "-c", str(self.candidate)], capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            os.replace(self.candidate, self.refused)
            words = (proc.stderr or proc.stdout).strip().replace(str(self.candidate), "bird.conf")
            raise ConfigRefused(f"BIRD refused the rendered configuration (kept the running one; the refused "
                                f"text is in {self.refused}): {words or f'exit status {proc.returncode}'}")

    def apply(self, text: str) -> str:
        """Make BIRD run `text`: nothing if it already does, a reload (`configure`) if it runs
        another, a start if it does not run. Checked first: a refused text changes nothing.
        Returns what was done ("" for nothing)."""
        want = digest(text)
        running = self.running()
        if running and self.loaded_digest() == want:
            return ""
        if not (self.conf.exists() and digest(self.conf.read_text()) == want):
            self.check(text)
            os.replace(self.candidate, self.conf)
        if running:
            reply = command(self.ctl, "configure")
            if not any(code in (3, 4, 5) for code, _ in reply):
                raise BirdError(f"BIRD did not take the new configuration: {'; '.join(t for _, t in reply)}")
            self._write(self.loaded, want + "\n")
            return "reloaded"
        self.start()
        self._write(self.loaded, want + "\n")
        return "started"

    # -- the process

    def pid(self) -> int | None:
        """BIRD's pid if the pid file names a live BIRD on this control socket."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None
        if state == "Z" or self.ctl.encode() not in argv:
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None and wait_answers(self.ctl, 0.0)

    def start(self) -> int:
        """Start BIRD on bird.conf (checked already) and wait until it answers."""
        self.prepare()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ctl)  # a dead BIRD's socket
        argv = [self.binary, "-c", str(self.conf), "-s", self.ctl, "-P", str(self.pid_file), "-R"]
        if self.user:
            argv += ["-u", self.user, "-g", grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        # BIRD forks into the background itself; the first process reports start-up errors.
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                              start_new_session=True)
        if proc.returncode != 0:
            raise PodnetError(f"BIRD did not start: {(proc.stderr or proc.stdout).strip() or proc.returncode}")
        if not wait_answers(self.ctl, START_TIMEOUT):
            raise PodnetError(f"BIRD started but its control socket {self.ctl} does not answer within "
                              f"{START_TIMEOUT:g}s; log {self.log_file}")
        self.starts += 1
        pid = self.pid()
        log.info("BIRD started (pid %s, control socket %s)", pid, self.ctl)
        return pid or 0

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM BIRD (it withdraws nothing from the kernel: `persist`); True if one ran."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.loaded.unlink()
        return True


def _searchable(path: Path, user: str) -> bool:
    """Whether `user` may pass through every directory down to `path` (the existing part)."""
    ids = pwd.getpwnam(user)
    groups = {ids.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    for d in [p for p in (path.resolve(), *path.resolve().parents) if p.exists()]:
        st = d.stat()
        bit = stat.S_IXUSR if st.st_uid == ids.pw_uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False
