"""The agent's and the node DNS process's metrics and health, scraped over real HTTP from
real processes in a node namespace and parsed with prometheus_client's parser:

- /readyz answers 503 (and why) while the agent waits for its Node, 200 once the node is
  programmed; /healthz 200 all along; the Service sync metrics under kube-proxy's names
  when asked (--metrics-kube-proxy-names); every other name is podnet_ (or process_/python_);
- by default the listener binds the node's address, not 0.0.0.0 nor 127.0.0.1;
- a CNI ADD through the real plugin moves the CNI histogram (by command and result), an
  ADD on a full pool moves the IPAM exhaustion counter, DNS queries move the query counter
  by type and result, a table deleted behind the agent's back moves drift_repaired;
- `podnet dns serve --metrics-port` serves its own metrics on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from podnet.cni.install import IPAM_NAME, PLUGIN_NAME, install_plugin  # noqa: E402
from podnet.dataplane.netns import in_netns  # noqa: E402
from tests.kernel.nsutil import in_ns, namespaces  # noqa: E402

NODE_IP = "10.77.0.21"  # outside the Service CIDR (10.96.0.0/12), whose unused addresses are dropped
PODNET = [sys.executable, "-m", "podnet.cli.main"]
PORT = 9102
NODE = f"""
apiVersion: v1
kind: Node
metadata: {{name: n1}}
status:
  addresses: [{{type: InternalIP, address: {NODE_IP}}}]
