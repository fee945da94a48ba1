"""A small client of the Kubernetes API: JSON over HTTPS with a bearer token (or a client
certificate), what kube-sync needs and nothing more.

Configuration comes from a kubeconfig file (its current context: server, certificate-authority
(-data), insecure-skip-tls-verify, token / tokenFile / client-certificate(-data) and
client-key(-data)) or, inside a Pod, from the service account (KUBERNETES_SERVICE_HOST/PORT
and /var/run/secrets/kubernetes.io/serviceaccount). A token read from a file is read again
every minute: projected service account tokens rotate.

Each thread has its own connection (kept alive); a watch has one of its own and yields the
stream's events as they arrive. A stream that ends inside an event raises StreamCut: the
caller watches again from the last complete event, nothing half-read is used.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import yaml

from podnet.errors import PodnetError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REREAD = 60.0


class KubeError(PodnetError):
    pass


class ConfigError(KubeError):
    pass


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, code: int, reason: str, message: str, status: dict | None = None):
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}
        super().__init__(f"{code} {reason}: {message}" if reason else f"HTTP {code}: {message}")

    @classmethod
    def from_status(cls, status: dict, code: int | None = None) -> ApiError:
        code = int(status.get("code") or code or 500)
        err_cls = {404: NotFound, 409: Conflict, 410: Gone}.get(code, ApiError)
        return err_cls(code, str(status.get("reason") or ""), str(status.get("message") or ""), status)


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists, or an update on a stale resourceVersion."""


class Gone(ApiError):
    """410: the resourceVersion asked for is compacted away: list again."""


class Unreachable(KubeError):
    """No answer: connection refused or reset, TLS failure, timeout."""


class StreamCut(KubeError):
    """A watch stream ended inside an event."""


