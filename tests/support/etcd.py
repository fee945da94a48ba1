"""Real etcd members on 127.0.0.1, for tests and benchmarks.

    with EtcdCluster(3) as cluster:
        store = open_store(cluster.url)
        cluster.kill_member(cluster.leader())
        ...

Each member gets free client and peer ports and a directory of its own holding
its data dir and its log (etcd.log). Processes are only ever signalled by PID.

    with EtcdCluster(1, tls=True, auth=True) as cluster:
        store = open_store(cluster.url, credentials=cluster.credentials)

tls=True: certificates made with openssl in the cluster's directory (Pki), client
URLs over HTTPS with --client-cert-auth (a client needs a certificate from the
cluster's CA). auth=True: a root user and a `podnet` user whose role may read and
write `auth_prefix`, made with etcdctl, then `etcdctl auth enable`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import IO

from podnet.errors import PodnetError
from podnet.store.credentials import EtcdCredentials

ETCD_BINARY = "etcd"
# Raft timing for tests on a small, busy machine: fast enough that a failover takes a
# second or two, slow enough that a loaded box does not trigger spurious elections.
HEARTBEAT_MS = 100
ELECTION_MS = 1000
START_TIMEOUT = 30.0
LOG_TAIL_LINES = 30
ROOT_PASSWORD = "root-Pw-0"
# Characters a URL must percent-encode, and etcdctl's USER:PASSWORD separator.
PODNET_PASSWORD = "pod:net@pw,%/1"


class EtcdError(PodnetError):
    pass


@dataclass
class Member:
    index: int
    name: str
    dir: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "etcd.log")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-64 * 1024:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now on 127.0.0.1 (held together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, client certificates, and a second
    CA that etcd does not trust, made with openssl in `directory` (keys 0600).

    client: no Common Name (subject /O=podnet), as etcd's JSON gateway needs with auth on;
    client_cn: CN=podnet; untrusted: a client certificate from the other CA."""

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._ca("ca")
        self._ca("other-ca")
        # etcd's JSON gateway dials its own gRPC server with this certificate: it must allow clientAuth.
        self._leaf("server", "ca", "/CN=etcd-test-server", "serverAuth,clientAuth", "IP:127.0.0.1,DNS:localhost")
        self._leaf("client", "ca", "/O=podnet", "clientAuth")
        self._leaf("client-cn", "ca", "/O=podnet/CN=podnet", "clientAuth")
        self._leaf("untrusted", "other-ca", "/O=podnet", "clientAuth")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def pair(self, name: str) -> tuple[str, str]:
        """(certificate, key) of a leaf."""
        return self.path(f"{name}.pem"), self.path(f"{name}.key")

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EtcdError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    def _ca(self, name: str) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                      f"{name}.pem", "-days", "2", "-subj", f"/CN=podnet test {name} {uuid.uuid4().hex[:8]}")
        os.chmod(self.path(f"{name}.key"), 0o600)

    def _leaf(self, name: str, ca: str, subject: str, usage: str, san: str | None = None) -> None:
        ext = self.path(f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
            if san:
                f.write(f"subjectAltName={san}\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                      "-subj", subject)
        os.chmod(self.path(f"{name}.key"), 0o600)
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                      "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext)

    def context(self, client: str | None = "client") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.path("ca.pem"))
        if client is not None:
            ctx.load_cert_chain(*self.pair(client))
        return ctx


def _post_json(endpoint: str, path: str, body: dict | None, timeout: float,
               tls: ssl.SSLContext | None = None) -> tuple[int, dict]:
    host, port = endpoint.rsplit(":", 1)
    if tls is None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=tls)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


