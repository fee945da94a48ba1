"""The agent side of the CNI plugin: CNIHandler serves one node's CNI requests.
`CNIHandler.handle(env, stdin)` returns (code, stdout text) and never raises.

It parses and checks a request (spec.py: versions, codes, results), runs the command
(commands.py: ADD, DEL, CHECK, STATUS, GC, VERSION) on a store connection of its own
(sessions.py), and orders concurrent requests: those of one attachment one at a time, and
GC alone. The error codes a runtime can see are listed in spec.py.

`CNIHandler.handle_ipam(env, stdin)` answers the same executable run as the IPAM plugin
podnet-ipam (ipamcommands.py), with the same parsing and ordering.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from podnet.cni import metrics as cni_metrics
from podnet.cni.commands import Commands, Dataplane
from podnet.cni.errors import CNIError
from podnet.cni.install import IPAM_NAME, PLUGIN_NAME
from podnet.cni.ipamcommands import IpamCommands, ipam_handle
from podnet.cni.netns import netns_problem
from podnet.cni.sessions import Sessions
from podnet.cni.spec import E_INTERNAL, LATEST, Request, error_output, parse_request
from podnet.multinet.attachments import Multinet
from podnet.store.base import KeyValueStore

__all__ = ["CNIHandler"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- ordering concurrent requests


class _GCLock:
    """ADD, DEL and CHECK share it; GC holds it alone, so it never sees half an ADD."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------- the handler


def _default_ready() -> tuple[int, str] | None:
    return None


class CNIHandler(Commands, IpamCommands):
    """Serves CNI requests for one node.

    dataplane: the pod dataplane (podnet.dataplane.pods.PodDataplane or an object with its
    interface). ready: for STATUS, None when the node can take ADDs, else (50 or 51, why).
    verify_netns: the check of CNI_NETNS on ADD/CHECK (returns a problem or None).
    """

    def __init__(
        self,
        kv: KeyValueStore,
        node: str,
        dataplane: Dataplane,
        *,
        ready: Callable[[], tuple[int, str] | None] = _default_ready,
        verify_netns: Callable[[str], str | None] = netns_problem,
        ipam_factory: Callable[[KeyValueStore], Any] | None = None,
    ):
        if ipam_factory is None:
            from podnet.ipam import IPAM

            ipam_factory = IPAM
        self.node = node
        self.dataplane = dataplane
        self.ready = ready
        self.verify_netns = verify_netns
        self.multinet = Multinet(node)
        self._sessions = Sessions(kv, ipam_factory)
        self._gc_lock = _GCLock()
        # one request per attachment at a time, and only per attachment: a slow ADD (a cold
        # ENI pool waits seconds for the cloud) never holds up another pod's
        self._attachment_locks: dict[str, list] = {}  # handle -> [lock, requests holding or waiting]
        self._attachment_guard = threading.Lock()

    def close(self) -> None:
        """Close the extra store connections opened for concurrent requests."""
        self._sessions.close()

    # ------------------------------------------------------------ entry point

    def handle(self, env: dict[str, str], stdin: str) -> tuple[int, str]:
        return self._answer(env, stdin, self._dispatch)

    def handle_ipam(self, env: dict[str, str], stdin: str) -> tuple[int, str]:
        """A request of the podnet-ipam plugin."""
        return self._answer(env, stdin, self._dispatch_ipam, ipam=True)

    def _answer(self, env: dict[str, str], stdin: str, dispatch: Callable[[Request], tuple[int, str]],
                ipam: bool = False) -> tuple[int, str]:
        started = time.monotonic()
        cpu_started = time.thread_time()  # this request's own CPU in the agent (delegates not included)
        version = LATEST
        command = env.get("CNI_COMMAND", "") if isinstance(env, dict) else ""
        plugin = IPAM_NAME if ipam else PLUGIN_NAME
        handle = ""
        try:
            req = parse_request(env, stdin)
            version = req.version
            handle = req.handle if req.container_id else ""
            code, output = dispatch(req)
        except CNIError as e:
            code, output = e.code, error_output(e.code, e.msg, e.details, e.version or version)
        except Exception as e:  # never let a request take the agent down, nor go unanswered
            log.exception("%s %s %s: internal error", plugin, command, handle)
            code = E_INTERNAL
            output = error_output(E_INTERNAL, f"podnet agent internal error: {type(e).__name__}: {e}", "", version)
        seconds = time.monotonic() - started
        cni_metrics.observe(plugin, command, code, seconds)
        elapsed = seconds * 1000
        cpu = (time.thread_time() - cpu_started) * 1000
        if code:
            log.info("%s %s %s: code %d in %.1f ms (agent CPU %.1f ms): %s", plugin, command, handle, code, elapsed,
                     cpu, output)
        else:
            log.info("%s %s %s: ok in %.1f ms (agent CPU %.1f ms)", plugin, command, handle, elapsed, cpu)
        return code, output

    @contextlib.contextmanager
    def _attachment(self, handle: str) -> Iterator[None]:
        with self._attachment_guard:
            entry = self._attachment_locks.setdefault(handle, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._attachment_guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._attachment_locks[handle]

    def _dispatch(self, req: Request) -> tuple[int, str]:
        if req.command == "VERSION":
            return self._version(req)
        if req.command == "STATUS":
            return self._status()
        if req.command == "GC":
            with self._gc_lock.exclusive():
                return self._gc(req)
        with self._gc_lock.shared(), self._attachment(req.handle):
            if req.command == "ADD":
                return self._add(req)
            if req.command == "DEL":
                return self._del(req)
            return self._check(req)

    def _dispatch_ipam(self, req: Request) -> tuple[int, str]:
        if req.command == "VERSION":
            return self._version(req)
        if req.command == "STATUS":
            return self._ipam_status(req)
        if req.command == "GC":
            valid = self._valid_attachments(req.config)
            with self._gc_lock.exclusive():
                return self._ipam_gc(req, valid)
        with self._gc_lock.shared(), self._attachment(ipam_handle(req.network, req.container_id, req.ifname)):
            if req.command == "ADD":
                return self._ipam_add(req)
            if req.command == "DEL":
                return self._ipam_del(req)
            return self._ipam_check(req)
