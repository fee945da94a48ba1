"""Network namespaces for kernel tests: unique names, removed even when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PYTHON = sys.executable


def sh(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


def py_in(ns: str, code: str, **kw) -> subprocess.CompletedProcess:
    """Run Python code inside a namespace (the code sees it as its own network)."""
    return in_ns(ns, PYTHON, "-c", code, **kw)


class Namespaces:
    def __init__(self) -> None:
        self.tag = f"pnt{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.created: list[str] = []

    def new(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        self.created.append(name)
        sh("ip", "netns", "add", name)
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)


@contextmanager
def namespaces() -> Iterator[Namespaces]:
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.cleanup()


class NsDriver:
    """A Python program (`code`, with `args`) kept alive in a namespace and spoken to in JSON
    lines: one request, one answer; an answer with "error" fails the test."""

    def __init__(self, ns: str, code: str, *args: str, close_timeout: float = 10):
        self.ns = ns
        self.close_timeout = close_timeout
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, **cmd) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        out = json.loads(line)
        assert "error" not in out, out["error"]
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.close_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM the processes a test started, last first; SIGKILL the ones still there after `timeout`."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_cni_server(ns: str, sock: str, url: str, node: str, procs: list[subprocess.Popen]) -> subprocess.Popen:
    """`python -m podnet.cni.serve` (the agent's CNI handler alone) for node in namespace ns,
    appended to procs once it answers on sock."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-m", "podnet.cni.serve", sock, url, node,
                          "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    line = p.stdout.readline().strip() if p.stdout else ""
    if line != "ready":
        p.kill()
        raise AssertionError(f"CNI server did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
    return p


def data_segment(ns: Namespaces, host_ip: str) -> tuple[str, str]:
    """A second underlay segment: a bridge (br0, in a namespace of its own) with an external host
    on it (its eth0 at host_ip/24). Nodes join it with join_segment. (segment, host) namespaces."""
    seg, ext = ns.new("seg"), ns.new("ext")
    in_ns(seg, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(seg, "ip", "link", "set", "br0", "up")
    in_ns(seg, "ip", "link", "add", "p-ext", "type", "veth", "peer", "name", "eth0", "netns", ext)
    in_ns(seg, "ip", "link", "set", "p-ext", "master", "br0", "up")
    in_ns(ext, "ip", "addr", "add", f"{host_ip}/24", "dev", "eth0")
    in_ns(ext, "ip", "link", "set", "eth0", "up")
    return seg, ext


def join_segment(seg: str, node: str, port: str) -> None:
    """The node's data0, plugged into the segment's bridge at port `port`."""
    in_ns(seg, "ip", "link", "add", port, "type", "veth", "peer", "name", "data0", "netns", node)
    in_ns(seg, "ip", "link", "set", port, "master", "br0", "up")
    in_ns(node, "ip", "link", "set", "data0", "up")
