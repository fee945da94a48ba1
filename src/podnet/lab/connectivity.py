"""Connectivity in a running lab, probed with real connections.

For every source pod, one probe client (`podnet.lab.probe`) runs inside the
pod's namespace and connects to each destination's served port; the server
answers with its name, so a row shows who really answered. Pod-to-pod paths are
`same-node` or `cross-node/<vxlan|direct>` (the destination pool's encapsulation);
pod-to-external is expected to work only from pools with natOutgoing (the
external host has no route back to pod addresses), or, in a lab with routers
(`spec.router`), from pods of a BGP node in a pool without disableBGPExport: the
router learnt their block. `cross-node/bgp` is a path between two BGP nodes in a
pool without encapsulation (BIRD's routes).

Then what the nodes send (sources `node/<name>`, and `external` for the external
host):
- `node->pod/<vxlan|direct|bgp>`: every node to one pod on every other node; the
  pod must see the node's own address.
- `external->pod`: with routers, the external host to every pod by its own address;
  reached (seeing the external address: no NAT) exactly when the router learnt it.
- `nodeport/<from-node|same-node|external>`: every NodePort (of NodePort and
  LoadBalancer Services) on every node, from every other node, from the node
  itself and from the external host. A row opens enough connections that every
  endpoint answers ( externalTrafficPolicy Cluster: endpoints on every node, each
  seeing the receiving node's address; Local: the receiving node's endpoints, each
  seeing the client's address, none there: dropped; but a node calling its own node
  port reaches every endpoint, as upstream's short-circuit for local traffic does).
NetworkPolicy counts as upstream defines it: a pod and its own node always reach
each other; the source it judges is the node's address, or the client's before
masquerade for an endpoint on the receiving node.

Pods' additional networks (podnet.multinet; NetworkPolicy and Services are eth0's only):
- `attachment/external->pod`: the data network's external host to every pod address on
  that network, seen as the host's own address (no NAT);
- `attachment/pod->external`: every such pod to that host, which must see the pod's
  address on the data network;
- `attachment/pod`: a pod to every other pod on a network both have (the network-status
  annotation names them), seen as the source's address on that network.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from podnet.cli.output import Column, table
from podnet.errors import PodnetError
from podnet.lab import cluster
from podnet.lab.state import LabState
from podnet.model.objects import EndpointSlice, IPPool, Node, Pod, Service
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
        return ObjectStore(cluster.open_lab_store(self.state))

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
    if dst.ref == VPC_HOST:
        return "vpc"
    if in_vpc(lab, dst.ip):
        return "same-node" if src["node"] == dst.node else "cross-node/vpc"
    if src["node"] == dst.node:
        return "same-node"
    if lab.state.data.get("cni") == "bridge":
        return "cross-node/direct"
    pool = pool_of(dst.ip, pools)
    if pool is None:
        return "cross-node"
    if pool.spec.encapsulation == "VXLAN":
        return "cross-node/vxlan"
    bgp = bgp_nodes(lab)
    return "cross-node/bgp" if src["node"] in bgp and dst.node in bgp else "cross-node/direct"


def bgp_nodes(lab: Lab) -> set[str]:
    """The lab's nodes that run BGP (their Node has spec.bgp)."""
    try:
        return {n.name for n in lab.store().list(Node) if n.spec.bgp is not None}
    except Exception:  # a store that cannot be read only loses the path detail
        return set()


def routed_outside(lab: Lab, node: str | None, pool: IPPool | None, bgp: set[str] | None = None) -> bool:
    """Whether the lab's routers learn a pod's block: a BGP node, a pool it may announce."""
    from podnet.lab.bgp import routers

    if pool is None or node is None or pool.spec.disable_bgp_export or not routers(lab.state):
        return False
    return node in (bgp_nodes(lab) if bgp is None else bgp)


VPC_HOST = "vpc-host"


