"""`podnet dns serve`: the node's DNS server as its own process, following the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dns.message", reason="needs dnspython (a podnet dependency)")

import dns.message
import dns.query
import dns.rcode
from tests.support.dns import free_port, make_service

from podnet.store.objects import ObjectStore
from podnet.store.url import open_store


def ask(host: str, port: int, name: str) -> list[str]:
    reply = dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    return [item.address for rrset in reply.answer for item in rrset]


class Serving:
    """One `podnet dns serve` process, ended by its handle."""

    def __init__(self, tmp: Path, url: str, address: str, port: int, tag: str):
        self.ready, self.synced = tmp / f"{tag}.ready", tmp / f"{tag}.synced"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "podnet.cli.main", "--store", url, "dns", "serve", "--node", "n1",
             "--dns-address", address, "--port", str(port), "--ready-file", str(self.ready),
             "--synced-file", str(self.synced)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 30.0) -> dict:
        self._wait(lambda: self.ready.exists(), timeout, "ready")
        return json.loads(self.ready.read_text())

    def wait_synced(self, rev: int, timeout: float = 15.0) -> None:
        def done() -> bool:
            try:
                return int(self.synced.read_text()) >= rev
            except (OSError, ValueError):
                return False
        self._wait(done, timeout, f"synced to {rev}")

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise AssertionError(f"dns serve exited ({self.proc.returncode}): {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, f"dns serve not {what} within {timeout:g}s"
            time.sleep(0.02)  # poll interval of a file the process writes

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_serves_follows_hands_over_and_stops_cleanly(tmp_path):
    db = tmp_path / "podnet.db"
    url = f"sqlite://{db}"
    store = ObjectStore(open_store(url))
    store.apply([make_service("web", ns="prod", cluster_ip="10.96.0.10")])
    port = free_port()
    first = Serving(tmp_path, url, "127.0.0.1", port, "first")
    second = None
    try:
        ready = first.wait_ready()
        assert ready["pid"] == first.proc.pid and ready["addresses"] == [["127.0.0.1", port]]
        assert ask("127.0.0.1", port, "web.prod.svc.cluster.local") == ["10.96.0.10"]

        # it follows the store on its own
        rev, _ = store.apply([make_service("db", ns="prod", cluster_ip="10.96.0.11")])
        first.wait_synced(rev)
        assert ask("127.0.0.1", port, "db.prod.svc.cluster.local") == ["10.96.0.11"]

        # a new process binds the same address and port before the old one stops, and
        # starts from a fresh list of the store
        rev, _ = store.apply([make_service("late", ns="prod", cluster_ip="10.96.0.12")])
        second = Serving(tmp_path, url, "127.0.0.1", port, "second")
        assert second.wait_ready()["revision"] >= rev
        assert first.stop() == 0
        assert ask("127.0.0.1", port, "late.prod.svc.cluster.local") == ["10.96.0.12"]
    finally:
        store.kv.close()
        first.stop()
        if second is not None:
            assert second.stop() == 0
    # every connection closed: the last one out checkpointed and removed the WAL
    assert not os.path.exists(f"{db}-wal")


def test_starts_before_its_address_exists(tmp_path):
    """IP_FREEBIND: it listens on an address no interface holds yet (the agent adds it to
    `lo` later), instead of failing."""
    url = f"sqlite://{tmp_path}/podnet.db"
    open_store(url).close()
    proc = Serving(tmp_path, url, "192.0.2.53", free_port(), "freebind")
    try:
        assert proc.wait_ready()["addresses"][0][0] == "192.0.2.53"
    finally:
        assert proc.stop() == 0


def test_waits_for_its_store(tmp_path):
    """A store that is not there yet is waited for (as a DaemonSet container would), and
    SIGTERM still ends the wait at once."""
    proc = Serving(tmp_path, f"sqlite://{tmp_path}/missing.db", "127.0.0.1", free_port(), "nostore")
    try:
        deadline = time.monotonic() + 30
        line = proc.proc.stderr.readline()
        while "retrying" not in line:
            assert line and time.monotonic() < deadline, "no warning that the store is missing"
            line = proc.proc.stderr.readline()
        assert "does not exist" in line
    finally:
        assert proc.stop() == 0
    assert not proc.ready.exists()
