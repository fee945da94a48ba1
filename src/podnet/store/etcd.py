"""The cluster store: etcd v3 through its built-in gRPC-gateway (JSON over HTTP/1.1).

Only the standard library is used: one keep-alive http.client connection per
store object for unary calls, one more per watch (a watch is a long-lived
streaming response, so it never blocks the store's other calls), and one per
listing of several pages while it lasts (its requests are pipelined).

Semantics follow podnet.store.base exactly:

* A transaction is one etcd Txn. Each op's `expect` becomes a compare
  (0 = must not exist, n = mod_revision must be n); the failure branch reads
  the compared keys in the same Txn, so the error names the first failing key
  exactly as check_expect does against that consistent snapshot.
* Reads are linearizable and may be retried on another endpoint. A write whose
  connection dies after the request went out has an unknown outcome: it is
  reported as StoreUnavailable saying so, never retried and never reported as
  a clean failure.
* A watch resumes after the last event it yielded when its connection drops,
  on whichever endpoint answers, and raises Compacted when etcd no longer has
  the history it needs.

Every request carries the `hasleader` metadata, so a member cut off from its
cluster rejects requests (and cancels watches) at once instead of hanging;
those rejections are safe to retry elsewhere.

Security, as etcdctl has it (podnet.store.credentials names the options):

* TLS (etcds://, or https:// endpoints): the server's certificate is verified against
  --cacert (else the system's CAs) and its name; --cert/--key are shown when given. In
  TLS 1.3 a server judges the client's certificate only after the client considers the
  handshake done, so each new connection first asks for the member's status: a
  refused certificate then shows as a refusal, never as a request of unknown outcome.
* A user and password: Authenticate gives a token, sent with every request
  (`Authorization`); when etcd answers "invalid auth token" (it expired, or the
  password changed) or "revision of auth store is old", the store authenticates again
  and repeats the request once (etcd applied none of it). A server with auth off
  answers Authenticate "authentication is not enabled": requests then go without one.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from podnet.errors import PodnetError
from podnet.hostport import parse_host_port
from podnet.store import codec
from podnet.store.base import (
    Compacted,
    Conflict,
    Event,
    KeyValueStore,
    Op,
    Record,
    StoreError,
    StoreUnavailable,
    check_expect,
)
from podnet.store.credentials import EtcdCredentials, tls_context
from podnet.store.layout import ALLOC, SHARED

CONNECT_TIMEOUT = 2.0
# Longer than etcd's own request timeout (5s + 2 election timeouts), so the server
# normally answers with its error before the client gives up.
REQUEST_TIMEOUT = 15.0
# How long calls keep trying other endpoints while members answer with errors
# (e.g. during a leader election). If no endpoint accepts a connection at all,
# calls fail at once.
RETRY_FOR = 10.0
# How long a watch keeps trying to reconnect before giving up.
WATCH_RECONNECT_FOR = 60.0
# Values per range request of a listing. etcd's time goes to encoding bytes, not to
# requests (bench/bench_etcdlist.py: 500 to 100 000 a page list in the same time
# within the noise, and the gateway takes answers of any size), while each page in
# memory at once costs: 2 000 a page left an agent's start ~10 MiB larger for good.
PAGE_SIZE = 1000

HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Grpc-Metadata-hasleader": "true",
}
# Every key podnet writes starts with this (SHARED and ALLOC): what a role must grant.
KEY_PREFIX = "/podnet"
PROBE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
AUTHENTICATE = "/v3/auth/authenticate"
# etcd's answers to a token it no longer takes: authenticate again, and repeat the request.
_TOKEN_REFUSED = ("etcdserver: invalid auth token", "etcdserver: revision of auth store is old")
_NO_USER = "etcdserver: user name is empty"
_DENIED = "etcdserver: permission denied"
_BAD_PASSWORD = "invalid user ID or password"
_AUTH_OFF = "authentication is not enabled"
# etcd 3.4.10+ refuses, on its JSON gateway, a verified client certificate with a Common
# Name while auth is enabled (the name would otherwise be taken as the user).
_GATEWAY_CN = b"CommonName of client sending a request against gateway"
_CN_REFUSED = "with auth enabled, etcd's JSON gateway refuses"
_GRPC_CODES = {"InvalidArgument": 3, "NotFound": 5, "PermissionDenied": 7, "FailedPrecondition": 9,
               "OutOfRange": 11, "Unimplemented": 12, "Unavailable": 14, "Unauthenticated": 16}

# gRPC status codes the gateway reports in its JSON errors.
_INVALID_ARGUMENT, _NOT_FOUND, _PERMISSION_DENIED, _FAILED_PRECONDITION = 3, 5, 7, 9
_OUT_OF_RANGE, _UNIMPLEMENTED, _UNAUTHENTICATED = 11, 12, 16
_PERMANENT_CODES = {_INVALID_ARGUMENT, _NOT_FOUND, _PERMISSION_DENIED, _FAILED_PRECONDITION,
                    _UNIMPLEMENTED, _UNAUTHENTICATED}
# Server errors raised before a request is proposed to raft: safe to send elsewhere.
_NOT_PROPOSED = ("etcdserver: no leader", "etcdserver: too many requests", "etcdserver: not capable")


class _NotSent(Exception):
    """The request certainly had no effect (not delivered, or rejected before it was proposed).
    unreachable: no connection could be made (refused, or TLS refused it): calls fail at
    once when that is so for every endpoint."""

    def __init__(self, message: str, *, unreachable: bool = False, refused: bool = False):
        super().__init__(message)
        self.unreachable = unreachable or refused
        self.refused = refused


class _MaybeSent(Exception):
    """The request was delivered but no answer came: it may or may not have been applied.
    unanswered: the connection was new and closed without a byte of answer (a member that
    is going away, or a TLS endpoint spoken to in plain HTTP): for a read, as unreachable."""

    def __init__(self, message: str, *, unanswered: bool = False):
        super().__init__(message)
        self.unanswered = unanswered


class _ServerError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _TokenRefused(Exception):
    """etcd no longer takes the token sent: authenticate again."""

    def __init__(self, endpoint: str, message: str):
        super().__init__(message)
        self.endpoint = endpoint


class _AuthOff(StoreError):
    """The server has authentication off: requests go without a token."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with prefix (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # empty prefix (or all 0xff): the whole keyspace