def in_vpc(lab: Lab, ip: str) -> bool:
    """An address of the lab's cloud VPC (an ENI pod's, the VPC host's)."""
    cloud = lab.state.data.get("cloud")
    return bool(cloud) and ipaddress.ip_address(ip) in ipaddress.ip_network(cloud["vpc_cidr"])


def vpc_targets(lab: Lab, all_ports: bool) -> list[Target]:
    """The VPC host of a lab with a cloud (lab/cloud.py)."""
    entry, cloud = lab.state.process(VPC_HOST), lab.state.data.get("cloud")
    if entry is None or not cloud:
        return []
    argv = entry["argv"]
    name = argv[argv.index("--name") + 1]
    ports = sorted((a.split(":") for i, a in enumerate(argv) if i and argv[i - 1] == "--port"),
                   key=lambda p: p[0] != "tcp")
    ip = str(ipaddress.ip_interface(cloud["vpc_host"]).ip)
    return [Target(name, VPC_HOST, None, proto, ip, int(port)) for proto, port in (ports if all_ports else ports[:1])]


def default_expect(lab: Lab, src: dict, dst: Target, kind: str, pools: list[IPPool]) -> bool:
    if kind == "vpc":  # the VPC routes VPC addresses (ENI pods') and the nodes' subnet, nothing else
        return bool(src.get("hostNetwork") or (src.get("ips") and in_vpc(lab, src["ips"][0])))
    if kind == "external":
        if src.get("hostNetwork"):
            return True  # the node's own address: the outside world can answer it
        pool = pool_of(src["ips"][0], pools) if src.get("ips") else None
        return bool(pool and (pool.spec.nat_outgoing or routed_outside(lab, src["node"], pool)))
    return True


Expect = Callable[[Lab, dict, Target, str, list[IPPool]], bool]
Allowed = Callable[[str, str, str, int], bool]  # (source IP, destination IP, proto, port) -> allowed


def policy_allowed(lab: Lab) -> Allowed:
    """NetworkPolicy as upstream defines it (the reference evaluator, written apart from
    the nftables compiler, so the kernel is checked against the spec)."""
    from podnet.model.objects import Namespace, NetworkPolicy
    from podnet.policy.evaluate import reference_allowed
    from podnet.policy.model import InputCache

    store = lab.store()
    pods = store.list(Pod)
    policies = store.list(NetworkPolicy)
    if not policies:
        return lambda src, dst, proto, port: True
    inputs = InputCache().inputs(pods, store.list(Namespace), policies,
                                 [p.status.pod_ip for p in pods if p.status.pod_ip and not p.spec.host_network])
    return lambda src, dst, proto, port: reference_allowed(inputs, src, dst, proto.upper(), port)


def policy_expect(lab: Lab, allowed: Allowed | None = None) -> Expect:
    """default_expect, and NetworkPolicy as upstream defines it."""
    allowed = allowed or policy_allowed(lab)

    def expect(lab: Lab, src: dict, dst: Target, kind: str, pools: list[IPPool]) -> bool:
        if not default_expect(lab, src, dst, kind, pools):
            return False
        if src.get("hostNetwork") or not src.get("ips"):
            return True
        return allowed(src["ips"][0], dst.ip, dst.proto, dst.port)

    return expect


@dataclass(frozen=True)
class Endpoint:
    pod: str  # the pod's name, what its server answers
    ip: str
    node: str | None
    port: int  # the target port on the pod


@dataclass(frozen=True)
class NodePort:
    service: str  # ns/name
    proto: str
    port: int  # the node port
    local: bool  # externalTrafficPolicy Local
    endpoints: tuple[Endpoint, ...]  # ready endpoints that are lab pods