"""
CLUSTER = """
apiVersion: podnet.io/v1
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.244.0.0/31, blockSize: 31, natOutgoing: true}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 80}]
"""


# ---------------------------------------------------------------- helpers


def apply(url: str, path: Path, text: str) -> None:
    path.write_text(text)
    subprocess.run([*PODNET, "--store", url, "apply", "-f", str(path)], check=True, capture_output=True)


def get(ns: str, path: str, host: str = NODE_IP, port: int = PORT) -> tuple[int, str]:
    """GET over a TCP connection made inside the namespace (the socket stays in it)."""
    sock = in_netns(f"/run/netns/{ns}", lambda: socket.create_connection((host, port), timeout=10))
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(ns: str, host: str = NODE_IP, port: int = PORT) -> tuple[Samples, dict[str, str]]:
    """(sample name and labels) -> value, and family name -> type."""
    status, body = get(ns, "/metrics", host, port)
    assert status == 200, body
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(done: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the process exited ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what} within {timeout:g}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)  # polling an HTTP endpoint of another process


def answers(ns: str, path: str) -> int | None:
    """The status of path, or None while nothing listens."""
    try:
        return get(ns, path)[0]
    except (ConnectionRefusedError, OSError):
        return None


def stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def node(tmp_path):
    """A node namespace with its underlay address, a store with the cluster's objects (not
    the Node: each test applies it when it wants)."""
    url = f"sqlite://{tmp_path / 'podnet.db'}"
    apply(url, tmp_path / "cluster.yaml", CLUSTER)
    with namespaces() as ns:
        ul, n1 = ns.new("ul"), ns.new("n1")
        in_ns(ul, "ip", "link", "add", "v1", "type", "veth", "peer", "name", "eth0", "netns", n1)
        in_ns(ul, "ip", "link", "set", "v1", "up")
        in_ns(n1, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        in_ns(n1, "ip", "link", "set", "eth0", "up")
        yield ns, n1, url


def start_agent(ns: str, url: str, tmp: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    sock = tmp / "cni.sock"
    log = tmp / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *PODNET, "--store", url, "agent", "--node", "n1",
                                 "--socket", str(sock), "--metrics-port", str(PORT), *extra],
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, sock, log


# ---------------------------------------------------------------- readiness and names


def test_readyz_is_503_until_the_node_is_programmed_then_200(node, tmp_path):
    _, n1, url = node
    agent, sock, log = start_agent(n1, url, tmp_path, "--metrics-address", NODE_IP, "--metrics-kube-proxy-names")
    try:
        # no Node object yet: the agent waits for it, its listener already answers
        wait_for(lambda: answers(n1, "/readyz") is not None, "the metrics listener", agent, log)
        status, body = get(n1, "/readyz")
        assert status == 503 and "waits for Node n1" in body, body
        assert get(n1, "/healthz") == (200, "ok\n")
        samples, _ = scrape(n1)
        assert value(samples, "podnet_agent_ready") == 0
        assert value(samples, "process_resident_memory_bytes") > 0
        assert not Path(f"{sock}.synced").exists()

        apply(url, tmp_path / "node.yaml", NODE)
        wait_for(lambda: answers(n1, "/readyz") == 200, "/readyz 200 after the first sync", agent, log)
        assert Path(f"{sock}.synced").exists()
        assert get(n1, "/healthz")[0] == 200
        samples, types = scrape(n1)
        assert value(samples, "podnet_agent_ready") == 1
        # kube-proxy's names for the Service sync metrics, podnet's for everything else
        assert types["kubeproxy_sync_proxy_rules_duration_seconds"] == "histogram"
        assert value(samples, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
        assert value(samples, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
        assert "kubeproxy_network_programming_duration_seconds" in types
        assert not any(name.startswith("podnet_service_sync") for name in types)
        for name in types:
            assert name.startswith(("podnet_", "kubeproxy_", "process_", "python_")), name
        for dp in ("routes", "nat", "services", "policy", "dns"):
            assert value(samples, "podnet_dataplane_sync_duration_seconds_count", dataplane=dp) >= 1, dp
            assert value(samples, "podnet_dataplane_last_sync_error", dataplane=dp) == 0
        assert "podnet_bgp_bird_up" in types
        assert "podnet_cni_request_duration_seconds" in types and "podnet_ipam_exhausted" in types
    finally:
        stop(agent, log)


# ---------------------------------------------------------------- the counters move


def cni(plugin: str, sock: Path, command: str, container: str, netns: str | None) -> tuple[int, dict]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}", "PATH": os.environ["PATH"]}
    if netns:
        env["CNI_NETNS"] = f"/run/netns/{netns}"
    conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni", "agentSocket": str(sock)}
    proc = subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def query(ns: str, name: str, rdtype: str) -> int:
    """One UDP query to the node DNS address from inside the namespace; the rcode."""
    sock = in_netns(f"/run/netns/{ns}", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        r = dns.query.udp(dns.message.make_query(name, rdtype), "169.254.20.10", timeout=5, sock=sock)
    finally:
        sock.close()
    return r.rcode()


def test_cni_ipam_dns_and_drift_move_their_metrics_and_the_listener_binds_the_node_address(node, tmp_path):
    ns, n1, url = node
    apply(url, tmp_path / "node.yaml", NODE)
    plugin = install_plugin(tmp_path / "bin")
    agent, sock, log = start_agent(n1, url, tmp_path, "--resync", "1")
    try:
        wait_for(lambda: Path(f"{sock}.synced").exists() and answers(n1, "/readyz") == 200, "the node programmed",
                 agent, log)
        # the listener: the node's address, not every address and not loopback
        listening = in_ns(n1, "ss", "-Hltn", f"sport = :{PORT}").stdout.split()
        assert f"{NODE_IP}:{PORT}" in listening, listening
        assert f"0.0.0.0:{PORT}" not in listening and f"*:{PORT}" not in listening
        with pytest.raises(ConnectionRefusedError):
            get(n1, "/healthz", host="127.0.0.1")

        before, _ = scrape(n1)
        # CNI ADD twice (the /31 pool's two addresses), then once more on the full pool
        pods = [ns.new(f"p{i}") for i in range(3)]
        assert cni(plugin, sock, "ADD", "pod0", pods[0])[0] == 0
        assert cni(plugin, sock, "ADD", "pod1", pods[1])[0] == 0
        code, out = cni(plugin, sock, "ADD", "pod2", pods[2])
        assert code != 0 and out["code"] == 100, out  # podnet's code for an exhausted IPAM
        after, _ = scrape(n1)
        h = "podnet_cni_request_duration_seconds_count"
        assert value(after, h, plugin=PLUGIN_NAME, command="ADD", result="ok") - \
            value(before, h, plugin=PLUGIN_NAME, command="ADD", result="ok") == 2
        assert value(after, h, plugin=PLUGIN_NAME, command="ADD", result="ipam_exhausted") - \
            value(before, h, plugin=PLUGIN_NAME, command="ADD", result="ipam_exhausted") == 1
        assert value(after, "podnet_cni_request_duration_seconds_bucket", plugin=PLUGIN_NAME, command="ADD",
                     result="ok", le="+Inf") == value(after, h, plugin=PLUGIN_NAME, command="ADD", result="ok")
        assert value(after, "podnet_ipam_exhausted_total", pool="tiny") - \
            value(before, "podnet_ipam_exhausted_total", pool="tiny") == 1
        assert value(after, "podnet_ipam_allocations_total", pool="tiny") - \
            value(before, "podnet_ipam_allocations_total", pool="tiny") == 2
        # the IPAM plugin of another network's delegate is counted under its own name
        ipam = {"cniVersion": "1.1.0", "name": "extra", "type": "macvlan", "master": "eth0",
                "ipam": {"type": IPAM_NAME, "pools": ["tiny"], "agentSocket": str(sock)}}
        status = subprocess.run([str(Path(plugin).with_name(IPAM_NAME))], input=json.dumps(ipam), env={
            "CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin", "PATH": os.environ["PATH"]}, capture_output=True,
            text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        again, _ = scrape(n1)
        assert value(again, h, plugin=IPAM_NAME, command="STATUS", result="ok") - \
            value(after, h, plugin=IPAM_NAME, command="STATUS", result="ok") == 1

        # DNS: an A record of a Service, twice (the second from the fast path), and a name that is not there
        before = after
        assert query(n1, "web.default.svc.cluster.local", "A") == dns.rcode.NOERROR
        assert query(n1, "web.default.svc.cluster.local", "A") == dns.rcode.NOERROR
        assert query(n1, "nothere.default.svc.cluster.local", "AAAA") == dns.rcode.NXDOMAIN
        after, _ = scrape(n1)
        q = "podnet_dns_queries_total"
        assert value(after, q, type="A", result="NOERROR") - value(before, q, type="A", result="NOERROR") == 2
        assert value(after, q, type="AAAA", result="NXDOMAIN") - \
            value(before, q, type="AAAA", result="NXDOMAIN") == 1

        # drift: the NAT table deleted behind the agent's back is repaired at the next resync, and counted
        d = "podnet_dataplane_drift_repaired_total"
        repaired = value(after, d, dataplane="nat")
        in_ns(n1, "nft", "delete", "table", "ip", "podnet-nat")
        wait_for(lambda: value(scrape(n1)[0], d, dataplane="nat") > repaired, "drift_repaired{nat} moved",
                 agent, log, timeout=30)
        assert in_ns(n1, "nft", "list", "table", "ip", "podnet-nat", check=False).returncode == 0

        before, _ = scrape(n1)
        for i in range(3):
            assert cni(plugin, sock, "DEL", f"pod{i}", pods[i])[0] == 0
        after, _ = scrape(n1)
        assert value(after, h, plugin=PLUGIN_NAME, command="DEL", result="ok") - \
            value(before, h, plugin=PLUGIN_NAME, command="DEL", result="ok") == 3
        assert value(after, "podnet_ipam_releases_total") - value(before, "podnet_ipam_releases_total") == 2
    finally:
        stop(agent, log)


# ---------------------------------------------------------------- the node DNS process


def test_dns_serve_has_its_own_metrics_listener_on_localhost(node, tmp_path):
    _, n1, url = node
    apply(url, tmp_path / "node.yaml", NODE)
    log = tmp_path / "dns.log"
    port = 9103
    in_ns(n1, "ip", "addr", "add", "169.254.20.10/32", "dev", "lo")
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", n1, *PODNET, "--store", url, "dns", "serve", "--node", "n1",
                                 "--metrics-port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                return get(n1, "/readyz", "127.0.0.1", port)[0] == 200
            except OSError:
                return False

        wait_for(ready, "the DNS process ready", proc, log)
        listening = in_ns(n1, "ss", "-Hltn", f"sport = :{port}").stdout.split()
        assert f"127.0.0.1:{port}" in listening, listening
        assert get(n1, "/healthz", "127.0.0.1", port)[0] == 200
        before, _ = scrape(n1, "127.0.0.1", port)
        assert query(n1, "web.default.svc.cluster.local", "A") == dns.rcode.NOERROR
        after, types = scrape(n1, "127.0.0.1", port)
        q = "podnet_dns_queries_total"
        assert value(after, q, type="A", result="NOERROR") - value(before, q, type="A", result="NOERROR") == 1
        assert value(after, "process_resident_memory_bytes") > 0
        for name in types:
            assert name.startswith(("podnet_dns_", "process_", "python_")), name
    finally:
        stop(proc, log)
