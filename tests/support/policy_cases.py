"""Truth-table cases in the shape of the upstream e2e NetworkPolicy tests.

The model: namespaces x, y, z (labels ns=<name>), pods a, b, c in each (labels
pod=<name>), each serving 80 and 81 over TCP, UDP and SCTP with the port names
serve-80-tcp etc. Addresses are fixed so ipBlock cases can name them:

    x/a 10.244.0.11  x/b .12  x/c .13   y/a .21 ...   z/c .33

A case file (tests/policy_cases/*.yaml) lists steps; each step applies and/or
deletes policies and then states the reachability matrix of one or more probes,
printed as upstream prints it: rows are sources, columns destinations, `.` is
allowed and `X` blocked. A case may override pod labels and named ports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from podnet.errors import ValidationError
from podnet.model.objects import Namespace, NetworkPolicy, Pod

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_NET = "10.96.0."


def pod_ip(pod: str) -> str:
    ns, name = pod.split("/")
    return f"10.244.0.{10 * (NAMESPACES.index(ns) + 1) + POD_NAMES.index(name) + 1}"


def service_ip(pod: str) -> str:
    """The ClusterIP of the Service in front of one pod (kernel tests DNAT it)."""
    return SERVICE_NET + str(PODS.index(pod) + 10)


def node_of(pod: str) -> str:
    return "n1" if pod not in PODS or PODS.index(pod) % 2 == 0 else "n2"


def default_ports() -> list[dict[str, Any]]:
    return [
        {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
        for proto in PROTOCOLS
        for port in PORTS
    ]


def make_pod(pod: str, labels: dict[str, str] | None = None, ports: list[dict] | None = None,
             host_network: bool = False) -> Pod:
    ns, name = pod.split("/")
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": ns, "labels": labels if labels is not None else {"pod": name}},
        "spec": {"nodeName": node_of(pod), "hostNetwork": host_network,
                 "containers": [{"name": "c", "ports": ports if ports is not None else default_ports()}]},
        "status": {"phase": "Running", "podIP": pod_ip(pod) if pod in PODS else None},
    })


def make_namespace(ns: str, labels: dict[str, str] | None = None) -> Namespace:
    return Namespace.model_validate({"metadata": {"name": ns, "labels": labels if labels is not None else {"ns": ns}}})


# ------------------------------------------------------------------ matrices


@dataclass
class Matrix:
    """allowed[src][dst]; sources and destinations in the order printed."""

    sources: list[str]
    dests: list[str]
    allowed: dict[str, dict[str, bool]]

    @classmethod
    def parse(cls, text: str) -> Matrix:
        lines = [ln.split() for ln in text.strip().splitlines() if ln.strip()]
        dests = lines[0][1:]
        allowed: dict[str, dict[str, bool]] = {}
        sources = []
        for row in lines[1:]:
            src, marks = row[0], row[1:]
            if len(marks) != len(dests):
                raise ValidationError(f"matrix row {src}: {len(marks)} marks for {len(dests)} columns")
            bad = [m for m in marks if m not in (".", "X")]
            if bad:
                raise ValidationError(f"matrix row {src}: marks must be '.' or 'X', not {bad[0]!r}")
            sources.append(src)
            allowed[src] = {d: m == "." for d, m in zip(dests, marks, strict=True)}
        return cls(sources, dests, allowed)

    def format(self) -> str:
        width = max(len(x) for x in [*self.sources, *self.dests, "-"])
        head = " ".join(x.ljust(width) for x in ["-", *self.dests])
        rows = [
            " ".join([s.ljust(width), *(("." if self.allowed[s][d] else "X").ljust(width) for d in self.dests)])
            for s in self.sources
        ]
        return "\n".join([head.rstrip(), *(r.rstrip() for r in rows)])

    def diff(self, other: Matrix, ignore_loopback: bool = False) -> list[str]:
        out = []
        for s in self.sources:
            for d in self.dests:
                if ignore_loopback and s == d:
                    continue
                if self.allowed[s][d] != other.allowed[s][d]:
                    want = "allowed" if self.allowed[s][d] else "blocked"
                    got = "allowed" if other.allowed[s][d] else "blocked"
                    out.append(f"{s} -> {d}: expected {want}, got {got}")
        return out


# ------------------------------------------------------------------ cases


@dataclass
class Probe:
    port: int
    protocol: str
    expect: Matrix
    via_service: bool = False

    @property
    def label(self) -> str:
        return f"{self.port}/{self.protocol}" + (" via Service" if self.via_service else "")


@dataclass
class Step:
    apply: list[NetworkPolicy]
    delete: list[str]  # "ns/name"
    probes: list[Probe]
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    pod_labels: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    description: str
    steps: list[Step]
    kernel: bool
    pods: dict[str, dict]  # per-pod overrides: labels, ports
    file: str = ""


def _policy(doc: dict, where: str) -> NetworkPolicy:
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", **doc}
    try:
        return NetworkPolicy.model_validate(doc)
    except Exception as e:  # pydantic's message names the field
        raise ValidationError(f"{where}: invalid policy: {e}") from None


def _probes(items: list[dict], where: str) -> list[Probe]:
    out = []
    for p in items:
        m = Matrix.parse(p["expect"])
        if set(m.sources) != set(PODS) or set(m.dests) != set(PODS):
            raise ValidationError(f"{where}: a matrix must have every pod as row and column")
        out.append(Probe(int(p.get("port", 80)), p.get("protocol", "TCP"), m, bool(p.get("via_service", False))))
    return out


def load_case(path: str | Path) -> Case:
    path = Path(path)
    doc = yaml.safe_load(path.read_text())
    steps_doc = doc.get("steps") or [{"apply": doc.get("policies", []), "probes": doc.get("probes", [])}]
    steps = []
    for i, s in enumerate(steps_doc):
        where = f"{path.name} step {i}"
        steps.append(Step(
            apply=[_policy(p, where) for p in s.get("apply") or ()],
            delete=list(s.get("delete") or ()),
            probes=_probes(s.get("probes") or [], where),
            namespace_labels=dict(s.get("namespace_labels") or {}),
            pod_labels=dict(s.get("pod_labels") or {}),
        ))
    return Case(doc["name"], doc.get("description", ""), steps, bool(doc.get("kernel", False)),
                dict(doc.get("pods") or {}), str(path))


def load_cases(directory: str | Path) -> list[Case]:
    return [load_case(p) for p in sorted(Path(directory).glob("*.yaml"))]


class CaseWorld:
    """The objects of a case as its steps change them."""

    def __init__(self, case: Case):
        self.case = case
        self.ns_labels = {ns: {"ns": ns} for ns in NAMESPACES}
        self.pod_labels = {p: dict(case.pods.get(p, {}).get("labels", {"pod": p.split("/")[1]})) for p in PODS}
        self.policies: dict[str, NetworkPolicy] = {}

    def step(self, step: Step) -> None:
        for key in step.delete:
            self.policies.pop(key, None)
        for pol in step.apply:
            self.policies[f"{pol.namespace}/{pol.name}"] = pol
        for ns, labels in step.namespace_labels.items():
            self.ns_labels[ns] = dict(labels)
        for pod, labels in step.pod_labels.items():
            self.pod_labels[pod] = dict(labels)

    def pods(self) -> list[Pod]:
        return [make_pod(p, self.pod_labels[p], self.case.pods.get(p, {}).get("ports")) for p in PODS]

    def namespaces(self) -> list[Namespace]:
        return [make_namespace(ns, self.ns_labels[ns]) for ns in NAMESPACES]

    def policy_list(self) -> list[NetworkPolicy]:
        return list(self.policies.values())


def predicted(world_inputs, state, probe: Probe, how: str = "walk") -> Matrix:
    """The matrix the compiled state (`walk`) or the reference semantics (`reference`)
    predicts for a probe. A Service probe is judged on the pod behind it (after DNAT)."""
    from podnet.policy.evaluate import reference_allowed, walk

    allowed: dict[str, dict[str, bool]] = {}
    for s in PODS:
        allowed[s] = {}
        for d in PODS:
            if how == "walk":
                ok = walk(state, pod_ip(s), pod_ip(d), probe.protocol, probe.port).allowed
            else:
                ok = reference_allowed(world_inputs, pod_ip(s), pod_ip(d), probe.protocol, probe.port)
            allowed[s][d] = ok
    return Matrix(list(PODS), list(PODS), allowed)
