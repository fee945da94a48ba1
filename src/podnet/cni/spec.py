"""The CNI specification (1.1) as the agent serves it: versions, the error codes, the
CNI_* variables each command needs, the checks libcni makes on them, the parsing of a
request into a Request, and the documents a runtime reads back (results, errors).

Nothing here touches the store or the kernel: it is what any CNI plugin would need to
speak the protocol, kept apart from what podnet does for each command (commands.py).

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
    104  an additional network (k8s.v1.cni.cncf.io/networks) could not be set up or removed: a
         delegate plugin failed, or the pod already has the interface; the message names the
         pod, the network and the plugin (a bad annotation or a missing
         NetworkAttachmentDefinition is code 7)
    999  internal error
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from podnet.cni.attachments import attachment_handle
from podnet.cni.errors import CNIError
from podnet.model.names import is_dns1123_label, is_dns1123_subdomain

if TYPE_CHECKING:
    from podnet.dataplane.pods import PodInterfaces

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
GATEWAY = "169.254.1.1"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
VALID_ATTACHMENTS_OLD = "cni.dev/attachments"  # the name in the first 1.1.0 text; libcni sends both

# Well-known codes.
E_INCOMPATIBLE_VERSION = 1
E_CONTAINER_UNKNOWN = 3
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
E_NETWORK = 104
E_POD_GONE = E_CONTAINER_UNKNOWN  # the Pod was deleted while its ADD ran
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


def error_output(code: int, msg: str, details: str = "", version: str = LATEST) -> str:
    """The CNI error document for stdout."""
    return json.dumps({"cniVersion": version, "code": code, "msg": msg, "details": details})


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))



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
    cni_path: tuple[str, ...] = ()  # CNI_PATH: where the additional networks' plugins are

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


def parse_request(env: Any, stdin: Any) -> Request:
    """The request a runtime sent: CNI_* variables and the network configuration, checked.

    Raises CNIError naming the fault (the request's cniVersion set on it once known)."""
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
        req.cni_path = tuple(d for d in env.get("CNI_PATH", "").split(":") if d)
        minimum = {"CHECK": (0, 4, 0), "STATUS": (1, 1, 0), "GC": (1, 1, 0)}.get(command)
        if minimum and version_tuple(req.version) < minimum:
            raise CNIError(E_INCOMPATIBLE_VERSION, f"config version {req.version} does not allow {command}",
                           f"{command} needs cniVersion {'.'.join(map(str, minimum))} or later")
    except CNIError as e:
        e.version = req.version
        raise
    return req


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
