"""A real BIND (named, from Debian's bind9) for tests and benchmarks: primary of dynamic
zones, on a loopback address and a free port, with a TSIG key that may update the zones
and transfer them.

    with Named(zones=["example.test"]) as named:
        named.key_name, named.secret            # the TSIG key
        named.query("web.example.test", "A")    # a dnspython answer
        named.restart()                         # stop, start again on the same port (zone kept)

Everything (config, key, zone files and journals, log) lives in a private temporary
directory; named runs in the foreground as this process's child and is stopped by its
PID. Readiness is the zone's SOA answering, not a sleep.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from tests.support.dns import free_port

NAMED = shutil.which("named") or "/usr/sbin/named"


def have_named() -> bool:
    return os.path.exists(NAMED)


class Named:
    def __init__(self, zones: Iterable[str] = ("example.test",), host: str = "127.0.0.1", port: int | None = None,
                 key_name: str = "podnet-test-key", algorithm: str = "hmac-sha256",
                 records: Iterable[str] = (), extra_keys: Iterable[str] = ()):
        self.zones = [z.rstrip(".") for z in zones]
        self.host = host
        self.port = port
        self.key_name = key_name
        self.algorithm = algorithm
        self.secret = base64.b64encode(secrets.token_bytes(32)).decode()
        self.records = list(records)  # zone-file lines (absolute names) put into every zone at start
        self.extra_keys = {k: base64.b64encode(secrets.token_bytes(32)).decode() for k in extra_keys}
        self.dir = tempfile.mkdtemp(prefix="podnet-named-")
        self.proc: subprocess.Popen | None = None
        self._written = False

    # ------------------------------------------------------------------ set-up

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _write(self) -> None:
        keys = {self.key_name: self.secret, **self.extra_keys}
        lines = [f'key "{k}" {{ algorithm {self.algorithm}; secret "{s}"; }};' for k, s in keys.items()]
        lines += [
            "options {",
            f'  directory "{self.dir}";',
            f'  pid-file "{self.path("named.pid")}";',
            f'  session-keyfile "{self.path("session.key")}";',
            f'  managed-keys-directory "{self.dir}";',
            f"  listen-on port {self.port} {{ {self.host}; }};",
            "  listen-on-v6 { none; };",
            "  recursion no;",
            "  dnssec-validation no;",
            "  notify no;",
            "  minimal-responses yes;",
            "};",
            "controls { };",
            "logging { channel log { file \"" + self.path("named.log") + "\"; print-time yes; severity info; };"
            " category default { log; }; category update { log; }; category xfer-out { log; };"
            " category update-security { log; }; };",
        ]
        grants = " ".join(f"grant {k} zonesub ANY;" for k in keys)
        for z in self.zones:
            lines += [f'zone "{z}" {{', "  type primary;", f'  file "{self.path(z + ".db")}";',
                      f"  update-policy {{ {grants} }};",
                      f"  allow-transfer {{ {' '.join(f'key {k};' for k in keys)} }};", "};"]
            with open(self.path(z + ".db"), "w") as f:
                f.write(f"$TTL 60\n@ IN SOA ns.{z}. admin.{z}. 1 60 60 600 60\n@ IN NS ns.{z}.\n"
                        f"ns IN A {self.host}\n")
                for r in self.records:
                    name = r.split()[0].rstrip(".")
                    if name == z or name.endswith("." + z):
                        f.write(r.rstrip() + "\n")
        with open(self.path("named.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")
        self._written = True

    def start(self, timeout: float = 20.0) -> Named:
        if self.port is None:
            self.port = free_port(self.host)
        if not self._written:
            self._write()
        with open(self.path("stderr"), "a") as err:
            # -g: foreground, log to stderr; no -u: stays this user (the files are its own)
            self.proc = subprocess.Popen([NAMED, "-g", "-c", self.path("named.conf")], stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"named exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if all(self.query(z, "SOA", timeout=0.5).rcode() == dns.rcode.NOERROR for z in self.zones):
                    return
            except (dns.exception.DNSException, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"named on {self.host}:{self.port} did not answer for its zones: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Named:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("stderr", "named.log"):
            try:
                with open(self.path(name), errors="replace") as f:
                    out += f.read().splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(out[-lines:])

    # ------------------------------------------------------------------ talking to it

    @property
    def key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.key_name, self.secret, self.algorithm)

    def query(self, name: str, rtype: str, timeout: float = 3.0) -> dns.message.Message:
        q = dns.message.make_query(name if name.endswith(".") else name + ".", rtype)
        return dns.query.tcp(q, self.host, port=self.port, timeout=timeout)

    def values(self, name: str, rtype: str) -> list[str]:
        """The record values at name (sorted; TXT: the joined strings; CNAME: without the dot)."""
        out = []
        for rrset in self.query(name, rtype).answer:
            if rrset.rdtype != dns.rdatatype.from_text(rtype):
                continue
            for rd in rrset:
                if rtype == "TXT":
                    out.append(b"".join(rd.strings).decode())
                elif rtype == "CNAME":
                    out.append(rd.target.to_text(omit_final_dot=True))
                else:
                    out.append(rd.to_text())
        return sorted(out)

    def ttl(self, name: str, rtype: str) -> int | None:
        for rrset in self.query(name, rtype).answer:
            return rrset.ttl
        return None

    def update(self, zone: str, build) -> int:  # noqa: ANN001 - build(UpdateMessage)
        """Send one signed UPDATE made by `build` (as a person would with nsupdate); its rcode."""
        u = dns.update.UpdateMessage(zone + ".")
        u.use_tsig(self.key)
        build(u)
        return dns.query.tcp(u, self.host, port=self.port, timeout=5).rcode()

    def serial(self, zone: str) -> int:
        return self.query(zone, "SOA").answer[0][0].serial

