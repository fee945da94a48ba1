"""FakeApiServer: a Kubernetes API server for tests and the lab, over HTTPS with bearer
tokens, in one Python process. A fake: no kube-apiserver can be installed here, and podnet
never ships this.

It serves what kubectl, the official Python client and podnet's own client use:

  discovery     /version, /api, /api/v1, /apis, /apis/<group>/<version> (APIResourceList)
  list          resourceVersion, labelSelector, fieldSelector, limit + continue (consistent
                snapshots; 410 Expired once the snapshot is compacted)
  watch         from a resourceVersion (or the current state as ADDED first, without
                one), allowWatchBookmarks (BOOKMARK every `bookmark_interval` seconds),
                timeoutSeconds, ERROR 410 Expired for a compacted version, objects entering or
                leaving a selector as ADDED/DELETED
  write         create (generateName, namespace must exist), update (optimistic on
                metadata.resourceVersion: 409 Conflict), patch (JSON patch, merge patch,
                strategic merge patch for built-in kinds), delete, the status subresource
  CRDs          creating a CustomResourceDefinition serves its kind; custom resources are
                pruned and validated against its structural schema (tests/support/
                openapi_schema.py), fieldValidation=Strict rejects unknown fields
  defaults      Service clusterIP and nodePort allocation, Namespace label
                kubernetes.io/metadata.name, uid, creationTimestamp, generation
  auth          Authorization: Bearer <token> (401 without); a token's user may be given
                RBAC rules (403 outside them), and every request is recorded per user

Failure injection for the clients' bad-input tests: `compact()` (history dropped: old
versions 410), `cut_watches` (the next watch events are cut mid-line and the connection
dropped), `expire_watches` (the next watch requests get ERROR 410), `fail_next` (HTTP
errors), `drop_watches()`, `stop()`/`start()` on the same port (an API server that is down).
Counters (`stats`) measure the load clients put on it: open watches, requests by verb,
bytes sent on watch streams.

    with FakeApiServer() as api:
        api.kubeconfig("/tmp/x/kubeconfig")      # for kubectl and the Python client
        api.create({...})                        # direct access, no HTTP

Run alone (the lab does): python -m tests.support.fake_apiserver --dir DIR [--port N] [--service-cidr CIDR]
writes DIR/kubeconfig, DIR/ca.crt, DIR/token and serves until SIGTERM.
"""

from __future__ import annotations

import base64
import bisect
import copy
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support import kube_patch, openapi_schema

VERSION_INFO = {"major": "1", "minor": "30", "gitVersion": "v1.30.0-podnet-fake", "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22.0",
                "compiler": "gc", "platform": "linux/amd64"}
