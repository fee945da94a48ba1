"""The desired Service dataplane as a value: what every backend (nftables maps,
iptables, kube-proxy-style nftables) renders from.

A Service port is reachable through one or more *frontends* (ClusterIP,
externalIP, LoadBalancer ingress IP, NodePort on every local address); each
frontend carries the ordered backends it balances over on this node and the
per-frontend behaviour (masquerade, affinity, source ranges, what to do without
endpoints). Everything is frozen and hashable, so two states compare with `==`
and diffs are set differences.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Proto = Literal["tcp", "udp", "sctp"]
FrontendKind = Literal["ClusterIP", "ExternalIP", "LoadBalancer", "NodePort"]
NoEndpoints = Literal["reject", "drop"]

MASQUERADE_MARK = 0x4000  # the bit kube-proxy uses (KUBE-MARK-MASQ)
# A frontend that balances over more endpoints than this is *large*: the compiler keeps
# the slot of every endpoint that stays across changes (the order of `backends`), so that
# a change to a Service with thousands of endpoints moves only the slots it must. Smaller
# frontends list their endpoints in address order (a pure function of the endpoints).
LARGE_ABOVE = 256


class Frontend(NamedTuple):
    """Where clients send packets: `ip` None means a NodePort, on every local address.
    (A NamedTuple: hashed in C, it is a dict key on every path that scales.)"""

    ip: str | None
    proto: Proto
    port: int

    def __str__(self) -> str:
        return f"{self.ip or '*'}:{self.port}/{self.proto}"


class Backend(NamedTuple):
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


class FrontendRule(NamedTuple):
    """One frontend of one Service port, as this node must program it.

    backends: the endpoints in slot order (empty: nothing to balance to, see
    no_endpoints): address order, or for more than LARGE_ABOVE the order kept across
    changes. masquerade: SNAT to the node so replies come back through it
    (NodePort/external traffic under externalTrafficPolicy Cluster).
    affinity_timeout: seconds of ClientIP stickiness, or None.
    source_ranges: LoadBalancer source CIDRs allowed (empty: everyone).
    owns_cluster_ip: this is the Service's first ClusterIP frontend (in port order),
    which carries the address's `cluster_ips` element (its other ports are rejected):
    one owner per address, so removing one port keeps the address while others need it.
    affinity_key: with affinity, the key of the client's affinity entries: equal for
    the frontends of one Service port that balance over the same endpoint choice
    (ClusterIP, NodePort, externalIPs, LoadBalancer IPs), so a client keeps its
    endpoint whichever of them it uses (as kube-proxy).
    short_circuit: for an externalIP, LoadBalancer IP or NodePort of a Service with
    externalTrafficPolicy Local, the Service's endpoints cluster-wide, used for traffic
    from this node's pods and from the node itself (kube-proxy's short-circuit: it is
    treated as ClusterIP traffic); empty when that would change nothing.
    scheduler, weights: how the eBPF backend chooses among `backends` (the
    podnet.io/scheduler and podnet.io/weights annotations; the other backends choose at
    random and say so).

    A NamedTuple (made, hashed and compared in C: there is one per frontend, and
    states compare by them).
    """

    frontend: Frontend
    service: str  # "namespace/name:portname" (portname may be empty), for logs, comments and metrics
    kind: FrontendKind
    backends: tuple[Backend, ...] = ()
    no_endpoints: NoEndpoints = "reject"
    masquerade: bool = False
    affinity_timeout: int | None = None
    source_ranges: tuple[str, ...] = ()
    owns_cluster_ip: bool = False
    affinity_key: int = 0
    short_circuit: tuple[Backend, ...] = ()
    scheduler: str = ""  # podnet.io/scheduler: "" (random), "lc", "sh", "wrr" (the eBPF backend's)
    weights: tuple[tuple[str, int], ...] = ()  # wrr: (endpoint address, weight); an address not listed: 1


@dataclass(frozen=True, order=True, slots=True)
class HealthCheck:
    """A healthCheckNodePort this node answers: 200 with local endpoints, else 503."""

    port: int
    namespace: str
    name: str
    local_endpoints: int


@dataclass(frozen=True)
class ServiceConfig:
    """Cluster-wide settings the compiler needs besides the objects."""

    service_cidrs: tuple[str, ...] = ()  # traffic to unused addresses here is dropped
    masquerade_mark: int = MASQUERADE_MARK
    # Addresses the node's own DNS server answers (NodeLocal DNSCache style, e.g. the
    # kube-dns ClusterIP): its NOTRACK rules keep them out of DNAT, so they are neither
    # dropped as unused nor load-balanced here.
    local_dns: tuple[str, ...] = ()


class _Frontends(Mapping[Frontend, FrontendRule]):
    """A read-only frontend -> rule mapping of one state (see ServiceState.frontends)."""

    __slots__ = ("_state",)

    def __init__(self, state: ServiceState):
        self._state = state

    def __getitem__(self, fe: Frontend) -> FrontendRule:
        r = self._state.rule(fe)
        if r is None:
            raise KeyError(fe)
        return r

    def get(self, fe: Frontend, default: Any = None) -> Any:  # type: ignore[override]
        r = self._state.rule(fe)
        return default if r is None else r

    def __contains__(self, fe: object) -> bool:
        return self._state.rule(fe) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Frontend]:
        live, over = self._state._live, self._state._over
        if not over:
            return iter(live)
        return self._merged(live, over)

    @staticmethod
    def _merged(live: dict[Frontend, FrontendRule], over: dict[Frontend, FrontendRule | None]) -> Iterator[Frontend]:
        for fe in live:
            if fe not in over:
                yield fe
        for fe, r in over.items():
            if r is not None:
                yield fe

    def __len__(self) -> int:
        live, over = self._state._live, self._state._over
        if not over:
            return len(live)
        return len(live) + sum((r is not None) - (fe in live) for fe, r in over.items())

    def keys(self):  # type: ignore[override]
        return self._state._live.keys() if not self._state._over else super().keys()

    def values(self):  # type: ignore[override]
        return self._state._live.values() if not self._state._over else super().values()

    def items(self):  # type: ignore[override]
        return self._state._live.items() if not self._state._over else super().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and all(other.get(fe) == r for fe, r in self.items())

    def __repr__(self) -> str:
        return f"<frontends of a ServiceState: {len(self)}>"


class ServiceState:
    """The whole desired Service dataplane of one node: a value.

    Built directly (`ServiceState(rules=...)`, what compile_services returns) it
    owns its frontend index. Built by ServiceCompiler it shares the compiler's
    live index instead of copying it (a sync costs the change, not the cluster):
    when the compiler moves on, every older state still alive is given the rules
    it had for the frontends that changed, so each state keeps reading as the
    snapshot it was when made. `frontends` is then a read-only mapping (use it at
    once; do not keep its dict views across compiler syncs).

    `previous` (compiler states): the frontends that changed since the state before
    (`base`), each with its rule there (None: it had none).
    """

    __slots__ = ("service_cidrs", "node_ips", "health_checks", "masquerade_mark", "previous",
                 "_live", "_over", "_shared", "_seq", "_base", "_rules", "__weakref__")

    def __init__(self, rules: Iterable[FrontendRule] = (), service_cidrs: tuple[str, ...] = (),
                 node_ips: tuple[str, ...] = (), health_checks: tuple[HealthCheck, ...] = (),
                 masquerade_mark: int = MASQUERADE_MARK):
        rules = tuple(rules)
        self.service_cidrs = service_cidrs
        self.node_ips = node_ips
        self.health_checks = health_checks
        self.masquerade_mark = masquerade_mark
        self.previous: dict[Frontend, FrontendRule | None] = {}
        self._rules: tuple[FrontendRule, ...] | None = rules
        self._live: dict[Frontend, FrontendRule] = {r.frontend: r for r in rules}
        # rules this state had where the live index moved on (None: no rule); None while current
        self._over: dict[Frontend, FrontendRule | None] | None = None
        self._shared = False  # _live is a compiler's, mutated after this state was made
        self._seq = 0  # order of the states sharing one live index
        self._base: ServiceState | None = None

    @classmethod
    def shared(cls, live: dict[Frontend, FrontendRule], seq: int, base: ServiceState | None,
               previous: dict[Frontend, FrontendRule | None], **fields: Any) -> ServiceState:
        """A state over a compiler's live index (ServiceCompiler only): `live` is not
        copied; the compiler must call `_moved_on` on every state still alive before
        it changes `live` again."""
        state = cls(**fields)
        state._rules = None  # made on first use
        state._live = live
        state._shared = True
        state._seq = seq
        state.previous = previous
        if base is not None:
            base._base = None  # keep one link, not the whole history
            state._base = base
        return state

    def _moved_on(self, previous: dict[Frontend, FrontendRule | None]) -> None:
        """The live index is about to hold new rules for `previous`'s frontends
        (each with its rule so far): keep this state's view of them."""
        over = self._over
        if over is None:
            self._over = dict(previous)
            return
        for fe, r in previous.items():
            if fe not in over:
                over[fe] = r

    # -- reading

    @property
    def rules(self) -> tuple[FrontendRule, ...]:
        """One rule per frontend (compiler states: in the order frontends first appeared)."""
        r = self._rules
        if r is None:
            r = self._rules = tuple(self.frontends.values())
        return r

    def rule(self, frontend: Frontend) -> FrontendRule | None:
        over = self._over
        if over and frontend in over:
            return over[frontend]
        return self._live.get(frontend)

    @property
    def frontends(self) -> Mapping[Frontend, FrontendRule]:
        return _Frontends(self) if self._shared else self._live

    def services(self) -> set[str]:
        return {r.service for r in self.rules}

    @property
    def base(self) -> ServiceState | None:
        return self._base

    def changed_since(self, other: ServiceState | None) -> frozenset[Frontend] | None:
        """The frontends that may differ from `other`, when known (else None: compare all)."""
        if other is None or other is self or self.service_cidrs != other.service_cidrs \
                or self.node_ips != other.node_ips:
            return None
        if self._base is other:
            return frozenset(self.previous)
        if self._shared and other._shared and other._live is self._live and other._seq < self._seq \
                and other._over is not None:
            return frozenset(other._over)  # every frontend that changed since `other` (a superset)
        return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServiceState):
            return NotImplemented
        if other is self:
            return True
        if (self.service_cidrs, self.node_ips, self.health_checks, self.masquerade_mark) != \
                (other.service_cidrs, other.node_ips, other.health_checks, other.masquerade_mark):
            return False
        if self._live is other._live:  # two states of one compiler: they differ at most where one moved on
            return all(self.rule(fe) == other.rule(fe) for fe in {*(self._over or ()), *(other._over or ())})
        a, b = self.frontends, other.frontends
        if len(a) != len(b):
            return False
        for fe, r in a.items():
            o = b.get(fe)
            if o is not r and o != r:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # holds a dict: compare, do not hash

    def __repr__(self) -> str:
        return (f"ServiceState({len(self.frontends)} frontends, service_cidrs={self.service_cidrs!r}, "
                f"node_ips={self.node_ips!r}, health_checks={self.health_checks!r}, "
                f"masquerade_mark={self.masquerade_mark:#x})")


@dataclass(frozen=True)
class StaleFlow:
    """UDP conntrack entries to delete after a sync: flows to `frontend` whose
    reply comes from `backend` (a removed endpoint), or, with backend None, every
    flow to `frontend` (it had no endpoints and now has some)."""

    frontend: Frontend
    backend: Backend | None


def stale_udp_flows(old: ServiceState | None, new: ServiceState) -> list[StaleFlow]:
    """What kube-proxy's conntrack cleanup deletes, computed from two states."""
    if old is None:
        return []
    out: list[StaleFlow] = []
    for fe, before in old.frontends.items():
        if fe.proto != "udp":
            continue
        after = new.rule(fe)
        kept = {*after.backends, *after.short_circuit} if after else set()
        for b in {*before.backends, *before.short_circuit}:
            if b not in kept:
                out.append(StaleFlow(fe, b))
        if not before.backends and after is not None and after.backends:
            out.append(StaleFlow(fe, None))
    for fe, after in new.frontends.items():
        if fe.proto == "udp" and old.rule(fe) is None and after.backends:
            # a new UDP frontend: flows to it started before it existed were never NATed
            out.append(StaleFlow(fe, None))
    return sorted(set(out), key=lambda f: (f.frontend, f.backend or Backend("", 0)))
