"""podnet-ipam as an IPAM plugin of its own: ADD, DEL, CHECK, STATUS and GC for any main
plugin (macvlan, vlan, host-device, ... run by any runtime or meta-plugin) that names

    "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": ..., "gateway": ...,
             "routes": [...], "dns": {...}, "agentSocket": "/run/podnet/cni.sock"}

The executable is podnet-cni under another name (native/cni/podnet-cni.c); the agent's
handler answers here (IpamCommands is a part of CNIHandler, as Commands is). Addresses come
from the named IPPools (allowedUses [Attachment]) with the same compare-and-swap IPAM as
eth0's, so they are unique in the cluster, which host-local's per-node files are not.

The IPAM handle of one attachment is `podnet-ipam:<network>:<containerID>:<ifname>`: no
network name, container ID or interface name holds a colon, so the handles of one network
are exactly those under `podnet-ipam:<network>:` (GC frees no other network's), and none is
a handle of the podnet-cni network (`<network>.<containerID>.<ifname>`), nor the reverse.
ADD of a handle that holds an address returns that address (a runtime's retry); DEL frees
it and succeeds when there is nothing to free; GC frees this node's addresses of the network
that cni.dev/valid-attachments does not list.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from podnet.cni.errors import CNIError
from podnet.cni.sessions import Sessions, store_call
from podnet.cni.spec import (
    E_CHECK_FAILED,
    E_INVALID_CONFIG,
    E_IPAM,
    E_IPAM_EXHAUSTED,
    E_NOT_READY,
    E_TRY_AGAIN,
    Request,
    version_tuple,
)
from podnet.multinet import PODNET_IPAM
from podnet.multinet.netconf import NetConfError
from podnet.multinet.podipam import PodnetIpamConfig, on_link, parse_config, requested_address
from podnet.store.base import StoreUnavailable

log = logging.getLogger("podnet.cni.handler")

HANDLE_PREFIX = f"{PODNET_IPAM}:"


def network_prefix(network: str) -> str:
    return f"{HANDLE_PREFIX}{network}:"


def ipam_handle(network: str, container_id: str, ifname: str) -> str:
    return f"{network_prefix(network)}{container_id}:{ifname}"


def ipam_config(req: Request) -> PodnetIpamConfig:
    """The request's ipam section, checked; CNIError 7 naming the network and the field."""
    section = req.config.get("ipam")
    if not isinstance(section, dict) or section.get("type") != PODNET_IPAM:
        raise CNIError(E_INVALID_CONFIG, f"network {req.network}: invalid network configuration: field ipam: "
                       f"expected an object with type {PODNET_IPAM}")
    try:
        return parse_config(section)
    except NetConfError as e:
        raise CNIError(E_INVALID_CONFIG, f"network {req.network}: invalid network configuration: {e}") from None


def requested_ips(conf: dict[str, Any]) -> list[str] | None:
    """Addresses the runtime asked for: the ips capability (runtimeConfig), else args.cni.ips."""
    runtime = conf.get("runtimeConfig")
    if isinstance(runtime, dict) and isinstance(runtime.get("ips"), list):
        return [ip for ip in runtime["ips"] if isinstance(ip, str)]
    args = conf.get("args")
    cni = args.get("cni") if isinstance(args, dict) else None
    if isinstance(cni, dict) and isinstance(cni.get("ips"), list):
        return [ip for ip in cni["ips"] if isinstance(ip, str)]
    return None


def ipam_result(version: str, cfg: PodnetIpamConfig, address: str) -> dict[str, Any]:
    """An IPAM result (no interfaces) in the shape the request's version defines."""
    entry: dict[str, Any] = {"address": address}
    if cfg.gateway is not None:
        entry["gateway"] = cfg.gateway
    if version_tuple(version) < (1, 0, 0):
        entry = {"version": str(ipaddress.ip_interface(address).version), **entry}
    return {"cniVersion": version, "ips": [entry], "routes": [dict(r) for r in cfg.routes],
            "dns": dict(cfg.dns or {})}


