"""The agent's Service dataplane: compiler, applier (nftables, iptables or eBPF), health checks, metrics.

Fed by the watch, one event at a time (`on_event`): Services and EndpointSlices go
straight into the compiler, which keeps them in compact form, so that a sync
costs what changed and the agent holds no copy of those objects. `replace` makes
the inputs a whole list (after the watch history was compacted).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable

from podnet.agent.contract import ALL_KEYS, AllKeys, Dataplane
from podnet.model.objects import EndpointSlice, Service
from podnet.model.records import ServiceRecord, SliceRecord
from podnet.policy.model import PodInfo
from podnet.services import nftables as nt
from podnet.services.applier import NftServiceApplier, ServiceApplier
from podnet.services.compiler import ServiceCompiler, SliceInfo, same_version
from podnet.services.conntrack import ConntrackSizing, apply_conntrack_sizing
from podnet.services.health import HealthCheckServer
from podnet.services.iptables import IptablesServiceApplier
from podnet.services.iptables import scheduler_problem as iptables_scheduler_problem
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import Frontend, FrontendRule, ServiceConfig, ServiceState
from podnet.services.nftables.schedulers import scheduler_problem as nftables_scheduler_problem
from podnet.store.objects import ObjectEvent, key_of, object_key, split_object_key

KINDS = ("Service", "EndpointSlice")
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
log = logging.getLogger("podnet.agent")
# proxy -> why a frontend's podnet.io/scheduler is not followed ("" if it is); eBPF has every scheduler
SCHEDULER_PROBLEMS = {"nftables": nftables_scheduler_problem, "iptables": iptables_scheduler_problem}
DEEP_RESYNC_EVERY = 60  # full syncs between element read-backs (an hour at the default 60 s resync)


def size_conntrack(sizing: ConntrackSizing, path: str = CONNTRACK_MAX) -> int | None:
    """Raise nf_conntrack_max as configured (kube-proxy's formula, as `podnet plan` shows it);
    a failure is logged, not fatal (the value is read-only inside a network namespace)."""
    if sizing.max_per_core <= 0:
        return None
    try:
        written = apply_conntrack_sizing(sizing, path=path)
    except OSError as e:
        log.warning("services: cannot raise nf_conntrack_max (%s): %s", path, e.strerror or e)
        return None
    if written:
        log.info("services: nf_conntrack_max set to %d", written)
    return written


def warn_node_in_service_cidrs(node_ip: str, service_cidrs: tuple[str, ...]) -> str | None:
    """The Service table drops traffic to addresses of the Service CIDRs that are no ClusterIP
    (as kube-proxy does): a node address inside one is then unreachable on every port but its
    NodePorts. Said once at start, with the fix, rather than found by a user's timeouts."""
    try:
        ip = ipaddress.ip_address(node_ip)
        cidr = next((c for c in service_cidrs if ip in ipaddress.ip_network(c, strict=False)), None)
    except ValueError:
        return None
    if cidr is None:
        return None
    message = (f"services: node address {node_ip} lies inside the Service CIDR {cidr}: traffic to it "
               f"on other than NodePorts is dropped as traffic to an unused ClusterIP; give the nodes "
               f"addresses outside the Service CIDRs (or the Services another CIDR)")
    log.warning(message)
    return message


class ServiceDataplane(Dataplane):
    name = "services"
    kinds = frozenset(KINDS)  # and Pods under the eBPF Services (__init__)
    def __init__(self, node: str, node_ip: str, service_cidrs: tuple[str, ...], local_dns: tuple[str, ...] = (),
                 applier: ServiceApplier | None = None, health: HealthCheckServer | None = None,
                 proxy: str = "nftables", cgroup_root: str | None = None, fast_path: bool = False):
        self.metrics = ServiceMetrics()
        self.proxy = proxy
        if proxy == "ebpf":  # a pod of this node: its interface gets the Service programs
            self.kinds = frozenset({*KINDS, "Pod"})
        warn_node_in_service_cidrs(node_ip, service_cidrs)
        self.compiler = ServiceCompiler(node, [node_ip], ServiceConfig(service_cidrs=service_cidrs,
                                                                       local_dns=local_dns))
        if applier is None:
            if proxy == "iptables":
                applier = IptablesServiceApplier(metrics=self.metrics)
            elif proxy == "ebpf":
                from podnet.services.ebpf.applier import EbpfServiceApplier
                from podnet.services.ebpf.fallback import EbpfWithNftablesFloor

                applier = EbpfWithNftablesFloor(EbpfServiceApplier(node, metrics=self.metrics, cgroup_root=cgroup_root,
                                                                   fast_path=fast_path),
                                                NftServiceApplier(metrics=self.metrics))
            else:
                applier = NftServiceApplier(metrics=self.metrics)
        self.applier = applier
        self.health = health if health is not None else HealthCheckServer()
        self._lock = threading.Lock()  # the watch feeds, the sync loop compiles
        self._triggers: dict[str, float] = {}  # slice -> trigger time of a change not yet programmed
        self._full_syncs = 0
        self._drifted = False  # verify() found a problem: the next sync re-reads the kernel
        self._started = False  # the first sync is done (it starts from the kernel's slot orders)
        self._restored = False  # fed from a restart snapshot: compiled with the slots it had then
        # frontend -> (Service port, why it balances at random): its podnet.io/scheduler is not this backend's
        self.scheduler_fallbacks: dict[Frontend, tuple[str, str]] = {}
        self._checked: ServiceState | None = None  # the last state _check_schedulers looked at

    # -- inputs

    def on_event(self, ev: ObjectEvent) -> bool:
        """Apply one watch event; False if it was not about Services or EndpointSlices.
        An object at the resourceVersion already held costs nothing (a replayed list)."""
        obj = ev.object
        if isinstance(obj, (ServiceRecord, Service)):
            with self._lock:
                old = self.compiler.service_info(obj.namespace, obj.name)
                if not same_version(old, obj):
                    self.compiler.set_service(obj)
            return True
        if isinstance(obj, (SliceRecord, EndpointSlice)):
            self._set_slice(obj)
            return True
        if self.proxy == "ebpf" and isinstance(obj, PodInfo) and obj.node == self.compiler.node_name:
            return True  # a pod of this node: its interface gets the Service programs at the sync
        if ev.type != "DELETED":
            return False
        parts = split_object_key(ev.key)
        if parts is None or parts[0] not in KINDS:
            return False
        kind, namespace, name = parts
        with self._lock:
            if kind == "Service":
                self.compiler.delete_service(namespace, name)
            else:
                self.compiler.delete_slice(namespace, name)
                self._triggers.pop(f"{namespace or 'default'}/{name}", None)
        return True

    def _check_schedulers(self, state: ServiceState) -> None:
        """The frontends whose podnet.io/scheduler this backend cannot do (they balance at
        random): kept in `scheduler_fallbacks`, counted in the metrics, and each new reason
        logged once per Service port. Checks the frontends that changed since the last
        state checked (all of them the first time); the sync goes on whatever it finds."""
        problem_of = SCHEDULER_PROBLEMS.get(self.proxy)
        if problem_of is None or state is self._checked:
            return
        changed = state.changed_since(self._checked) if self._checked is not None else None
        if changed is None:
            fallbacks: dict[Frontend, tuple[str, str]] = {}
            rules: Iterable[FrontendRule | None] = state.rules
        else:
            fallbacks = dict(self.scheduler_fallbacks)
            for fe in changed:
                fallbacks.pop(fe, None)
            rules = map(state.rule, changed)
        for r in rules:
            if r is not None and r.scheduler and (why := problem_of(r)):
                fallbacks[r.frontend] = (r.service, why)
        for service, why in sorted(set(fallbacks.values()) - set(self.scheduler_fallbacks.values())):
            log.warning("services: %s: %s", service, why)
        self.scheduler_fallbacks = fallbacks
        self.metrics.scheduler_fallbacks.set(len({service for service, _ in fallbacks.values()}))
        self._checked = state

    def _set_slice(self, sl: SliceRecord | EndpointSlice) -> None:
        with self._lock:
            old = self.compiler.slice_info(sl.namespace, sl.name)
            if same_version(old, sl) and old.service == (sl.service_name or None):  # type: ignore[union-attr]
                return
        info = SliceInfo(sl, self.compiler.node_name)
        with self._lock:
            old = self.compiler.slice_info(sl.namespace, sl.name)
            self.compiler.set_slice(info)
            if info.trigger is not None and (old is None or old.trigger != info.trigger):
                self._triggers[f"{sl.namespace or 'default'}/{sl.name}"] = info.trigger

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        """A relist fed every object it named (`listed`: their store keys): forget the rest."""
        if listed is ALL_KEYS:  # the first list: nothing held before it
            return
        with self._lock:
            for ns, name in [k for k in self.compiler.service_keys() if object_key(Service, k[1], k[0]) not in listed]:
                self.compiler.delete_service(ns, name)
            for ns, name in [k for k in self.compiler.slice_keys()
                             if object_key(EndpointSlice, k[1], k[0]) not in listed]:
                self.compiler.delete_slice(ns, name)
                self._triggers.pop(f"{ns}/{name}", None)

    def snapshot(self) -> object:
        """The compiler's records and rules, and (nftables) the digest of the state they
        make: a restarted agent compares it with the table's own digest instead of hashing
        every element again (~2 s at 50 000 Services), and adopts a table that matches."""
        with self._lock:
            state = self.compiler.state()  # (what was pending compiled now, not at the next start)
            digest = None
            applier = self.applier
            if isinstance(applier, NftServiceApplier):
                if applier.applied_state is state and applier.digest is not None and applier.counts:
                    digest = (applier.digest, dict(applier.counts))  # the kernel's, as last applied
                else:
                    counts: dict[str, int] = {}
                    digest = (nt.state_digest(state, counts), counts)
            return {"compiler": self.compiler.snapshot(), "digest": digest}

    def restore(self, state: object) -> None:
        with self._lock:
            self.compiler.restore(state["compiler"])  # type: ignore[index]
            if state["digest"] is not None and isinstance(self.applier, NftServiceApplier):  # type: ignore[index]
                self.applier.expected = state["digest"]  # type: ignore[index]
            self._restored = True  # the compiled large frontends keep the kernel's slots already

    def replace(self, services: Iterable[Service], slices: Iterable[EndpointSlice]) -> None:
        """Make the inputs exactly these objects (unchanged resourceVersions cost nothing)."""
        listed = set()
        for svc in services:
            listed.add(key_of(svc))
            self.on_event(ObjectEvent("ADDED", svc, "", 0))
        for sl in slices:
            listed.add(key_of(sl))
            self._set_slice(sl)
        self.end_reload(listed)

    # -- sync

    def verify(self) -> list[str]:
        """The cheap check (chain names, and each set's element count, counted without
        decoding an element): what is wrong with the table, if anything; the next sync then
        re-reads the elements and repairs them. An element deleted behind the agent's back
        is found by the first resync after it, not by the hourly read-back."""
        problem = self.applier.verify()
        if problem is None or problem == "never applied":
            return []
        self._drifted = True
        return [problem]

    def sync(self, full: bool = False) -> str:
        """Program what changed. `full` (the agent's periodic resync, after verify()):
        re-read every element only when verify() found a problem or every
        DEEP_RESYNC_EVERY full syncs; a read-back costs seconds at 50 000 Services."""
        resync, self._drifted = self._drifted, False
        if full:
            self._full_syncs += 1
            resync = resync or self._full_syncs % DEEP_RESYNC_EVERY == 0
        if not self._started and not self._restored:
            # after an agent restart the large frontends keep the slots the kernel has: a
            # table that is right stays as it is
            orders = self.applier.slot_orders()
            if orders:
                with self._lock:
                    self.compiler.keep_slots(orders)
        with self._lock:
            state = self.compiler.state()
            triggers, self._triggers = self._triggers, {}
        self._check_schedulers(state)
        try:
            result = self.applier.apply(state, resync=resync)
            self.health.sync(state.health_checks)
        except BaseException:
            self._retry_triggers(triggers)
            self._drifted = self._drifted or resync
            raise
        if result.errors:
            self._retry_triggers(triggers)
            self._drifted = self._drifted or resync
            raise RuntimeError("; ".join(result.errors))
        self._started = True
        self.metrics.observe_programming(triggers)
        if not result.sent:
            return ""
        how = f"rebuilt ({result.reason})" if result.full else "updated"
        return (f"table {how}: +{result.added} -{result.removed} elements"
                + (f", {result.stale_flows} stale UDP flows cleared" if result.stale_flows else ""))

    def _retry_triggers(self, triggers: dict[str, float]) -> None:
        with self._lock:
            for k, t in triggers.items():
                self._triggers.setdefault(k, t)  # a newer change of the slice wins

    def close(self) -> None:
        self.health.close()  # the table stays: a restart must not interrupt Services
