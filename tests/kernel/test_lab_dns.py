"""DNS as pods see it in a lab: real clients (dig, getent, Python's getaddrinfo) inside
pod namespaces against the node's DNS server on 169.254.20.10, whose upstream is a
real dnsmasq on the lab's external host (`spec.external.dns`) serving `example.test`.

Queries are counted on the wire at both ends: an nftables counter in the node's
namespace (per source pod and per query type, matched on the bytes of the question)
and the upstream dnsmasq's query log.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from podnet.dns.resolvconf import NODE_DNS_ADDRESS, render
from podnet.errors import PodnetError
from podnet.lab import state as lab_state
from podnet.lab import topology
from podnet.lab.cluster import down_by_name, up
from podnet.lab.connectivity import Lab
from podnet.lab.spec import DEFAULT_SERVICE_CIDR, parse_lab
from podnet.model.objects import ObjectMeta, Service, ServicePort, ServiceSpec
from podnet.services.clusterip import allocate_cluster_ips, release_service

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("dig", "dnsmasq", "getent", "nft")),
                       reason="needs dig, dnsmasq, getent and nft"),
]

EXTERNAL_IP = "10.98.0.10"
ZONE = "example.test"
RECORDS = {"www": EXTERNAL_IP, "docs": "10.98.0.20", "ftp": "10.98.0.30"}
HTTP = [{"name": "http", "containerPort": 8080}]
MANIFESTS = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-pods", "namespace": "shop"},
     "spec": {"clusterIP": "None", "selector": {"app": "web"},
              "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "docs", "namespace": "shop"},
     "spec": {"type": "ExternalName", "externalName": f"docs.{ZONE}"}},
    # a StatefulSet's pod: hostname + subdomain naming its headless Service
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
     "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "pg", "port": 5432}]}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop", "labels": {"app": "db"}},
     "spec": {"nodeName": "node-2", "hostname": "db-0", "subdomain": "db", "containers": [{"name": "db"}]}},
]


@pytest.fixture(scope="module")
def lab():
    root = Path(tempfile.mkdtemp(prefix="pndns-"))
    name = f"dns-{secrets.token_hex(3)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
           "spec": {"underlay": {"cidr": "10.99.0.0/24"},
                    "external": {"address": f"{EXTERNAL_IP}/24", "dns": {"zone": ZONE, "records": RECORDS}},
                    "nodes": [{"name": "node-1"}, {"name": "node-2"}],
                    "pods": [{"name": "web-1", "namespace": "shop", "node": "node-1", "labels": {"app": "web"},
                              "ports": HTTP},
                             {"name": "web-2", "namespace": "shop", "node": "node-2", "labels": {"app": "web"},
                              "ports": HTTP},
                             {"name": "client", "node": "node-1"},
                             {"name": "direct", "node": "node-1"}],
                    "manifests": MANIFESTS}}
    st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, timeout=90)
    try:
        yield Lab(st)
    finally:
        try:
            down_by_name(name, root)
            assert topology.netns_list(f"pnl-{st.id}-") == []
            assert not any((topology.ETC_NETNS / f"pnl-{st.id}-{suffix}").exists()
                           for suffix in ("1", "2", "p0", "p1", "p2", "p3", "p4"))
            assert st.process_pid(st.process("external-dns")) is None
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- helpers


def dig(lab: Lab, pod: str, *args: str) -> str:
    proc = lab.exec(pod, ["dig", "+tries=1", "+time=3", *args], timeout=20)
    assert proc.returncode == 0, proc
    return proc.stdout


def short(lab: Lab, pod: str, *args: str) -> list[str]:
    return dig(lab, pod, "+short", *args).splitlines()


def header(out: str) -> tuple[str, set[str], int]:
    """(rcode, flags, answer count) from dig's full output."""
    line = next(x for x in out.splitlines() if "->>HEADER<<-" in x)
    rcode = line.split("status: ")[1].split(",")[0]
    flags_line = next(x for x in out.splitlines() if x.startswith(";; flags:"))
    flags = set(flags_line.split(";")[2].split(":")[1].split())
    answers = int(flags_line.split("ANSWER: ")[1].split(",")[0])
    return rcode, flags, answers


def getent(lab: Lab, pod: str, *args: str) -> list[list[str]]:
    proc = lab.exec(pod, ["getent", *args], timeout=30)
    assert proc.returncode == 0, f"getent {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return [line.split() for line in proc.stdout.splitlines()]


