"""Connectivity in a running lab, probed with real connections.

For every source pod, one probe client (`podnet.lab.probe`) runs inside the
pod's namespace and connects to each destination's served port; the server
answers with its name, so a row shows who really answered. Pod-to-pod paths are
`same-node` or `cross-node/<vxlan|direct>` (the destination pool's encapsulation);
pod-to-external is expected to work only from pools with natOutgoing (the
external host has no route back to pod addresses).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from podnet.errors import PodnetError
from podnet.lab import cluster
from podnet.lab.state import LabState
from podnet.model.objects import IPPool, Pod
from podnet.store import open_store
from podnet.store.objects import ObjectStore


@dataclass(frozen=True)
class Target:
    name: str  # what should answer: a pod name or the external host's name
    ref: str  # ns/name, or "external"
    node: str | None
    proto: str
    ip: str
    port: int


@dataclass(frozen=True)
class Row:
    src: str
    dst: str
    kind: str
    expected: bool
    ok: bool
    detail: str
    target: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lab:
    """A running lab, read from its state: pods, nodes, the store, exec into namespaces."""

    def __init__(self, state: LabState):
        self.state = state

    @classmethod
    def open(cls, name: str | None = None, root: Path | None = None) -> Lab:
        return cls(cluster.find_lab(name, root))

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def nodes(self) -> list[dict]:
        return self.state.data.get("nodes", [])

    @property
    def pods(self) -> list[dict]:
        return self.state.data.get("pods", [])

    def store(self) -> ObjectStore:
        return ObjectStore(open_store(self.state.data["store"]))

    def pod(self, ref: str) -> dict:
        return cluster.find_pod(self.state, ref)

    def node(self, name: str) -> dict:
        return cluster.find_node(self.state, name)

    def exec(self, pod: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run argv in a pod's namespace (kwargs go to subprocess.run; text output by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(cluster.exec_argv(self.pod(pod)["netns"], argv), check=False, **kwargs)

    def exec_node(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(cluster.exec_argv(self.node(node)["netns"], argv), check=False, **kwargs)

    @property
    def external_ip(self) -> str | None:
        """The external host's address, if the lab has one."""
        ext = self.state.data.get("external")
        return str(ipaddress.ip_interface(ext).ip) if ext else None

    def probe(self, pod: str, targets: Iterable[str], timeout: float = 2.0) -> list[dict]:
        """Run the probe client in a pod against PROTO:HOST:PORT targets; one dict per target."""
        return self._probe(pod, self.pod(pod)["netns"], targets, timeout)

    def probe_node(self, node: str, targets: Iterable[str], timeout: float = 2.0) -> list[dict]:
        """The same from a node's own namespace (as the node itself or a hostNetwork pod)."""
        return self._probe(f"node {node}", self.node(node)["netns"], targets, timeout)

    def probe_external(self, targets: Iterable[str], timeout: float = 2.0) -> list[dict]:
        """The same from the external host (its address, in the underlay's namespace)."""
        netns, ip = self.state.data.get("underlay_netns"), self.external_ip
        if not netns or not ip:
            raise PodnetError(f"lab {self.name} has no external host")
        return self._probe("the external host", netns, targets, timeout, bind=ip)

    def _probe(self, who: str, netns: str, targets: Iterable[str], timeout: float,
               bind: str | None = None) -> list[dict]:
        argv = [sys.executable, "-m", "podnet.lab.probe", "--timeout", str(timeout),
                *(["--bind", bind] if bind else []), *targets]
        proc = subprocess.run(cluster.exec_argv(netns, argv), capture_output=True, text=True, check=False,
                              timeout=timeout * 3 + 10)
        if proc.returncode != 0:
            raise PodnetError(f"probe from {who} failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)


def _pools(lab: Lab) -> list[IPPool]:
    try:
        return lab.store().list(IPPool)
    except Exception:  # a store that cannot be read only loses the path detail
        return []


def pool_of(ip: str, pools: list[IPPool]) -> IPPool | None:
    addr = ipaddress.ip_address(ip)
    for p in pools:
        if addr in ipaddress.ip_network(p.spec.cidr):
            return p
    return None


def targets(lab: Lab, all_ports: bool = False) -> list[Target]:
    """Every pod's served port (the first, or all), and the external host's."""
    out: list[Target] = []
    try:
        pods = {(p.namespace, p.name): p for p in lab.store().list(Pod)}
    except Exception:
        pods = {}
    for entry in lab.pods:
        pod = pods.get((entry["namespace"], entry["name"]))
        if pod is None or not entry.get("ips"):
            continue
        ports = [(p.protocol.lower(), p.container_port) for c in pod.spec.containers for p in c.ports]
        ports = [p for p in ports if p[0] != "sctp"]
        if not all_ports:
            ports = sorted(ports, key=lambda p: p[0] != "tcp")[:1]
        for proto, port in ports:
            out.append(Target(entry["name"], f"{entry['namespace']}/{entry['name']}", entry["node"], proto,
                              entry["ips"][0], port))
    ext = lab.state.process("external")
    if ext is not None and lab.state.data.get("external"):
        ip = str(ipaddress.ip_interface(lab.state.data["external"]).ip)
        argv = ext["argv"]
        name = argv[argv.index("--name") + 1]
        ports = [a.split(":") for i, a in enumerate(argv) if i and argv[i - 1] == "--port"]
        ports = sorted(ports, key=lambda p: p[0] != "tcp")
        for proto, port in ports if all_ports else ports[:1]:
            out.append(Target(name, "external", None, proto, ip, int(port)))
    return out


def path_kind(lab: Lab, src: dict, dst: Target, pools: list[IPPool]) -> str:
    if dst.ref == "external":
        return "external"
    if src["node"] == dst.node:
        return "same-node"
    if lab.state.data.get("cni") == "bridge":
        return "cross-node/direct"
    pool = pool_of(dst.ip, pools)
    if pool is None:
        return "cross-node"
    return "cross-node/vxlan" if pool.spec.encapsulation == "VXLAN" else "cross-node/direct"


def default_expect(lab: Lab, src: dict, dst: Target, kind: str, pools: list[IPPool]) -> bool:
    if kind == "external":
        if src.get("hostNetwork"):
            return True  # the node's own address: the outside world can answer it
        pool = pool_of(src["ips"][0], pools) if src.get("ips") else None
        return bool(pool and pool.spec.nat_outgoing)
    return True


Expect = Callable[[Lab, dict, Target, str, list[IPPool]], bool]


def policy_expect(lab: Lab) -> Expect:
    """default_expect, and NetworkPolicy as upstream defines it (the reference evaluator,
    written apart from the nftables compiler, so the kernel is checked against the spec)."""
    from podnet.model.objects import Namespace, NetworkPolicy
    from podnet.policy.evaluate import reference_allowed
    from podnet.policy.model import InputCache

    store = lab.store()
    pods = store.list(Pod)
    policies = store.list(NetworkPolicy)
    inputs = InputCache().inputs(pods, store.list(Namespace), policies,
                                 [p.status.pod_ip for p in pods if p.status.pod_ip and not p.spec.host_network])

    def expect(lab: Lab, src: dict, dst: Target, kind: str, pools: list[IPPool]) -> bool:
        if not default_expect(lab, src, dst, kind, pools):
            return False
        if not policies or src.get("hostNetwork") or not src.get("ips"):
            return True
        return reference_allowed(inputs, src["ips"][0], dst.ip, dst.proto.upper(), dst.port)

    return expect


def probe_all(lab: Lab, *, timeout: float = 2.0, include_external: bool = True, all_ports: bool = False,
              sources: Iterable[str] | None = None, expect: Expect | None = None) -> list[Row]:
    """Probe every source pod against every other pod (and the external host); one Row per pair.
    Expected outcomes follow the routing setup and the NetworkPolicies in the store."""
    expect = expect or policy_expect(lab)
    pools = _pools(lab)
    all_targets = [t for t in targets(lab, all_ports) if include_external or t.ref != "external"]
    srcs = [p for p in lab.pods if p.get("ips")]
    if sources is not None:
        wanted = set(sources)
        srcs = [p for p in srcs if p["name"] in wanted or f"{p['namespace']}/{p['name']}" in wanted]

    def run(src: dict) -> list[Row]:
        ref = f"{src['namespace']}/{src['name']}"
        mine = [t for t in all_targets if t.ref != ref]
        if not mine:
            return []
        try:
            results = lab.probe(ref, [f"{t.proto}:{t.ip}:{t.port}" for t in mine], timeout)
        except (PodnetError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            results = [{"ok": False, "error": f"probe failed: {e}"} for _ in mine]
        rows = []
        for t, r in zip(mine, results, strict=True):
            kind = path_kind(lab, src, t, pools)
            expected = expect(lab, src, t, kind, pools)
            reached = bool(r.get("ok")) and r.get("name") == t.name
            if reached:
                detail = f"answered by {r['name']}" + (f", saw source {r['peer']}" if r.get("peer") else "")
            elif r.get("ok"):
                detail = f"answered by {r.get('name')!r}, expected {t.name!r}"
            else:
                detail = r.get("error") or "no answer"
            rows.append(Row(ref, t.ref, kind, expected, reached == expected, detail,
                            f"{t.proto}/{t.ip}:{t.port}"))
        return rows

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [row for rows in pool.map(run, srcs) for row in rows]


def format_table(rows: list[Row]) -> str:
    header = ("SRC", "DST", "TARGET", "PATH", "EXPECT", "RESULT", "DETAIL")
    table = [header] + [
        (r.src, r.dst, r.target, r.kind, "reach" if r.expected else "blocked",
         "ok" if r.ok else "FAIL", r.detail) for r in rows
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    bad = sum(1 for r in rows if not r.ok)
    lines.append(f"{len(rows)} probes: {len(rows) - bad} as expected, {bad} not")
    return "\n".join(lines)
