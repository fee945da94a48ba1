"""Real reference resolvers (unbound, dnsmasq) for tests and benchmarks.

Each runs in the foreground on a loopback address and a free port, from a
private temporary directory, and is stopped by its own PID. ``netns`` runs it
inside a network namespace (through ``ip netns exec``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

# The repository root, for ``tests.support`` imports in subprocesses.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host (in the caller's namespace)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_udp(host: str, port: int, name: str = "localhost.", timeout: float = 10.0) -> None:
    """Wait until something answers DNS on host:port."""
    q = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.strip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                s.sendto(q, (host, port))
                data = s.recv(4096)
                if data[:2] == q[:2]:
                    return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing answers DNS on {host}:{port}")


class _Daemon:
    name = "daemon"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None,
                 cpu: int | None = None):
        self.host = host
        self.port = port
        self.netns = netns
        self.cpu = cpu
        self.dir = tempfile.mkdtemp(prefix=f"podnet-{self.name}-")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        return (self.host, self.port)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> _Daemon:
        if self.port is None:
            if self.netns is not None:
                self.port = 5300 + (os.getpid() % 4000)
            else:
                self.port = free_port(self.host)
        cmd = self.command()
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.path("stderr"), "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            if self.netns is None:
                wait_udp(self.host, self.port, timeout=timeout)
            else:
                subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                                f"import sys; sys.path.insert(0, {_ROOT!r}); "
                                f"from tests.support.dns import wait_udp; wait_udp({self.host!r}, {self.port})"],
                               check=True, timeout=timeout + 5, capture_output=True)
        except BaseException:
            self.stop()
            raise
        return self

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class Unbound(_Daemon):
    """unbound with local zones (``records``: zone-file lines) and no recursion.

    ``forward`` makes it forward everything else to (host, port); otherwise every
    other name is NXDOMAIN from a static root with an SOA, so negative answers
    are cacheable.
    """

    name = "unbound"

    def __init__(self, records: Iterable[str] = (), zones: Iterable[str] = (), forward: tuple[str, int] | None = None,
                 log_queries: bool = True, extra: Iterable[str] = (), **kw):
        super().__init__(**kw)
        self.records = list(records)
        self.zones = list(zones)
        self.forward = forward
        self.log_queries = log_queries
        self.extra = list(extra)

    def command(self) -> list[str]:
        conf = self.path("unbound.conf")
        lines = [
            "server:",
            f"  interface: {self.host}@{self.port}",
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{self.dir}"',
            f'  pidfile: "{self.path("unbound.pid")}"',
            "  use-syslog: no",
            f'  logfile: "{self.path("unbound.log")}"',
            f"  log-queries: {'yes' if self.log_queries else 'no'}",
            "  verbosity: 0",
            "  num-threads: 1",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            "  access-control: 0.0.0.0/0 allow",
            "  module-config: \"iterator\"",
            "  incoming-num-tcp: 256",
            "  minimal-responses: yes",
            "  qname-minimisation: no",
            "  msg-cache-size: 64m",
            "  rrset-cache-size: 64m",
            "  so-rcvbuf: 4m",
        ]
        lines.append('  local-zone: "test." nodefault')  # unbound blocks RFC 6761 names by default
        lines.append("  do-not-query-localhost: no")  # the upstream it forwards to is on loopback
        if self.forward is None:
            lines += ['  local-zone: "." static',
                      '  local-data: ". 3600 IN SOA root.test. admin.test. 1 3600 600 86400 60"']
        for z in self.zones:
            lines.append(f'  local-zone: "{z}" static')
        for r in self.records:
            lines.append(f'  local-data: "{r}"')
        lines += self.extra
        if self.forward is not None:
            lines += ["forward-zone:", '  name: "."', f"  forward-addr: {self.forward[0]}@{self.forward[1]}"]
        with open(conf, "w") as f:
            f.write("\n".join(x for x in lines if x) + "\n")
        return ["unbound", "-d", "-c", conf]

    def query_log(self) -> list[str]:
        """Logged queries as 'name TYPE' (log_queries must be on)."""
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.path("unbound.log")) as f:
            for line in f:
                if "info: " in line and " IN" in line:
                    parts = line.split("info: ", 1)[1].split()
                    if len(parts) >= 3:
                        out.append(f"{parts[1]} {parts[2]}")
        return out


class Dnsmasq(_Daemon):
    """dnsmasq answering host records (``hosts``: (name, ip)) and SRV records."""

    name = "dnsmasq"

    def __init__(self, hosts: Iterable[tuple[str, str]] = (), srv: Iterable[str] = (), domains: Iterable[str] = (),
                 servers: Iterable[tuple[str, int]] = (), cache_size: int = 10000, log_queries: bool = True, **kw):
        super().__init__(**kw)
        self.hosts = list(hosts)
        self.srv = list(srv)
        self.domains = list(domains)
        self.servers = list(servers)
        self.cache_size = cache_size
        self.log_queries = log_queries

    def command(self) -> list[str]:
        hosts_file = self.path("hosts")
        with open(hosts_file, "w") as f:
            for name, ip in self.hosts:
                f.write(f"{ip} {name}\n")
        cmd = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
               f"--listen-address={self.host}", f"--port={self.port}", f"--addn-hosts={hosts_file}",
               f"--cache-size={self.cache_size}", "--local-ttl=300", f"--pid-file={self.path('dnsmasq.pid')}", "--user=root",
               "--interface=lo", "--except-interface=nonexistent0"]
        for s in self.srv:
            cmd.append(f"--srv-host={s}")
        for d in self.domains:
            cmd.append(f"--local=/{d}/")
        for host, port in self.servers:
            cmd.append(f"--server={host}#{port}")
        if self.log_queries:
            cmd += ["--log-queries", f"--log-facility={self.path('dnsmasq.log')}"]
        return cmd

    def query_log(self) -> list[str]:
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.path("dnsmasq.log")) as f:
            for line in f:
                if "query[" in line:
                    tail = line.split("query[", 1)[1]
                    qtype, rest = tail.split("]", 1)
                    out.append(f"{rest.split()[0]} {qtype}")
        return out


# ---------------------------------------------------------------- object builders (tests, benchmarks)


def make_service(name: str, ns: str = "prod", cluster_ip: str | None = "10.96.0.10", ports: list | None = None,
                 **spec):
    """A Service; ``cluster_ip="None"`` makes it headless; extra keys go into spec (camelCase)."""
    from podnet.model.objects import Service

    spec = {"clusterIP": cluster_ip, "ports": ports if ports is not None else [{"name": "http", "port": 80}], **spec}
    if spec.get("type") == "ExternalName" or spec["clusterIP"] is None:
        spec.pop("clusterIP")
    return Service.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def make_slice(name: str, service: str, endpoints: list, ns: str = "prod", ports: list | None = None,
               address_type: str = "IPv4"):
    from podnet.model.objects import EndpointSlice

    return EndpointSlice.model_validate({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })


def make_endpoint(ip: str, hostname: str | None = None, ready: bool = True) -> dict:
    out: dict = {"addresses": [ip], "conditions": {"ready": ready}}
    if hostname:
        out["hostname"] = hostname
    return out


def make_pod(name: str, ip: str, ns: str = "prod", node: str = "n1"):
    from podnet.model.objects import Pod

    return Pod.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": {"nodeName": node},
                               "status": {"podIP": ip}})