def split_scheme(endpoint: str) -> tuple[str | None, str]:
    """("http" | "https" | None, HOST:PORT) of an endpoint as etcdctl's --endpoints writes it."""
    text = endpoint.strip()
    for scheme in ("http", "https"):
        if text.startswith(scheme + "://"):
            return scheme, text[len(scheme) + 3:].rstrip("/")
    return None, text.rstrip("/")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    try:
        return parse_host_port(split_scheme(endpoint)[1])
    except ValueError as e:
        raise PodnetError(f"etcd endpoint {e}") from None


class _Tls:
    """A store's TLS context and the options it came from (for messages)."""

    def __init__(self, creds: EtcdCredentials):
        self.creds = creds
        self.context = tls_context(creds)

    def verify_failed(self, e: ssl.SSLCertVerificationError) -> str:
        reason = e.verify_message or e.reason or str(e)
        if e.verify_code in (2, 19, 20, 21):  # no issuer certificate / self-signed / not trusted
            trusted = self.creds.named("cacert") if self.creds.cacert else "the system's CAs (give --cacert)"
            return f"TLS: the server's certificate is not signed by a CA in {trusted} ({reason})"
        return f"TLS: the server's certificate is refused ({reason})"

    def refused(self, e: BaseException) -> str:
        """The server ended a connection right after the handshake: it refused our certificate."""
        alert = getattr(e, "reason", None) if not isinstance(e, ssl.SSLEOFError) else None
        closed = f"the server ended the connection after the handshake{f' ({alert})' if alert else ''}"
        if self.creds.cert is None:
            return f"TLS: {closed}: it requires a client certificate (--cert and --key, or ETCDCTL_CERT and ETCDCTL_KEY)"
        return (f"TLS: {closed}: it does not accept the client certificate {self.creds.named('cert')} "
                "(signed by a CA it does not trust?)")


def _decode_value(key: str, raw: str | None) -> dict[str, Any]:
    try:
        return codec.loads(_unb64(raw))  # orjson, as the SQLite store: an agent's start decodes every value
    except ValueError:
        raise StoreError(f"{key}: stored value is not JSON") from None


def _record(kv: dict[str, Any]) -> Record:
    key = _unb64(kv["key"]).decode()
    return Record(key, _decode_value(key, kv.get("value")), int(kv["mod_revision"]), int(kv["create_revision"]))


