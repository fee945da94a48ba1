"""The agent side of the CNI plugin: validates a request, does the IPAM work and drives the
pod dataplane. `CNIHandler.handle(env, stdin)` returns (code, stdout text) and never raises.

Attachments. Each (network name, CNI_CONTAINERID, CNI_IFNAME) is one attachment, with the
IPAM handle `<network>.<containerID>.<ifname>`. ADD writes its record
/podnet-alloc/attachments/<node>/<handle> before it allocates, so GC and DEL can always find what
an interrupted ADD left; DEL and GC release the address before they delete the record.

Error codes (CNI spec 1.1 well-known codes, then this plugin's own):

    1    cniVersion missing or unsupported; CHECK below 0.4.0; STATUS or GC below 1.1.0
    4    a CNI_* variable is missing or invalid: CNI_COMMAND, CNI_CONTAINERID, CNI_IFNAME,
         CNI_NETNS, CNI_PATH, CNI_ARGS (libcni reports bad container IDs and interface
         names with this code too)
    5    (plugin only) stdin could not be read
    6    stdin is not a JSON object; a malformed request from the plugin
    7    invalid network configuration: name, type, prevResult (CHECK),
         cni.dev/valid-attachments (GC), agentSocket / agentTimeout (plugin)
    8    CNI_NETNS is not a usable network namespace on ADD/CHECK: missing, not a network
         namespace, or the node's own (libcni's ErrInvalidNetNS)
    11   try again later: the agent is unreachable (plugin), the store is unavailable, or IPAM
         lost too many concurrent updates
    50   STATUS: the node cannot take ADDs (not programmed yet, store unreachable, every pool
         serving the node exhausted, or a pod MTU a veth refuses)
    51   STATUS: and pods already running may have limited connectivity
    100  IPAM has no address for this pod (the message names the pools, the node and why)
    101  IPAM cannot serve the request: no usable pool, or the requested address is unavailable
    102  the pod dataplane failed to set up or remove the pod's interfaces
    103  CHECK found problems (listed in the message)
    999  internal error
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from podnet.cni.errors import CNIError
from podnet.model.names import is_dns1123_label, is_dns1123_subdomain
from podnet.store.base import AlreadyExists, Conflict, KeyValueStore, NotFound, StoreError, StoreUnavailable
from podnet.store.layout import ALLOC

if TYPE_CHECKING:  # the agent hands in the real one; tests may hand in a stand-in
    from podnet.dataplane.pods import PodInterfaces

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
GATEWAY = "169.254.1.1"
ATTACHMENTS_PREFIX = ALLOC + "attachments/"  # per node; no other node's agent reads them
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
VALID_ATTACHMENTS_OLD = "cni.dev/attachments"  # the name in the first 1.1.0 text; libcni sends both

# Well-known codes.
E_INCOMPATIBLE_VERSION = 1
E_INVALID_ENV = 4
E_IO = 5
E_DECODING = 6
E_INVALID_CONFIG = 7
E_INVALID_NETNS = 8
E_TRY_AGAIN = 11
E_NOT_READY = 50
E_NOT_READY_LIMITED = 51
# podnet's own.
E_IPAM_EXHAUSTED = 100
E_IPAM = 101
E_DATAPLANE = 102
E_CHECK_FAILED = 103
E_INTERNAL = 999

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}
# libcni's pattern for container IDs and network names.
ID_PATTERN = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
# Longer IDs would not fit the kernel's 255-byte interface alias the dataplane keeps them in.
MAX_ID_LENGTH = 200
MAX_IFNAME_LENGTH = 15
KNOWN_ARGS = ("IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID", "K8S_POD_INFRA_CONTAINER_ID")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type


def error_output(code: int, msg: str, details: str = "", version: str = LATEST) -> str:
    """The CNI error document for stdout."""
    return json.dumps({"cniVersion": version, "code": code, "msg": msg, "details": details})


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def attachment_handle(network: str, container_id: str, ifname: str) -> str:
    return f"{network}.{container_id}.{ifname}"


def node_attachments_prefix(node: str) -> str:
    return f"{ATTACHMENTS_PREFIX}{node}/"


def attachment_key(node: str, handle: str) -> str:
    return f"{ATTACHMENTS_PREFIX}{node}/{handle}"


class Dataplane(Protocol):
    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces: ...
    def delete(self, container_id: str, ifname: str, netns: str | None) -> None: ...
    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]: ...
    def attachments(self) -> list[tuple[str, str]]: ...


# ---------------------------------------------------------------- network namespaces


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _node_namespaces() -> list[os.stat_result]:
    """The agent's own network namespace and init's: a pod's namespace is neither."""
    out = []
    for path in ("/proc/self/ns/net", "/proc/1/ns/net"):
        with contextlib.suppress(OSError):
            out.append(os.stat(path))
    return out


