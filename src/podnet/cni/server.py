"""The agent's CNI socket: one thread per connection, one request per connection.

Protocol (see native/cni/podnet-cni.c): the plugin sends one JSON document
{"env": {CNI_* variables}, "stdin": text} and half-closes; the server answers
{"code": int, "output": text} and closes. The socket file is created 0600 (the
mode is set on the socket before bind, so it is never reachable by others).
The same executable run as podnet-ipam adds "plugin": "podnet-ipam": the request goes to
the handler's handle_ipam.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from typing import Any, Protocol

from podnet.cni.spec import E_DECODING, E_INTERNAL, LATEST, error_output
from podnet.errors import PodnetError

log = logging.getLogger(__name__)

MAX_REQUEST = 4 << 20  # bytes: a configuration with prevResult, or GC's list of every attachment
READ_TIMEOUT = 30.0  # seconds for the plugin to send its request
MAX_CONCURRENT = 64  # requests handled at once; more wait for a turn


class Handler(Protocol):
    def handle(self, env: dict[str, str], stdin: str) -> tuple[int, str]: ...


PLUGIN = "podnet-cni"
IPAM_PLUGIN = "podnet-ipam"  # handled by the handler's handle_ipam(env, stdin), when it has one


class CNIServerError(PodnetError):
    pass


class CNIServer:
    def __init__(self, socket_path: str, handler: Handler, *, max_request: int = MAX_REQUEST,
                 read_timeout: float = READ_TIMEOUT, max_concurrent: int = MAX_CONCURRENT):
        self.socket_path = socket_path
        self.handler = handler
        self.max_request = max_request
        self.read_timeout = read_timeout
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> CNIServer:
        if self._listener is not None:
            raise CNIServerError(f"CNI server on {self.socket_path} is already started")
        parent = os.path.dirname(os.path.abspath(self.socket_path))
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as e:
            raise CNIServerError(f"cannot create {parent} for the CNI socket: {e.strerror or e}") from None
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), 0o600)  # bind creates the file with the socket's mode
            sock.bind(self.socket_path)
            sock.listen(128)
            st = os.stat(self.socket_path)
        except OSError as e:
            sock.close()
            raise CNIServerError(f"cannot listen on {self.socket_path}: {e.strerror or e}") from None
        self._inode = (st.st_dev, st.st_ino)
        self._listener = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="cni-accept", daemon=True)
        self._thread.start()
        log.info("CNI server listening on %s", self.socket_path)
        return self

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CNIServerError(f"{self.socket_path} exists and is not a socket: not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.socket_path)
        except OSError:
            pass  # nobody listens: a leftover of an agent that did not stop cleanly
        else:
            raise CNIServerError(f"another process is serving {self.socket_path}")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, wait (up to timeout) for requests in progress, remove the socket file."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        listener.close()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            workers = list(self._workers)
        for t in workers:
            t.join(timeout)
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._inode:  # still ours, not a newer agent's
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        log.info("CNI server on %s stopped", self.socket_path)

    def __enter__(self) -> CNIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="cni-request", daemon=True)
            with self._lock:
                self._workers.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.read_timeout)
                try:
                    data, too_big = self._read_request(conn)
                except OSError as e:
                    log.warning("CNI request not read: %s", e)
                    return
                if too_big:
                    code, output = E_DECODING, error_output(
                        E_DECODING, f"request larger than {self.max_request} bytes refused")
                else:
                    with self._slots:
                        code, output = self._answer(data)
                reply = json.dumps({"code": code, "output": output}).encode()
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
        except Exception:
            log.exception("CNI request failed")
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _read_request(self, conn: socket.socket) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        too_big = False
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return b"".join(chunks), too_big
            size += len(chunk)
            if size > self.max_request:
                too_big = True
                chunks = []  # keep reading to the end (so the plugin sees our answer) but keep nothing
            elif not too_big:
                chunks.append(chunk)

    def _answer(self, data: bytes) -> tuple[int, str]:
        try:
            request: Any = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            return E_DECODING, error_output(E_DECODING, f"malformed request from the plugin: {e}")
        if (not isinstance(request, dict) or not isinstance(request.get("env"), dict)
                or not isinstance(request.get("stdin"), str)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())):
            return E_DECODING, error_output(
                E_DECODING, 'malformed request from the plugin: expected {"env": {name: text}, "stdin": text}')
        plugin = request.get("plugin", PLUGIN)
        handle = getattr(self.handler, "handle_ipam", None) if plugin == IPAM_PLUGIN else self.handler.handle
        if plugin not in (PLUGIN, IPAM_PLUGIN) or handle is None:
            return E_DECODING, error_output(E_DECODING, f"this podnet agent does not serve the plugin {plugin!r}")
        try:
            code, output = handle(request["env"], request["stdin"])
        except Exception as e:
            log.exception("CNI handler failed")
            return E_INTERNAL, error_output(E_INTERNAL, f"podnet agent internal error: {type(e).__name__}: {e}", "",
                                            LATEST)
        if not isinstance(code, int) or not isinstance(output, str):
            return E_INTERNAL, error_output(E_INTERNAL, "podnet agent internal error: handler gave a malformed answer")
        return code, output