class EtcdCluster:
    """`size` etcd members on 127.0.0.1, started and healthy when the constructor returns.

    base_dir: where member directories (base_dir/m0, m1, ...: data/ and etcd.log) go.
    If not given, a temporary directory that stop() removes; a given base_dir is the
    caller's and is left in place, logs included (member directories in it are
    wiped when the cluster starts, so each start is a fresh cluster).
    die_with_parent: members get SIGKILL if the thread that started them dies (so a
    killed test run leaves no etcd behind); leave it off when starting from a
    short-lived thread.
    """

    def __init__(
        self,
        size: int = 1,
        base_dir: str | None = None,
        *,
        etcd: str = ETCD_BINARY,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
        max_txn_ops: int = 10_000,
        start_timeout: float = START_TIMEOUT,
        die_with_parent: bool = False,
        extra_args: tuple[str, ...] | list[str] = (),
        tls: bool = False,
        auth: bool = False,
        auth_prefix: str = "/",
    ):
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        binary = shutil.which(etcd)
        if binary is None:
            raise EtcdError(f"etcd binary {etcd!r} not found on PATH (Debian: apt-get install etcd-server)")
        self.binary = binary
        self.size = size
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.max_txn_ops = max_txn_ops
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent and shutil.which("setpriv") is not None
        self.extra_args = list(extra_args)
        self._own_dir = base_dir is None
        if base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="podnet-etcd-")
        else:
            os.makedirs(base_dir, exist_ok=True)
            self.base_dir = base_dir
        self.token = f"podnet-{uuid.uuid4().hex[:12]}"
        self.members: list[Member] = []
        self.auth = auth
        self.auth_prefix = auth_prefix
        self.pki: Pki | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._auth_on = False
        try:
            self.pki = Pki(os.path.join(self.base_dir, "pki")) if tls else None
            self._tls_context = self.pki.context() if self.pki is not None else None
            self._start_all()
            if auth:
                self._enable_auth()
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ properties

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def tls(self) -> bool:
        return self.pki is not None

    @property
    def url(self) -> str:
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)

    @property
    def credentials(self) -> EtcdCredentials:
        """The `podnet` user's (with auth) and the client certificate (with TLS)."""
        return self.credentials_for("podnet" if self.auth else None, PODNET_PASSWORD)

    def credentials_for(self, user: str | None, password: str | None = None, client: str = "client",
                        ) -> EtcdCredentials:
        values: dict[str, str | None] = {"user": user, "password": password if user else None}
        if self.pki is not None:
            values |= dict(zip(("cert", "key"), self.pki.pair(client), strict=True), cacert=self.pki.path("ca.pem"))
        return EtcdCredentials(**values)

    def etcdctl(self, *args: str, root: bool = True, input: str | None = None) -> str:
        """Run etcdctl against the cluster (as root once auth is on); its output."""
        cmd = ["etcdctl", "--endpoints", ",".join(("https://" if self.tls else "http://") + e for e in self.endpoints)]
        if self.pki is not None:
            cmd += ["--cacert", self.pki.path("ca.pem"), "--cert", self.pki.pair("client")[0],
                    "--key", self.pki.pair("client")[1]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        if root and self._auth_on:
            env |= {"ETCDCTL_USER": "root", "ETCDCTL_PASSWORD": ROOT_PASSWORD}
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=30, input=input)
        if proc.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def _enable_auth(self) -> None:
        self.etcdctl("user", "add", "root", "--new-user-password", ROOT_PASSWORD)
        self.etcdctl("user", "grant-role", "root", "root")
        self.add_user("podnet", PODNET_PASSWORD, self.auth_prefix)
        self.etcdctl("auth", "enable")
        self._auth_on = True

    def add_user(self, name: str, password: str, prefix: str) -> None:
        """A user whose role `name` may read and write keys starting with `prefix`."""
        self.etcdctl("user", "add", name, "--new-user-password", password)
        self.etcdctl("role", "add", name)
        self.etcdctl("role", "grant-permission", name, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", name, name)

    def pids(self) -> list[int | None]:
        return [m.pid if m.running() else None for m in self.members]

    # ------------------------------------------------------------------ lifecycle

    def _start_all(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            ports = free_ports(2 * self.size)
            self.members = [
                Member(i, f"m{i}", os.path.join(self.base_dir, f"m{i}"), ports[2 * i], ports[2 * i + 1])
                for i in range(self.size)
            ]
            for m in self.members:
                shutil.rmtree(m.dir, ignore_errors=True)
                os.makedirs(m.dir)
                self._spawn(m, new=True)
            try:
                self._wait_healthy(self.members)
                return
            except EtcdError as e:
                # Another process may have taken a port between probing and binding: retry.
                busy = "address already in use" in str(e)
                self._stop_members()
                if not busy or attempt == attempts - 1:
                    raise

    def _command(self, m: Member, new: bool) -> list[str]:
        peers = ",".join(f"{o.name}=http://127.0.0.1:{o.peer_port}" for o in self.members)
        scheme = "https" if self.pki is not None else "http"
        cmd = [
            self.binary,
            "--name", m.name,
            "--data-dir", m.data_dir,
            "--listen-client-urls", f"{scheme}://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", peers,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new" if new else "existing",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--pre-vote=true",
            "--max-txn-ops", str(self.max_txn_ops),
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]
        if self.pki is not None:
            cert, key = self.pki.pair("server")
            cmd += ["--cert-file", cert, "--key-file", key, "--client-cert-auth",
                    "--trusted-ca-file", self.pki.path("ca.pem")]
        if self.die_with_parent:
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]  # setpriv execs: same PID
        return cmd

    def _spawn(self, m: Member, new: bool) -> None:
        if m.log is not None:
            m.log.close()
        m.log = open(m.log_path, "ab")
        m.proc = subprocess.Popen(
            self._command(m, new),
            stdin=subprocess.DEVNULL,
            stdout=m.log,
            stderr=subprocess.STDOUT,
            cwd=m.dir,
            start_new_session=True,  # a Ctrl-C to the caller's terminal is the caller's to handle
        )

    def _healthy(self, m: Member) -> bool:
        try:
            status, doc = _post_json(m.endpoint, "/health", None, timeout=2.0, tls=self._tls_context)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        return status == 200 and doc.get("health") == "true"

    def _wait_healthy(self, members: list[Member]) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(members)
        while pending:
            for m in list(pending):
                if not m.running():
                    code = m.proc.returncode if m.proc is not None else None
                    raise EtcdError(
                        f"etcd member {m.name} ({m.endpoint}) exited with status {code} while starting; "
                        f"log {m.log_path}:\n{m.log_tail()}"
                    )
                if self._healthy(m):
                    pending.remove(m)
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name} ({m.log_path}):\n{m.log_tail()}" for m in pending)
                raise EtcdError(
                    f"etcd members {', '.join(m.name for m in pending)} not healthy after "
                    f"{self.start_timeout:.0f}s:\n{tails}"
                )
            time.sleep(0.1)

    def kill_member(self, i: int) -> None:
        """SIGKILL member i (by PID) and reap it."""
        m = self.members[i]
        if m.running():
            os.kill(m.proc.pid, signal.SIGKILL)
        if m.proc is not None:
            m.proc.wait()

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        """SIGTERM member i (by PID), SIGKILL if it has not exited within timeout."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.running():
            os.kill(m.proc.pid, signal.SIGTERM)
            try:
                m.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(m.proc.pid, signal.SIGKILL)
                m.proc.wait()
        else:
            m.proc.wait()

    def restart_member(self, i: int, wait: bool = True) -> None:
        """Start member i again on its ports and data dir (it rejoins with its data)."""
        m = self.members[i]
        if m.running():
            raise EtcdError(f"etcd member {m.name} is still running (pid {m.pid})")
        self._spawn(m, new=False)
        if wait:
            self._wait_healthy([m])

    def leader(self) -> int:
        """Index of the current leader, as reported by a running member."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            for m in self.members:
                if not m.running():
                    continue
                try:
                    status, doc = _post_json(m.endpoint, "/v3/maintenance/status", {}, timeout=2.0,
                                             tls=self._tls_context)
                except (OSError, ValueError, http.client.HTTPException):
                    continue
                leader_id = doc.get("leader") if status == 200 else None
                if leader_id and leader_id != "0":
                    for o in self.members:
                        if o.running() and self._member_id(o) == leader_id:
                            return o.index
            if time.monotonic() > deadline:
                raise EtcdError("etcd cluster has no leader")
            time.sleep(0.1)

    def _member_id(self, m: Member) -> str | None:
        try:
            status, doc = _post_json(m.endpoint, "/v3/maintenance/status", {}, timeout=2.0, tls=self._tls_context)
        except (OSError, ValueError, http.client.HTTPException):
            return None
        return doc.get("header", {}).get("member_id") if status == 200 else None

    def _stop_members(self) -> None:
        for i in range(len(self.members)):
            with contextlib.suppress(OSError):
                self.stop_member(i)
        for m in self.members:
            if m.log is not None:
                m.log.close()
                m.log = None

    def stop(self) -> None:
        """Stop every member (by PID) and remove the temporary directories."""
        self._stop_members()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["PODNET_PASSWORD", "ROOT_PASSWORD", "EtcdCluster", "EtcdError", "Member", "Pki", "free_ports"]