def _compare(op: Op) -> dict[str, Any] | None:
    if op.expect is None:
        return None
    key = _b64(op.key.encode())
    if op.expect == 0:
        # put: must not exist; delete: must exist (any revision), as check_expect has it.
        result = "EQUAL" if op.kind == "put" else "GREATER"
        return {"key": key, "target": "CREATE", "result": result, "create_revision": "0"}
    return {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(op.expect)}


class _Connection:
    """One keep-alive HTTP (or HTTPS) connection to one endpoint."""

    def __init__(self, host: str, port: int, connect_timeout: float, timeout: float | None,
                 tls: _Tls | None = None):
        self.tls = tls
        self.fresh = True  # no answer read on it yet
        if tls is None:
            self.conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        else:
            self.conn = http.client.HTTPSConnection(host, port, timeout=connect_timeout, context=tls.context)
        try:
            self.conn.connect()
        except ssl.SSLCertVerificationError as e:
            self.conn.close()
            raise _NotSent(tls.verify_failed(e) if tls else str(e), refused=True) from None
        except ssl.SSLError as e:
            self.conn.close()
            raise _NotSent(f"TLS handshake failed: {e.reason or e}", refused=True) from None
        except OSError as e:
            self.conn.close()
            if tls is not None and isinstance(e, ConnectionResetError):
                raise _NotSent(f"TLS handshake failed ({e}): does the endpoint serve plain HTTP? "
                               "then write etcd://, not etcds://", refused=True) from None
            raise _NotSent(f"cannot connect: {e}", unreachable=True) from None
        sock = self.conn.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        sock.settimeout(timeout)
        if tls is not None:
            self._probe()

    def _probe(self) -> None:
        """Ask for the member's status: its answer proves it accepted this client's certificate."""
        try:
            self.conn.request("POST", "/v3/maintenance/status", body=b"{}", headers=PROBE_HEADERS)
            resp = self.conn.getresponse()
            resp.read()
        except TimeoutError:
            self.conn.close()
            raise _NotSent("no answer to a status request after the TLS handshake", unreachable=True) from None
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            assert self.tls is not None
            raise _NotSent(self.tls.refused(e), refused=True) from None
        if resp.will_close:
            self.conn.close()
            raise _NotSent(f"the server closed the connection after a status request (HTTP {resp.status})")

    @property
    def sock(self) -> socket.socket | None:
        return self.conn.sock

    def idle_and_open(self) -> bool:
        """False if the server closed this idle connection (it is readable: EOF or junk)."""
        sock = self.conn.sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def send(self, path: str, body: bytes, token: str | None = None) -> None:
        headers = {**HEADERS, "Authorization": token} if token else HEADERS
        try:
            self.conn.request("POST", path, body=body, headers=headers)
        except (OSError, http.client.HTTPException) as e:
            # The request did not fully leave this host, so the server cannot have acted on it.
            raise _NotSent(f"sending failed: {e}") from None

    def response(self) -> http.client.HTTPResponse:
        try:
            resp = self.conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            if self.fresh and isinstance(e, http.client.RemoteDisconnected):
                hint = "" if self.tls else ": if the endpoint serves TLS, write etcds://"
                raise _MaybeSent(f"closed a new connection without answering{hint}", unanswered=True) from None
            raise _MaybeSent(f"no response: {e or type(e).__name__}") from None
        self.fresh = False
        return resp

    def close(self) -> None:
        self.conn.close()


def _read_json(resp: http.client.HTTPResponse) -> dict[str, Any]:
    try:
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise _MaybeSent(f"response cut off: {e or type(e).__name__}") from None
    try:
        doc = codec.loads(data) if data else {}  # a range page: 1 000 values as base64
    except ValueError:
        doc = None
    if resp.status != 200:
        if data.startswith(_GATEWAY_CN):
            raise _ServerError(_FAILED_PRECONDITION, f"{_CN_REFUSED} a client certificate whose subject has a "
                               "Common Name: use one without CN (e.g. subject /O=podnet)")
        if isinstance(doc, dict) and ("error" in doc or "message" in doc):
            raise _ServerError(int(doc.get("code", 2)), str(doc.get("message") or doc.get("error")))
        if resp.status == 404:
            raise _ServerError(_UNIMPLEMENTED, "no etcd v3 JSON gateway at /v3/ here (etcd 3.4 or later is needed)")
        raise _ServerError(2, f"HTTP {resp.status} {resp.reason}: {data[:200]!r}")
    if not isinstance(doc, dict):
        raise _MaybeSent(f"unreadable response: {data[:200]!r}")
    return doc


