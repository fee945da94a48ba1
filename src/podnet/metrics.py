"""Prometheus metrics of a podnet process: one registry, and the listener that serves it.

    from podnet import metrics
    metrics.register(collector)      # a metric of library code (CNI, IPAM: registry=None), or a
                                     # running part's collector (the agent's, the DNS server's)
    server = metrics.MetricsServer(metrics.listen_address(None, node_ip), 9090, ready=why_not).start()

Every process (the agent, `podnet dns serve`) exposes exactly one registry, REGISTRY: the
process collectors (process_*, python_gc_*, python_info), the process-wide metrics of
library code (CNI requests, IPAM, conntrack cleanup: declared with registry=None, so a
process exposes only those it registers), and the collectors of what runs in it (the
agent's dataplanes, Service proxy, BGP and DNS server), registered when they start and
unregistered when they stop. prometheus_client's global default registry
is not used: nothing another library registers there leaks into podnet's exposition.

Every metric is named `podnet_...`; the Service proxy's sync metrics can carry
kube-proxy's names instead (`podnet agent --metrics-kube-proxy-names`, see
services/metrics.py). The `_created` series prometheus_client adds to counters and
histograms are turned off: they double the exposition and no dashboard reads them.

The listener answers GET /metrics (text format 0.0.4, or OpenMetrics when the scraper
asks for it), /healthz (200 while the process serves) and /readyz (200 when ready(),
else 503 with the reason). It binds the node's address or 127.0.0.1, never every
address unless that address (0.0.0.0 or ::) is asked for explicitly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from podnet.errors import PodnetError

__all__ = ["REGISTRY", "MetricsServer", "listen_address", "register", "renamed", "text", "unregister"]

log = logging.getLogger("podnet.metrics")

disable_created_metrics()

PREFIX = "podnet_"
LOCALHOST = "127.0.0.1"


def _registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


REGISTRY = _registry()


def register(collector) -> None:
    """Add a running part's collector to the process's registry (once)."""
    with contextlib.suppress(ValueError):  # already there (a part started twice in one process)
        REGISTRY.register(collector)


def unregister(collector) -> None:
    with contextlib.suppress(KeyError):
        REGISTRY.unregister(collector)


def renamed(family: Metric, name: str, documentation: str | None = None) -> Metric:
    """The same samples under another family name (kube-proxy's names for the Service
    proxy's metrics): each sample's name keeps its suffix (_bucket, _sum, _total, ...)."""
    out = Metric(name, documentation or family.documentation, family.type, family.unit)
    for s in family.samples:
        out.samples.append(s._replace(name=name + s.name[len(family.name):]))
    return out


def text(collectors: Iterable) -> str:
    """The text exposition of some collectors alone (tests and tools)."""
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    encoder, _ = choose_encoder("text/plain")
    return encoder(reg).decode()


# ---------------------------------------------------------------- the listener


def listen_address(explicit: str | None, node_ip: str | None) -> str:
    """Where a metrics listener binds: the address asked for (0.0.0.0 or :: only this way),
    else the node's address, else 127.0.0.1."""
    for what, value in (("--metrics-address", explicit), ("the node's address", node_ip)):
        if not value:
            continue
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise PodnetError(f"{what} {value!r}: expected an IP address (0.0.0.0 for every address)") from None
        return value
    return LOCALHOST


class MetricsServer:
    """/metrics, /healthz and /readyz on one address and port, served on a thread.

    ready(): None when the process is ready, else why not (the body of the 503)."""

    def __init__(self, address: str, port: int, *, registry: CollectorRegistry = REGISTRY,
                 ready: Callable[[], str | None] = lambda: None):
        self.address = address
        self.port = port
        self.registry = registry
        self.ready = ready
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[:2]

    def start(self) -> MetricsServer:
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    try:
                        body = encoder(server_ref.registry)
                    except Exception as e:  # a collector failed: say so, keep serving
                        log.exception("metrics: a collector failed")
                        self._send(500, f"collecting metrics failed: {e}\n".encode(), "text/plain; charset=utf-8")
                        return
                    self._send(200, body, content_type)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    try:
                        why = server_ref.ready()
                    except Exception as e:  # noqa: BLE001 - not ready, and why
                        why = f"readiness check failed: {e}"
                    if why:
                        self._send(503, f"not ready: {why}\n".encode())
                    else:
                        self._send(200, b"ok\n")
                else:
                    self._send(404, b"not found: /metrics, /healthz and /readyz are served here\n")

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        try:
            self._server = Server((self.address, self.port), Handler)
        except OSError as e:
            raise PodnetError(f"cannot serve metrics on {self.address}:{self.port}: {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s port %d", *self.bound)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
