"""An agent stops cleanly, and `podnet node cleanup` removes what it programmed.

One node namespace (its underlay address on a veth), a private SQLite store, one agent:

- SIGTERM: the agent exits at once with status 0, having closed every store connection
  (it held the last ones: the WAL file SQLite keeps while a connection is open is
  checkpointed and removed), its CNI socket gone and its lock released; while it ran, a
  second agent with the same socket refused to start;
- `podnet node cleanup` refuses while the agent runs, then removes podnet's tables, the
  VXLAN device, the DNS addresses on lo and the agent's files (read back with `nft -j`
  and `ip -j`), and a second run has nothing to do.

A node with BGP: cleanup stops the BIRD the agent left running and removes its routes.
tests/kernel/test_lab_node_cleanup.py does the same on lab nodes with pods, routes and
the iptables Service proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.nsutil import in_ns, namespaces

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

NODE_IP = "10.99.0.11"
PODNET = [sys.executable, "-m", "podnet.cli.main"]
MANIFEST = f"""
apiVersion: v1
kind: Node
metadata: {{name: n1}}
status:
  addresses: [{{type: InternalIP, address: {NODE_IP}}}]
---
apiVersion: podnet.io/v1
kind: IPPool
metadata: {{name: pool}}
spec: {{cidr: 10.244.0.0/16, natOutgoing: true}}
"""


def podnet_in(ns: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return in_ns(ns, *PODNET, *args, check=check, timeout=60)


def wait_for(done, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the agent exited ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what} within {timeout:g}s:\n{log.read_text()}"
        time.sleep(0.05)  # poll interval of a file the agent writes


def podnet_state(ns: str) -> dict:
    """What of podnet's there is in the namespace, read back with nft -j and ip -j."""
    tables = [t["table"]["name"] for t in json.loads(in_ns(ns, "nft", "-j", "list", "tables").stdout)["nftables"]
              if "table" in t]
    links = [link["ifname"] for link in json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout)]
    lo = [a["local"] for a in json.loads(in_ns(ns, "ip", "-j", "-4", "addr", "show", "dev", "lo").stdout)[0]
          ["addr_info"]]
    routes = [r["dst"] for proto in ("88", "89")
              for r in json.loads(in_ns(ns, "ip", "-j", "route", "show", "proto", proto).stdout or "[]")]
    return {"tables": sorted(t for t in tables if t.startswith("podnet-")),
            "links": sorted(name for name in links if name.startswith("pn")),
            "lo": sorted(a for a in lo if a != "127.0.0.1"), "routes": sorted(routes)}


