"""healthCheckNodePort servers: external load balancers ask each node whether it has
local endpoints for an externalTrafficPolicy Local Service.

One small threaded HTTP listener per healthCheckNodePort (as kube-proxy): any
path answers 200 when the node has local endpoints, 503 when not, with a JSON
body naming the Service and the count. `sync()` opens, updates and closes
listeners to match the desired health checks; it never blocks on clients.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from podnet.services.model import HealthCheck

log = logging.getLogger("podnet.services")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    check: HealthCheck


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        check = self.server.check
        body = json.dumps({
            "service": {"namespace": check.namespace, "name": check.name},
            "localEndpoints": check.local_endpoints,
            "serviceProxyHealthy": True,
        }).encode()
        self.send_response(200 if check.local_endpoints > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep the access log quiet
        pass


class HealthCheckServer:
    def __init__(self, address: str = "0.0.0.0"):
        self.address = address
        self.servers: dict[int, _Server] = {}
        self.errors: dict[int, str] = {}
        self._lock = threading.Lock()

    def sync(self, checks: Iterable[HealthCheck]) -> None:
        wanted = {c.port: c for c in checks}
        with self._lock:
            for port in list(self.servers):
                if port not in wanted:
                    self._close(port)
            for port, check in wanted.items():
                server = self.servers.get(port)
                if server is not None:
                    server.check = check  # a plain attribute swap: handlers read it per request
                    continue
                try:
                    server = _Server((self.address, port), _Handler)
                except OSError as e:
                    self.errors[port] = str(e)
                    log.error("health check port %d for %s/%s: %s", port, check.namespace, check.name, e)
                    continue
                self.errors.pop(port, None)
                server.check = check
                threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
                self.servers[port] = server

    def ports(self) -> list[int]:
        return sorted(self.servers)

    def _close(self, port: int) -> None:
        server = self.servers.pop(port)
        server.shutdown()
        server.server_close()

    def close(self) -> None:
        with self._lock:
            for port in list(self.servers):
                self._close(port)