def node_ports(lab: Lab) -> list[NodePort]:
    """The TCP and UDP node ports of the lab's NodePort and LoadBalancer Services, with
    their ready endpoints (from the EndpointSlices, as the agents see them)."""
    try:
        store = lab.store()
        services, slices = store.list(Service), store.list(EndpointSlice)
    except Exception:  # a store that cannot be read: no NodePort probes
        return []
    by_ip = {e["ips"][0]: e for e in lab.pods if e.get("ips") and not e.get("hostNetwork")}
    out = []
    for svc in services:
        if svc.spec.type not in ("NodePort", "LoadBalancer"):
            continue
        ns = svc.namespace or "default"
        mine = [s for s in slices if (s.namespace or "default") == ns and s.service_name == svc.name]
        for sp in svc.spec.ports:
            if not sp.node_port or sp.protocol not in ("TCP", "UDP"):
                continue
            endpoints = set()
            for sl in mine:
                port = next((p.port for p in sl.ports or () if p.name == sp.name and p.protocol == sp.protocol), None)
                for ep in sl.endpoints:
                    entry = by_ip.get(ep.addresses[0])
                    if port and entry and ep.conditions.is_ready:
                        endpoints.add(Endpoint(entry["name"], ep.addresses[0], entry["node"], port))
            if endpoints:
                out.append(NodePort(f"{ns}/{svc.name}", sp.protocol.lower(), sp.node_port,
                                    svc.spec.external_traffic_policy == "Local",
                                    tuple(sorted(endpoints, key=lambda e: e.pod))))
    return out


# Connections per endpoint in a NodePort row: the chance that a random choice misses one
# endpoint of three in 3 * 12 connections is 3 * (2/3)^36, about 1e-6.
TRIES_PER_ENDPOINT = 12


@dataclass(frozen=True)
class _Check:
    """One row to be: `count` connections to `target` from one client."""

    dst: str
    kind: str
    target: str  # PROTO:HOST:PORT
    count: int
    answerers: frozenset[str]  # who must answer, each at least once; empty: nothing may answer
    may_fail: bool  # some endpoints are behind a policy that drops this client: timeouts are fine
    peer: str | None  # the source every answerer must see


def _node_checks(lab: Lab, node: dict, pools: list[IPPool], allowed: Allowed) -> list[_Check]:
    """From a node to one pod (its first served port) on every other node."""
    checks = []
    seen: set[str] = set()
    for t in targets(lab):
        if t.ref == "external" or t.node in (None, node["name"]) or t.node in seen or t.ip == lab.node(t.node)["address"]:
            continue
        seen.add(t.node)
        pool = pool_of(t.ip, pools)
        mode = "direct" if lab.state.data.get("cni") == "bridge" or (pool and pool.spec.encapsulation != "VXLAN") \
            else "vxlan"
        if mode == "direct" and {node["name"], t.node} <= bgp_nodes(lab):
            mode = "bgp"
        if in_vpc(lab, t.ip):
            mode = "vpc"  # an ENI pod: the VPC routes it
        reach = allowed(node["address"], t.ip, t.proto, t.port)
        checks.append(_Check(t.ref, f"node->pod/{mode}", f"{t.proto}:{t.ip}:{t.port}", 1,
                             frozenset({t.name}) if reach else frozenset(), False, node["address"]))
    return checks


def _node_port_checks(lab: Lab, client: str, client_ip: str, ports: list[NodePort],
                      allowed: Allowed) -> list[_Check]:
    """From one client (a node or the external host) to every node port on every node."""
    checks = []
    for np in ports:
        for node in lab.nodes:
            receiver = node["address"]
            kind = "external" if client == "external" else "same-node" if client == node["name"] else "from-node"
            # Local: the receiving node's endpoints, except for the node's own traffic, which goes
            # to any endpoint as upstream's short-circuit sends it
            short_circuit = np.local and kind == "same-node"
            eps = [e for e in np.endpoints if e.node == node["name"]] if np.local and not short_circuit \
                else list(np.endpoints)
            # Cluster: masqueraded, the policy of a remote endpoint's node sees the receiving node.
            # The receiving node's own endpoints are judged before masquerade: the client's address.
            # A pod and its own node always reach each other.
            ok = [e for e in eps if (client == e.node and client_ip == receiver) or allowed(
                client_ip if np.local or e.node == node["name"] else receiver, e.ip, np.proto, e.port)]
            checks.append(_Check(np.service, f"nodeport/{kind}", f"{np.proto}:{receiver}:{np.port}",
                                 max(1, TRIES_PER_ENDPOINT * len(eps)), frozenset(e.pod for e in ok),
                                 len(ok) < len(eps), client_ip if np.local else receiver))
    return checks