def netns_problem(path: str) -> str | None:
    """Why path is not a pod's network namespace, or None if it is one."""
    if not path.startswith("/"):
        return f"CNI_NETNS {path!r} is not an absolute path"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"network namespace {path} does not exist"
    except OSError as e:
        return f"cannot open network namespace {path}: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            return f"{path} is not a network namespace"
        if nstype != CLONE_NEWNET:
            return f"{path} is a namespace, but not a network namespace"
        if any(_same_file(st, own) for own in _node_namespaces()):
            return f"{path} is the node's own network namespace, not a pod's"
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------- requests


@dataclass
class Request:
    command: str
    version: str
    config: dict[str, Any]
    network: str = ""
    container_id: str = ""
    ifname: str = ""
    netns: str = ""
    args: dict[str, str] | None = None

    @property
    def handle(self) -> str:
        return attachment_handle(self.network, self.container_id, self.ifname)

    @property
    def namespace(self) -> str | None:
        return (self.args or {}).get("K8S_POD_NAMESPACE") or None

    @property
    def pod(self) -> str | None:
        return (self.args or {}).get("K8S_POD_NAME") or None


def _truthy(value: str) -> bool | None:
    low = value.lower()
    if low in ("1", "true"):
        return True
    if low in ("0", "false"):
        return False
    return None


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS as libcni reads it: `K=V;K=V`, unknown keys refused unless IgnoreUnknown is true.

    Raises CNIError(4) naming the fault. Empty segments (a trailing ';') are skipped.
    """
    pairs: dict[str, str] = {}
    for part in text.split(";"):
        if not part:
            continue
        kv = part.split("=")
        if len(kv) != 2 or not kv[0]:
            raise CNIError(E_INVALID_ENV, f"CNI_ARGS: invalid pair {part!r}", "expected KEY=VALUE pairs separated by ';'")
        pairs[kv[0]] = kv[1]
    ignore = _truthy(pairs.get("IgnoreUnknown", "false"))
    if ignore is None:
        raise CNIError(E_INVALID_ENV, f"CNI_ARGS: IgnoreUnknown={pairs['IgnoreUnknown']!r} is not a boolean",
                       "expected 1, 0, true or false")
    if not ignore:
        unknown = [k for k in pairs if k not in KNOWN_ARGS]
        if unknown:
            raise CNIError(E_INVALID_ENV, f"CNI_ARGS: unknown argument {unknown[0]!r}",
                           f"known: {', '.join(KNOWN_ARGS)}; add IgnoreUnknown=1 to pass others")
    ns = pairs.get("K8S_POD_NAMESPACE")
    if ns and not is_dns1123_label(ns):
        raise CNIError(E_INVALID_ENV, f"CNI_ARGS: K8S_POD_NAMESPACE {ns!r} is not a namespace name",
                       "expected a DNS label: lowercase letters, digits and '-', at most 63")
    name = pairs.get("K8S_POD_NAME")
    if name and not is_dns1123_subdomain(name):
        raise CNIError(E_INVALID_ENV, f"CNI_ARGS: K8S_POD_NAME {name!r} is not a pod name",
                       "expected lowercase letters, digits, '-' and '.', at most 253")
    return pairs


def check_container_id(cid: str) -> None:
    if not ID_PATTERN.fullmatch(cid) or len(cid) > MAX_ID_LENGTH:
        raise CNIError(E_INVALID_ENV, f"CNI_CONTAINERID {cid[:80]!r} is invalid",
                       "expected a letter or digit, then letters, digits, '_', '.' or '-', "
                       f"at most {MAX_ID_LENGTH} characters")


def check_ifname(name: str) -> None:
    problem = None
    if len(name.encode("utf-8", "surrogateescape")) > MAX_IFNAME_LENGTH:
        problem = f"is longer than {MAX_IFNAME_LENGTH} bytes"
    elif name in (".", ".."):
        problem = "may not be '.' or '..'"
    elif any(c in "/:" or c.isspace() or c == "\x00" for c in name):
        problem = "may not contain '/', ':' or whitespace"
    if problem:
        raise CNIError(E_INVALID_ENV, f"CNI_IFNAME {name[:40]!r} {problem}")


def check_network_name(conf: dict[str, Any]) -> str:
    name = conf.get("name")
    if name is None or name == "":
        raise CNIError(E_INVALID_CONFIG, "invalid network configuration: field name is missing")
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name) or len(name) > MAX_ID_LENGTH:
        raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: field name {str(name)[:80]!r} is not a "
                       "valid network name", "expected a letter or digit, then letters, digits, '_', '.' or '-'")
    kind = conf.get("type")
    if not isinstance(kind, str) or not kind:
        raise CNIError(E_INVALID_CONFIG, "invalid network configuration: field type is missing or not a string")
    return name


def check_version(conf: dict[str, Any]) -> str:
    version = conf.get("cniVersion")
    if version is None:
        raise CNIError(E_INCOMPATIBLE_VERSION, "incompatible CNI versions: the network configuration has no cniVersion",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(E_INCOMPATIBLE_VERSION, f"incompatible CNI versions: cniVersion {str(version)[:40]!r} "
                       "is not supported", f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def _requested_version(stdin: str) -> str:
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError):
        return LATEST
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST


# ---------------------------------------------------------------- results


def add_result(version: str, ifs: PodInterfaces, address: str, prefix_len: int, netns: str) -> dict[str, Any]:
    """The ADD result in the shape the requested spec version defines.

    0.3.x/0.4.0 carry ips[].version; 1.0.0 dropped it; 1.1.0 added interfaces[].mtu.
    """
    v = version_tuple(version)
    ip = ipaddress.ip_address(address)
    gateway = ifs.gateway or GATEWAY
    host: dict[str, Any] = {"name": ifs.host_ifname, "mac": ifs.host_mac}
    pod: dict[str, Any] = {"name": ifs.pod_ifname, "mac": ifs.pod_mac, "sandbox": netns}
    if v >= (1, 1, 0):
        pod["mtu"] = ifs.mtu
    ip_entry: dict[str, Any] = {"address": f"{ip}/{prefix_len}", "gateway": gateway, "interface": 1}
    if v < (1, 0, 0):
        ip_entry = {"version": str(ip.version), **ip_entry}
    default = "0.0.0.0/0" if ip.version == 4 else "::/0"
    return {
        "cniVersion": version,
        "interfaces": [host, pod],
        "ips": [ip_entry],
        "routes": [{"dst": default, "gw": gateway}],
        "dns": {},
    }


def prev_result_address(prev: Any, ifname: str) -> str:
    """The pod address a prevResult records for ifname (the first one when it names no interface)."""
    if not isinstance(prev, dict):
        raise CNIError(E_INVALID_CONFIG, "invalid network configuration: CHECK needs prevResult, the result of "
                       "the ADD, as a JSON object")
    ips = prev.get("ips")
    interfaces = prev.get("interfaces") if isinstance(prev.get("interfaces"), list) else []
    if not isinstance(ips, list):
        raise CNIError(E_INVALID_CONFIG, "invalid network configuration: prevResult has no ips list")
    candidates = []
    for entry in ips:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            continue
        idx = entry.get("interface")
        if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(interfaces):
            iface = interfaces[idx]
            if not isinstance(iface, dict) or iface.get("name") != ifname or not iface.get("sandbox"):
                continue
        try:
            candidates.append(str(ipaddress.ip_interface(entry["address"]).ip))
        except ValueError:
            raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: prevResult address "
                           f"{entry['address'][:60]!r} is not an address in CIDR form") from None
    if not candidates:
        raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: prevResult has no address for {ifname}")
    return candidates[0]


# ---------------------------------------------------------------- store sessions


class _Sessions:
    """A store connection and an IPAM per concurrent request.

    A KeyValueStore (and an IPAM) is for one thread: each request borrows an idle pair, or
    opens one more on the same store URL. A store without a URL is shared under a lock.
    """

    def __init__(self, kv: KeyValueStore, ipam_factory: Callable[[KeyValueStore], Any]):
        self._kv = kv
        self._factory = ipam_factory
        self._idle: list[tuple[KeyValueStore, Any]] = [(kv, ipam_factory(kv))]
        self._opened: list[KeyValueStore] = []
        self._lock = threading.Lock()
        self._shared = threading.Lock()
        self._url = getattr(kv, "url", None)

    @contextlib.contextmanager
    def session(self) -> Iterator[tuple[KeyValueStore, Any]]:
        if not self._url:
            with self._shared:
                yield self._idle[0]
            return
        with self._lock:
            pair = self._idle.pop() if self._idle else None
        if pair is None:
            kv = self._open()
            pair = (kv, self._factory(kv))
            with self._lock:
                self._opened.append(kv)
        try:
            yield pair
        finally:
            with self._lock:
                self._idle.append(pair)

    def _open(self) -> KeyValueStore:
        """One more connection to the store the agent started with, never to a new file at its
        path (the store was deleted or replaced): ADDs would then split between two stores."""
        from podnet.store import open_store

        try:
            kv = open_store(self._url, create=False)
        except StoreError as e:
            raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
        if getattr(kv, "file_id", None) != getattr(self._kv, "file_id", None):
            kv.close()
            raise CNIError(E_TRY_AGAIN, f"store unavailable: store {self._url} was replaced after the agent "
                           "opened it: refusing to use either copy (restart the agent to use the new one)")
        return kv

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
            self._idle = [p for p in self._idle if p[0] is self._kv]
        for kv in opened:
            with contextlib.suppress(Exception):
                kv.close()


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


class CNIHandler:
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
        self._sessions = _Sessions(kv, ipam_factory)
        self._gc_lock = _GCLock()
        self._stripes = [threading.Lock() for _ in range(64)]

    def close(self) -> None:
        """Close the extra store connections opened for concurrent requests."""
        self._sessions.close()

    # ------------------------------------------------------------ entry point

    def handle(self, env: dict[str, str], stdin: str) -> tuple[int, str]:
        started = time.monotonic()
        version = LATEST
        command = env.get("CNI_COMMAND", "") if isinstance(env, dict) else ""
        handle = ""
        try:
            req = self._parse(env, stdin)
            version = req.version
            handle = req.handle if req.container_id else ""
            code, output = self._dispatch(req)
        except CNIError as e:
            code, output = e.code, error_output(e.code, e.msg, e.details, e.version or version)
        except Exception as e:  # never let a request take the agent down, nor go unanswered
            log.exception("CNI %s %s: internal error", command, handle)
            code = E_INTERNAL
            output = error_output(E_INTERNAL, f"podnet agent internal error: {type(e).__name__}: {e}", "", version)
        elapsed = (time.monotonic() - started) * 1000
        if code:
            log.info("CNI %s %s: code %d in %.1f ms: %s", command, handle, code, elapsed, output)
        else:
            log.info("CNI %s %s: ok in %.1f ms", command, handle, elapsed)
        return code, output

    def _parse(self, env: Any, stdin: Any) -> Request:
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise CNIError(E_DECODING, "malformed request: env must map variable names to strings")
        if not isinstance(stdin, str):
            raise CNIError(E_DECODING, "malformed request: stdin must be text")
        command = env.get("CNI_COMMAND", "")
        if not command:
            raise CNIError(E_INVALID_ENV, "required environment variable CNI_COMMAND is missing",
                           f"expected one of {', '.join(COMMANDS)}")
        if command not in COMMANDS:
            raise CNIError(E_INVALID_ENV, f"unknown CNI_COMMAND {command[:40]!r}", f"expected one of {', '.join(COMMANDS)}")
        missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
        if missing:
            noun = "variable" if len(missing) == 1 else "variables"
            raise CNIError(E_INVALID_ENV, f"required environment {noun} {', '.join(missing)} missing for {command}")
        if command == "VERSION":
            return Request(command, _requested_version(stdin), {})
        try:
            conf = json.loads(stdin)
        except ValueError as e:
            raise CNIError(E_DECODING, f"error decoding the network configuration: {e}") from None
        except RecursionError:
            raise CNIError(E_DECODING, "error decoding the network configuration: JSON nested too deeply") from None
        if not isinstance(conf, dict):
            raise CNIError(E_DECODING, "error decoding the network configuration: expected a JSON object")
        req = Request(command, check_version(conf), conf)
        try:
            req.network = check_network_name(conf)
            if command in ("ADD", "DEL", "CHECK"):
                req.container_id = env["CNI_CONTAINERID"]
                check_container_id(req.container_id)
                req.ifname = env["CNI_IFNAME"]
                check_ifname(req.ifname)
                req.netns = env.get("CNI_NETNS", "")
                req.args = parse_cni_args(env.get("CNI_ARGS", ""))
            minimum = {"CHECK": (0, 4, 0), "STATUS": (1, 1, 0), "GC": (1, 1, 0)}.get(command)
            if minimum and version_tuple(req.version) < minimum:
                raise CNIError(E_INCOMPATIBLE_VERSION, f"config version {req.version} does not allow {command}",
                               f"{command} needs cniVersion {'.'.join(map(str, minimum))} or later")
        except CNIError as e:
            e.version = req.version
            raise
        return req

    def _dispatch(self, req: Request) -> tuple[int, str]:
        if req.command == "VERSION":
            return 0, json.dumps({"cniVersion": req.version, "supportedVersions": list(SUPPORTED_VERSIONS)})
        if req.command == "STATUS":
            return self._status()
        if req.command == "GC":
            with self._gc_lock.exclusive():
                return self._gc(req)
        stripe = self._stripes[zlib.crc32(req.handle.encode("utf-8", "surrogateescape")) % len(self._stripes)]
        with self._gc_lock.shared(), stripe:
            if req.command == "ADD":
                return self._add(req)
            if req.command == "DEL":
                return self._del(req)
            return self._check(req)

    # ------------------------------------------------------------ ADD

    def _add(self, req: Request) -> tuple[int, str]:
        problem = self.verify_netns(req.netns)
        if problem:
            raise CNIError(E_INVALID_NETNS, problem)
        key = attachment_key(self.node, req.handle)
        with self._sessions.session() as (kv, ipam):
            existing = _store(lambda: kv.get(key))
            if existing is not None:
                # An earlier ADD of this attachment never finished, or its DEL never came: start clean.
                log.warning("CNI ADD %s: an earlier attachment record exists; removing what it left", req.handle)
                old_netns = existing.value.get("netns") or None
                if old_netns is not None and self.verify_netns(old_netns) is not None:
                    old_netns = None
                self._teardown(kv, ipam, req.container_id, req.ifname, old_netns, req.handle, key)
            record = {
                "network": req.network,
                "containerID": req.container_id,
                "ifname": req.ifname,
                "netns": req.netns,
                "namespace": req.namespace,
                "pod": req.pod,
                "podUID": (req.args or {}).get("K8S_POD_UID"),
                "handle": req.handle,
                "created": time.time(),
            }
            _store(lambda: kv.put(key, record))
            try:
                alloc = self._allocate(ipam, req)
                ifs = self.dataplane.add(req.container_id, req.ifname, req.netns, alloc.address)
                result = add_result(req.version, ifs, alloc.address, alloc.prefix_len, req.netns)
            except BaseException as e:
                undo_errors = self._undo(kv, ipam, req, key)
                if isinstance(e, CNIError):
                    if undo_errors:
                        e.details = "; ".join(filter(None, [e.details, *undo_errors]))
                    raise
                if not isinstance(e, Exception):
                    raise
                log.exception("CNI ADD %s: pod dataplane failed", req.handle)
                raise CNIError(E_DATAPLANE, f"setting up the pod interface {req.ifname} in {req.netns} failed: {e}",
                               "; ".join(undo_errors)) from None
        return 0, json.dumps(result)

    def _allocate(self, ipam: Any, req: Request) -> Any:
        from podnet.ipam import IPAMError, IPAMExhausted, TooManyConflicts

        try:
            return ipam.allocate(req.handle, self.node, namespace=req.namespace, pod=req.pod)
        except IPAMExhausted as e:
            raise CNIError(E_IPAM_EXHAUSTED, str(e)) from None
        except TooManyConflicts as e:
            raise CNIError(E_TRY_AGAIN, f"IPAM: {e}") from None
        except StoreUnavailable as e:
            raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
        except IPAMError as e:
            raise CNIError(E_IPAM, f"IPAM: {e}") from None

    def _undo(self, kv: KeyValueStore, ipam: Any, req: Request, key: str) -> list[str]:
        """Remove everything a failed ADD made; the problems met doing so (normally none)."""
        problems = []
        try:
            self.dataplane.delete(req.container_id, req.ifname, req.netns)
        except Exception as e:
            problems.append(f"cleanup: removing the pod interface failed: {e}")
            return problems  # keep the address and the record: a DEL or GC finishes the job
        try:
            ipam.release(req.handle)
        except Exception as e:
            problems.append(f"cleanup: releasing the address failed: {e}")
            return problems
        try:
            kv.delete(key)
        except Exception as e:
            problems.append(f"cleanup: deleting the attachment record failed: {e}")
        for p in problems:
            log.error("CNI ADD %s: %s", req.handle, p)
        return problems

    # ------------------------------------------------------------ DEL

    def _del(self, req: Request) -> tuple[int, str]:
        key = attachment_key(self.node, req.handle)
        netns: str | None = req.netns or None
        if netns is not None and self.verify_netns(netns) is not None:
            # Gone, never a namespace, or the node's own: leave it alone. The host side of the
            # pair (named after the attachment, never a node interface) is all there is to remove.
            netns = None
        with self._sessions.session() as (kv, ipam):
            record = _store(lambda: kv.get(key))
            if netns is None and record is not None and record.value.get("netns"):
                recorded = record.value["netns"]
                if self.verify_netns(recorded) is None:
                    netns = recorded
            self._teardown(kv, ipam, req.container_id, req.ifname, netns, req.handle, key)
        return 0, ""

    def _teardown(self, kv: KeyValueStore, ipam: Any, container_id: str, ifname: str, netns: str | None,
                  handle: str, key: str) -> None:
        """Interfaces, then the address, then the record: a failure leaves the rest findable."""
        from podnet.ipam import TooManyConflicts

        try:
            self.dataplane.delete(container_id, ifname, netns)
        except Exception as e:
            log.exception("CNI teardown %s: pod dataplane failed", handle)
            raise CNIError(E_DATAPLANE, f"removing the pod interface {ifname} of {container_id} failed: {e}") from None
        try:
            ipam.release(handle)
        except (TooManyConflicts, StoreUnavailable) as e:
            raise CNIError(E_TRY_AGAIN, f"releasing the address of {handle}: {e}") from None
        _store(lambda: kv.delete(key))

    # ------------------------------------------------------------ CHECK

    def _check(self, req: Request) -> tuple[int, str]:
        address = prev_result_address(req.config.get("prevResult"), req.ifname)
        problem = self.verify_netns(req.netns)
        if problem:
            raise CNIError(E_INVALID_NETNS, problem)
        problems = []
        with self._sessions.session() as (kv, ipam):
            if _store(lambda: kv.get(attachment_key(self.node, req.handle))) is None:
                problems.append(f"no attachment record for {req.handle} on node {self.node}")
            held = _store(lambda: ipam.lookup(req.handle))
            if held is None:
                problems.append(f"IPAM holds no address for {req.handle}")
            elif held.address != address:
                problems.append(f"IPAM holds {held.address} for {req.handle}, not {address} as prevResult says")
        try:
            problems += self.dataplane.check(req.container_id, req.ifname, req.netns, address)
        except Exception as e:
            problems.append(f"cannot inspect the pod interfaces: {e}")
        if problems:
            raise CNIError(E_CHECK_FAILED, f"CHECK of {req.handle} found problems: {'; '.join(problems)}")
        return 0, ""

    # ------------------------------------------------------------ STATUS

    def _status(self) -> tuple[int, str]:
        try:
            verdict = self.ready()
        except Exception as e:
            raise CNIError(E_NOT_READY, f"podnet agent readiness check failed: {e}") from None
        if verdict is not None:
            code, message = verdict
            raise CNIError(code if code in (E_NOT_READY, E_NOT_READY_LIMITED) else E_NOT_READY, message)
        try:
            with self._sessions.session() as (kv, ipam):
                kv.revision()
                # Every ADD would fail: the pools that serve this node have no address left.
                capacity = getattr(ipam, "capacity_problem", None)
                exhausted = capacity(self.node) if capacity is not None else None
        except Exception as e:
            raise CNIError(E_NOT_READY, f"the podnet store is not reachable: {e}") from None
        if exhausted:
            raise CNIError(E_NOT_READY, f"node {self.node} cannot take new pods: {exhausted}")
        # Every ADD would fail in the pod dataplane: say why now (e.g. an MTU a veth refuses).
        check = getattr(self.dataplane, "setup_problem", None)
        problem = check() if check is not None else None
        if problem:
            raise CNIError(E_NOT_READY, f"node {self.node} cannot set up pods: {problem}")
        return 0, ""

    # ------------------------------------------------------------ GC

    def _gc(self, req: Request) -> tuple[int, str]:
        valid = self._valid_attachments(req.config)
        valid_handles = {attachment_handle(req.network, cid, ifname) for cid, ifname in valid}
        failures: list[str] = []
        removed = 0
        with self._sessions.session() as (kv, ipam):
            records, _ = _store(lambda: kv.list(node_attachments_prefix(self.node)))
            other_networks: set[tuple[str, str]] = set()
            for rec in records:
                value = rec.value
                cid, ifname = value.get("containerID", ""), value.get("ifname", "")
                if value.get("network") != req.network:
                    other_networks.add((cid, ifname))
                    continue
                if (cid, ifname) in valid:
                    continue
                try:
                    self._teardown(kv, ipam, cid, ifname, None, value.get("handle") or rec.key.rpartition("/")[2],
                                   rec.key)
                    removed += 1
                except CNIError as e:
                    failures.append(e.msg)
            # Interfaces without a record (the record was lost, or another agent made them).
            try:
                live = self.dataplane.attachments()
            except Exception as e:
                live = []
                failures.append(f"listing pod interfaces failed: {e}")
            for cid, ifname in live:
                if (cid, ifname) in valid or (cid, ifname) in other_networks:
                    continue
                try:
                    self.dataplane.delete(cid, ifname, None)
                    removed += 1
                except Exception as e:
                    failures.append(f"removing the pod interface {ifname} of {cid} failed: {e}")
            # Addresses without a record.
            for handle in self._node_handles(kv, ipam, req.network):
                if handle in valid_handles:
                    continue
                try:
                    ipam.release(handle)
                    removed += 1
                except Exception as e:
                    failures.append(f"releasing {handle} failed: {e}")
        log.info("CNI GC %s on %s: %d attachments kept, %d resources removed", req.network, self.node,
                 len(valid), removed)
        if failures:
            raise CNIError(E_DATAPLANE, f"GC removed what it could but {len(failures)} failed: {'; '.join(failures)}")
        return 0, ""

    @staticmethod
    def _valid_attachments(conf: dict[str, Any]) -> set[tuple[str, str]]:
        lists = [conf[k] for k in (VALID_ATTACHMENTS, VALID_ATTACHMENTS_OLD) if k in conf]
        if not lists:
            raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: GC needs {VALID_ATTACHMENTS}, the "
                           "attachments to keep")
        out: set[tuple[str, str]] = set()
        for items in lists:
            if not isinstance(items, list):
                raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: {VALID_ATTACHMENTS} must be a list")
            for item in items:
                if (not isinstance(item, dict) or not isinstance(item.get("containerID"), str)
                        or not isinstance(item.get("ifname"), str)):
                    raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: every {VALID_ATTACHMENTS} "
                                   "entry needs containerID and ifname strings")
                out.add((item["containerID"], item["ifname"]))
        return out

    def _node_handles(self, kv: KeyValueStore, ipam: Any, network: str) -> list[str]:
        """IPAM handles of this network whose addresses are allocated for this node."""
        from urllib.parse import quote

        from podnet.ipam import block as blk
        from podnet.ipam import keys

        prefix = keys.HANDLES + quote(f"{network}.", safe="")
        records, _ = _store(lambda: kv.list(prefix))
        out = []
        for rec in records:
            handle = keys.handle_of_key(rec.key)
            for cidr in rec.value.get("blocks", {}):
                block = _store(lambda c=cidr: kv.get(keys.block_key(c)))
                if block is None:
                    continue
                if any(attrs.get("handle_id") == handle and (attrs.get("secondary") or {}).get("node") == self.node
                       for _, attrs in blk.allocations(block.value)):
                    out.append(handle)
                    break
        return out


def _store(fn: Callable[[], Any]) -> Any:
    """A store call; an unavailable store, or one that changed under us, is a reason to try again later."""
    try:
        return fn()
    except StoreUnavailable as e:
        raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
    except (Conflict, AlreadyExists, NotFound) as e:
        raise CNIError(E_TRY_AGAIN, f"store changed concurrently: {e}") from None
