"""Why a connection is allowed or denied, read off the compiled table.

The objects are compiled with every pod treated as local (each pod's own node
programs exactly the same dispatch, group and policy chains for it), and the
connection is walked through that state as the kernel walks it. So the answer
is the kernel's, with the policy and rule behind each chain rule named.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from podnet.errors import PodnetError
from podnet.model.objects import Namespace, NetworkPolicy, Node, Pod
from podnet.policy.compiler import EGRESS, INGRESS, compile_policy
from podnet.policy.evaluate import LOOPBACK_NOTE, DirectionVerdict, is_loopback, walk
from podnet.policy.model import PROTOCOLS, InputCache


class ExplainError(PodnetError):
    pass


@dataclass
class Endpoint:
    text: str  # as given
    ip: str
    pod: Pod | None = None

    @property
    def label(self) -> str:
        if self.pod is not None:
            return f"{self.pod.namespace}/{self.pod.name} ({self.ip})"
        return self.ip


@dataclass
class Explanation:
    src: Endpoint
    dst: Endpoint
    port: int
    protocol: str
    allowed: bool
    lines: list[str] = field(default_factory=list)
    egress: DirectionVerdict | None = None
    ingress: DirectionVerdict | None = None

    def text(self) -> str:
        head = (f"{self.src.label} -> {self.dst.label} {self.port}/{self.protocol}: "
                f"{'ALLOWED' if self.allowed else 'DENIED (dropped)'}")
        return "\n".join([head, *self.lines])

    def to_dict(self) -> dict[str, Any]:
        def direction(v: DirectionVerdict | None) -> dict | None:
            if v is None:
                return None
            return {
                "isolated": v.isolated, "allowed": v.allowed, "policies": v.policies,
                "allowed_by": None if v.allowed_by is None else
                {"policy": v.allowed_by.policy, "rule": v.allowed_by.rule_index},
            }
        return {"src": self.src.label, "dst": self.dst.label, "port": self.port, "protocol": self.protocol,
                "allowed": self.allowed, "egress": direction(self.egress), "ingress": direction(self.ingress),
                "explanation": self.lines}


def parse_port(text: str) -> tuple[int, str]:
    port, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in PROTOCOLS:
        raise ExplainError(f"unknown protocol {proto!r}: expected TCP, UDP or SCTP")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ExplainError(f"invalid port {port!r}: expected 1-65535, e.g. 80/TCP")
    return int(port), proto


def resolve(text: str, pods: list[Pod]) -> Endpoint:
    try:
        ip = str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    else:
        owner = next((p for p in pods if p.status.pod_ip == ip and not p.spec.host_network), None)
        return Endpoint(text, ip, owner)
    ns, sep, name = text.partition("/")
    if not sep:
        ns, name = "default", text
    pod = next((p for p in pods if p.namespace == ns and p.name == name), None)
    if pod is None:
        raise ExplainError(f"no pod {ns}/{name}: give ns/pod or an IPv4 address")
    if not pod.status.pod_ip:
        raise ExplainError(f"pod {ns}/{name} has no address yet")
    return Endpoint(text, pod.status.pod_ip, pod)


def _direction_lines(v: DirectionVerdict, who: str, peer: str) -> list[str]:
    name = "egress" if v.direction == EGRESS else "ingress"
    if not v.isolated:
        return [f"{name} of {who}: no policy with {name.capitalize()} selects it: allowed"]
    out = [f"{name} of {who}: selected by {', '.join(v.policies)}"]
    for c in v.checks:
        mark = "MATCH" if c.peer_ok and c.port_ok else "no"
        why = []
        if not c.peer_ok:
            why.append(f"{peer} is not {c.peer_desc}")
        if not c.port_ok:
            why.append(f"port is not {c.port_desc}")
        out.append(f"  {c.policy} {name} rule {c.rule_index}: {c.peer_desc}, {c.port_desc}: {mark}"
                   + (f" ({'; '.join(why)})" if why else ""))
    if v.policies and not v.checks:
        out.append("  (these policies have no rules: they isolate and allow nothing)")
    if v.allowed_by is not None:
        out.append(f"  -> allowed by {v.allowed_by.policy} {name} rule {v.allowed_by.rule_index}")
    else:
        out.append("  -> denied: no rule of these policies admits it")
    return out


def explain(pods: list[Pod], namespaces: list[Namespace], policies: list[NetworkPolicy], nodes: list[Node],
            src_text: str, dst_text: str, port_text: str) -> Explanation:
    port, proto = parse_port(port_text)
    src, dst = resolve(src_text, pods), resolve(dst_text, pods)
    node_ips = {n.name: n.internal_ip for n in nodes}
    ex = Explanation(src, dst, port, proto, True)
    if is_loopback(src.ip, dst.ip):
        ex.lines.append(f"{src.label} is both ends: {LOOPBACK_NOTE}")
        return ex
    for a, b in ((src, dst), (dst, src)):
        if a.pod is not None and b.pod is None and node_ips.get(a.pod.spec.node_name or "") == b.ip:
            ex.lines.append(f"{b.ip} is the node of {a.label}: traffic between a pod and its own node is "
                            "always allowed")
            return ex
    for e in (src, dst):
        if e.pod is not None and e.pod.spec.host_network:
            ex.lines.append(f"{e.label} uses the host network: no policy selects it, it counts as its address")
    inputs = InputCache().inputs(pods, namespaces, policies, [p.status.pod_ip for p in pods if p.status.pod_ip])
    state = compile_policy(inputs)
    v = walk(state, src.ip, dst.ip, proto, port, first_only=False)
    ex.egress, ex.ingress, ex.allowed = v.egress, v.ingress, v.allowed
    ex.lines += _direction_lines(v.egress, src.label, f"destination {dst.ip}")
    ex.lines += _direction_lines(v.ingress, dst.label, f"source {src.ip}")
    if v.allowed:
        ex.lines.append("replies of the connection are allowed (ct state established,related)")
    else:
        blocked = [d for d, dv in ((EGRESS, v.egress), (INGRESS, v.ingress)) if not dv.allowed]
        ex.lines.append(f"the connection needs the source's egress AND the destination's ingress; "
                        f"{' and '.join(blocked)} denied: packets are dropped (the client times out)")
    return ex
