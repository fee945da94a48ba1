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

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Proto = Literal["tcp", "udp", "sctp"]
FrontendKind = Literal["ClusterIP", "ExternalIP", "LoadBalancer", "NodePort"]
NoEndpoints = Literal["reject", "drop"]

MASQUERADE_MARK = 0x4000  # the bit kube-proxy uses (KUBE-MARK-MASQ)
DEFAULT_CONNTRACK_MAX_PER_CORE = 32768
DEFAULT_CONNTRACK_MIN = 131072


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


@dataclass(frozen=True, order=True)
class FrontendRule:
    """One frontend of one Service port, as this node must program it.

    backends: the endpoints in slot order (empty: nothing to balance to, see
    no_endpoints). masquerade: SNAT to the node so replies come back through it
    (NodePort/external traffic under externalTrafficPolicy Cluster).
    affinity_timeout: seconds of ClientIP stickiness, or None.
    source_ranges: LoadBalancer source CIDRs allowed (empty: everyone).
    """

    frontend: Frontend
    service: str  # "namespace/name:portname" (portname may be empty), for logs, comments and metrics
    kind: FrontendKind
    backends: tuple[Backend, ...] = ()
    no_endpoints: NoEndpoints = "reject"
    masquerade: bool = False
    affinity_timeout: int | None = None
    source_ranges: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
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


@dataclass(frozen=True)
class ServiceState:
    """The whole desired Service dataplane of one node."""

    rules: tuple[FrontendRule, ...] = field(default=(), compare=False)  # one per frontend
    service_cidrs: tuple[str, ...] = ()
    node_ips: tuple[str, ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()
    masquerade_mark: int = MASQUERADE_MARK
    # what two states compare by: the rule of each frontend, whatever the order of `rules`
    _index: dict[Frontend, FrontendRule] = field(init=False, repr=False)
    # a hint from ServiceCompiler: this state differs from `_base` at most in `_changed`
    _base: ServiceState | None = field(init=False, default=None, compare=False, repr=False)
    _changed: frozenset[Frontend] = field(init=False, default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {r.frontend: r for r in self.rules})

    __hash__ = None  # type: ignore[assignment]  # holds a dict: compare, do not hash

    @classmethod
    def from_frontends(cls, index: dict[Frontend, FrontendRule], base: ServiceState | None = None,
                       changed: frozenset[Frontend] = frozenset(), **fields: object) -> ServiceState:
        """Build from a frontend -> rule dict without another pass over the rules.

        base/changed: the previous state and the frontends that may differ from it,
        so that a consumer holding `base` can diff in proportion to the change.
        """
        state = cls(**fields)  # type: ignore[arg-type]
        object.__setattr__(state, "rules", tuple(index.values()))
        object.__setattr__(state, "_index", index.copy())
        if base is not None:
            object.__setattr__(base, "_base", None)  # keep one link, not the whole history
            object.__setattr__(state, "_base", base)
            object.__setattr__(state, "_changed", frozenset(changed))
        return state

    def changed_since(self, other: ServiceState) -> frozenset[Frontend] | None:
        """The frontends that may differ from `other`, when known (else None: compare all)."""
        if self._base is other and other is not None and self.service_cidrs == other.service_cidrs \
                and self.node_ips == other.node_ips:
            return self._changed
        return None

    def rule(self, frontend: Frontend) -> FrontendRule | None:
        return self._index.get(frontend)

    @property
    def frontends(self) -> dict[Frontend, FrontendRule]:
        return self._index

    def services(self) -> set[str]:
        return {r.service for r in self.rules}


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
        kept = set(after.backends) if after else set()
        for b in before.backends:
            if b not in kept:
                out.append(StaleFlow(fe, b))
        if not before.backends and after is not None and after.backends:
            out.append(StaleFlow(fe, None))
    for fe, after in new.frontends.items():
        if fe.proto == "udp" and old.rule(fe) is None and after.backends:
            # a new UDP frontend: flows to it started before it existed were never NATed
            out.append(StaleFlow(fe, None))
    return sorted(set(out), key=lambda f: (f.frontend, f.backend or Backend("", 0)))