def pod_ip(lab: Lab, ref: str) -> str:
    return lab.pod(ref)["ips"][0]


def cluster_ip(lab: Lab, name: str, ns: str = "shop") -> str:
    svc = lab.store().get(Service, name, ns)
    assert svc is not None and svc.spec.cluster_ip
    return svc.spec.cluster_ip


def wire_name_length(name: str) -> int:
    return sum(len(label) + 1 for label in name.strip(".").split(".")) + 1


class QueryCounter:
    """nftables counters in a node's namespace: UDP queries from one pod to the node's DNS
    address, in all and per type of `qname` (the type sits right after the name: UDP
    header 8 bytes, DNS header 12, then the name)."""

    TYPES = {"a": 1, "aaaa": 28}

    def __init__(self, lab: Lab, node: str, src: str, qname: str):
        self.lab, self.node = lab, node
        self.table = f"dnscount{secrets.token_hex(3)}"
        offset = (8 + 12 + wire_name_length(qname)) * 8
        match = f"ip saddr {src} ip daddr {NODE_DNS_ADDRESS} udp dport 53"
        rules = [f"add table ip {self.table}",
                 f"add chain ip {self.table} input {{ type filter hook input priority -400; }}",
                 f"add counter ip {self.table} q_all"]
        rules += [f"add counter ip {self.table} q_{t}" for t in self.TYPES]
        rules.append(f"add rule ip {self.table} input {match} counter name q_all")
        rules += [f"add rule ip {self.table} input {match} @th,{offset},16 {code} counter name q_{t}"
                  for t, code in self.TYPES.items()]
        self._nft("-f", "-", input="\n".join(rules) + "\n")

    def _nft(self, *args: str, input: str | None = None) -> str:
        proc = self.lab.exec_node(self.node, ["nft", *args], input=input, timeout=10)
        assert proc.returncode == 0, proc
        return proc.stdout

    def read(self) -> dict[str, int]:
        out = {}
        for name in ("all", *self.TYPES):
            text = self._nft("list", "counter", "ip", self.table, f"q_{name}")
            out[name] = int(text.split("packets ")[1].split()[0])
        return out

    def remove(self) -> None:
        self.lab.exec_node(self.node, ["nft", "delete", "table", "ip", self.table], timeout=10)


@contextlib.contextmanager
def counting(lab: Lab, pod: str, qname: str):
    node = lab.pod(pod)["node"]
    counter = QueryCounter(lab, node, pod_ip(lab, pod), qname)
    try:
        yield counter
    finally:
        counter.remove()


class UpstreamLog:
    """The external dnsmasq's query log, from a point on."""

    def __init__(self, lab: Lab):
        entry = lab.state.process("external-dns")
        assert entry is not None
        self.lab = lab
        self.path = Path(entry["log"])
        self.start = self.path.stat().st_size

    def queries(self, timeout: float = 10.0) -> list[str]:
        """`TYPE name` of every query logged since this object was made.

        dnsmasq answers and logs queries one at a time, in order: once a marker query sent
        now is in the log, every query before it is too."""
        marker = f"marker-{secrets.token_hex(4)}.{ZONE}"
        topology.run(["ip", "netns", "exec", self.lab.state.data["underlay_netns"], "dig", "+short", "+tries=1",
                      f"@{EXTERNAL_IP}", marker])
        deadline = time.monotonic() + timeout
        while True:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                text = f.read().decode(errors="replace")
            if f" {marker} " in text:
                break
            assert time.monotonic() < deadline, f"dnsmasq did not log the marker query {marker} in {timeout:g}s"
            time.sleep(0.05)  # poll interval of the condition above, which has a deadline
        out = []
        for line in text.splitlines():
            if "query[" in line and marker not in line:
                qtype, rest = line.split("query[", 1)[1].split("]", 1)
                out.append(f"{qtype} {rest.split()[0]}")
        return out


# ---------------------------------------------------------------------- cluster names


