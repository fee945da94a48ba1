"""A pod's additional networks together, for the CNI handler's ADD, DEL, CHECK and GC.

ADD (after podnet's eth0): for each planned network in order, its podnet-ipam address (if
it names podnet-ipam), then its plugins (delegate.py); then the pod's default route
(default-route), the results into the attachment record (the result cache: DEL and
CHECK use it, never the NAD, which may be gone) and the network-status annotation. All or
nothing: when any step fails, DEL runs for every network tried so far, newest first, and
their addresses are released; the caller then removes eth0. A rollback that fails leaves
the record so that DEL or GC finishes it.

DEL (teardown): every recorded network in reverse, each past the failures of the others;
an address is released after its network's DEL succeeded, or when its interface is not in
the pod (the namespace is gone, or the plugin failed before making it). A network whose DEL
failed while its interface is still in the pod is kept for the runtime's next DEL.

The podnet-cni network configuration may carry a "multinet" object:
    {"globalNamespaces": ["default"], "pluginTimeout": 30}
(globalNamespaces also as Multus's comma-separated text).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from podnet.cni.errors import CNIError
from podnet.cni.ipamcommands import allocate_on_link
from podnet.model.names import is_dns1123_label
from podnet.multinet import delegate
from podnet.multinet.delegate import NetworkAttachment
from podnet.multinet.invoke import Invocation
from podnet.multinet.plan import DEFAULT_GLOBAL_NAMESPACES, PlanError, PodRef, plan_networks, read_pod
from podnet.multinet.podipam import requested_address
from podnet.multinet.results import merge
from podnet.multinet.routes import present_interfaces, set_default_route
from podnet.multinet.status import network_status, write_status
from podnet.store.base import KeyValueStore, StoreUnavailable

log = logging.getLogger("podnet.multinet")

# CNI codes (podnet.cni.spec): 7 invalid configuration, 11 try again, 100/101 IPAM, 104 networks.
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_IPAM_EXHAUSTED = 100
E_IPAM = 101
E_NETWORK = 104


@dataclass(frozen=True)
class MultinetConfig:
    global_namespaces: tuple[str, ...] = DEFAULT_GLOBAL_NAMESPACES
    plugin_timeout: float = 30.0

    @classmethod
    def from_netconf(cls, conf: dict[str, Any]) -> MultinetConfig:
        section = conf.get("multinet")
        if section is None:
            return cls()
        where = "invalid network configuration: field multinet"
        if not isinstance(section, dict):
            raise CNIError(E_INVALID_CONFIG, f"{where}: expected an object")
        unknown = [k for k in section if k not in ("globalNamespaces", "pluginTimeout")]
        if unknown:
            raise CNIError(E_INVALID_CONFIG, f"{where}.{unknown[0]}: unknown (known: globalNamespaces, "
                           "pluginTimeout)")
        names = section.get("globalNamespaces", list(DEFAULT_GLOBAL_NAMESPACES))
        if isinstance(names, str):  # Multus's form
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) and is_dns1123_label(n) for n in names):
            raise CNIError(E_INVALID_CONFIG, f"{where}.globalNamespaces: expected a list of namespace names")
        timeout = section.get("pluginTimeout", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise CNIError(E_INVALID_CONFIG, f"{where}.pluginTimeout: expected seconds, above 0 and at most 600")
        return cls(tuple(names), float(timeout))


def cni_args_text(args: dict[str, str] | None) -> str:
    """CNI_ARGS for the delegates: the runtime's, with IgnoreUnknown=1 first (the reference
    plugins refuse keys they do not know otherwise)."""
    pairs = {"IgnoreUnknown": "1", **(args or {})}
    return ";".join(f"{k}={v}" for k, v in pairs.items())


class Multinet:
    """The additional networks of one node's pods (one instance serves every request)."""

    def __init__(self, node: str, *,
                 default_route: Callable[[str, str, tuple[str, ...], Sequence[str], str], None] = set_default_route,
                 present: Callable[[str, Sequence[str]], set[str]] = present_interfaces):
        self.node = node
        self._default_route = default_route
        self._present = present

    # ------------------------------------------------------------ ADD

    def plan(self, kv: KeyValueStore, *, namespace: str | None, pod: str | None, uid: str | None,
             primary_ifname: str, network: str, container_id: str, version: str,
             config: MultinetConfig) -> tuple[PodRef | None, list[NetworkAttachment]]:
        """The pod's additional networks, or CNIError naming the pod and the network."""
        if not pod:
            return None, []
        ref = PodRef(namespace or "default", pod, uid)
        try:
            obj = read_pod(kv, ref)
            return ref, plan_networks(kv, obj, ref, primary_ifname=primary_ifname, handle_prefix=network,
                                      container_id=container_id, default_version=version,
                                      global_namespaces=config.global_namespaces)
        except PlanError as e:
            raise CNIError(E_TRY_AGAIN if e.lag else E_INVALID_CONFIG, e.message) from None
        except StoreUnavailable as e:
            raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None

    def add(self, kv: KeyValueStore, ipam: Any, *, ref: PodRef, networks: list[NetworkAttachment],
            container_id: str, netns: str, args: dict[str, str] | None, cni_path: tuple[str, ...],
            config: MultinetConfig, primary_name: str, primary_ifname: str, primary_result: dict[str, Any],
            version: str, save: Callable[[list[NetworkAttachment]], None]) -> dict[str, Any]:
        """Every network, all or nothing; the pod's merged result. `save` records the networks
        (with their results) in the attachment record."""
        args_text = cni_args_text(args)
        tried: list[NetworkAttachment] = []
        current: NetworkAttachment | None = None
        try:
            taken = self._present(netns, [att.ifname for att in networks])
            for att in networks:
                current = att
                where = f"pod {ref}: network {att.network} (interface {att.ifname})"
                if att.ifname in taken:
                    raise CNIError(E_NETWORK, f"{where}: the pod already has an interface {att.ifname}")
                tried.append(att)
                if att.handle:
                    att = att.with_(address=self._allocate(ipam, att, ref, where))
                    tried[-1] = att
                inv = Invocation(container_id, netns, att.ifname, args_text, cni_path, config.plugin_timeout)
                started, cpu_started = time.monotonic(), time.thread_time()
                try:
                    result = delegate.add(att, inv)
                except CNIError as e:
                    raise CNIError(E_NETWORK, f"{where}: {e}", f"the plugin's code {e.code}"
                                   + (f": {e.details}" if e.details else "")) from None
                log.debug("%s: ADD in %.1f ms (agent CPU %.1f ms)", where, (time.monotonic() - started) * 1000,
                          (time.thread_time() - cpu_started) * 1000)
                tried[-1] = att.with_(result=result)
            current = None
            keep = self._cluster_ranges(kv) if any(a.default_route for a in tried) else []
            for att in tried:
                if att.default_route:
                    try:
                        self._default_route(netns, att.ifname, att.default_route, keep, primary_ifname)
                    except Exception as e:
                        raise CNIError(E_NETWORK, f"pod {ref}: network {att.network}: setting the default route "
                                       f"via {', '.join(att.default_route)} on {att.ifname} failed: {e}") from None
            save(tried)
            merged = merge(primary_result, [(a.ifname, a.result or {}, a.default_route or None) for a in tried],
                           version)
            entries = network_status(primary_name, primary_ifname, primary_result,
                                     [(a.network, a.ifname, a.result or {}) for a in tried])
            try:
                write_status(kv, ref.namespace, ref.name, ref.uid, entries)
            except StoreUnavailable as e:
                raise CNIError(E_TRY_AGAIN, f"pod {ref}: writing the network-status annotation: store unavailable: "
                               f"{e}") from None
            except Exception as e:
                raise CNIError(E_TRY_AGAIN, f"pod {ref}: writing the network-status annotation failed: {e}") from None
            return merged
        except BaseException as e:
            problems = self.rollback(ipam, tried, container_id, netns, args_text, cni_path, config)
            if isinstance(e, CNIError):
                if problems:
                    e.details = "; ".join(filter(None, [e.details, *problems]))
                    e.leftover = True  # type: ignore[attr-defined]
                raise
            if not isinstance(e, Exception):
                raise
            log.exception("pod %s: additional networks failed", ref)
            what = f"network {current.network}: " if current is not None else ""
            err = CNIError(E_NETWORK, f"pod {ref}: {what}{type(e).__name__}: {e}", "; ".join(problems))
            err.leftover = bool(problems)  # type: ignore[attr-defined]
            raise err from None

    @staticmethod
    def _cluster_ranges(kv: KeyValueStore) -> list[str]:
        """What stays on eth0 when the default route moves: Workload pools, Services, node DNS."""
        from podnet.cluster import cluster_config
        from podnet.dns.resolvconf import NODE_DNS_ADDRESS
        from podnet.model.objects import IPPool
        from podnet.store.objects import ObjectStore

        pools = [p.spec.cidr for p in ObjectStore(kv).list(IPPool) if "Workload" in p.spec.allowed_uses]
        return [*pools, cluster_config(kv).service_cidr, f"{NODE_DNS_ADDRESS}/32"]

    def _allocate(self, ipam: Any, att: NetworkAttachment, ref: PodRef, where: str) -> str:
        cfg = att.podnet_ipam()
        assert cfg is not None and att.handle is not None
        wanted = requested_address(att.capability_args.get("ips")) if self._declares_ips(att) else None
        return allocate_on_link(ipam, cfg, att.handle, self.node, namespace=ref.namespace, pod=ref.name,
                                address=wanted, where=f"{where}: podnet-ipam")

    @staticmethod
    def _declares_ips(att: NetworkAttachment) -> bool:
        return any((p.get("capabilities") or {}).get("ips") for p in att.plugins)

    def rollback(self, ipam: Any, tried: list[NetworkAttachment], container_id: str, netns: str | None,
                 args_text: str, cni_path: tuple[str, ...], config: MultinetConfig) -> list[str]:
        problems, _ = self._remove(ipam, tried, container_id, netns, args_text, cni_path, config)
        for p in problems:
            log.error("rollback: %s", p)
        return problems

    # ------------------------------------------------------------ DEL, GC

    def teardown(self, ipam: Any, record: dict[str, Any], container_id: str, netns: str | None,
                 cni_path: tuple[str, ...], config: MultinetConfig) -> tuple[list[str], list[dict[str, Any]]]:
        """DEL every recorded network (reverse); (problems, records of the networks still there)."""
        networks = [NetworkAttachment.from_record(r) for r in record.get("networks") or [] if isinstance(r, dict)]
        if not networks:
            return [], []
        args = record.get("cniArgs") if isinstance(record.get("cniArgs"), dict) else None
        if args is None:
            args = {k: v for k, v in (("K8S_POD_NAMESPACE", record.get("namespace")),
                                      ("K8S_POD_NAME", record.get("pod")),
                                      ("K8S_POD_INFRA_CONTAINER_ID", container_id),
                                      ("K8S_POD_UID", record.get("podUID"))) if v}
        problems, left = self._remove(ipam, networks, container_id, netns, cni_args_text(args), cni_path, config)
        return problems, [n.to_record() for n in left]

    def _remove(self, ipam: Any, networks: list[NetworkAttachment], container_id: str, netns: str | None,
                args_text: str, cni_path: tuple[str, ...],
                config: MultinetConfig) -> tuple[list[str], list[NetworkAttachment]]:
        problems: list[str] = []
        left: list[NetworkAttachment] = []
        for att in reversed(networks):
            inv = Invocation(container_id, netns or "", att.ifname, args_text, cni_path, config.plugin_timeout)
            ok = True
            try:
                delegate.delete(att, inv)
            except CNIError as e:
                problems.append(f"network {att.network} (interface {att.ifname}): {e}")
                # A plugin whose DEL fails (a master link that is gone, a broken configuration) left
                # nothing in the pod if its interface is not there: the address can go.
                ok = netns is None or not self._still_there(netns, att.ifname)
            if att.handle and ok:
                try:
                    ipam.release(att.handle)
                except Exception as e:
                    ok = False
                    problems.append(f"network {att.network}: releasing the podnet-ipam address: {e}")
            if not ok:
                left.insert(0, att)
        return problems, left

    def _still_there(self, netns: str, ifname: str) -> bool:
        try:
            return ifname in self._present(netns, [ifname])
        except Exception:  # the namespace cannot be opened: it is gone, and the interface with it
            return False

    @staticmethod
    def handles(record: dict[str, Any]) -> set[str]:
        """The podnet-ipam handles a record's networks hold (GC keeps those of live pods)."""
        return {r["handle"] for r in record.get("networks") or [] if isinstance(r, dict) and r.get("handle")}

    # ------------------------------------------------------------ CHECK

    def check(self, ipam: Any, record: dict[str, Any], container_id: str, netns: str, cni_path: tuple[str, ...],
              config: MultinetConfig) -> list[str]:
        problems = []
        args_text = cni_args_text(record.get("cniArgs") if isinstance(record.get("cniArgs"), dict) else None)
        for raw in record.get("networks") or []:
            att = NetworkAttachment.from_record(raw)
            where = f"network {att.network} (interface {att.ifname})"
            if att.result is None:
                problems.append(f"{where}: never added (no result recorded)")
                continue
            if att.handle:
                held = ipam.lookup(att.handle)
                wanted = (att.address or "").split("/")[0]
                if held is None:
                    problems.append(f"{where}: podnet-ipam holds no address for {att.handle}")
                elif held.address != wanted:
                    problems.append(f"{where}: podnet-ipam holds {held.address}, the pod has {wanted}")
            try:
                delegate.check(att, Invocation(container_id, netns, att.ifname, args_text, cni_path,
                                               config.plugin_timeout))
            except CNIError as e:
                problems.append(f"{where}: {e}")
        return problems
