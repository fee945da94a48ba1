"""`python -m podnet.dns.server --store URL`: the server lists and watches the store itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.exception
import dns.message
import dns.query
import dns.rcode
from tests.support.dns import free_port, make_endpoint, make_pod, make_service, make_slice

from podnet.store.objects import ObjectStore
from podnet.store.url import open_store


def ask(port: int, name: str, src: str | None = None):
    return dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=3, source=src)


def wait_for(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fn():
                return
        except (dns.exception.Timeout, IndexError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_server_follows_the_store(tmp_path):
    url = f"sqlite:///{tmp_path}/podnet.db"
    store = ObjectStore(open_store(url))
    store.apply([make_service("web", ns="prod"), make_pod("client", "127.0.0.42", ns="team", node="n1")])
    port = free_port()
    ready, stats = tmp_path / "ready.json", tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "podnet.dns.server", "--listen", f"127.0.0.1:{port}",
                             "--store", url, "--node", "n1", "--ready-file", str(ready), "--stats-file", str(stats)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert json.loads(ready.read_text())["pid"] == proc.pid
        wait_for(lambda: ask(port, "web.prod.svc.cluster.local").answer)
        # a change in the store reaches the answers through the watch
        store.apply([make_service("db", ns="prod", cluster_ip="None"),
                     make_slice("db-1", "db", [make_endpoint("10.244.3.3", "db-0")])])
        wait_for(lambda: [str(r) for r in ask(port, "db-0.db.prod.svc.cluster.local").answer[0]] == ["10.244.3.3"])
        store.delete(type(make_service("x")), "web", "prod")
        wait_for(lambda: ask(port, "web.prod.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN)
        # the pod on this node is an autopath client: web.prod from namespace "team"
        store.apply([make_service("web", ns="prod", cluster_ip="10.96.0.77")])
        wait_for(lambda: ask(port, "web.prod.svc.cluster.local").answer)
        r = ask(port, "web.prod.team.svc.cluster.local", src="127.0.0.42")
        assert [str(rr) for rrset in r.answer for rr in rrset] == ["web.prod.svc.cluster.local.", "10.96.0.77"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
    assert json.loads(stats.read_text())["errors"] == 0