ALL_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status: bool = False  # has a status subresource
    schema: dict | None = None  # structural schema (custom resources)
    builtin: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gvr(self) -> tuple[str, str, str]:
        return self.group, self.version, self.plural

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN = [
    ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",), status=True),
    ResourceType("", "v1", "nodes", "Node", False, ("no",), status=True),
    ResourceType("", "v1", "pods", "Pod", True, ("po",), status=True),
    ResourceType("", "v1", "services", "Service", True, ("svc",), status=True),
    ResourceType("", "v1", "events", "Event", True, ("ev",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    ResourceType("", "v1", "secrets", "Secret", True),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), status=True),
    ResourceType("apps", "v1", "deployments", "Deployment", True, ("deploy",), status=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                 ("crd", "crds"), status=True),
]
SERVICE_CIDR = "10.96.0.0/12"
NODE_PORTS = (30000, 32767)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.group_resource} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def _invalid(rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    text = "; ".join(f"{f}: {m}" for f, _, m in causes) if len(causes) > 1 else f"{causes[0][0]}: {causes[0][2]}"
    what = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    return ApiError(422, "Invalid", f'{what} "{name}" is invalid: {text}',
                    {"name": name, "group": rt.group, "kind": rt.kind,
                     "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]})


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- selectors


def parse_label_selector(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """kubectl's label selector syntax: a=b, a==b, a!=b, a in (x,y), a notin (x), a, !a."""
    reqs = []
    for part in re.findall(r"[^,()]+(?:\([^)]*\))?", text or ""):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^(\S+)\s+(in|notin)\s*\(([^)]*)\)$", part)
        if m:
            reqs.append((m.group(1), m.group(2), tuple(v.strip() for v in m.group(3).split(",") if v.strip())))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append((k.strip(), "!=", (v.strip(),)))
        elif "=" in part:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            reqs.append((k.strip(), "=", (v.strip(),)))
        elif part.startswith("!"):
            reqs.append((part[1:].strip(), "!", ()))
        else:
            reqs.append((part, "exists", ()))
    return reqs


def labels_match(reqs: list, labels: dict) -> bool:
    for key, op, values in reqs:
        have = key in labels
        v = labels.get(key)
        if op == "=" and v != values[0]:
            return False
        if op == "!=" and have and v == values[0]:
            return False
        if op == "in" and v not in values:
            return False
        if op == "notin" and have and v in values:
            return False
        if op == "exists" and not have:
            return False
        if op == "!" and have:
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    reqs = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append((k, "!=", v))
        else:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            reqs.append((k, "=", v))
    return reqs


def fields_match(reqs: list, obj: dict) -> bool:
    for path, op, value in reqs:
        cur: Any = obj
        for p in path.split("."):
            cur = cur.get(p) if isinstance(cur, dict) else None
        have = "" if cur is None else str(cur).lower() if isinstance(cur, bool) else str(cur)
        if (op == "=") != (have == value):
            return False
    return True


# ---------------------------------------------------------------- storage


@dataclass
class _Event:
    rv: int
    rt: ResourceType
    type: str  # ADDED MODIFIED DELETED
    obj: dict
    prev: dict | None


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)  # (verb, resource) -> count
    users: Counter = field(default_factory=Counter)  # (user, verb, group, resource) -> count
    watches_open: int = 0
    watches_started: int = 0
    watch_bytes: int = 0
    watch_events: int = 0
    forbidden: Counter = field(default_factory=Counter)  # (user, verb, group, resource) refused by RBAC
    bytes_sent: int = 0
    connections: int = 0


class Faults:
    def __init__(self) -> None:
        self.cut_watches = 0  # the next N watch events are cut mid-line, the connection dropped
        self.expire_watches = 0  # the next N watch requests answer ERROR 410 at once
        self.fail_next: list[tuple[str, int]] = []  # (verb or "*", HTTP code): the next matching requests fail


class FakeApiServer:
    def __init__(self, *, port: int = 0, bookmark_interval: float = 1.0, tokens: dict[str, str] | None = None,
                 workdir: str | None = None, default_watch_timeout: float = 1800.0, tls: bool = True,
                 service_cidr: str = SERVICE_CIDR):
        self.port = port
        self.service_cidr = service_cidr  # where ClusterIPs are allocated
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.tls = tls
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="podnet-fakeapi-")
        os.makedirs(self.dir, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.tokens: dict[str, str] = {self.token: "admin"}  # token -> user
        self.tokens.update(tokens or {})
        self.rules: dict[str, list[dict]] = {}  # user -> RBAC PolicyRules (a user without rules may do anything)
        self.stats = Stats()
        self.faults = Faults()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.types: dict[tuple[str, str, str], ResourceType] = {rt.gvr: rt for rt in BUILTIN}
        self.rv = 1
        self.compacted = 0  # versions at or below this are gone
        self._versions: dict[tuple[str, str, str, str, str], list[tuple[int, dict | None]]] = {}
        self._keys: dict[tuple[str, str, str], list[tuple[str, str]]] = {}  # gvr -> sorted (ns, name)
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._ips_used: set[str] = set()
        self._ports_used: set[int] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._watchers: set[_Watcher] = set()
        self._conns: set[socket.socket] = set()
        self.ca_path = os.path.join(self.dir, "ca.crt")
        self._cert = os.path.join(self.dir, "server.crt")
        self._key = os.path.join(self.dir, "server.key")
        if tls and not os.path.exists(self._cert):
            _make_certs(self.dir)
        for ns in ("default", "kube-system"):
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeApiServer:
        ctx = None
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self._cert, self._key)
        self._server = _Server(("127.0.0.1", self.port), _Handler, self, ctx)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fake-apiserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the port is freed; start() serves again on it). Open connections drop."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.drop_watches()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def add_user(self, name: str, rules: list[dict] | None = None) -> str:
        """A token for a new user; with `rules` (RBAC PolicyRules) the user may do only those."""
        token = secrets.token_hex(16)
        self.tokens[token] = name
        if rules is not None:
            self.rules[name] = rules
        return token

    def kubeconfig(self, path: str | None = None, token: str | None = None, user: str = "admin") -> str:
        path = path or os.path.join(self.dir, "kubeconfig")
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url, **(
                {"certificate-authority": self.ca_path} if self.tls else {})}}],
            "users": [{"name": user, "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": user}}],
        }
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f, indent=1)
        os.chmod(path + ".tmp", 0o600)
        os.replace(path + ".tmp", path)
        return path

    # ------------------------------------------------------------ failure injection

    def compact(self, rv: int | None = None) -> int:
        """Forget history up to rv (default: now): watches and continue tokens from before it get 410."""
        with self.lock:
            rv = self.rv if rv is None else rv
            self.compacted = max(self.compacted, rv)
            cut = bisect.bisect_right(self._history_rvs, rv)
            del self._history[:cut]
            del self._history_rvs[:cut]
            for key in list(self._versions):
                versions = self._versions[key]
                keep = [v for v in versions if v[0] > rv]
                older = [v for v in versions if v[0] <= rv]
                if older and older[-1][1] is not None:
                    keep.insert(0, older[-1])
                if keep:
                    self._versions[key] = keep
                else:
                    del self._versions[key]
                    keys = self._keys[key[:3]]
                    i = bisect.bisect_left(keys, key[3:])
                    if i < len(keys) and keys[i] == key[3:]:
                        del keys[i]
            return self.compacted

    def drop_watches(self) -> None:
        with self.lock:
            for w in self._watchers:
                w.dropped = True
            self.changed.notify_all()

    # ------------------------------------------------------------ types

    def type_for(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def type_of(self, obj: dict) -> ResourceType:
        api = obj.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        for rt in self.types.values():
            if rt.group == group and rt.version == version and rt.kind == obj.get("kind"):
                return rt
        raise ApiError(404, "NotFound", f'the server could not find the requested resource (kind {obj.get("kind")} '
                       f"in {api})")

    def _register_crd(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for v in spec.get("versions") or ():
            if not v.get("served", True):
                continue
            rt = ResourceType(spec.get("group", ""), v["name"], names.get("plural", ""), names.get("kind", ""),
                              spec.get("scope") == "Namespaced", tuple(names.get("shortNames") or ()),
                              status="status" in (v.get("subresources") or {}),
                              schema=(v.get("schema") or {}).get("openAPIV3Schema"), builtin=False)
            self.types[rt.gvr] = rt

    def _unregister_crd(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        for v in spec.get("versions") or ():
            gvr = (spec.get("group", ""), v["name"], (spec.get("names") or {}).get("plural", ""))
            rt = self.types.pop(gvr, None)
            if rt is not None:
                for ns, name in list(self._keys.get(gvr, [])):
                    if self._current(rt, ns, name) is not None:
                        self._write(rt, ns, name, None)

    # ------------------------------------------------------------ storage

    def _vkey(self, rt: ResourceType, ns: str, name: str) -> tuple[str, str, str, str, str]:
        return (*rt.gvr, ns, name)

    def _current(self, rt: ResourceType, ns: str, name: str, at: int | None = None) -> dict | None:
        versions = self._versions.get(self._vkey(rt, ns, name))
        if not versions:
            return None
        if at is None:
            return versions[-1][1]
        for rv, obj in reversed(versions):
            if rv <= at:
                return obj
        return None

    def _write(self, rt: ResourceType, ns: str, name: str, obj: dict | None) -> dict | None:
        """Store a new version (None: delete) under a fresh resourceVersion; the event goes to watchers."""
        prev = self._current(rt, ns, name)
        self.rv += 1
        if obj is not None:
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
        key = self._vkey(rt, ns, name)
        if key not in self._versions:
            keys = self._keys.setdefault(rt.gvr, [])
            i = bisect.bisect_left(keys, (ns, name))
            if i == len(keys) or keys[i] != (ns, name):
                keys.insert(i, (ns, name))
        self._versions.setdefault(key, []).append((self.rv, obj))
        if obj is None:
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            ev = _Event(self.rv, rt, "DELETED", gone, prev)
        else:
            ev = _Event(self.rv, rt, "ADDED" if prev is None else "MODIFIED", obj, prev)
        self._history.append(ev)
        self._history_rvs.append(self.rv)
        self.changed.notify_all()
        return obj

    def list_at(self, rt: ResourceType, ns: str | None, at: int, start: tuple[str, str] | None = None,
                ) -> Iterable[dict]:
        keys = self._keys.get(rt.gvr, [])
        i = bisect.bisect_right(keys, start) if start else (bisect.bisect_left(keys, (ns, "")) if ns else 0)
        while i < len(keys):
            k = keys[i]
            i += 1
            if ns and k[0] != ns:
                if k[0] > ns:
                    break
                continue
            obj = self._current(rt, k[0], k[1], at)
            if obj is not None:
                yield obj

    # ------------------------------------------------------------ direct access (no HTTP)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict | None:
        with self.lock:
            rt = self.type_of({"apiVersion": api_version, "kind": kind})
            obj = self._current(rt, namespace if rt.namespaced else "", name)
            return copy.deepcopy(obj)

    def objects(self, api_version: str, kind: str) -> list[dict]:
        with self.lock:
            rt = self.type_of({"apiVersion": api_version, "kind": kind})
            return copy.deepcopy(list(self.list_at(rt, None, self.rv)))

    def create(self, obj: dict, *, strict: bool = False) -> dict:
        with self.lock:
            rt = self.type_of(obj)
            ns = (obj.get("metadata") or {}).get("namespace") or ("default" if rt.namespaced else "")
            return self.do_create(rt, ns, obj, strict=strict)[0]

    def apply(self, obj: dict) -> dict:
        """Create, or replace keeping the stored status when the object carries none."""
        with self.lock:
            rt = self.type_of(obj)
            ns = (obj.get("metadata") or {}).get("namespace") or ("default" if rt.namespaced else "")
            cur = self._current(rt, ns if rt.namespaced else "", obj["metadata"]["name"])
            if cur is None:
                return self.do_create(rt, ns, obj)[0]
            new = copy.deepcopy(obj)
            new["metadata"].pop("resourceVersion", None)
            return self.do_update(rt, ns if rt.namespaced else "", obj["metadata"]["name"], new)[0]

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict:
        with self.lock:
            rt = self.type_of({"apiVersion": api_version, "kind": kind})
            return self.do_delete(rt, namespace if rt.namespaced else "", name)

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str, status: dict) -> dict:
        with self.lock:
            rt = self.type_of({"apiVersion": api_version, "kind": kind})
            return self.do_patch(rt, namespace if rt.namespaced else "", name, {"status": status},
                                 "application/merge-patch+json", "status")[0]

    # ------------------------------------------------------------ the verbs

    def do_create(self, rt: ResourceType, ns: str, body: Any, *, strict: bool = False,
                  dry_run: bool = False) -> tuple[dict, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format: expected an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata: expected an object")
        self._check_kind(rt, obj)
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            meta["namespace"] = ns
            namespace = self._current(self.types[("", "v1", "namespaces")], "", ns)
            if namespace is None:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            if (namespace.get("status") or {}).get("phase") == "Terminating":
                raise ApiError(403, "Forbidden", f'{rt.plural} "{meta.get("name", "")}" is forbidden: unable to '
                               f"create new content in namespace {ns} because it is being terminated")
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name") or ""
        self._check_name(rt, name)
        if self._current(rt, ns if rt.namespaced else "", name) is not None:
            raise ApiError(409, "AlreadyExists", f'{rt.group_resource} "{name}" already exists',
                           {"name": name, "group": rt.group, "kind": rt.plural})
        warnings = self._validate(rt, obj, strict)
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta.setdefault("generation", 1)
        for k in ("deletionTimestamp", "selfLink"):
            meta.pop(k, None)
        self._defaults(rt, obj, None)
        if dry_run:
            return obj, warnings
        out = self._write(rt, ns if rt.namespaced else "", name, obj)
        if rt.gvr == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(out)
            established = copy.deepcopy(out)
            established["status"] = {"conditions": [
                {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": now_rfc3339()}
                for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))],
                "acceptedNames": out["spec"].get("names", {})}
            out = self._write(rt, "", name, established)
        return copy.deepcopy(out), warnings

    def do_update(self, rt: ResourceType, ns: str, name: str, body: Any, sub: str = "", *, strict: bool = False,
                  dry_run: bool = False) -> tuple[dict, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format: expected an object")
        cur = self._current(rt, ns, name)
        if cur is None:
            raise _not_found(rt, name)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        self._check_kind(rt, obj)
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", f'the name of the object ({meta.get("name")}) does not match the name '
                           f"on the URL ({name})")
        rv = meta.get("resourceVersion")
        if rv and rv != cur["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.group_resource} "{name}": the '
                           "object has been modified; please apply your changes to the latest version and try again",
                           {"name": name, "group": rt.group, "kind": rt.plural})
        if sub == "status":
            new = copy.deepcopy(cur)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = obj
            # metadata the server owns stays its own
            for k in ("uid", "creationTimestamp", "generation"):
                if k in cur["metadata"]:
                    new["metadata"][k] = cur["metadata"][k]
            new["metadata"]["name"] = name
            if rt.namespaced:
                new["metadata"]["namespace"] = ns
            if rt.status:
                if "status" in cur:
                    new["status"] = cur["status"]
                else:
                    new.pop("status", None)
            if new.get("spec") != cur.get("spec"):
                new["metadata"]["generation"] = int(cur["metadata"].get("generation") or 1) + 1
        warnings = self._validate(rt, new, strict)
        self._defaults(rt, new, cur)
        if _same(new, cur):
            return copy.deepcopy(cur), warnings  # no change: no new version, no event
        if dry_run:
            return new, warnings
        out = self._write(rt, ns, name, new)
        if rt.gvr == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(out)
        return copy.deepcopy(out), warnings

    def do_patch(self, rt: ResourceType, ns: str, name: str, patch: Any, content_type: str, sub: str = "", *,
                 strict: bool = False, dry_run: bool = False) -> tuple[dict, list[str]]:
        cur = self._current(rt, ns, name)
        if cur is None:
            raise _not_found(rt, name)
        ct = content_type.split(";")[0].strip()
        try:
            if ct == "application/json-patch+json":
                new = kube_patch.json_patch(cur, patch)
            elif ct == "application/merge-patch+json":
                new = kube_patch.merge_patch(cur, patch)
            elif ct == "application/strategic-merge-patch+json":
                if not rt.builtin:
                    raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                                   "format - accepted media types include: application/json-patch+json, "
                                   "application/merge-patch+json, application/apply-patch+yaml")
                new = kube_patch.strategic_merge_patch(cur, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the fake API server does not take {ct} patches: "
                               "application/json-patch+json, application/merge-patch+json or "
                               "application/strategic-merge-patch+json")
        except kube_patch.PatchError as e:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {e}") from None
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patch does not leave an object")
        meta = new.setdefault("metadata", {})
        if meta.get("resourceVersion") != cur["metadata"]["resourceVersion"] and meta.get("resourceVersion"):
            pass  # a patch naming another version is a precondition: do_update says Conflict
        if sub != "status" and rt.status:
            # a patch of the main resource leaves status alone
            if "status" in cur:
                new["status"] = cur["status"]
            else:
                new.pop("status", None)
        return self.do_update(rt, ns, name, new, sub, strict=strict, dry_run=dry_run)

    def do_delete(self, rt: ResourceType, ns: str, name: str, preconditions: dict | None = None) -> dict:
        cur = self._current(rt, ns, name)
        if cur is None:
            raise _not_found(rt, name)
        if preconditions and preconditions.get("resourceVersion") and \
                preconditions["resourceVersion"] != cur["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.group_resource} "{name}": the '
                           "object has been modified; please apply your changes to the latest version and try again")
        if preconditions and preconditions.get("uid") and preconditions["uid"] != cur["metadata"].get("uid"):
            raise ApiError(409, "Conflict", f'Precondition failed: UID in precondition: {preconditions["uid"]}, '
                           f'UID in object meta: {cur["metadata"].get("uid")}')
        if rt.plural == "namespaces":
            # As the API server: the namespace is Terminating at once, and its contents and then it
            # go a moment later (its controller's work), so that deleting them in turn still works.
            if (cur.get("status") or {}).get("phase") != "Terminating":
                terminating = copy.deepcopy(cur)
                terminating["metadata"]["deletionTimestamp"] = now_rfc3339()
                terminating["status"] = {"phase": "Terminating"}
                out = self._write(rt, ns, name, terminating)
                timer = threading.Timer(0.2, self._finish_namespace, args=(name,))
                timer.daemon = True
                timer.start()
                return copy.deepcopy(out)
            return copy.deepcopy(cur)
        if rt.plural == "services":
            self._release_service(cur)
        self._write(rt, ns, name, None)
        if rt.gvr == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._unregister_crd(cur)
        out = copy.deepcopy(cur)
        return out

    def _finish_namespace(self, name: str) -> None:
        with self.lock:
            ns_type = self.types[("", "v1", "namespaces")]
            if self._current(ns_type, "", name) is None:
                return
            for other in list(self.types.values()):
                if other.namespaced:
                    for obj in list(self.list_at(other, name, self.rv)):
                        if other.plural == "services":
                            self._release_service(obj)
                        self._write(other, name, obj["metadata"]["name"], None)
            self._write(ns_type, "", name, None)

    # ------------------------------------------------------------ validation and defaults

    def _check_kind(self, rt: ResourceType, obj: dict) -> None:
        if obj.get("kind") and obj["kind"] != rt.kind:
            raise ApiError(400, "BadRequest", f"the object's kind {obj['kind']!r} does not match the resource "
                           f"{rt.plural} (kind {rt.kind})")
        if obj.get("apiVersion") and obj["apiVersion"] != rt.api_version:
            raise ApiError(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}) does not match "
                           f"the expected API version ({rt.api_version})")
        obj["kind"] = rt.kind
        obj["apiVersion"] = rt.api_version

    def _check_name(self, rt: ResourceType, name: str) -> None:
        if not name:
            raise _invalid(rt, "", [("metadata.name", "FieldValueRequired",
                                     "Required value: name or generateName is required")])
        if len(name) > 253 or not _NAME.match(name):
            raise _invalid(rt, name, [("metadata.name", "FieldValueInvalid",
                                       f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                                       "lower case alphanumeric characters, '-' or '.', and must start and end "
                                       "with an alphanumeric character")])

    def _validate(self, rt: ResourceType, obj: dict, strict: bool) -> list[str]:
        """Custom resources: prune unknown fields (or refuse them, strict) and check the schema."""
        if rt.schema is None:
            return []
        pruned, unknown, errors = openapi_schema.check(obj, rt.schema, strict)
        if errors:
            raise _invalid(rt, obj["metadata"].get("name", ""), [(e.field, e.reason, e.message) for e in errors])
        obj.clear()
        obj.update(pruned)
        return [f'unknown field "{u}"' for u in unknown]

    def _defaults(self, rt: ResourceType, obj: dict, cur: dict | None) -> None:
        if rt.plural == "namespaces":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj.setdefault("status", {"phase": "Active"})
        elif rt.plural == "pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
            for c in (obj.get("spec") or {}).get("containers") or ():
                for p in c.get("ports") or ():
                    p.setdefault("protocol", "TCP")
        elif rt.plural == "services":
            self._service_defaults(obj, cur)

    def _service_defaults(self, obj: dict, cur: dict | None) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports") or ():
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        if spec["type"] == "ExternalName":
            return
        old = (cur or {}).get("spec") or {}
        ip = spec.get("clusterIP") or old.get("clusterIP")
        if not ip:
            ip = self._allocate_ip()
        elif ip != "None" and ip != old.get("clusterIP"):
            if ip in self._ips_used:
                raise _invalid(self.types[("", "v1", "services")], obj["metadata"]["name"], [
                    ("spec.clusterIPs", "FieldValueInvalid",
                     f"Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: provided IP is already "
                     "allocated")])
            self._ips_used.add(ip)
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            old_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort") for p in old.get("ports") or ()}
            for p in spec.get("ports") or ():
                if not p.get("nodePort"):
                    p["nodePort"] = old_ports.get((p.get("port"), p.get("protocol"))) or self._allocate_port()
                else:
                    self._ports_used.add(p["nodePort"])

    def _allocate_ip(self) -> str:
        net = ipaddress.ip_network(self.service_cidr)
        for host in net.hosts():
            s = str(host)
            if s.endswith(".1") and host == net.network_address + 1:
                continue  # the kubernetes Service's, as upstream
            if s not in self._ips_used:
                self._ips_used.add(s)
                return s
        raise ApiError(500, "InternalError", "no ClusterIP left")

    def _allocate_port(self) -> int:
        for p in range(NODE_PORTS[0], NODE_PORTS[1] + 1):
            if p not in self._ports_used:
                self._ports_used.add(p)
                return p
        raise ApiError(500, "InternalError", "no node port left")

    def _release_service(self, svc: dict) -> None:
        spec = svc.get("spec") or {}
        self._ips_used.discard(spec.get("clusterIP"))
        for p in spec.get("ports") or ():
            self._ports_used.discard(p.get("nodePort"))

    # ------------------------------------------------------------ authorization

    def allowed(self, user: str, verb: str, rt: ResourceType | None, sub: str, name: str) -> bool:
        rules = self.rules.get(user)
        if rules is None:
            return True
        if rt is None:  # discovery
            return True
        resource = f"{rt.plural}/{sub}" if sub else rt.plural
        for r in rules:
            if not ({"*", rt.group} & set(r.get("apiGroups") or ())):
                continue
            if not ({"*", resource} & set(r.get("resources") or ())):
                continue
            if not ({"*", verb} & set(r.get("verbs") or ())):
                continue
            names = r.get("resourceNames")
            if names and name not in names:
                continue
            return True
        return False

    # ------------------------------------------------------------ discovery

    def discovery(self, path: str) -> dict | None:
        with self.lock:
            types = list(self.types.values())
        if path == "/version":
            return VERSION_INFO
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for rt in types:
                if rt.group and rt.version not in groups.setdefault(rt.group, []):
                    groups[rt.group].append(rt.version)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(groups.items())]}
        if path == "/openapi/v3":
            gvs = {(rt.group, rt.version) for rt in types}
            return {"paths": {(f"apis/{g}/{v}" if g else "api/v1"): {
                "serverRelativeURL": f"/openapi/v3/{f'apis/{g}/{v}' if g else 'api/v1'}?hash={self.rv:016X}"}
                for g, v in sorted(gvs)}}
        if path.startswith("/openapi/v3/"):
            return self._openapi_v3(path[len("/openapi/v3/"):], types)
        m = re.match(r"^/apis/([^/]+)$", path)
        if m:
            vs = [rt.version for rt in types if rt.group == m.group(1)]
            if not vs:
                return None
            return {"kind": "APIGroup", "apiVersion": "v1", "name": m.group(1),
                    "versions": [{"groupVersion": f"{m.group(1)}/{v}", "version": v} for v in dict.fromkeys(vs)],
                    "preferredVersion": {"groupVersion": f"{m.group(1)}/{vs[0]}", "version": vs[0]}}
        m = re.match(r"^/api/(v1)$|^/apis/([^/]+)/([^/]+)$", path)
        if not m:
            return None
        group, version = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
        resources = []
        for rt in types:
            if rt.group != group or rt.version != version:
                continue
            resources.append({"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": ALL_VERBS, **(
                                  {"shortNames": list(rt.short_names)} if rt.short_names else {})})
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        if not resources:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group
                else version, "resources": resources}


    def _openapi_v3(self, gv: str, types: list[ResourceType]) -> dict | None:
        """An OpenAPI v3 document of one group/version: only its paths' PATCH operations, which say
        that they take fieldValidation (kubectl then validates on the server, not with a schema)."""
        group, _, version = gv[len("apis/"):].rpartition("/") if gv.startswith("apis/") else ("", "", "v1")
        paths = {}
        for rt in types:
            if (rt.group, rt.version) != (group, version):
                continue
            base = f"/apis/{group}/{version}" if group else "/api/v1"
            item = f"{base}/namespaces/{{namespace}}/{rt.plural}/{{name}}" if rt.namespaced else \
                f"{base}/{rt.plural}/{{name}}"
            paths[item] = {"patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": rt.kind},
                "x-kubernetes-action": "patch",
                "parameters": [{"name": p, "in": "query", "schema": {"type": "string"}}
                               for p in ("dryRun", "fieldManager", "fieldValidation", "force")],
                "responses": {"200": {"description": "OK"}}}}
        if not paths:
            return None
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": VERSION_INFO["gitVersion"]},
                "paths": paths, "components": {"schemas": {}}}