class _SnapshotCompacted(StoreError):
    """A page after the first asked for a revision etcd compacted meanwhile."""


RANGE = "/v3/kv/range"


class _PageReader:
    """The pages of one range listing, each prepared by etcd while the caller decodes the
    one before.

    A listing is hundreds of requests; asked one after the other, the store waits for the
    network and etcd's JSON encoding of a page, then decodes it, then asks for the next.
    Here the request for page n+1 goes out before page n is handed to the caller, on a
    connection of the listing's own (the store's may be needed by other threads meanwhile),
    so etcd encodes it, and the kernel buffers it, while the caller decodes: pipelining,
    no thread (a reading thread's allocations and the interpreter lock cost an agent's
    start more memory and no less time). Every page after the first is read at the
    first page's revision (one snapshot). A page whose pipelined request fails in any way
    is asked for again through the store's call, which fails over, authenticates and
    raises exactly as for any read. Leaving the `with` block closes the connection, an
    answer still unread with it.

    Each request ends where the group of its first key ends, one level below the listed
    prefix (e.g. /podnet/shared/pods/ under /podnet/shared/), not at the prefix's end:
    etcd 3.4 walks its index from a range's start to its end for every page, whatever its
    limit, which made a listing quadratic (the first 1 000 of 200 000 keys: 65 ms to the
    prefix's end, 17 ms bounded); a group that ends early costs one short page.
    """

    def __init__(self, store: EtcdStore, prefix: str):
        self.store = store
        self.start = prefix.encode()
        self.end = prefix_range_end(self.start)
        self.revision = 0
        self._conn: _Connection | None = None

    def __enter__(self) -> _PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        """The raw key-values of each page, in key order."""
        end = self._group_end(self.start)
        kvs, after = self._read(self._call(self._request(self.start, end)), end)
        while after is not None:
            end = self._group_end(after)
            request = self._request(after, end)
            sent = self._ask(request)  # etcd prepares it while the caller takes this page
            yield kvs
            kvs, after = self._read(self._answer(request, sent), end)
        yield kvs

    def _group_end(self, key: bytes) -> bytes:
        """The end of key's group one level below the listed prefix (the prefix's end if
        key is in none)."""
        slash = key.find(b"/", len(self.start))
        return prefix_range_end(key[:slash + 1]) if slash >= 0 else self.end

    def _request(self, key: bytes, end: bytes) -> dict[str, Any]:
        request: dict[str, Any] = {"key": _b64(key), "range_end": _b64(end), "limit": str(self.store.page_size)}
        if self.revision:
            request["revision"] = str(self.revision)  # every page from the first page's snapshot
        return request

    def _read(self, doc: dict[str, Any], end: bytes) -> tuple[list[dict[str, Any]], bytes | None]:
        """A page's key-values and the key the next page starts at (None: this is the last)."""
        self.revision = self.revision or int(doc["header"]["revision"])
        kvs = doc.get("kvs") or []
        if doc.get("more") and kvs:
            return kvs, _unb64(kvs[-1]["key"]) + b"\x00"
        return kvs, (end if end != self.end else None)  # the group is done: the next one, if any

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.store._call(RANGE, request)
        except StoreError as e:
            if self.revision and "compacted" in str(e):
                raise _SnapshotCompacted(str(e)) from None
            raise

    def _ask(self, request: dict[str, Any]) -> bool:
        """Send a page's request on the listing's connection; False if it did not go out."""
        if self.store._closed:
            return False  # the store's call says so
        try:
            token = self.store._token_now()
            if self._conn is None:
                self._conn = self.store._connect(self.store._current)
            self._conn.send(RANGE, json.dumps(request, separators=(",", ":")).encode(), token)
            return True
        except (_NotSent, StoreError):
            self._drop()
            return False

    def _answer(self, request: dict[str, Any], sent: bool) -> dict[str, Any]:
        if sent and self._conn is not None:
            try:
                resp = self._conn.response()
                doc = _read_json(resp)
                if resp.will_close:
                    self._drop()
                return doc
            except (_MaybeSent, _ServerError):
                self._drop()
        return self._call(request)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class EtcdStore(KeyValueStore):
    """endpoints: HOST:PORT, or etcdctl's http://HOST:PORT / https://HOST:PORT (all alike);
    tls: for endpoints without a scheme; credentials: TLS files, user and password (as
    given: the environment is open_store's to read)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        tls: bool | None = None,
        credentials: EtcdCredentials | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        timeout: float = REQUEST_TIMEOUT,
        retry_for: float = RETRY_FOR,
        watch_reconnect_for: float = WATCH_RECONNECT_FOR,
        page_size: int = PAGE_SIZE,
    ):
        if not endpoints:
            raise PodnetError("etcd store needs at least one endpoint")
        schemes = {scheme for scheme, _ in map(split_scheme, endpoints)} - {None}
        if len(schemes) > 1:
            raise PodnetError(f"etcd endpoints {', '.join(endpoints)} mix http:// and https://: "
                              "the members of one store are all TLS or all not")
        if schemes and tls is not None and (schemes == {"https"}) != tls:
            raise PodnetError(f"etcd endpoints {', '.join(endpoints)} are {schemes.pop()}:// but the store URL says "
                              f"{'etcds' if tls else 'etcd'}://")
        self.tls = schemes == {"https"} if schemes else bool(tls)
        self.endpoints = [split_scheme(e)[1] for e in endpoints]
        self._addrs = [parse_endpoint(e) for e in self.endpoints]
        self.url = ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)
        self.credentials = (credentials or EtcdCredentials()).checked()
        creds = self.credentials
        if not self.tls and creds.tls_files:
            # ETCDCTL_* may be meant for another etcd, and etcdctl ignores them for http://
            # endpoints; a flag or PODNET_ETCD_* given for a plain store is a mistake.
            named = [creds.where(f) for f in ("cacert", "cert", "key")
                     if getattr(creds, f) is not None and not creds.where(f).startswith("ETCDCTL_")]
            if named:
                raise PodnetError(f"{', '.join(named)} {'is' if len(named) == 1 else 'are'} for TLS, but the store "
                                  f"{self.url} is plain HTTP: write etcds://{','.join(self.endpoints)}")
        self._tls = _Tls(creds) if self.tls else None
        self._auth = creds.user is not None
        self._token: str | None = None  # None: not authenticated yet; "": the server has auth off
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retry_for = retry_for
        self.watch_reconnect_for = watch_reconnect_for
        self.page_size = page_size
        self._current = 0  # index of the endpoint in use
        self._conn: _Connection | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._watch_conns: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._watch_lock = threading.Lock()

    def __repr__(self) -> str:
        user = f" user={self.credentials.user!r}" if self._auth else ""
        return f"<EtcdStore {self.url}{user}>"

    def clone(self) -> EtcdStore:
        """Another client of the same members, with the same credentials, TLS context and
        token (a token is the user's, good on every member): a pool of stores authenticates
        once, not once per store."""
        other = EtcdStore(self.endpoints, tls=self.tls, credentials=self.credentials,
                          connect_timeout=self.connect_timeout, timeout=self.timeout, retry_for=self.retry_for,
                          watch_reconnect_for=self.watch_reconnect_for, page_size=self.page_size)
        other._current = self._current
        with self._lock:
            other._token = self._token
        return other

    # ------------------------------------------------------------------ plumbing

    def _endpoints_text(self) -> str:
        return ", ".join(self.endpoints)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self, index: int) -> _Connection:
        host, port = self._addrs[index]
        return _Connection(host, port, self.connect_timeout, self.timeout, self._tls)

    def _once(self, path: str, body: bytes, token: str | None) -> dict[str, Any]:
        """One request on the current endpoint's connection (opened or refreshed as needed)."""
        if self._conn is not None and not self._conn.idle_and_open():
            self._drop()
        if self._conn is None:
            self._conn = self._connect(self._current)
        self._conn.send(path, body, token)
        resp = self._conn.response()
        doc = _read_json(resp)
        if resp.will_close:
            self._drop()
        return doc

    def _call(self, path: str, request: dict[str, Any], *, write: bool = False) -> dict[str, Any]:
        """POST to the current endpoint, failing over to the others, with a token if the
        store has a user (authenticating again once if etcd no longer takes it).

        Reads are retried anywhere. A write is only retried when it certainly was not
        applied; if it may have been, StoreUnavailable says its outcome is unknown.
        """
        if self._closed:
            raise StoreUnavailable(f"etcd store {self.url} is closed")
        body = json.dumps(request, separators=(",", ":")).encode()
        for attempt in range(2):
            token = self._token_now()
            try:
                return self._send(path, body, write, token)
            except _TokenRefused as e:
                self._forget_token(token)
                if attempt:
                    raise StoreError(f"etcd {e.endpoint}: {e}, even with a token just issued to user "
                                     f"{self.credentials.user!r}") from None
        raise AssertionError("not reached")

    # ------------------------------------------------------------------ authentication

    def _token_now(self) -> str | None:
        """The token to send (authenticating first if there is none yet); None without a user."""
        if not self._auth:
            return None
        with self._lock:
            if self._token is None:
                self._token = self._authenticate()
            return self._token

    def _forget_token(self, token: str | None) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def _authenticate(self) -> str:
        creds = self.credentials
        body = json.dumps({"name": creds.user, "password": creds.password}).encode()
        try:
            doc = self._send(AUTHENTICATE, body, False, None)
        except _AuthOff:
            return ""
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise StoreError(f"etcd {self.endpoints[self._current]}: Authenticate gave no token")
        return token

    def _token_refused(self, message: str, token: str | None) -> bool:
        return self._auth and (message.startswith(_TOKEN_REFUSED) or (token == "" and message.startswith(_NO_USER)))

    def _refusal(self, endpoint: str, e: _ServerError, path: str) -> StoreError:
        """The error a permanent server answer becomes, saying what to change."""
        message, creds = str(e), self.credentials
        if path == AUTHENTICATE and _BAD_PASSWORD in message:
            came = sorted({creds.where("user"), creds.where("password")})
            return StoreError(f"etcd {endpoint}: authentication as user {creds.user!r} failed: wrong user name or "
                              f"password (from {' and '.join(came)})")
        if path == AUTHENTICATE and _AUTH_OFF in message:
            return _AuthOff(message)
        if message.startswith(_NO_USER) and not self._auth:
            return StoreError(f"etcd {endpoint} requires authentication ({message}): give --user NAME[:PASSWORD] "
                              "(or ETCDCTL_USER and ETCDCTL_PASSWORD), or NAME:PASSWORD@ in the store URL")
        if message.startswith(_DENIED):
            who = f"user {creds.user!r}" if self._auth else "this client"
            return StoreError(f"etcd {endpoint}: {message} for {who} (its roles need readwrite on the prefix "
                              f"{KEY_PREFIX}, which holds {SHARED} and {ALLOC})")
        return StoreError(f"etcd {endpoint}: {message}")

    # ------------------------------------------------------------------ failover

    def _send(self, path: str, body: bytes, write: bool, token: str | None) -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        with self._lock:
            while True:
                errors: list[str] = []
                all_unreachable = True
                refused = False
                for _ in range(len(self._addrs)):
                    endpoint = self.endpoints[self._current]
                    try:
                        return self._once(path, body, token)
                    except _NotSent as e:
                        all_unreachable &= e.unreachable
                        refused |= e.refused
                        errors.append(f"{endpoint}: {e}")
                    except _MaybeSent as e:
                        all_unreachable &= e.unanswered and not write
                        if write:
                            self._drop()
                            raise StoreUnavailable(
                                f"etcd {endpoint}: connection lost after the transaction was sent ({e}); "
                                "its outcome is unknown: read the keys again before retrying"
                            ) from None
                        errors.append(f"{endpoint}: {e}")
                    except _ServerError as e:
                        if path != AUTHENTICATE and self._token_refused(str(e), token):
                            raise _TokenRefused(endpoint, str(e)) from None
                        if e.code in _PERMANENT_CODES or e.code == _OUT_OF_RANGE:
                            raise self._refusal(endpoint, e, path) from None
                        all_unreachable = False
                        if write and not str(e).startswith(_NOT_PROPOSED):
                            self._drop()
                            raise StoreUnavailable(
                                f"etcd {endpoint}: {e}; the transaction's outcome is unknown: "
                                "read the keys again before retrying"
                            ) from None
                        errors.append(f"{endpoint}: {e}")
                    self._drop()
                    self._current = (self._current + 1) % len(self._addrs)
                if all_unreachable or time.monotonic() + delay > deadline:
                    if len(errors) == 1:
                        raise StoreUnavailable(f"etcd {errors[0]}")
                    what = ("no etcd endpoint accepted the connection" if refused else "no etcd endpoint answered"
                            ) if all_unreachable else "no etcd endpoint could serve the request"
                    raise StoreUnavailable(f"{what} ({self._endpoints_text()}): {'; '.join(errors)}")
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def close(self) -> None:
        """Close the store's connection, and stop its watches (they end, as if exhausted)."""
        with self._lock:
            self._closed = True
            self._drop()
        with self._watch_lock:
            watching = list(self._watch_conns)
        for conn in watching:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------------ reads

    def revision(self) -> int:
        # A key in podnet's prefix: a user whose role grants only that may read it.
        doc = self._call("/v3/kv/range", {"key": _b64(SHARED.encode()), "count_only": True})
        return int(doc["header"]["revision"])

    def identity(self) -> str:
        """The etcd cluster's ID (a cluster made again with the same members and token has
        the same: the agent's snapshot also checks a revision and its own Node's)."""
        doc = self._call("/v3/kv/range", {"key": _b64(SHARED.encode()), "count_only": True})
        return f"etcd:{doc['header'].get('cluster_id', '')}"

    def get(self, key: str) -> Record | None:
        doc = self._call("/v3/kv/range", {"key": _b64(key.encode())})
        kvs = doc.get("kvs") or []
        return _record(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[Record], int]:
        for _attempt in range(5):
            records: list[Record] = []
            try:
                with _PageReader(self, prefix) as pages:
                    for kvs in pages:
                        records.extend(_record(kv) for kv in kvs)
                return records, pages.revision
            except _SnapshotCompacted:
                pass  # the snapshot was compacted between pages: read it all again, at a newer revision
        raise StoreUnavailable(f"listing {prefix!r}: the store was compacted under every attempt")

    def stream(self, prefix: str, sink: Callable[[Record], None]) -> int:
        with _PageReader(self, prefix) as pages:
            try:
                for kvs in pages:
                    for kv in kvs:
                        sink(_record(kv))
            except _SnapshotCompacted:
                raise Compacted(pages.revision, pages.revision + 1) from None
        return pages.revision

    # ------------------------------------------------------------------ writes

    def txn(self, ops: list[Op]) -> int:
        compares = [c for c in (_compare(op) for op in ops) if c is not None]
        # etcd refuses one key twice in a Txn; as in the other backends, the last write wins.
        last: dict[str, Op] = {}
        for op in ops:
            last.pop(op.key, None)
            last[op.key] = op
        success = []
        for op in last.values():
            key = _b64(op.key.encode())
            if op.kind == "put":
                value = json.dumps(op.value, separators=(",", ":")).encode()
                success.append({"request_put": {"key": key, "value": _b64(value)}})
            else:
                success.append({"request_delete_range": {"key": key}})
        checked = list(dict.fromkeys(op.key for op in ops if op.expect is not None))
        failure = [{"request_range": {"key": _b64(k.encode()), "keys_only": True}} for k in checked]
        doc = self._call("/v3/kv/txn", {"compare": compares, "success": success, "failure": failure}, write=True)
        if doc.get("succeeded") or not compares:
            return int(doc["header"]["revision"])
        current: dict[str, int] = dict.fromkeys(checked, 0)
        for response in doc.get("responses") or []:
            for kv in (response.get("response_range") or {}).get("kvs") or []:
                current[_unb64(kv["key"]).decode()] = int(kv["mod_revision"])
        for op in ops:
            if op.expect is not None:
                check_expect(op, current[op.key])
        raise Conflict(checked[0])  # not reached: some compare failed, so some check does

    # ------------------------------------------------------------------ watch

    def watch(self, prefix: str, start_revision: int, previous: bool = True) -> Iterator[Event]:
        """See KeyValueStore.watch. "From now" (start_revision <= 0) means after the
        revision current when watch() is called, not when iteration starts."""
        if start_revision <= 0:
            start_revision = self.revision() + 1
        return self._watch(prefix, start_revision, previous)

    def _open_watch(self, index: int, prefix: str, start: int, previous: bool = True, token: str | None = None,
                    ) -> tuple[_Connection, http.client.HTTPResponse]:
        conn = self._connect(index)
        with self._watch_lock:
            self._watch_conns.add(conn)
        request = {"create_request": {
            "key": _b64(prefix.encode()),
            "range_end": _b64(prefix_range_end(prefix.encode())),
            "start_revision": str(start),
            **({"prev_kv": True} if previous else {}),
        }}
        try:
            conn.send("/v3/watch", json.dumps(request).encode(), token)
            resp = conn.response()
            if resp.status != 200:
                _read_json(resp)  # raises the server's error
                raise _MaybeSent(f"HTTP {resp.status}")
        except BaseException:
            conn.close()
            raise
        return conn, resp

    def _watch(self, prefix: str, start_revision: int, previous: bool = True) -> Iterator[Event]:
        next_rev = start_revision
        index = self._current
        failed_since: float | None = None
        errors: dict[str, str] = {}
        delay = 0.05
        failures = 0
        while True:
            if self._closed:
                return
            endpoint = self.endpoints[index]
            conn: _Connection | None = None
            token: str | None = None
            try:
                try:
                    token = self._token_now()
                except StoreUnavailable as e:  # no member could authenticate: as if none answered
                    raise _NotSent(str(e)) from None
                conn, resp = self._open_watch(index, prefix, next_rev, previous, token)
                created = False
                while True:
                    line = resp.readline()
                    if not line:
                        raise _MaybeSent("watch stream ended")
                    if not line.strip():
                        continue
                    msg = codec.loads(line)
                    if "error" in msg:
                        err = msg["error"]
                        text = str(err.get("message") if isinstance(err, dict) else err)
                        if self._token_refused(text, token):
                            self._forget_token(token)  # the next attempt authenticates again
                        raise _MaybeSent(text)
                    result = msg.get("result") or {}
                    if int(result.get("compact_revision") or 0) > 0:
                        raise Compacted(next_rev, int(result["compact_revision"]))
                    if result.get("canceled"):
                        reason = str(result.get("cancel_reason") or "no reason given")
                        code, _, desc = reason.partition(" desc = ")
                        if desc:  # "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
                            raise _ServerError(_GRPC_CODES.get(code.rpartition(" ")[2], 2), desc)
                        raise _MaybeSent(f"watch canceled: {reason}")
                    if result.get("created") and not created:
                        created = True
                        conn.sock.settimeout(None)  # wait for events as long as it takes (TCP keepalive is on)
                        failed_since, errors, delay, failures = None, {}, 0.05, 0
                    floor = next_rev
                    for raw in result.get("events") or []:
                        event = self._event(raw)
                        if event.revision < floor:
                            continue  # already yielded before a reconnect
                        yield event
                        # etcd never splits one revision's events across messages, and all of
                        # this message's events are yielded before the stream is read again.
                        next_rev = event.revision + 1
            except (_NotSent, _MaybeSent, _ServerError, OSError, http.client.HTTPException, ValueError) as e:
                if self._closed:
                    return
                if isinstance(e, _ServerError):
                    if self._token_refused(str(e), token):
                        self._forget_token(token)  # the next attempt authenticates again
                    elif e.code in (_OUT_OF_RANGE, _PERMISSION_DENIED) or str(e).startswith((_NO_USER, _CN_REFUSED)):
                        raise self._refusal(endpoint, e, "/v3/watch") from None
                errors[endpoint] = str(e) or type(e).__name__
                now = time.monotonic()
                failed_since = failed_since if failed_since is not None else now
                if now - failed_since > self.watch_reconnect_for:
                    detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
                    raise StoreUnavailable(
                        f"watch of {prefix!r}: no etcd endpoint answered for {self.watch_reconnect_for:.0f}s "
                        f"({self._endpoints_text()}): {detail}"
                    ) from None
                index = (index + 1) % len(self._addrs)
                failures += 1
                if failures % len(self._addrs) == 0:  # every endpoint failed once: back off
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            finally:
                if conn is not None:
                    conn.close()

    @staticmethod
    def _event(raw: dict[str, Any]) -> Event:
        kv = raw["kv"]
        key = _unb64(kv["key"]).decode()
        rev = int(kv["mod_revision"])
        if raw.get("type") == "DELETE":
            prev = raw.get("prev_kv")
            return Event("DELETED", key, _decode_value(key, prev.get("value")) if prev else None, rev)
        kind = "ADDED" if int(kv.get("create_revision") or 0) == rev else "MODIFIED"
        return Event(kind, key, _decode_value(key, kv.get("value")), rev)

    # ------------------------------------------------------------------ maintenance

    def status(self) -> dict[str, Any]:
        """The current endpoint's /v3/maintenance/status (leader, member_id, revision, ...)."""
        return self._call("/v3/maintenance/status", {})

    def compact(self, revision: int) -> None:
        """Drop history before `revision` (etcd keeps `revision` itself watchable)."""
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})


__all__ = ["EtcdStore", "prefix_range_end"]
