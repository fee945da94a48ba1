"""A CNI conflist executor that behaves as libcni does for containerd.

Generic: it runs any conflist (podnet-cni, the reference plugins, ...), and is
used by the lab, by CNI tests and by benchmarks.

* ADD runs every plugin in order; each gets the list's `name` and `cniVersion`,
  the previous plugin's result as `prevResult` and, in `runtimeConfig`, the
  capability arguments it declares in `capabilities` (portMappings, bandwidth,
  ...). The final result is cached on disk in libcni's layout
  (`<cache>/results/<network>-<containerID>-<ifname>`) and returned. If a plugin
  fails, DEL runs for the plugins already run (newest first) and the plugin's
  CNI error is raised as `CNIError` with its code and message.
* DEL runs the plugins in reverse with the cached result as `prevResult`, then
  drops the cache entry. CHECK runs them in order against the cached result.
* GC issues DEL for every cached attachment of this network that is not in the
  valid list, then (for cniVersion >= 1.1.0) GC on every plugin with
  `cni.dev/valid-attachments` (and `cni.dev/attachments`, the name the spec first
  used). STATUS (>= 1.1.0) asks every plugin whether it is ready.
* Plugins run with a given network namespace as their current one (the pod's
  host side is the node, which in the lab is itself a namespace): `nsenter --net`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podnet.cni.errors import CNIError

CACHE_KIND = "cniCacheV1"
DEFAULT_TIMEOUT = 60.0
# Codes from the CNI spec for errors this executor raises itself.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_CONFIG = 7
ERR_INTERNAL = 999


@dataclass
class RuntimeConf:
    """What a runtime knows about one attachment (libcni's RuntimeConf)."""

    container_id: str
    netns: str  # path, e.g. /run/netns/NAME
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)  # CNI_ARGS, in order
    capability_args: dict[str, Any] = field(default_factory=dict)


def k8s_args(namespace: str, name: str, infra_container_id: str, uid: str) -> list[tuple[str, str]]:
    """CNI_ARGS as the kubelet/containerd pass them."""
    return [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", namespace), ("K8S_POD_NAME", name),
            ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id), ("K8S_POD_UID", uid)]