def allocate_on_link(ipam: Any, cfg: PodnetIpamConfig, handle: str, node: str, *, namespace: str, pod: str,
                     address: str | None, where: str) -> str:
    """A podnet-ipam address for `handle` from cfg's pools, with the prefix its interface gets
    (podnet-ipam run by a runtime, and additional networks of podnet's own). CNI errors start
    with `where`; a pool that cannot serve attachments, or one outside the subnet, is bad
    configuration (the address handed out goes back)."""
    from podnet.ipam import IPAMError, IPAMExhausted, NoPool, TooManyConflicts, TryLater
    from podnet.model.objects import ATTACHMENT, IPPool

    try:
        got = ipam.allocate(handle, node, namespace=namespace, pod=pod, pools=list(cfg.pools), address=address,
                            use=ATTACHMENT)
    except IPAMExhausted as e:
        raise CNIError(E_IPAM_EXHAUSTED, f"{where}: {e}") from None
    except NoPool as e:
        raise CNIError(E_INVALID_CONFIG, f"{where}: {e}") from None
    except (TooManyConflicts, TryLater) as e:
        raise CNIError(E_TRY_AGAIN, f"{where}: {e}") from None
    except StoreUnavailable as e:
        raise CNIError(E_TRY_AGAIN, f"{where}: store unavailable: {e}") from None
    except IPAMError as e:
        raise CNIError(E_IPAM, f"{where}: {e}") from None
    pool = ipam.objects.get(IPPool, got.pool)
    try:
        return on_link(cfg, got.address, pool.spec.cidr if pool is not None else f"{got.address}/{got.prefix_len}")
    except ValueError as e:
        store_call(lambda: ipam.release(handle))  # nothing half-made: the address goes back
        raise CNIError(E_INVALID_CONFIG, f"{where}: IPPool {got.pool} gave {got.address}, but {e}: the pool "
                       "must lie inside ipam.subnet") from None


class IpamCommands:
    """The podnet-ipam commands, for one node. The handler sets these attributes."""

    node: str
    _sessions: Sessions
    _release_unkept: Callable[..., int]  # Commands': GC of this node's handles under a prefix

    def _ipam_add(self, req: Request) -> tuple[int, str]:
        cfg = ipam_config(req)
        handle = ipam_handle(req.network, req.container_id, req.ifname)
        where = f"network {req.network}: {PODNET_IPAM} (IPPool {', '.join(cfg.pools)})"
        with self._sessions.session() as (_, ipam):
            address = allocate_on_link(ipam, cfg, handle, self.node, namespace=req.namespace, pod=req.pod,
                                       address=requested_address(requested_ips(req.config)), where=where)
        return 0, json.dumps(ipam_result(req.version, cfg, address))

    def _ipam_del(self, req: Request) -> tuple[int, str]:
        from podnet.ipam import TooManyConflicts

        handle = ipam_handle(req.network, req.container_id, req.ifname)
        with self._sessions.session() as (_, ipam):
            try:
                ipam.release(handle)
            except (TooManyConflicts, StoreUnavailable) as e:
                raise CNIError(E_TRY_AGAIN, f"network {req.network}: {PODNET_IPAM}: releasing the address of "
                               f"{handle}: {e}") from None
        return 0, ""

    def _ipam_check(self, req: Request) -> tuple[int, str]:
        ipam_config(req)
        handle = ipam_handle(req.network, req.container_id, req.ifname)
        prev = req.config.get("prevResult")
        ips = prev.get("ips") if isinstance(prev, dict) else None
        claimed = {str(ipaddress.ip_interface(e["address"]).ip) for e in ips or []
                   if isinstance(e, dict) and isinstance(e.get("address"), str) and _is_interface(e["address"])}
        with self._sessions.session() as (_, ipam):
            held = store_call(lambda: ipam.lookup(handle))
        if held is None:
            raise CNIError(E_CHECK_FAILED, f"network {req.network}: {PODNET_IPAM} holds no address for {handle}")
        if held.address not in claimed:
            raise CNIError(E_CHECK_FAILED, f"network {req.network}: {PODNET_IPAM} holds {held.address} for {handle}, "
                           f"prevResult has {', '.join(sorted(claimed)) or 'no address'}")
        return 0, ""

    def _ipam_status(self, req: Request) -> tuple[int, str]:
        ipam_config(req)
        try:
            with self._sessions.session() as (kv, _):
                kv.revision()
        except Exception as e:
            raise CNIError(E_NOT_READY, f"network {req.network}: {PODNET_IPAM}: the podnet store is not "
                           f"reachable: {e}") from None
        return 0, ""

    def _ipam_gc(self, req: Request, valid: set[tuple[str, str]]) -> tuple[int, str]:
        keep = {ipam_handle(req.network, cid, ifname) for cid, ifname in valid}
        failures: list[str] = []
        with self._sessions.session() as (kv, ipam):
            released = self._release_unkept(kv, ipam, network_prefix(req.network), keep, failures)
        log.info("podnet-ipam GC %s on %s: %d attachments kept, %d addresses released", req.network, self.node,
                 len(valid), released)
        if failures:
            raise CNIError(E_TRY_AGAIN, f"network {req.network}: {PODNET_IPAM} GC released what it could but "
                           f"{len(failures)} failed: {'; '.join(failures)}")
        return 0, ""



def _is_interface(text: str) -> bool:
    try:
        ipaddress.ip_interface(text)
    except ValueError:
        return False
    return True
