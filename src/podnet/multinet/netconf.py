"""A NetworkAttachmentDefinition's spec.config: a CNI network configuration, one plugin
(`type`) or a list of them (`plugins`), checked as libcni loads it and made safe to run.

    NetConf.parse(text)          the configuration, or NetConfError naming where it is wrong
    NetConf.conflist(...)        the list form the agent runs and records (name, cniVersion and
                                 the pod's cni-args filled in)

Checks beyond libcni's: a plugin `type` (and an `ipam.type`) is a file name looked up in
CNI_PATH, never a path (a NAD must not run an arbitrary program on the node);
`podnet-cni` cannot be a delegate (eth0 is podnet's own); `podnet-ipam` sections are
checked here too (podipam.py), so `podnet apply` refuses a bad one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from podnet.errors import PodnetError
from podnet.multinet import PODNET_IPAM

# Every version a delegate's configuration may name (the reference plugins speak up to 1.0.0).
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_TYPE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")  # a file name in CNI_PATH
NETWORK_NAME = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")  # libcni's
MAX_NAME = 200
PRIMARY_PLUGIN = "podnet-cni"


class NetConfError(PodnetError):
    """A configuration that cannot run; `path` is where in it (e.g. plugins[1].ipam.type)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _check_type(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise NetConfError(path, "required: the plugin's executable name in CNI_PATH, e.g. macvlan")
    if not PLUGIN_TYPE.fullmatch(value) or value in (".", ".."):
        raise NetConfError(path, f"{value[:80]!r} is not a plugin name: expected a file name in CNI_PATH "
                           "(letters, digits, '_', '.', '-'; no '/')")
    return value


def _check_plugin(plugin: Any, path: str) -> dict[str, Any]:
    if not isinstance(plugin, dict):
        raise NetConfError(path, f"expected a JSON object (a plugin configuration), got {type(plugin).__name__}")
    kind = _check_type(plugin.get("type"), f"{path}.type" if path else "type")
    if kind == PRIMARY_PLUGIN:
        raise NetConfError(f"{path}.type" if path else "type",
                           f"{PRIMARY_PLUGIN} cannot be an additional network: the pod's eth0 is podnet's own")
    where = f"{path}." if path else ""
    caps = plugin.get("capabilities")
    if caps is not None and (not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values())):
        raise NetConfError(f"{where}capabilities", "expected an object of capability names to true or false")
    ipam = plugin.get("ipam")
    if ipam is not None:
        if not isinstance(ipam, dict):
            raise NetConfError(f"{where}ipam", f"expected a JSON object, got {type(ipam).__name__}")
        if ipam:  # {} is "no IPAM" to the reference plugins
            ipam_type = _check_type(ipam.get("type"), f"{where}ipam.type")
            if ipam_type == PODNET_IPAM:
                from podnet.multinet.podipam import parse_config

                parse_config(ipam, f"{where}ipam")
    return plugin


@dataclass(frozen=True)
class NetConf:
    """A checked CNI configuration. name and cni_version are None when it leaves them out
    (the NAD's name and the pod's request fill them in, as Multus does)."""

    name: str | None
    cni_version: str | None
    plugins: tuple[dict[str, Any], ...]
    is_list: bool
    disable_check: bool = False

    @classmethod
    def parse(cls, text: Any) -> NetConf:
        if not isinstance(text, str):
            raise NetConfError("", f"expected the CNI configuration as a JSON text (a string), got "
                               f"{type(text).__name__}")
        if not text.strip():
            raise NetConfError("", "is empty: expected a CNI configuration (JSON with type or plugins)")
        try:
            conf = json.loads(text)
        except ValueError as e:
            raise NetConfError("", f"not valid JSON: {e}") from None
        except RecursionError:
            raise NetConfError("", "not valid JSON: nested too deeply") from None
        return cls.from_dict(conf)

    @classmethod
    def from_dict(cls, conf: Any) -> NetConf:
        if not isinstance(conf, dict):
            raise NetConfError("", f"expected a JSON object, got {type(conf).__name__}")
        name = conf.get("name")
        if name is not None and name != "":
            if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name) or len(name) > MAX_NAME:
                raise NetConfError("name", f"{str(name)[:80]!r} is not a network name: expected a letter or "
                                   "digit, then letters, digits, '_', '.' or '-'")
        else:
            name = None
        version = conf.get("cniVersion")
        if version is not None and version != "":
            if version not in SUPPORTED_VERSIONS:
                raise NetConfError("cniVersion", f"{str(version)[:40]!r} is not a CNI version: expected one of "
                                   f"{', '.join(SUPPORTED_VERSIONS)}")
        else:
            version = None
        disable_check = conf.get("disableCheck", False)
        if not isinstance(disable_check, bool):
            raise NetConfError("disableCheck", "expected true or false")
        if "plugins" in conf:
            if "type" in conf:
                raise NetConfError("", "has both type and plugins: a configuration is one plugin (type) or a "
                                   "list (plugins), not both")
            plugins = conf["plugins"]
            if not isinstance(plugins, list) or not plugins:
                raise NetConfError("plugins", "expected a non-empty list of plugin configurations")
            checked = tuple(_check_plugin(p, f"plugins[{i}]") for i, p in enumerate(plugins))
            return cls(name, version, checked, True, disable_check)
        if "type" not in conf:
            raise NetConfError("", "has neither type (one plugin) nor plugins (a list)")
        return cls(name, version, (_check_plugin(conf, ""),), False, disable_check)

    def conflist(self, *, default_name: str, default_version: str,
                 cni_args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The list form the agent runs: {cniVersion, name, disableCheck, plugins}, each plugin
        without the list's fields, the pod's cni-args merged into each plugin's args.cni."""
        plugins = []
        for p in self.plugins:
            plugin = {k: v for k, v in p.items() if k not in ("name", "cniVersion")} if not self.is_list else dict(p)
            if cni_args:
                args = dict(plugin.get("args") or {}) if isinstance(plugin.get("args"), dict) else {}
                merged = dict(args.get("cni") or {}) if isinstance(args.get("cni"), dict) else {}
                merged.update(cni_args)
                args["cni"] = merged
                plugin["args"] = args
            plugins.append(plugin)
        return {"cniVersion": self.cni_version or default_version, "name": self.name or default_name,
                "disableCheck": self.disable_check, "plugins": plugins}
