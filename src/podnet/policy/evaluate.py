"""Verdicts computed two ways.

- `walk`: runs a packet through a compiled `PolicyState` exactly as the kernel
  runs it through table `ip podnet-policy` (dispatch map, group chain, policy
  chains, set lookups), recording why. `podnet policy explain` uses this, so it
  cannot disagree with what was programmed.
- `reference_allowed`: the upstream semantics read straight from the objects,
  with no compiler involved. Truth tables check both.

A pod talking to itself (source and destination the same address) is always
allowed, both ways: the packets stay on the pod's loopback and never reach the
forward hook, and Kubernetes never lets a policy block a pod from itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from podnet.policy.compiler import DIRECTIONS, EGRESS, INGRESS, PolicyState, Rule
from podnet.policy.model import (
    CidrPeer,
    Inputs,
    PeerSelector,
    PodInfo,
    PortSpec,
    interval_of,
    selector_matches,
)


@dataclass
class RuleCheck:
    policy: str
    rule_index: int
    peer_desc: str
    port_desc: str
    peer_ok: bool
    port_ok: bool


@dataclass
class DirectionVerdict:
    direction: str
    isolated: bool  # some policy selects the pod for this direction
    policies: list[str] = field(default_factory=list)
    allowed_by: RuleCheck | None = None
    checks: list[RuleCheck] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.isolated or self.allowed_by is not None


@dataclass
class Verdict:
    src: str
    dst: str
    port: int
    protocol: str
    egress: DirectionVerdict
    ingress: DirectionVerdict
    note: str = ""

    @property
    def loopback(self) -> bool:
        return is_loopback(self.src, self.dst)

    @property
    def allowed(self) -> bool:
        return self.loopback or (self.egress.allowed and self.ingress.allowed)


LOOPBACK_NOTE = ("a pod talking to itself: the packets stay on its loopback and never reach the policy "
                 "table; always allowed")


def is_loopback(src: str, dst: str) -> bool:
    return src == dst


def _in_set(state: PolicyState, name: str, value: str) -> bool:
    s = state.sets.get(name)
    if s is None:
        return False
    if s.kind == "cidr":
        addr = int(ipaddress.IPv4Address(value))
        return any(lo <= addr <= hi for lo, hi in map(interval_of, s.elements))
    return value in s.elements


def _rule_check(state: PolicyState, policy: str, direction: str, r: Rule, src: str, dst: str,
                protocol: str, port: int) -> RuleCheck:
    peer = src if direction == INGRESS else dst
    peer_ok = r.peer_set is None or _in_set(state, r.peer_set, peer)
    if r.port is None:
        port_ok = True
    elif r.port.protocol != protocol:
        port_ok = False
    elif r.port.named_set is not None:
        port_ok = _in_set(state, r.port.named_set, f"{dst} . {port}")
    elif r.port.lo is None:
        port_ok = True
    else:
        assert r.port.hi is not None
        port_ok = r.port.lo <= port <= r.port.hi
    return RuleCheck(policy, r.rule_index, r.peer_desc, r.port_desc, peer_ok, port_ok)


def walk_direction(state: PolicyState, direction: str, src: str, dst: str, protocol: str, port: int,
                   first_only: bool = True) -> DirectionVerdict:
    pod = dst if direction == INGRESS else src
    group = state.dispatch[direction].get(pod)
    if group is None:
        return DirectionVerdict(direction, False)
    v = DirectionVerdict(direction, True)
    for chain_name in state.groups[group].policy_chains:
        chain = state.policy_chains[chain_name]
        v.policies.append(chain.policy)
        for r in chain.rules:
            check = _rule_check(state, chain.policy, direction, r, src, dst, protocol, port)
            v.checks.append(check)
            if check.peer_ok and check.port_ok and v.allowed_by is None:
                v.allowed_by = check
                if first_only:
                    return v
    return v


def walk(state: PolicyState, src: str, dst: str, protocol: str, port: int, first_only: bool = True) -> Verdict:
    """The kernel's verdict on a new connection src -> dst:port/protocol (addresses after DNAT).

    The directions are walked even for a pod to itself, to show what the chains hold;
    such a connection is allowed all the same (see the module doc)."""
    return Verdict(
        src, dst, port, protocol,
        egress=walk_direction(state, EGRESS, src, dst, protocol, port, first_only),
        ingress=walk_direction(state, INGRESS, src, dst, protocol, port, first_only),
        note=LOOPBACK_NOTE if is_loopback(src, dst) else "",
    )


# ------------------------------------------------------------------ reference semantics


def _peer_matches(inp: Inputs, policy_ns: str, peer, ip: str) -> bool:
    if isinstance(peer, CidrPeer):
        return peer.contains(ip)
    assert isinstance(peer, PeerSelector)
    for pod in inp.pods.values():
        if pod.ip != ip:
            continue
        if peer.ns_selector is None:
            if pod.namespace != policy_ns:
                continue
        else:
            ns_labels = dict(inp.namespaces.get(pod.namespace, (("kubernetes.io/metadata.name", pod.namespace),)))
            if not selector_matches(peer.ns_selector, ns_labels):
                continue
        if selector_matches(peer.pod_selector, pod.label_map):
            return True
    return False


def _port_matches(spec: PortSpec, dst_pod: PodInfo | None, protocol: str, port: int) -> bool:
    if spec.protocol != protocol:
        return False
    if spec.port is None:
        return True
    if isinstance(spec.port, str):
        if dst_pod is None:
            return False
        return dst_pod.named_port(spec.port, protocol) == port
    end = spec.end_port if spec.end_port is not None else spec.port
    return spec.port <= port <= end


def _selected(inp: Inputs, pod: PodInfo | None, direction: str) -> list[str]:
    if pod is None or pod.host_network or pod.ip is None:
        return []
    return sorted(
        k for k, pol in inp.policies.items()
        if pol.namespace == pod.namespace and pol.rules(direction) is not None
        and selector_matches(pol.pod_selector, pod.label_map)
    )


def reference_allowed(inp: Inputs, src_ip: str, dst_ip: str, protocol: str, port: int) -> bool:
    """Upstream semantics: the source's egress AND the destination's ingress; a pod to itself
    always."""
    if is_loopback(src_ip, dst_ip):
        return True
    pods_by_ip = {p.ip: p for p in inp.pods.values() if p.ip}
    src, dst = pods_by_ip.get(src_ip), pods_by_ip.get(dst_ip)
    for direction, pod in ((EGRESS, src), (INGRESS, dst)):
        selecting = _selected(inp, pod, direction)
        if not selecting:
            continue
        peer_ip = dst_ip if direction == EGRESS else src_ip
        ok = False
        for key in selecting:
            pol = inp.policies[key]
            for rule in pol.rules(direction) or ():
                peer_ok = rule.peers is None or any(_peer_matches(inp, pol.namespace, p, peer_ip) for p in rule.peers)
                port_ok = rule.ports is None or any(_port_matches(s, dst, protocol, port) for s in rule.ports)
                if peer_ok and port_ok:
                    ok = True
                    break
            if ok:
                break
        if not ok:
            return False
    return True


__all__ = ["DIRECTIONS", "Verdict", "DirectionVerdict", "RuleCheck", "walk", "reference_allowed"]