def _external_pod_checks(lab: Lab, ext: str, pools: list[IPPool], allowed: Allowed) -> list[_Check]:
    """With routers (BGP): the external host to every pod by its own address, no NAT."""
    from podnet.lab.bgp import routers

    if not routers(lab.state):
        return []
    bgp = bgp_nodes(lab)
    checks = []
    for t in targets(lab):
        if t.ref == "external" or t.node is None or t.ip == lab.node(t.node)["address"]:
            continue
        reach = routed_outside(lab, t.node, pool_of(t.ip, pools), bgp) and allowed(ext, t.ip, t.proto, t.port)
        checks.append(_Check(t.ref, "external->pod", f"{t.proto}:{t.ip}:{t.port}", 1,
                             frozenset({t.name}) if reach else frozenset(), False, ext))
    return checks


def _judge(src: str, check: _Check, results: list[dict]) -> Row:
    answers = Counter(r.get("name") for r in results if r.get("ok"))
    peers = {r.get("peer") for r in results if r.get("ok")}
    failed = sum(1 for r in results if not r.get("ok"))
    expected = bool(check.answerers)
    problems = []
    if not expected and answers:
        problems.append("expected no answer")
    if strangers := set(answers) - check.answerers:
        problems.append(f"answered by {', '.join(sorted(strangers))}, not an expected endpoint")
    if missing := check.answerers - set(answers):
        problems.append(f"never answered: {', '.join(sorted(missing))}")
    if expected and failed and not check.may_fail:
        errors = Counter(r.get("error") or "no answer" for r in results if not r.get("ok"))
        problems.append(", ".join(f"{n} x{c}" for n, c in sorted(errors.items())))
    if check.peer and answers and peers != {check.peer}:
        problems.append(f"saw source {', '.join(sorted(str(p) for p in peers))}, expected {check.peer}")
    if answers:
        counts = ", ".join(f"{n} x{c}" if check.count > 1 else str(n) for n, c in sorted(answers.items()))
        detail = f"answered by {counts}, saw source {', '.join(sorted(str(p) for p in peers))}"
    else:
        detail = "; ".join(sorted({r.get("error") or "no answer" for r in results})) or "no answer"
    if problems:
        detail = f"{'; '.join(problems)} ({detail})"
    proto, _, rest = check.target.partition(":")
    return Row(src, check.dst, check.kind, expected, not problems, detail, f"{proto}/{rest}")