def test_clusterip_service_from_dig_getent_and_getaddrinfo(lab):
    ip = cluster_ip(lab, "web")
    assert short(lab, "client", "web.shop.svc.cluster.local") == [ip]
    rcode, flags, answers = header(dig(lab, "client", "web.shop.svc.cluster.local", "A"))
    assert (rcode, answers) == ("NOERROR", 1) and {"qr", "aa"} <= flags
    assert getent(lab, "client", "hosts", "web.shop")[0][0] == ip  # ndots:5: the search path completes it
    assert getent(lab, "shop/web-1", "ahostsv4", "web")[0][0] == ip  # the pod's own namespace
    code = "import socket; print(socket.getaddrinfo('web.shop', 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])"
    proc = lab.exec("client", [sys.executable, "-c", code], timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == ip, proc


def test_headless_service_has_one_address_per_ready_endpoint(lab):
    expected = sorted([pod_ip(lab, "shop/web-1"), pod_ip(lab, "shop/web-2")])
    assert sorted(short(lab, "client", "web-pods.shop.svc.cluster.local")) == expected
    rows = getent(lab, "client", "ahostsv4", "web-pods.shop.svc.cluster.local")
    assert sorted({r[0] for r in rows}) == expected
    # each endpoint by its dashed address, under the Service
    host = pod_ip(lab, "shop/web-2").replace(".", "-")
    assert short(lab, "client", f"{host}.web-pods.shop.svc.cluster.local") == [pod_ip(lab, "shop/web-2")]


def test_headless_endpoint_named_by_the_pods_hostname(lab):
    ip = pod_ip(lab, "shop/db-0")
    assert short(lab, "client", "db-0.db.shop.svc.cluster.local") == [ip]
    assert getent(lab, "shop/web-1", "ahostsv4", "db-0.db")[0][0] == ip  # via the search path
    assert short(lab, "client", "SRV", "_pg._tcp.db.shop.svc.cluster.local") == [
        "0 100 5432 db-0.db.shop.svc.cluster.local."]
    assert short(lab, "client", "-x", ip) == ["db-0.db.shop.svc.cluster.local."]


def test_srv_for_a_named_port(lab):
    assert short(lab, "client", "SRV", "_http._tcp.web.shop.svc.cluster.local") == [
        "0 100 80 web.shop.svc.cluster.local."]
    out = dig(lab, "client", "SRV", "_http._tcp.web.shop.svc.cluster.local")
    additional = out.split("ADDITIONAL SECTION:")[1].split("\n\n")[0].split()
    assert additional[-3:] == ["IN", "A", cluster_ip(lab, "web")], out  # the target's address comes along


def test_ptr_for_the_cluster_ip(lab):
    ip = cluster_ip(lab, "web")
    assert short(lab, "client", "-x", ip) == ["web.shop.svc.cluster.local."]
    assert getent(lab, "client", "hosts", ip)[0][1] == "web.shop.svc.cluster.local"


def test_external_name_is_a_cname_resolved_upstream(lab):
    assert short(lab, "client", "docs.shop.svc.cluster.local") == [f"docs.{ZONE}.", RECORDS["docs"]]
    assert short(lab, "client", "CNAME", "docs.shop.svc.cluster.local") == [f"docs.{ZONE}."]


def test_pod_record(lab):
    ip = pod_ip(lab, "shop/web-1")
    assert short(lab, "client", f"{ip.replace('.', '-')}.shop.pod.cluster.local") == [ip]


def test_nxdomain_and_nodata(lab):
    rcode, flags, answers = header(dig(lab, "client", "nothing.shop.svc.cluster.local"))
    assert (rcode, answers) == ("NXDOMAIN", 0) and "aa" in flags
    out = dig(lab, "client", "AAAA", "web.shop.svc.cluster.local")  # the name exists, without IPv6
    rcode, flags, answers = header(out)
    assert (rcode, answers) == ("NOERROR", 0)
    assert "SOA" in out.split("AUTHORITY SECTION:")[1]
    rcode, _, answers = header(dig(lab, "client", f"nosuch.{ZONE}"))  # upstream's NXDOMAIN, passed on
    assert (rcode, answers) == ("NXDOMAIN", 0)


def _poll(lab: Lab, name: str, want: list[str], within: float) -> float:
    start = time.monotonic()
    while True:
        got = short(lab, "client", name)
        elapsed = time.monotonic() - start
        if got == want:
            return elapsed
        assert elapsed < within, f"{name}: still {got}, expected {want} after {elapsed:.1f}s"
        time.sleep(0.1)


def test_a_service_change_reaches_dig_within_two_seconds(lab):
    store = lab.store()
    svc = Service(metadata=ObjectMeta(name="late", namespace="shop"),
                  spec=ServiceSpec(selector={"app": "web"}, ports=[ServicePort(name="http", port=80)]))
    name = "late.shop.svc.cluster.local"
    assert short(lab, "client", name) == []
    try:
        (svc,) = allocate_cluster_ips([svc], store, DEFAULT_SERVICE_CIDR)
        store.apply([svc])
        _poll(lab, name, [svc.spec.cluster_ip], 2.0)
    finally:
        store.delete(Service, "late", "shop")
        release_service(store, svc)
    _poll(lab, name, [], 2.0)


# ---------------------------------------------------------------------- the outside world


def test_external_name_in_one_query_thanks_to_autopath(lab):
    upstream = UpstreamLog(lab)
    asked = f"www.{ZONE}.default.svc.cluster.local"  # ndots:5: the first search element goes first
    with counting(lab, "client", asked) as counter:
        rows = getent(lab, "client", "ahostsv4", f"www.{ZONE}")
        v4 = counter.read()
        hosts = getent(lab, "client", "hosts", f"www.{ZONE}")
        both = counter.read()
    assert rows[0][0] == EXTERNAL_IP and hosts[0][0] == EXTERNAL_IP
    assert v4 == {"all": 1, "a": 1, "aaaa": 0}, v4  # the server walked the search path itself
    # getent hosts: one query per family (AAAA is NODATA behind the CNAME, then A from the cache)
    assert both == {"all": 3, "a": 2, "aaaa": 1}, both
    # upstream: the name itself, once per type; the cluster candidates never leave the node
    assert sorted(upstream.queries()) == [f"A www.{ZONE}", f"AAAA www.{ZONE}"]


def test_without_autopath_every_search_element_is_a_query(lab):
    # The same pod resolv.conf, but the nameserver is the upstream itself: no autopath.
    pod = lab.pod("direct")
    conf = topology.ETC_NETNS / pod["netns"] / "resolv.conf"
    original = conf.read_text()
    conf.write_text(render("default", EXTERNAL_IP))
    upstream = UpstreamLog(lab)
    try:
        rows = getent(lab, "direct", "ahostsv4", f"ftp.{ZONE}")
    finally:
        conf.write_text(original)
    assert rows[0][0] == RECORDS["ftp"]
    assert upstream.queries() == [f"A ftp.{ZONE}.default.svc.cluster.local", f"A ftp.{ZONE}.svc.cluster.local",
                                  f"A ftp.{ZONE}.cluster.local", f"A ftp.{ZONE}"]


def test_the_external_dns_is_a_real_server_in_the_underlay(lab):
    ul = lab.state.data["underlay_netns"]
    proc = topology.run(["ip", "netns", "exec", ul, "dig", "+short", "+tries=1", f"@{EXTERNAL_IP}",
                         f"www.{ZONE}"])
    assert proc.stdout.split() == [EXTERNAL_IP]
    proc = topology.run(["ip", "netns", "exec", ul, "dig", "+tries=1", f"@{EXTERNAL_IP}", "example.org"])
    assert header(proc.stdout)[0] == "NXDOMAIN"
    # the node DNS processes forward to it (the agents answer nothing: --dns-server separate)
    servers = [p["argv"] for p in lab.state.data["processes"] if p.get("role") == "node-dns"]
    assert len(servers) == 2 and all(a[a.index("--dns-upstream") + 1] == EXTERNAL_IP for a in servers)
    agents = [p["argv"] for p in lab.state.data["processes"] if p.get("role") == "agent"]
    assert agents and all("--dns-upstream" not in a and a[a.index("--dns-server") + 1] == "separate"
                          for a in agents)


def test_up_fails_cleanly_when_the_dns_server_does_not_start(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "dnsmasq"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'dnsmasq: failed to create listening socket for port 53' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ.get('PATH', '')}")
    name = f"dnsfail-{secrets.token_hex(2)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
           "spec": {"underlay": {"cidr": "10.99.0.0/24"}, "external": {"address": "10.98.0.10/24", "dns": True},
                    "nodes": [{"name": "node-1"}]}}
    lab_id = secrets.token_hex(3)  # this lab's namespaces only: other labs may come and go meanwhile
    handed: list[str] = []
    monkeypatch.setattr(lab_state, "new_lab_id", lambda: handed.append(lab_id) or lab_id)
    with pytest.raises(PodnetError, match="external DNS server \\(dnsmasq\\) exited(.|\\n)*failed to create listening"):
        up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=tmp_path / "labs", timeout=20)
    assert handed == [lab_id] and topology.netns_list(f"pnl-{lab_id}-") == []  # everything it made is gone
    assert not (tmp_path / "labs" / name).exists()