def pod_capability_args(pod: Any) -> dict[str, Any]:
    """Capability arguments containerd derives from a Pod: hostPorts and bandwidth annotations."""
    from podnet.lab.spec import parse_quantity  # a Kubernetes quantity parser; no cycle at import time

    caps: dict[str, Any] = {}
    mappings = []
    for c in pod.spec.containers:
        for p in c.ports:
            if p.host_port:
                m = {"hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol.lower()}
                if p.host_ip:
                    m["hostIP"] = p.host_ip
                mappings.append(m)
    if mappings:
        caps["portMappings"] = mappings
    ann = pod.metadata.annotations
    bw: dict[str, int] = {}
    if "kubernetes.io/ingress-bandwidth" in ann:
        # As the kubelet: rate in bits per second, burst capped at MaxInt32 bits ("no limit").
        bw["ingressRate"] = parse_quantity(ann["kubernetes.io/ingress-bandwidth"])
        bw["ingressBurst"] = 2**31 - 1
    if "kubernetes.io/egress-bandwidth" in ann:
        bw["egressRate"] = parse_quantity(ann["kubernetes.io/egress-bandwidth"])
        bw["egressBurst"] = 2**31 - 1
    if bw:
        caps["bandwidth"] = bw
    return caps


def version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        raise CNIError(ERR_INVALID_CONFIG, f"invalid cniVersion {v!r}", plugin="-", command="parse") from None


def netns_path(ns: str) -> str:
    return ns if "/" in ns else f"/run/netns/{ns}"


class CniRuntime:
    def __init__(
        self,
        conflist: dict[str, Any] | str | bytes,
        *,
        cni_path: Sequence[str],
        cache_dir: str | os.PathLike[str],
        host_netns: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        if isinstance(conflist, (str, bytes)):
            raw = conflist.encode() if isinstance(conflist, str) else conflist
            conflist = json.loads(raw)
        else:
            raw = json.dumps(conflist).encode()
        assert isinstance(conflist, dict)
        self.raw = raw
        self.conflist = conflist
        self.name = conflist.get("name")
        self.cni_version = conflist.get("cniVersion", "0.4.0")
        self.plugins: list[dict[str, Any]] = conflist.get("plugins") or []
        if not self.name or not isinstance(self.name, str):
            raise CNIError(ERR_INVALID_CONFIG, "conflist has no name", plugin="-", command="parse")
        if not self.plugins:
            raise CNIError(ERR_INVALID_CONFIG, f"conflist {self.name} has no plugins",
                           plugin="-", command="parse")
        for p in self.plugins:
            if not isinstance(p, dict) or not p.get("type"):
                raise CNIError(ERR_INVALID_CONFIG, f"conflist {self.name}: a plugin has no type",
                               plugin="-", command="parse")
        self.cni_path = [str(p) for p in cni_path]
        self.cache_dir = Path(cache_dir)
        self.host_netns = netns_path(host_netns) if host_netns else None
        self.timeout = timeout

    # ------------------------------------------------------------------ commands

    def add(self, rt: RuntimeConf) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        for plugin in self.plugins:
            done.append(plugin)
            try:
                out = self.invoke(self._conf(plugin, prev, rt), "ADD", rt)
            except CNIError:
                self._undo(done, prev, rt)
                raise
            if not out:
                self._undo(done, prev, rt)
                raise CNIError(ERR_INTERNAL, "plugin returned no result",
                               plugin=plugin["type"], command="ADD")
            prev = out
        assert prev is not None
        self._write_cache(rt, prev)
        return prev

    def delete(self, rt: RuntimeConf) -> None:
        cached = self.cached(rt)
        prev = cached.get("result") if cached else None
        errors: list[CNIError] = []
        for plugin in reversed(self.plugins):
            try:
                self.invoke(self._conf(plugin, prev if self._has_prev_result() else None, rt), "DEL", rt)
            except CNIError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        self._cache_file(rt).unlink(missing_ok=True)

    def check(self, rt: RuntimeConf) -> None:
        if version_tuple(self.cni_version) < (0, 4, 0):
            raise CNIError(ERR_INCOMPATIBLE_VERSION,
                           f"configuration version {self.cni_version} does not support CHECK",
                           plugin="-", command="CHECK")
        cached = self.cached(rt)
        if not cached or not cached.get("result"):
            raise CNIError(ERR_INTERNAL,
                           f"no cached result for {self.name}/{rt.container_id}/{rt.ifname}: was ADD run?",
                           plugin="-", command="CHECK")
        for plugin in self.plugins:
            self.invoke(self._conf(plugin, cached["result"], rt), "CHECK", rt)

    def gc(self, valid_attachments: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """DEL every cached attachment not listed as (containerID, ifname); then plugin GC.

        Returns the attachments that were deleted.
        """
        valid = {(c, i) for c, i in valid_attachments}
        removed: list[tuple[str, str]] = []
        errors: list[CNIError] = []
        for entry in self.cached_attachments():
            key = (entry.get("containerId", ""), entry.get("ifName", ""))
            if key in valid:
                continue
            rt = RuntimeConf(container_id=key[0], ifname=key[1], netns=entry.get("netns", ""),
                             args=[tuple(a) for a in entry.get("cniArgs") or []],  # type: ignore[misc]
                             capability_args=entry.get("capabilityArgs") or {})
            try:
                self.delete(rt)
                removed.append(key)
            except CNIError as e:
                errors.append(e)
        if version_tuple(self.cni_version) >= (1, 1, 0):
            listed = [{"containerID": c, "ifname": i} for c, i in sorted(valid)]
            for plugin in self.plugins:
                conf = {**plugin, "name": self.name, "cniVersion": self.cni_version,
                        "cni.dev/valid-attachments": listed, "cni.dev/attachments": listed}
                try:
                    self.invoke(conf, "GC", None)
                except CNIError as e:
                    errors.append(e)
        if errors:
            raise errors[0]
        return removed

    def status(self) -> None:
        """STATUS on every plugin (cniVersion >= 1.1.0; older lists have no STATUS and are ready)."""
        if version_tuple(self.cni_version) < (1, 1, 0):
            return
        for plugin in self.plugins:
            self.invoke({**plugin, "name": self.name, "cniVersion": self.cni_version}, "STATUS", None)

    def plugin_versions(self, plugin_type: str) -> list[str]:
        """The CNI versions a plugin supports (its VERSION answer)."""
        out = self.invoke({"cniVersion": self.cni_version, "name": self.name, "type": plugin_type}, "VERSION", None)
        return list((out or {}).get("supportedVersions") or [])

    # ------------------------------------------------------------------ cache

    def _cache_file(self, rt: RuntimeConf) -> Path:
        return self.cache_dir / "results" / f"{self.name}-{rt.container_id}-{rt.ifname}"

    def cached(self, rt: RuntimeConf) -> dict[str, Any] | None:
        try:
            return json.loads(self._cache_file(rt).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def cached_result(self, rt: RuntimeConf) -> dict[str, Any] | None:
        c = self.cached(rt)
        return c.get("result") if c else None

    def cached_attachments(self) -> list[dict[str, Any]]:
        d = self.cache_dir / "results"
        out = []
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            try:
                entry = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if entry.get("kind") == CACHE_KIND and entry.get("networkName") == self.name:
                out.append(entry)
        return out

    def _write_cache(self, rt: RuntimeConf, result: dict[str, Any]) -> None:
        path = self._cache_file(rt)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = {
            "kind": CACHE_KIND, "containerId": rt.container_id,
            "config": base64.b64encode(self.raw).decode(), "ifName": rt.ifname, "networkName": self.name,
            "netns": rt.netns, "cniArgs": [list(a) for a in rt.args], "capabilityArgs": rt.capability_args,
            "result": result,
        }
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ plumbing

    def _has_prev_result(self) -> bool:
        return version_tuple(self.cni_version) >= (0, 4, 0)

    def _conf(self, plugin: dict[str, Any], prev: dict[str, Any] | None, rt: RuntimeConf) -> dict[str, Any]:
        conf = {**plugin, "name": self.name, "cniVersion": self.cni_version}
        if prev is not None:
            conf["prevResult"] = prev
        runtime_config = {cap: rt.capability_args[cap] for cap, on in (plugin.get("capabilities") or {}).items()
                          if on and cap in rt.capability_args}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        return conf

    def _undo(self, done: list[dict[str, Any]], prev: dict[str, Any] | None, rt: RuntimeConf) -> None:
        for plugin in reversed(done):
            try:
                self.invoke(self._conf(plugin, prev if self._has_prev_result() else None, rt), "DEL", rt)
            except CNIError:
                pass  # best effort: the ADD error is the one to report

    def find_plugin(self, plugin_type: str) -> str:
        for d in self.cni_path:
            exe = os.path.join(d, plugin_type)
            if os.path.isfile(exe) and os.access(exe, os.X_OK):
                return exe
        raise CNIError(ERR_INTERNAL, f"failed to find plugin {plugin_type!r} in path {self.cni_path}",
                       plugin=plugin_type, command="find")

    def invoke(self, conf: dict[str, Any], command: str, rt: RuntimeConf | None) -> dict[str, Any] | None:
        """Run one plugin once; returns its JSON answer (None when it printed nothing)."""
        plugin_type = conf["type"]
        exe = self.find_plugin(plugin_type)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = os.pathsep.join(self.cni_path)
        if rt is not None:
            env["CNI_CONTAINERID"] = rt.container_id
            env["CNI_NETNS"] = rt.netns
            env["CNI_IFNAME"] = rt.ifname
            if rt.args:
                env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in rt.args)
        argv = [exe]
        if self.host_netns:
            argv = [shutil.which("nsenter") or "nsenter", f"--net={self.host_netns}", "--", exe]
        try:
            proc = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CNIError(ERR_INTERNAL, f"plugin did not answer within {self.timeout:g}s",
                           plugin=plugin_type, command=command) from None
        except OSError as e:
            raise CNIError(ERR_INTERNAL, f"cannot run {exe}: {e.strerror}",
                           plugin=plugin_type, command=command) from None
        stdout = proc.stdout.strip()
        if proc.returncode != 0:
            raise _plugin_error(plugin_type, command, proc.returncode, stdout, proc.stderr)
        if not stdout:
            return None
        try:
            return json.loads(stdout)
        except json.JSONDecodeError:
            raise CNIError(ERR_INTERNAL, f"plugin printed something that is not JSON: {stdout[:200]!r}",
                           plugin=plugin_type, command=command) from None


def _plugin_error(plugin: str, command: str, rc: int, stdout: bytes, stderr: bytes) -> CNIError:
    try:
        err = json.loads(stdout)
    except json.JSONDecodeError:
        err = None
    if isinstance(err, dict) and ("code" in err or "msg" in err):
        code = err.get("code")
        return CNIError(int(code) if isinstance(code, int) else ERR_INTERNAL,
                        str(err.get("msg") or "(no message)"), str(err.get("details") or ""),
                        plugin=plugin, command=command)
    tail = (stderr or stdout).decode(errors="replace").strip().splitlines()[-3:]
    return CNIError(ERR_INTERNAL, f"plugin exited with status {rc}", " | ".join(tail),
                    plugin=plugin, command=command)


def result_ips(result: dict[str, Any]) -> list[str]:
    """Addresses (without prefix) of a CNI result, the sandbox interface's first."""
    ifaces = result.get("interfaces") or []
    sandboxed = {i for i, it in enumerate(ifaces) if it.get("sandbox")}
    ips = result.get("ips") or []
    ordered = sorted(ips, key=lambda ip: 0 if ip.get("interface") in sandboxed else 1)
    return [ip["address"].split("/")[0] for ip in ordered if "address" in ip]


def max_common_version(supported: Iterable[Iterable[str]], prefer: Sequence[str] = ("1.1.0", "1.0.0")) -> str:
    """The newest preferred cniVersion every plugin supports."""
    sets = [set(s) for s in supported]
    for v in prefer:
        if all(v in s for s in sets):
            return v
    common = set.intersection(*sets) if sets else set()
    if not common:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "the plugins share no CNI version",
                       plugin="-", command="VERSION")
    return max(common, key=version_tuple)


__all__ = ["CNIError", "CniRuntime", "RuntimeConf", "k8s_args", "max_common_version", "pod_capability_args",
           "result_ips"]