def probe_nodes(lab: Lab, *, timeout: float = 2.0, include_external: bool = True,
                allowed: Allowed | None = None, pools: list[IPPool] | None = None) -> list[Row]:
    """Node->pod and NodePort rows (see the module's docstring)."""
    allowed = allowed or policy_allowed(lab)
    pools = _pools(lab) if pools is None else pools
    ports = node_ports(lab)
    clients: list[tuple[str, Callable[[list[str]], list[dict]], list[_Check]]] = []
    for node in lab.nodes:
        checks = _node_checks(lab, node, pools, allowed) + _node_port_checks(lab, node["name"], node["address"],
                                                                            ports, allowed)
        clients.append((f"node/{node['name']}", lambda t, n=node["name"]: lab.probe_node(n, t, timeout), checks))
    if include_external and (ext := lab.external_ip) and lab.state.data.get("underlay_netns") and ports:
        clients.append(("external", lambda t: lab.probe_external(t, timeout),
                        _node_port_checks(lab, "external", ext, ports, allowed)))
    if include_external and (ext := lab.external_ip) and lab.state.data.get("underlay_netns"):
        if checks := _external_pod_checks(lab, ext, pools, allowed):
            clients.append(("external", lambda t: lab.probe_external(t, timeout), checks))

    def run(client: tuple[str, Callable[[list[str]], list[dict]], list[_Check]]) -> list[Row]:
        src, probe, checks = client
        if not checks:
            return []
        flat = [c.target for c in checks for _ in range(c.count)]
        try:
            results = probe(flat)
        except (PodnetError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            results = [{"ok": False, "error": f"probe failed: {e}"} for _ in flat]
        rows, i = [], 0
        for c in checks:
            rows.append(_judge(src, c, results[i:i + c.count]))
            i += c.count
        return rows

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [row for rows in pool.map(run, clients) for row in rows]


def _pod_port(pod: Pod | None) -> tuple[str, int] | None:
    ports = [(p.protocol.lower(), p.container_port) for c in (pod.spec.containers if pod else []) for p in c.ports
             if p.protocol != "SCTP"]
    return sorted(ports, key=lambda p: p[0] != "tcp")[0] if ports else None


def probe_attachments(lab: Lab, *, timeout: float = 2.0) -> list[Row]:
    """The additional networks' rows (see the module's docstring)."""
    from podnet.lab.cluster import DATA_EXTERNAL
    from podnet.multinet.status import read_status

    entries = [e for e in lab.pods if e.get("networks")]
    if not entries:
        return []
    try:
        stored = {(p.namespace, p.name): p for p in lab.store().list(Pod)}
    except Exception:
        stored = {}
    # Per pod: (network, interface, address) of every additional network, from its status annotation.
    nets: dict[str, list[tuple[str, str, str]]] = {}
    for e in entries:
        ref = f"{e['namespace']}/{e['name']}"
        status = read_status(stored[(e["namespace"], e["name"])]) if (e["namespace"], e["name"]) in stored else []
        names = {s.get("interface"): s.get("name") for s in status if not s.get("default")}
        nets[ref] = [(names.get(ifname) or ifname, ifname, ip) for ifname, ips in e["networks"].items() for ip in ips]
    clients: list[tuple[str, Callable[[list[str]], list[dict]], list[_Check]]] = []
    data_ns, data_ext = lab.state.data.get("data_netns"), lab.state.data.get("data_external")
    ext_entry = lab.state.process(DATA_EXTERNAL)
    if data_ns and data_ext and ext_entry is not None:
        ext_ip = str(ipaddress.ip_interface(data_ext).ip)
        subnet = ipaddress.ip_interface(data_ext).network
        argv = ext_entry["argv"]
        ext_name = argv[argv.index("--name") + 1]
        ext_port = sorted((a.split(":") for i, a in enumerate(argv) if i and argv[i - 1] == "--port"),
                          key=lambda p: p[0] != "tcp")[0]
        inbound = []
        for e in entries:
            ref = f"{e['namespace']}/{e['name']}"
            port = _pod_port(stored.get((e["namespace"], e["name"])))
            on_data = [ip for _, _, ip in nets[ref] if ipaddress.ip_address(ip) in subnet]
            if not on_data:
                continue
            if port is not None:
                inbound += [_Check(ref, "attachment/external->pod", f"{port[0]}:{ip}:{port[1]}", 1,
                                   frozenset({e["name"]}), False, ext_ip) for ip in on_data]
            check = _Check(ext_name, "attachment/pod->external", f"{ext_port[0]}:{ext_ip}:{ext_port[1]}", 1,
                           frozenset({ext_name}), False, on_data[0])
            clients.append((ref, lambda t, r=ref: lab.probe(r, t, timeout), [check]))
        if inbound:
            clients.append((f"{ext_name} (data network)",
                            lambda t: lab._probe("the data network's host", data_ns, t, timeout, bind=ext_ip),
                            inbound))
    for e in entries:
        src = f"{e['namespace']}/{e['name']}"
        checks = []
        for other in entries:
            dst = f"{other['namespace']}/{other['name']}"
            port = _pod_port(stored.get((other["namespace"], other["name"])))
            if dst == src or port is None:
                continue
            for network, _, ip in nets[dst]:
                mine = [a for n, _, a in nets[src] if n == network]
                if mine:
                    checks.append(_Check(dst, "attachment/pod", f"{port[0]}:{ip}:{port[1]}", 1,
                                         frozenset({other["name"]}), False, mine[0]))
        if checks:
            clients.append((src, lambda t, r=src: lab.probe(r, t, timeout), checks))

    def run(client: tuple[str, Callable[[list[str]], list[dict]], list[_Check]]) -> list[Row]:
        src, probe, checks = client
        try:
            results = probe([c.target for c in checks])
        except (PodnetError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            results = [{"ok": False, "error": f"probe failed: {e}"} for _ in checks]
        return [_judge(src, c, [r]) for c, r in zip(checks, results, strict=True)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [row for rows in pool.map(run, clients) for row in rows]


def probe_all(lab: Lab, *, timeout: float = 2.0, include_external: bool = True, all_ports: bool = False,
              sources: Iterable[str] | None = None, expect: Expect | None = None,
              include_nodes: bool = True) -> list[Row]:
    """Probe every source pod against every other pod (and the external host); one Row per pair.
    Then, unless `sources` names pods or include_nodes is false, the node->pod and NodePort
    rows of probe_nodes. Expected outcomes follow the routing setup and the NetworkPolicies
    in the store."""
    allowed = policy_allowed(lab)
    expect = expect or policy_expect(lab, allowed)
    pools = _pools(lab)
    node_rows = probe_nodes(lab, timeout=timeout, include_external=include_external, allowed=allowed,
                            pools=pools) if include_nodes and sources is None else []
    all_targets = [t for t in targets(lab, all_ports) if include_external or t.ref != "external"]
    all_targets += vpc_targets(lab, all_ports)
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
            if reached and in_vpc(lab, src["ips"][0]) and (kind == "vpc" or in_vpc(lab, t.ip)) \
                    and r.get("peer") != src["ips"][0]:
                reached = False  # VPC addresses travel as they are: a NATed source is a failure
                r = {**r, "ok": False, "error": f"saw source {r.get('peer')}, not {src['ips'][0]}: NATed"}
            if reached:
                detail = f"answered by {r['name']}" + (f", saw source {r['peer']}" if r.get("peer") else "")
            elif r.get("ok"):
                detail = f"answered by {r.get('name')!r}, expected {t.name!r}"
            else:
                detail = r.get("error") or "no answer"
            rows.append(Row(ref, t.ref, kind, expected, reached == expected, detail,
                            f"{t.proto}/{t.ip}:{t.port}"))
        return rows

    attachment_rows = probe_attachments(lab, timeout=timeout) if include_nodes and sources is None else []
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [row for rows in pool.map(run, srcs) for row in rows] + node_rows + attachment_rows


PROBE_COLUMNS = [
    Column("SRC", lambda r: r.src),
    Column("DST", lambda r: r.dst),
    Column("TARGET", lambda r: r.target, wide=True),
    Column("PATH", lambda r: r.kind),
    Column("EXPECT", lambda r: "reach" if r.expected else "blocked"),
    Column("RESULT", lambda r: "ok" if r.ok else "FAIL"),
    Column("DETAIL", lambda r: r.detail),
]


def format_table(rows: list[Row], wide: bool = False) -> str:
    """The probes as `podnet lab probe` prints them (the address probed with wide=True),
    and a count of those not as expected."""
    bad = sum(1 for r in rows if not r.ok)
    return table(PROBE_COLUMNS, rows, wide=wide) + f"\n{len(rows)} probes: {len(rows) - bad} as expected, {bad} not"
