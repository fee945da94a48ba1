"""Labs for kernel tests: unique names, and nothing left behind, also when a test fails."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from podnet.lab import topology
from podnet.lab.cluster import down_by_name, up
from podnet.lab.connectivity import Lab
from podnet.lab.spec import parse_lab

REPAIR_RESYNC = 2.0  # seconds: the agents' full reconcile period in the labs that test repairs


@contextmanager
def running_lab(spec: dict, prefix: str, timeout: float = 90, source: str = "store") -> Iterator[Lab]:
    """Bring up a lab from the `spec` of a Lab file (`source`: as `lab up --source`); take it
    down afterwards and check that no namespace or /etc/netns entry of it is left."""
    root = Path(tempfile.mkdtemp(prefix=f"pn{prefix}-"))
    root.chmod(0o755)  # as lab_root(): BIRD's user reaches a BGP node's directory
    name = f"{prefix}-{secrets.token_hex(3)}"
    doc = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name}, "spec": spec}
    try:
        st = up(parse_lab(yaml.safe_dump(doc), f"{name}.yaml"), root=root, timeout=timeout, source=source)
        try:
            yield Lab(st)
        finally:
            down_by_name(name, root)
            prefix_ns = f"pnl-{st.id}-"
            assert topology.netns_list(prefix_ns) == []
            assert not list(topology.ETC_NETNS.glob(f"{prefix_ns}*"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def echo_connection(server_netns: str, port: int, client_netns: str, target: str,
                    ready: Callable[[], bool] = lambda: True, timeout: float = 10) -> Iterator[Callable[[str], str]]:
    """A socat echo server on `port` in server_netns and one TCP connection to it from
    client_netns through `target` (host:port), opened once the server listens and
    ready() holds. Yields roundtrip(word) -> what came back. Both processes are ended
    by their handles."""
    server = subprocess.Popen(["ip", "netns", "exec", server_netns, "socat", f"TCP-LISTEN:{port},reuseaddr,fork",
                               "EXEC:cat"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", server_netns, "ss", "-ltn", f"sport = :{port}"],
                                   capture_output=True, text=True)
            if str(port) in probe.stdout and ready():
                break
            time.sleep(0.2)
        client = subprocess.Popen(["ip", "netns", "exec", client_netns, "socat", "-", f"TCP:{target}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        pipe_in, pipe_out = client.stdin, client.stdout
        assert pipe_in is not None and pipe_out is not None

        def roundtrip(word: str) -> str:
            pipe_in.write(word + "\n")
            pipe_in.flush()
            return pipe_out.readline().strip()

        yield roundtrip
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)


def web_client_intruder(web_ports: list[dict]) -> list[dict]:
    """The policy labs' pods: web (app=web) on node-1; client (app=client) and intruder
    (app=intruder) on node-2."""
    return [{"name": "web", "node": "node-1", "labels": {"app": "web"}, "ports": web_ports},
            {"name": "client", "node": "node-2", "labels": {"app": "client"}, "ports": [{"containerPort": 9000}]},
            {"name": "intruder", "node": "node-2", "labels": {"app": "intruder"}, "ports": [{"containerPort": 9000}]}]


def log_offsets(lab: Lab) -> dict[str, int]:
    """Where each agent's log ends now (see log_since)."""
    return {n["name"]: Path(n["log"]).stat().st_size for n in lab.nodes}


def log_since(lab: Lab, node: str, offsets: dict[str, int]) -> str:
    """What the agent of `node` logged after log_offsets was taken."""
    path = Path(next(n["log"] for n in lab.nodes if n["name"] == node))
    return path.read_bytes()[offsets[node]:].decode(errors="replace")


def ip_of(lab: Lab, pod: str) -> str:
    return lab.pod(pod)["ips"][0]


def reaches(lab: Lab, pod: str, target: str) -> bool:
    return bool(lab.probe(pod, [target], timeout=1)[0].get("ok"))


def node_sh(lab: Lab, node: str, *argv: str) -> str:
    proc = lab.exec_node(node, list(argv))
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def wait_for(condition: Callable[[], bool], what: str, within: float = REPAIR_RESYNC * 3 + 10) -> float:
    """Poll until the condition holds; how long it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"not repaired within {within:g}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def agent_maps(lab: Lab, node: str) -> str:
    """The directory of a node's agent's pinned maps: named by node and netns inode."""
    from podnet.ebpf.bpffs import ROOT, pin_root

    inode = node_sh(lab, node, "stat", "-L", "-c", "%i", "/proc/self/ns/net").strip()
    return f"{pin_root()}/{ROOT}/{node}-{inode}/maps"


def services_fast_path(lab: Lab, node: str) -> bool:
    """Whether the node's eBPF Services take local pod flows past the node's netfilter (on
    only with eBPF policy: nftables policy would be skipped)."""
    import json

    from podnet.services.ebpf import maps as m

    entry = json.loads(node_sh(lab, node, "bpftool", "-j", "map", "lookup", "pinned",
                               f"{agent_maps(lab, node)}/{m.CONFIG}", "key", "0", "0", "0", "0"))
    return bool(int(entry["value"][0], 16) & m.CFG_FAST_PATH)