@dataclass(frozen=True)
class Resource:
    """One kind of the API: where it lives and how it is named."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


@dataclass
class KubeConfig:
    server: str
    ca_file: str | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    origin: str = ""

    @classmethod
    def load(cls, path: str | None = None, context: str | None = None) -> KubeConfig:
        """An explicit kubeconfig, else $KUBECONFIG, else the service account inside a Pod, else
        ~/.kube/config."""
        if path:
            return cls.from_kubeconfig(path, context)
        env = os.environ.get("KUBECONFIG")
        if env:
            return cls.from_kubeconfig(env.split(os.pathsep)[0], context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        home = os.path.expanduser("~/.kube/config")
        if os.path.exists(home):
            return cls.from_kubeconfig(home, context)
        raise ConfigError("no Kubernetes API configuration: pass --kubeconfig, set KUBECONFIG, or run in a Pod "
                          "with a service account")

    @classmethod
    def in_cluster(cls, sa_dir: str = SERVICE_ACCOUNT_DIR) -> KubeConfig:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("KUBERNETES_SERVICE_HOST is not set: not inside a Pod")
        token = os.path.join(sa_dir, "token")
        if not os.path.exists(token):
            raise ConfigError(f"{token}: no service account token (automountServiceAccountToken off?)")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", ca_file=os.path.join(sa_dir, "ca.crt"), token_file=token,
                   origin="the Pod's service account")

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> KubeConfig:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"kubeconfig {path} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {path}: expected a mapping")
        base = os.path.dirname(os.path.abspath(path))
        ctx_name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", ctx_name, path).get("context") or {}
        cluster = _named(doc, "clusters", ctx.get("cluster"), path).get("cluster") or {}
        user = _named(doc, "users", ctx.get("user"), path).get("user") or {} if ctx.get("user") else {}
        server = cluster.get("server")
        if not server:
            raise ConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")

        def file_or_data(file_key: str, data_key: str, section: dict) -> str | None:
            if section.get(file_key):
                p = section[file_key]
                return p if os.path.isabs(p) else os.path.join(base, p)
            if section.get(data_key):
                return _temp_file(base64.b64decode(section[data_key]))
            return None

        return cls(server=server.rstrip("/"),
                   ca_file=file_or_data("certificate-authority", "certificate-authority-data", cluster),
                   insecure=bool(cluster.get("insecure-skip-tls-verify")),
                   token=user.get("token"),
                   token_file=user.get("tokenFile"),
                   cert_file=file_or_data("client-certificate", "client-certificate-data", user),
                   key_file=file_or_data("client-key", "client-key-data", user),
                   origin=f"kubeconfig {path}")


def _named(doc: dict, section: str, name: str | None, path: str) -> dict:
    for item in doc.get(section) or ():
        if isinstance(item, dict) and item.get("name") == name:
            return item
    raise ConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")


def _temp_file(data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="podnet-kube-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class KubeClient:
    def __init__(self, cfg: KubeConfig, timeout: float = 30.0, user_agent: str = "podnet"):
        self.cfg = cfg
        self.timeout = timeout
        self.user_agent = user_agent
        url = urlsplit(cfg.server)
        if url.scheme not in ("https", "http"):
            raise ConfigError(f"API server URL {cfg.server!r}: expected https://HOST[:PORT]")
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.tls else 80)
        self._ctx = self._ssl_context() if self.tls else None
        self._local = threading.local()
        self._token: str | None = cfg.token
        self._token_read = 0.0
        self._lock = threading.Lock()
        self._watch_conns: set[http.client.HTTPConnection] = set()
        self.requests = 0
        self.bytes_received = 0

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cfg.ca_file) if self.cfg.ca_file else \
            ssl.create_default_context()
        if self.cfg.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cfg.cert_file and self.cfg.key_file:
            ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        return ctx

    def _bearer(self) -> str | None:
        if self.cfg.token_file and time.monotonic() - self._token_read > TOKEN_REREAD:
            try:
                with open(self.cfg.token_file) as f:
                    self._token = f.read().strip()
                self._token_read = time.monotonic()
            except OSError as e:
                raise ConfigError(f"cannot read the token file {self.cfg.token_file}: {e.strerror or e}") from None
        return self._token

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        token = self._bearer()
        if token:
            h["Authorization"] = f"Bearer {token}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._lock:
            conns = list(self._watch_conns)
        for c in conns:
            _shut(c)

    # ------------------------------------------------------------ requests

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json") -> dict:
        query = ("?" + urlencode({k: v for k, v in params.items() if v is not None})) if params else ""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = self._headers(content_type if data is not None else None)
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = self._connect(self.timeout)
            try:
                conn.request(method, path + query, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if attempt == 0 and not fresh and not isinstance(e, socket.timeout):
                    continue  # a kept-alive connection the server had closed: once more on a new one
                raise Unreachable(f"{method} {self.cfg.server}{path}: {_reason(e)}") from None
            self.requests += 1
            self.bytes_received += len(raw)
            if resp.will_close:
                conn.close()
                self._local.conn = None
            return _decode(resp.status, raw, method, path)
        raise AssertionError("unreachable")

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict:
        return self.request("GET", res.path(namespace, name))

    def list(self, res: Resource, namespace: str | None = None, **params: Any) -> dict:
        return self.request("GET", res.path(namespace), params)

    def create(self, res: Resource, obj: dict, namespace: str | None = None) -> dict:
        return self.request("POST", res.path(namespace), None, obj)

    def replace(self, res: Resource, obj: dict, sub: str | None = None) -> dict:
        meta = obj["metadata"]
        return self.request("PUT", res.path(meta.get("namespace"), meta["name"], sub), None, obj)

    def patch(self, res: Resource, name: str, patch: Any, namespace: str | None = None, sub: str | None = None,
              content_type: str = "application/merge-patch+json") -> dict:
        return self.request("PATCH", res.path(namespace, name, sub), None, patch, content_type)

    def delete(self, res: Resource, name: str, namespace: str | None = None) -> dict:
        return self.request("DELETE", res.path(namespace, name))

    # ------------------------------------------------------------ watch

    def watch(self, res: Resource, resource_version: str, *, timeout_seconds: int = 300, bookmarks: bool = True,
              namespace: str | None = None, label_selector: str | None = None) -> Iterator[dict]:
        """The events of a watch from resource_version, as the server sends them (ERROR events
        included: the caller decides). Ends when the server ends the stream; raises StreamCut
        if it ends inside an event, Unreachable if the connection fails."""
        params = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_seconds),
                  "allowWatchBookmarks": "true" if bookmarks else None, "labelSelector": label_selector}
        path = res.path(namespace) + "?" + urlencode({k: v for k, v in params.items() if v is not None})
        conn = self._connect(timeout_seconds + 30)
        with self._lock:
            self._watch_conns.add(conn)
        try:
            try:
                conn.request("GET", path, headers=self._headers(None))
                resp = conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                raise Unreachable(f"watch {self.cfg.server}{res.path(namespace)}: {_reason(e)}") from None
            if resp.status != 200:
                raw = resp.read()
                _decode(resp.status, raw, "GET", res.path(namespace))
                raise ApiError(resp.status, "", "unexpected answer to a watch")
            self.requests += 1
            while True:
                try:
                    line = resp.readline()
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    raise StreamCut(f"watch of {res.plural}: the stream broke ({_reason(e)})") from None
                if not line:
                    return
                self.bytes_received += len(line)
                if not line.endswith(b"\n"):
                    raise StreamCut(f"watch of {res.plural}: the stream ended inside an event")
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    raise StreamCut(f"watch of {res.plural}: an event that is not JSON") from None
                if not isinstance(ev, dict) or "type" not in ev:
                    raise StreamCut(f"watch of {res.plural}: an event without a type")
                yield ev
        finally:
            with self._lock:
                self._watch_conns.discard(conn)
            conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message}"
    if isinstance(e, socket.timeout):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text


def _decode(status: int, raw: bytes, method: str, path: str) -> dict:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = None
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise ApiError(status, "", f"{method} {path}: the answer is not a JSON object")
        return body
    if isinstance(body, dict) and body.get("kind") == "Status":
        raise ApiError.from_status(body, status)
    text = raw[:200].decode(errors="replace").strip()
    raise ApiError.from_status({"code": status, "reason": http.client.responses.get(status, ""),
                                "message": f"{method} {path}: {text}"}, status)