def _bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, as the API server reads query flags (the Python client sends True)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _same(a: dict, b: dict) -> bool:
    def strip(o: dict) -> dict:
        return {**o, "metadata": {k: v for k, v in o.get("metadata", {}).items() if k != "resourceVersion"}}

    return strip(a) == strip(b)


def _make_certs(directory: str) -> None:
    """A CA and a server certificate for 127.0.0.1 and localhost (EC P-256, made with openssl)."""
    def run(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3",
        "-subj", f"/CN=podnet fake apiserver CA {uuid.uuid4().hex[:8]}")
    with open(os.path.join(directory, "server.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "3", "-extfile", "server.ext")
    for k in ("ca.key", "server.key"):
        os.chmod(os.path.join(directory, k), 0o600)


# ---------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, fake: FakeApiServer, ctx: ssl.SSLContext | None):
        self.fake = fake
        self.ctx = ctx
        super().__init__(addr, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ctx is not None:
            try:
                request.settimeout(10)
                request = self.ctx.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError):
                request.close()
                return
        with self.fake.lock:
            self.fake._conns.add(request)
            self.fake.stats.connections += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.fake.lock:
                self.fake._conns.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-response is not worth a traceback


class _Watcher:
    def __init__(self) -> None:
        self.dropped = False


_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(?P<rest>(?:/[^/]+)*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ------------------------------------------------------------ plumbing

    def _send_json(self, code: int, body: dict, warnings: list[str] = ()) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for w in warnings:
            self.send_header("Warning", f'299 - "{w}"')
        self.end_headers()
        self.wfile.write(data)
        self.server.fake.stats.bytes_sent += len(data)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.code, e.status())

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            try:
                import yaml

                return yaml.safe_load(raw)
            except Exception:
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format") from None

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        try:
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            user = self._authenticate()
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            path = url.path.rstrip("/") or "/"
            if method == "GET" and (path in ("/version", "/api", "/apis") or path.startswith(("/api/", "/apis/",
                                                                                                "/openapi/v3"))):
                found = fake.discovery(path)
                if found is not None:
                    self._send_json(200, found)
                    return
            if method == "GET" and path in ("/healthz", "/readyz", "/livez"):
                data = b"ok"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(data)
                return
            route = self._route(path)
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            rt, ns, name, sub = route
            verb = self._verb(method, name, params)
            with fake.lock:
                fake.stats.requests[(verb, rt.plural)] += 1
                fake.stats.users[(user, verb, rt.group, f"{rt.plural}/{sub}" if sub else rt.plural)] += 1
                for i, (v, code) in enumerate(fake.faults.fail_next):
                    if v in ("*", verb):
                        del fake.faults.fail_next[i]
                        raise ApiError(code, "InternalError" if code == 500 else "ServiceUnavailable",
                                       f"injected failure ({code})")
            if not fake.allowed(user, verb, rt, sub, name):
                with fake.lock:
                    fake.stats.forbidden[(user, verb, rt.group, f"{rt.plural}/{sub}" if sub else rt.plural)] += 1
                scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
                raise ApiError(403, "Forbidden", f'{rt.group_resource} {repr(name) + " " if name else ""}is forbidden: '
                               f'User "{user}" cannot {verb} resource "{rt.plural}{"/" + sub if sub else ""}" in API '
                               f'group "{rt.group}" {scope}', {"name": name, "group": rt.group, "kind": rt.plural})
            if verb == "watch":
                self._watch(rt, ns, params)
                return
            code, out, warnings = self._verb_call(verb, rt, ns, name, sub, params, body)
            self._send_json(code, out, warnings)
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _authenticate(self) -> str:
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        user = self.server.fake.tokens.get(token)
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def _route(self, path: str) -> tuple[ResourceType, str, str, str] | None:
        m = _PATH.match(path)
        if not m:
            return None
        group, version = ("", "v1") if m.group("core") else (m.group("group"), m.group("version"))
        parts = [p for p in m.group("rest").split("/") if p]
        fake = self.server.fake
        ns = ""
        if len(parts) >= 3 and parts[0] == "namespaces":
            rt = fake.type_for(group, version, parts[2])
            if rt is not None and rt.namespaced:
                ns = parts[1]
                parts = parts[2:]
        if not parts:
            return None
        rt = fake.type_for(group, version, parts[0])
        if rt is None:
            return None
        name = parts[1] if len(parts) > 1 else ""
        sub = parts[2] if len(parts) > 2 else ""
        if len(parts) > 3 or (sub and sub != "status"):
            return None
        if sub == "status" and not rt.status:
            return None
        return rt, ns, name, sub

    def _verb(self, method: str, name: str, params: dict) -> str:
        if method == "GET":
            if _bool(params.get("watch")):
                return "watch"
            return "get" if name else "list"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]

    def _verb_call(self, verb: str, rt: ResourceType, ns: str, name: str, sub: str, params: dict,
                   body: Any) -> tuple[int, dict, list[str]]:
        fake = self.server.fake
        strict = params.get("fieldValidation") == "Strict"
        dry = params.get("dryRun") == "All"
        if rt.namespaced and not ns and verb not in ("list",):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        with fake.lock:
            if verb == "get":
                obj = fake._current(rt, ns, name)
                if obj is None:
                    raise _not_found(rt, name)
                return 200, obj, []
            if verb == "list":
                return 200, self._list(rt, ns, params), []
            if verb == "create":
                if name:
                    raise ApiError(405, "MethodNotAllowed", "create takes the collection's URL")
                obj, warnings = fake.do_create(rt, ns, body, strict=strict, dry_run=dry)
                return 201, obj, warnings
            if verb == "update":
                obj, warnings = fake.do_update(rt, ns, name, body, sub, strict=strict, dry_run=dry)
                return 200, obj, warnings
            if verb == "patch":
                obj, warnings = fake.do_patch(rt, ns, name, body, self.headers.get("Content-Type") or "", sub,
                                              strict=strict, dry_run=dry)
                return 200, obj, warnings
            if verb == "delete":
                pre = body.get("preconditions") if isinstance(body, dict) else None
                return 200, fake.do_delete(rt, ns, name, pre), []
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported")

    # ------------------------------------------------------------ list

    def _list(self, rt: ResourceType, ns: str, params: dict) -> dict:
        fake = self.server.fake
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        limit = int(params.get("limit") or 0)
        start = None
        at = fake.rv
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"]))
                at, start = int(token["rv"]), tuple(token["start"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "BadRequest", "continue key is not valid") from None
            if at <= fake.compacted:
                raise ApiError(410, "Expired", "The provided continue parameter is too old to display a consistent "
                               "list result. You can start a new list without the continue parameter.")
        else:
            rv = params.get("resourceVersion")
            if rv and rv != "0" and params.get("resourceVersionMatch") == "Exact":
                at = int(rv)
                if at <= fake.compacted:
                    raise ApiError(410, "Expired", f"too old resource version: {at} ({fake.compacted + 1})")
        items = []
        more = None
        for obj in fake.list_at(rt, ns or None, at, start):  # type: ignore[arg-type]
            if labels and not labels_match(labels, obj["metadata"].get("labels") or {}):
                continue
            if fields and not fields_match(fields, obj):
                continue
            if limit and len(items) == limit:
                last = items[-1]["metadata"]
                more = base64.urlsafe_b64encode(json.dumps(
                    {"rv": at, "start": [last.get("namespace", ""), last["name"]]}).encode()).decode()
                break
            items.append(obj)
        meta: dict[str, Any] = {"resourceVersion": str(at)}
        if more:
            meta["continue"] = more
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta, "items": items}

    # ------------------------------------------------------------ watch

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, rt: ResourceType, ns: str, params: dict) -> None:
        fake = self.server.fake
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        bookmarks = _bool(params.get("allowWatchBookmarks"))
        timeout = float(params.get("timeoutSeconds") or fake.default_watch_timeout)
        deadline = time.monotonic() + timeout
        rv_param = params.get("resourceVersion") or ""

        def matches(obj: dict | None) -> bool:
            if obj is None:
                return False
            if ns and obj["metadata"].get("namespace") != ns:
                return False
            if labels and not labels_match(labels, obj["metadata"].get("labels") or {}):
                return False
            return not fields or fields_match(fields, obj)

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        watcher = _Watcher()
        sent = 0
        initial: list[dict] = []
        with fake.lock:
            fake._watchers.add(watcher)
            fake.stats.watches_open += 1
            fake.stats.watches_started += 1
            fake.changed.notify_all()  # for whoever waits for watches to be open
            expire = fake.faults.expire_watches > 0
            if expire:
                fake.faults.expire_watches -= 1
                fake.changed.notify_all()  # for tests waiting on the fault to be used up
            if rv_param in ("", "0"):
                cursor = fake.rv
                initial = [o for o in fake.list_at(rt, ns or None, cursor) if matches(o)]
            else:
                try:
                    cursor = int(rv_param)
                except ValueError:
                    cursor = -1
                if cursor < 0:
                    expire = True
                elif cursor < fake.compacted:
                    expire = True
        try:
            if expire:
                gone = {"type": "ERROR", "object": ApiError(
                    410, "Expired", f"too old resource version: {rv_param} ({fake.compacted + 1})").status()}
                self._chunk(json.dumps(gone, separators=(",", ":")).encode() + b"\n")
                return
            for obj in initial:
                if not self._send_event(watcher, {"type": "ADDED", "object": obj}):
                    return
            next_bookmark = time.monotonic() + fake.bookmark_interval
            while True:
                with fake.lock:
                    while True:
                        if watcher.dropped or fake._server is None:
                            self.close_connection = True
                            return
                        i = bisect.bisect_right(fake._history_rvs, cursor)
                        if i < len(fake._history) or time.monotonic() >= min(deadline, next_bookmark if bookmarks
                                                                              else deadline):
                            break
                        wait = min(deadline, next_bookmark if bookmarks else deadline) - time.monotonic()
                        fake.changed.wait(max(0.0, wait))
                    if cursor < fake.compacted and i == 0 and fake._history_rvs and fake._history_rvs[0] > cursor + 1:
                        pass  # compacted under a running watch: what is still there is sent
                    events = fake._history[i:]
                    cursor = fake.rv
                out = []
                for ev in events:
                    if ev.rt.gvr != rt.gvr:
                        continue
                    now_in, was_in = matches(ev.obj if ev.type != "DELETED" else None), matches(ev.prev)
                    if ev.type == "DELETED":
                        if was_in:
                            out.append({"type": "DELETED", "object": ev.obj})
                    elif now_in and not was_in:
                        out.append({"type": "ADDED", "object": ev.obj})
                    elif now_in:
                        out.append({"type": "MODIFIED", "object": ev.obj})
                    elif was_in:  # left the selector: a deletion to this watcher
                        out.append({"type": "DELETED", "object": ev.obj})
                for e in out:
                    if not self._send_event(watcher, e):
                        return
                    sent += 1
                now = time.monotonic()
                if now >= deadline:
                    self._chunk(b"")
                    return
                if bookmarks and now >= next_bookmark:
                    mark = {"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                                           "metadata": {"resourceVersion": str(cursor)}}}
                    if not self._send_event(watcher, mark):
                        return
                    next_bookmark = now + fake.bookmark_interval
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            with fake.lock:
                fake._watchers.discard(watcher)
                fake.stats.watches_open -= 1

    def _send_event(self, watcher: _Watcher, event: dict) -> bool:
        fake = self.server.fake
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        with fake.lock:
            cut = fake.faults.cut_watches > 0 and event["type"] != "BOOKMARK"
            if cut:
                fake.faults.cut_watches -= 1
            fake.stats.watch_bytes += len(data)
            fake.stats.bytes_sent += len(data)
            fake.stats.watch_events += 1
        if cut:  # half a line, then the connection goes (no terminating chunk)
            self._chunk(data[: len(data) // 2])
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        self._chunk(data)
        return True


# ---------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="the fake Kubernetes API server of podnet's tests and lab")
    p.add_argument("--dir", required=True, help="writes kubeconfig, ca.crt and token here")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bookmark-interval", type=float, default=5.0)
    p.add_argument("--service-cidr", default=SERVICE_CIDR, help="ClusterIPs are allocated here")
    args = p.parse_args(argv)
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    api = FakeApiServer(port=args.port, workdir=args.dir, bookmark_interval=args.bookmark_interval,
                        service_cidr=args.service_cidr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    api.start()
    with open(os.path.join(args.dir, "token.tmp"), "w") as f:
        f.write(api.token)
    os.chmod(os.path.join(args.dir, "token.tmp"), 0o600)
    os.replace(os.path.join(args.dir, "token.tmp"), os.path.join(args.dir, "token"))
    api.kubeconfig(os.path.join(args.dir, "kubeconfig"))
    with open(os.path.join(args.dir, "url.tmp"), "w") as f:
        f.write(api.url + "\n")
    os.replace(os.path.join(args.dir, "url.tmp"), os.path.join(args.dir, "url"))  # written last: ready
    stop.wait()
    api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