def test_agent_stops_cleanly_and_cleanup_removes_what_it_programmed(tmp_path):
    db = tmp_path / "podnet.db"
    url = f"sqlite://{db}"
    sock = tmp_path / "cni.sock"
    (tmp_path / "objects.yaml").write_text(MANIFEST)
    subprocess.run([*PODNET, "--store", url, "apply", "-f", str(tmp_path / "objects.yaml")], check=True,
                   capture_output=True)
    with namespaces() as ns:
        ul, node = ns.new("ul"), ns.new("n1")
        in_ns(ul, "ip", "link", "add", "v1", "type", "veth", "peer", "name", "eth0", "netns", node)
        in_ns(ul, "ip", "link", "set", "v1", "up")
        in_ns(node, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        in_ns(node, "ip", "link", "set", "eth0", "up")
        log = tmp_path / "agent.log"
        argv = ["--store", url, "agent", "--node", "n1", "--socket", str(sock), "--cluster-dns-ip", "10.96.0.10"]
        with open(log, "w") as out:
            agent = subprocess.Popen(["ip", "netns", "exec", node, *PODNET, *argv], stdout=out,
                                     stderr=subprocess.STDOUT)
        try:
            synced = Path(f"{sock}.synced")
            wait_for(synced.exists, "the agent did not program the node", agent, log)
            programmed = podnet_state(node)
            assert programmed["tables"] == ["podnet-dns", "podnet-nat", "podnet-policy", "podnet-svc"]
            assert programmed["links"] == ["pn-vxlan"]
            assert programmed["lo"] == ["10.96.0.10", "169.254.20.10"]

            # one agent per socket
            second = podnet_in(node, *argv)
            assert second.returncode == 1
            assert f"another podnet agent (pid {agent.pid}) runs with socket {sock}" in second.stderr
            assert sock.is_socket()  # the first one's, untouched

            # cleanup refuses while the agent runs, and changes nothing
            refused = podnet_in(node, "node", "cleanup", "--socket", str(sock))
            assert refused.returncode == 1
            assert f"a podnet agent (pid {agent.pid}) runs on this node" in refused.stderr
            assert "a DNS server listens on 169.254.20.10:53" in refused.stderr
            assert podnet_state(node) == programmed

            # the agent's connections keep SQLite's WAL file; the agent holds the last ones
            assert Path(f"{db}-wal").exists()
            started = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(15) == 0, log.read_text()
            assert time.monotonic() - started < 10
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        text = log.read_text()
        assert "agent on n1 stopped" in text and "Traceback" not in text, text
        assert not Path(f"{db}-wal").exists(), "a store connection was left open: the WAL is still there"
        assert not sock.exists()
        assert podnet_state(node) == programmed  # stopping leaves the dataplane as it is

        dry = podnet_in(node, "node", "cleanup", "--socket", str(sock), "--dry-run", check=True)
        assert "would remove nft table ip podnet-svc" in dry.stdout
        assert podnet_state(node) == programmed
        done = podnet_in(node, "node", "cleanup", "--socket", str(sock), check=True)
        for line in ("removed nft table ip podnet-svc", "removed nft table ip podnet-policy",
                     "removed nft table ip podnet-nat", "removed nft table ip podnet-dns",
                     "removed link pn-vxlan (VXLAN)", "removed address 169.254.20.10/32 on lo",
                     "removed address 10.96.0.10/32 on lo", f"removed file {sock}.synced",
                     f"removed file {sock}.lock"):
            assert line in done.stdout, done.stdout
        assert podnet_state(node) == {"tables": [], "links": [], "lo": [], "routes": []}
        assert not list(tmp_path.glob("cni.sock*"))
        assert in_ns(node, "ip", "-4", "addr", "show", "dev", "eth0").stdout.count(NODE_IP) == 1  # not podnet's

        again = podnet_in(node, "node", "cleanup", "--socket", str(sock), check=True)
        assert again.stdout.strip() == "nothing to do: podnet has nothing on this node"


BIRD_CONF = """
router id 10.99.0.11;
protocol device {}
protocol kernel { ipv4 { export all; }; persist; }
protocol static { ipv4; route 10.250.0.0/24 blackhole; }
"""


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird (bird2)")
def test_cleanup_stops_the_agents_bird_and_removes_its_routes(tmp_path):
    """A node with BGP: BIRD outlives the agent (by design), and its routes outlive BIRD
    (`persist`). Cleanup stops the BIRD of the agent's directory, removes the routes of
    protocol 12 and the directory; without that directory, routes of protocol 12 are
    someone else's BIRD's and stay."""
    sock = tmp_path / "cni.sock"
    bird_dir = tmp_path / "cni.sock.bird"
    bird_dir.mkdir()
    (bird_dir / "bird.conf").write_text(BIRD_CONF)
    with namespaces() as ns:
        node = ns.new("n1")
        try:
            in_ns(node, "bird", "-c", str(bird_dir / "bird.conf"), "-s", str(bird_dir / "bird.ctl"),
                  "-P", str(bird_dir / "bird.pid"))  # a daemon: returns once it runs
            pid = int((bird_dir / "bird.pid").read_text())
            deadline = time.monotonic() + 30
            while "10.250.0.0/24" not in in_ns(node, "ip", "route", "show", "proto", "bird").stdout:
                assert time.monotonic() < deadline, "BIRD did not install its route"
                time.sleep(0.05)  # BIRD installs it on its own schedule

            done = podnet_in(node, "node", "cleanup", "--socket", str(sock), check=True)
            assert f"removed BIRD (pid {pid}, {bird_dir})" in done.stdout
            assert "removed route blackhole 10.250.0.0/24 (protocol 12)" in done.stdout
            assert f"removed directory {bird_dir}" in done.stdout
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            assert in_ns(node, "ip", "route", "show", "proto", "bird").stdout == ""
            assert not bird_dir.exists()

            # someone else's BIRD route (no podnet BIRD directory): left alone
            in_ns(node, "ip", "route", "add", "blackhole", "10.251.0.0/24", "proto", "bird")
            again = podnet_in(node, "node", "cleanup", "--socket", str(sock), check=True)
            assert again.stdout.strip() == "nothing to do: podnet has nothing on this node"
            assert "10.251.0.0/24" in in_ns(node, "ip", "route", "show", "proto", "bird").stdout
        finally:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int((bird_dir / "bird.pid").read_text()), signal.SIGKILL)
