"""The installed podnet-cni executable (native/cni/podnet-cni.c, built and installed by
podnet.cni.install), run as the runtime runs it (a subprocess with CNI_* variables and the
configuration on stdin), against a real CNIServer + CNIHandler on a temp socket and a temp
SQLite store, or a raw socket where the test needs exact bytes. Whatever the input: exit 0 or
1, one JSON document. Its JSON reader is held to Python's json module, message for message."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from cni_doubles import RecordingDataplane
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from podnet.cni import DEFAULT_SOCKET, install
from podnet.cni.attachments import ATTACHMENTS_PREFIX
from podnet.cni.handler import CNIHandler
from podnet.cni.install import IPAM_NAME, PLUGIN_NAME, PluginBuildError, build_plugin, install_plugin
from podnet.cni.server import CNIServer, CNIServerError
from podnet.ipam import keys as ipam_keys
from podnet.model.objects import IPPool
from podnet.store import open_store
from podnet.store.objects import ObjectStore

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def run_plugin(plugin: str, env: dict[str, str], stdin: bytes | None = b"", timeout: float = 30):
    proc = subprocess.run([plugin], input=stdin, env=env, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL if stdin is None else None)
    assert b"Traceback" not in proc.stdout + proc.stderr, proc
    assert proc.returncode in (0, 1), proc
    return proc


def cni_error(proc) -> dict:
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict) and isinstance(doc["code"], int) and not isinstance(doc["code"], bool), doc
    assert isinstance(doc["msg"], str) and doc["msg"] and doc["cniVersion"] in SUPPORTED
    return doc


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    return install_plugin(str(tmp_path_factory.mktemp("cni-bin")))


class Agent:
    """A CNIServer + CNIHandler on a temp socket and store, with a recording dataplane."""

    def __init__(self, root: Path):
        self.socket = str(root / "run" / "cni.sock")
        self.kv = open_store("sqlite://" + str(root / "podnet.db"))
        ObjectStore(self.kv).apply([IPPool.model_validate({
            "apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "default-pool"},
            "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
        self.dataplane = RecordingDataplane()
        self.handler = CNIHandler(self.kv, "node-1", self.dataplane, verify_netns=lambda p: None)
        self.server = CNIServer(self.socket, self.handler).start()

    def config(self, version: str = "1.0.0", **extra) -> bytes:
        return json.dumps({"cniVersion": version, "name": "podnet", "type": PLUGIN_NAME,
                           "agentSocket": self.socket, **extra}).encode()

    def state(self) -> set[str]:
        """Every attachment record and IPAM handle in the store."""
        return ({r.key for r in self.kv.list(ATTACHMENTS_PREFIX)[0]}
                | {r.key for r in self.kv.list(ipam_keys.HANDLES)[0]})

    def close(self) -> None:
        self.server.stop()
        self.handler.close()
        self.kv.close()


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.close()


def cni_env(command: str, cid: str = "abc123", **extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/p1",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web", **extra}


# ---------------------------------------------------------------- the executable and its installation

PT_DYNAMIC, PT_INTERP = 2, 3


def program_headers(path: str) -> list[int]:
    """The type of each program header of a 64-bit little-endian ELF executable."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4:6] == b"\x02\x01", "not a 64-bit little-endian ELF file"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    entsize, count = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * entsize)[0] for i in range(count)]


def test_plugin_is_a_static_executable(plugin):
    """No interpreter, no dynamic section: the kernel runs it as it is."""
    headers = program_headers(plugin)
    assert headers and PT_INTERP not in headers and PT_DYNAMIC not in headers
    assert Path(plugin).read_bytes()[:2] != b"#!"
    if shutil.which("file"):
        assert "statically linked" in subprocess.run(["file", "-b", plugin], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chroot")
def test_plugin_needs_nothing_on_the_host(plugin, tmp_path):
    """In a root holding nothing but the plugin and the agent's socket, with no PATH and no other
    variable: VERSION, the error for a missing agent, and an ADD and DEL through the real agent."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(plugin, root / "bin" / PLUGIN_NAME)
    agent = Agent(root)  # its socket: /run/cni.sock inside the root

    def run(env: dict[str, str], stdin: bytes):
        def enter() -> None:
            os.chroot(root)
            os.chdir("/")
        return subprocess.run(["/bin/" + PLUGIN_NAME], input=stdin, env=env, capture_output=True, timeout=30,
                              preexec_fn=enter)

    try:
        assert set(os.listdir(root)) <= {"bin", "run", "podnet.db", "podnet.db-wal", "podnet.db-shm"}
        proc = run({"CNI_COMMAND": "VERSION"}, b"{}")
        assert proc.returncode == 0 and json.loads(proc.stdout)["supportedVersions"] == SUPPORTED
        conf = {"cniVersion": "1.0.0", "name": "podnet", "type": PLUGIN_NAME}
        proc = run(cni_env("ADD"), json.dumps({**conf, "agentSocket": "/run/missing.sock"}).encode())
        assert cni_error(proc)["code"] == 11
        proc = run(cni_env("ADD"), json.dumps({**conf, "agentSocket": "/run/cni.sock"}).encode())
        assert proc.returncode == 0, proc.stdout
        assert json.loads(proc.stdout)["ips"][0]["address"].startswith("10.244.")
        proc = run(cni_env("DEL"), json.dumps({**conf, "agentSocket": "/run/cni.sock"}).encode())
        assert (proc.returncode, proc.stdout) == (0, b"")
        assert agent.state() == set()
    finally:
        agent.close()


def test_plugin_default_socket_is_the_agents():
    source = install.SOURCE.read_text()
    assert re.search(r'#define DEFAULT_SOCKET "([^"]+)"', source)[1] == DEFAULT_SOCKET


def test_install_copies_only_what_changed(tmp_path):
    binary = build_plugin()
    target = Path(install_plugin(tmp_path / "bin", binary))
    assert target == tmp_path / "bin" / PLUGIN_NAME
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and not target.is_symlink()
    assert target.read_bytes() == Path(binary).read_bytes()
    inode = target.stat().st_ino
    install_plugin(tmp_path / "bin", binary)
    assert target.stat().st_ino == inode  # the same file: not written again

    target.write_bytes(b"#!/bin/sh\nexit 1\n")  # an old or damaged copy: replaced by a new file
    install_plugin(tmp_path / "bin", binary)
    assert target.read_bytes() == Path(binary).read_bytes() and stat.S_IMODE(target.stat().st_mode) == 0o755
    target.unlink()
    target.symlink_to(binary)  # a link (to this checkout) becomes a copy
    install_plugin(tmp_path / "bin", binary)
    assert not target.is_symlink() and target.read_bytes() == Path(binary).read_bytes()
    # podnet-ipam is the same executable; no temporary file left
    assert sorted(os.listdir(tmp_path / "bin")) == [PLUGIN_NAME, IPAM_NAME]
    assert (tmp_path / "bin" / IPAM_NAME).read_bytes() == Path(binary).read_bytes()


def test_install_module_entry_point(tmp_path):
    """python -m podnet.cni.install, as set-up and the lab run it, compiling into its own build dir."""
    proc = subprocess.run([sys.executable, "-m", "podnet.cni.install", "--build-dir", str(tmp_path / "build"),
                           str(tmp_path / "bin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "bin" / PLUGIN_NAME)
    assert sorted(os.listdir(tmp_path / "build")) == [PLUGIN_NAME, f"{PLUGIN_NAME}.sha256"]
    assert PT_INTERP not in program_headers(proc.stdout.strip())
    proc = run_plugin(proc.stdout.strip(), {"CNI_COMMAND": "VERSION"}, b"{}")
    assert json.loads(proc.stdout)["supportedVersions"] == SUPPORTED


def test_build_reuses_the_binary_until_the_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "podnet-cni.c"
    source.write_text(install.SOURCE.read_text())
    monkeypatch.setattr(install, "SOURCE", source)
    first = Path(build_plugin(tmp_path / "build"))
    inode = first.stat().st_ino
    assert Path(build_plugin(tmp_path / "build")).stat().st_ino == inode
    source.write_text(source.read_text() + "/* changed */\n")
    assert Path(build_plugin(tmp_path / "build")).stat().st_ino != inode


def test_build_failures_are_reported(tmp_path, monkeypatch):
    source = tmp_path / "podnet-cni.c"
    source.write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setattr(install, "SOURCE", source)
    with pytest.raises(PluginBuildError, match="undeclared"):
        build_plugin(tmp_path / "build")
    with pytest.raises(PluginBuildError, match="not found"):
        build_plugin(tmp_path / "build", cc=str(tmp_path / "no-such-cc"))
    assert not (tmp_path / "build" / PLUGIN_NAME).exists()
    assert not [p for p in os.listdir(tmp_path / "build") if p.startswith(".")]  # no temporary file left


# ---------------------------------------------------------------- answered by the plugin itself


@pytest.mark.parametrize("stdin,version", [
    (b'{"cniVersion": "0.4.0"}', "0.4.0"),
    (b'{"cniVersion": "1.0.0"}', "1.0.0"),
    (b'{"cniVersion": "9.9.9"}', "1.1.0"),
    (b"", "1.1.0"),
    (b"\xff not json", "1.1.0"),
])
def test_version(plugin, stdin, version):
    proc = run_plugin(plugin, {"CNI_COMMAND": "VERSION"}, stdin)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"cniVersion": version, "supportedVersions": SUPPORTED}


def test_missing_command_is_code_4(plugin):
    doc = cni_error(run_plugin(plugin, {}, b"{}"))
    assert doc["code"] == 4 and "CNI_COMMAND" in doc["msg"]


def test_unknown_command_is_code_4(plugin):
    doc = cni_error(run_plugin(plugin, {"CNI_COMMAND": "FROB"}, b"{}"))
    assert doc["code"] == 4 and "FROB" in doc["msg"]


@pytest.mark.parametrize("stdin,words", [
    (b"", "Expecting value"),
    (b"{not json", "line 1 column 2"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"a": NaN}', "NaN"),
    (b"[" * 200_000, "nested too deeply"),
])
def test_undecodable_stdin_is_code_6(plugin, stdin, words):
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), stdin))
    assert doc["code"] == 6 and words in doc["msg"], doc


def test_unreadable_stdin_is_code_5(plugin):
    proc = subprocess.run([plugin], env=cni_env("ADD"), capture_output=True, stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: os.close(0))  # the plugin starts with no stdin at all
    assert cni_error(proc)["code"] == 5


def test_agent_socket_missing_is_code_11(plugin, tmp_path):
    path = str(tmp_path / "nothing.sock")
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_NAME, "agentSocket": path}).encode()
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), conf))
    assert doc["code"] == 11 and doc["cniVersion"] == "1.0.0"
    assert doc["msg"] == f"podnet agent not reachable at {path}: No such file or directory"


def test_agent_socket_stale_is_code_11(plugin, tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_NAME, "agentSocket": path}).encode()
    doc = cni_error(run_plugin(plugin, cni_env("DEL"), conf))
    assert doc["code"] == 11 and "Connection refused" in doc["msg"]


def test_agent_that_never_answers_is_code_11(plugin, tmp_path):
    path = str(tmp_path / "silent.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)  # connections queue, nobody accepts
    try:
        conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_NAME, "agentSocket": path,
                           "agentTimeout": 0.5}).encode()
        doc = cni_error(run_plugin(plugin, cni_env("ADD"), conf))
        assert doc["code"] == 11 and "no answer within 0.5 s" in doc["msg"]
    finally:
        s.close()


@pytest.mark.parametrize("field", [{"agentSocket": 5}, {"agentSocket": ""}, {"agentSocket": "/x" * 100},
                                   {"agentTimeout": "soon"}, {"agentTimeout": 0}])
def test_bad_agent_settings_are_code_7(plugin, field):
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_NAME, **field}).encode()
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), conf))
    assert doc["code"] == 7 and next(iter(field)) in doc["msg"]


# ---------------------------------------------------------------- through the agent


def test_add_check_del_through_the_agent(plugin, agent):
    proc = run_plugin(plugin, cni_env("ADD"), agent.config("1.0.0"))
    assert proc.returncode == 0, proc.stdout
    result = json.loads(proc.stdout)
    assert result["cniVersion"] == "1.0.0" and result["ips"][0]["address"].startswith("10.244.")
    proc = run_plugin(plugin, cni_env("CHECK"), agent.config("1.0.0", prevResult=result))
    assert (proc.returncode, proc.stdout) == (0, b"")
    for _ in range(2):
        proc = run_plugin(plugin, cni_env("DEL"), agent.config("1.0.0"))
        assert (proc.returncode, proc.stdout) == (0, b"")
    assert agent.state() == set()


def test_agent_errors_reach_stdout_unchanged(plugin, agent):
    doc = cni_error(run_plugin(plugin, cni_env("ADD", cid="-bad"), agent.config("0.4.0")))
    assert doc["code"] == 4 and "CNI_CONTAINERID" in doc["msg"] and doc["cniVersion"] == "0.4.0"


def test_status_and_gc_through_the_agent(plugin, agent):
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    assert run_plugin(plugin, env, agent.config("1.1.0")).returncode == 0
    assert run_plugin(plugin, cni_env("ADD", cid="gone1"), agent.config("1.1.0")).returncode == 0
    gc = agent.config("1.1.0", **{"cni.dev/valid-attachments": []})
    assert run_plugin(plugin, {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, gc).returncode == 0
    assert agent.state() == set()


def test_concurrent_plugins(plugin, agent):
    procs = [subprocess.Popen([plugin], env=cni_env("ADD", cid=f"par{i}"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(12)]
    outs = [p.communicate(agent.config(), timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({json.loads(o)["ips"][0]["address"] for o, _ in outs}) == 12


# ---------------------------------------------------------------- the server


def test_server_socket_is_private_and_removed_on_stop(tmp_path):
    path = tmp_path / "deep" / "run" / "cni.sock"  # parents created
    server = CNIServer(str(path), RecordingHandler()).start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        server.stop()
    assert not path.exists()


def test_server_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    path = str(tmp_path / "cni.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    first = CNIServer(path, RecordingHandler()).start()
    try:
        with pytest.raises(CNIServerError, match="another process is serving"):
            CNIServer(path, RecordingHandler()).start()
    finally:
        first.stop()


def test_server_refuses_to_remove_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "cni.sock"
    path.write_text("precious")
    with pytest.raises(CNIServerError, match="not a socket"):
        CNIServer(str(path), RecordingHandler()).start()
    assert path.read_text() == "precious"


class RecordingHandler:
    """Test double for CNIHandler: answers every request with code 0 and records it."""

    def __init__(self, fail: bool = False):
        self.requests: list[tuple[dict, str]] = []
        self.fail = fail

    def handle(self, env, stdin):
        if self.fail:
            raise RuntimeError("handler bug")
        self.requests.append((env, stdin))
        return 0, ""


def raw_exchange(path: str, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


@pytest.mark.parametrize("payload", [b"garbage", b"[]", b'{"env": {"A": 1}, "stdin": ""}', b'{"env": {}}',
                                     b"\xff\xfe", b""])
def test_server_answers_malformed_requests_with_code_6(tmp_path, payload):
    handler = RecordingHandler()
    with CNIServer(str(tmp_path / "s.sock"), handler) as server:
        reply = raw_exchange(server.socket_path, payload)
    assert reply["code"] == 6 and json.loads(reply["output"])["code"] == 6
    assert handler.requests == []


def test_server_refuses_oversized_requests_and_keeps_serving(tmp_path):
    handler = RecordingHandler()
    with CNIServer(str(tmp_path / "s.sock"), handler, max_request=1000) as server:
        reply = raw_exchange(server.socket_path, json.dumps({"env": {}, "stdin": "x" * 5000}).encode())
        assert reply["code"] == 6 and "larger than 1000 bytes" in json.loads(reply["output"])["msg"]
        ok = raw_exchange(server.socket_path, json.dumps({"env": {"CNI_COMMAND": "DEL"}, "stdin": "{}"}).encode())
        assert ok == {"code": 0, "output": ""}
    assert handler.requests == [({"CNI_COMMAND": "DEL"}, "{}")]


def test_server_turns_a_handler_exception_into_code_999(tmp_path):
    with CNIServer(str(tmp_path / "s.sock"), RecordingHandler(fail=True)) as server:
        reply = raw_exchange(server.socket_path, json.dumps({"env": {}, "stdin": ""}).encode())
    assert reply["code"] == 999 and "handler bug" in json.loads(reply["output"])["msg"]


def test_plugin_sends_every_cni_variable_and_the_raw_stdin(plugin, tmp_path):
    handler = RecordingHandler()
    with CNIServer(str(tmp_path / "s.sock"), handler) as server:
        stdin = json.dumps({"cniVersion": "1.0.0", "agentSocket": server.socket_path, "x": "é"}, indent=1)
        env = {**cni_env("CHECK"), "CNI_EXTRA": "1", "HOME": "/root"}
        proc = run_plugin(plugin, env, stdin.encode())
    assert proc.returncode == 0
    (got_env, got_stdin), = handler.requests
    assert got_env == {k: v for k, v in env.items() if k.startswith("CNI_")}
    assert got_stdin == stdin


# ---------------------------------------------------------------- the same executable as podnet-ipam


def ipam_plugin(plugin: str) -> str:
    return str(Path(plugin).with_name(IPAM_NAME))


def test_ipam_name_reads_the_socket_from_the_ipam_object_and_says_it_is_ipam(plugin, raw_agent):
    """Run as podnet-ipam: agentSocket inside "ipam" (a main plugin hands over its whole
    configuration; a top-level agentSocket is not podnet-ipam's), and "plugin" in the request."""
    text = json.dumps({"cniVersion": "1.0.0", "name": "underlay", "type": "macvlan", "agentSocket": "/nowhere",
                       "ipam": {"type": IPAM_NAME, "pools": ["global"], "agentSocket": raw_agent.path}})
    proc = run_plugin(ipam_plugin(plugin), cni_env("ADD"), text.encode())
    assert (proc.returncode, proc.stdout) == (0, b"")
    (request,) = raw_agent.requests
    assert json.loads(request) == {"env": cni_env("ADD"), "stdin": text, "plugin": IPAM_NAME}


@pytest.mark.parametrize("field", [{"agentSocket": 5}, {"agentTimeout": 0}])
def test_ipam_name_bad_agent_settings_name_the_ipam_field(plugin, field):
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "macvlan", "ipam": {"type": IPAM_NAME, **field}})
    doc = cni_error(run_plugin(ipam_plugin(plugin), cni_env("ADD"), conf.encode()))
    assert doc["code"] == 7 and f"field ipam.{next(iter(field))}:" in doc["msg"]


def test_ipam_add_check_del_through_the_agent(plugin, agent):
    ObjectStore(agent.kv).apply([IPPool.model_validate({
        "apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "global"},
        "spec": {"cidr": "10.99.0.64/26", "blockSize": 29, "allowedUses": ["Attachment"]}})])

    def conf(**extra) -> bytes:
        return json.dumps({"cniVersion": "1.0.0", "name": "underlay", "type": "macvlan", **extra, "ipam": {
            "type": IPAM_NAME, "pools": ["global"], "subnet": "10.99.0.0/24", "agentSocket": agent.socket}}).encode()

    env = {**cni_env("ADD"), "CNI_IFNAME": "net1"}
    proc = run_plugin(ipam_plugin(plugin), env, conf())
    assert proc.returncode == 0, proc.stdout
    result = json.loads(proc.stdout)
    assert result["ips"][0]["address"].startswith("10.99.0.") and result["ips"][0]["address"].endswith("/24")
    assert not agent.dataplane.calls  # an IPAM plugin makes no interface
    proc = run_plugin(ipam_plugin(plugin), {**env, "CNI_COMMAND": "CHECK"}, conf(prevResult=result))
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert {ipam_keys.handle_of_key(k) for k in agent.state()} == {"podnet-ipam:underlay:abc123:net1"}
    for _ in range(2):
        proc = run_plugin(ipam_plugin(plugin), {**env, "CNI_COMMAND": "DEL"}, conf())
        assert (proc.returncode, proc.stdout) == (0, b"")
    assert agent.state() == set()


# ---------------------------------------------------------------- exact bytes: the request, JSON as Python reads it


class RawAgent:
    """A socket that records each request's bytes and answers with `reply` (bytes, or None to
    close without answering). Only for what the real agent never sends; `done` is set once a
    request is answered."""

    def __init__(self, path: str, reply: bytes | None = b'{"code": 0, "output": ""}'):
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self.done = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(1 << 16):
                    data += chunk
                self.requests.append(data)
                if self.reply is not None:
                    conn.sendall(self.reply)
                self.done.set()  # before the close: the plugin may exit as soon as it sees it

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def raw_agent(tmp_path):
    a = RawAgent(str(tmp_path / "raw.sock"))
    yield a
    a.close()


def test_request_is_byte_for_byte_the_documented_framing(plugin, raw_agent):
    """{"env": {CNI_* in environment order}, "stdin": text}, as json.dumps writes it (ASCII, ", " and
    ": "); a variable's bytes that are not UTF-8 travel as \\udcXX, as Python decodes them."""
    text = json.dumps({"cniVersion": "1.0.0", "agentSocket": raw_agent.path, "x": "é😀\u2028\t\"\\/"},
                      ensure_ascii=False, indent=1)
    env = {b"CNI_COMMAND": b"ADD", b"HOME": b"/root", b"CNI_ARGS": b"K8S_POD_NAME=a=b;\xff\xc3\xa9\x01",
           b"CNI_\xfe": b"\xed\xa0\x80", b"CNI_": b"", b"cni_lower": b"x", b"CNI_PATH": b"/opt/cni/bin"}
    proc = subprocess.run([plugin], input=text.encode(), env=env, capture_output=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, b"")
    decoded = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in env.items()}
    expected = json.dumps({"env": {k: v for k, v in decoded.items() if k.startswith("CNI_")}, "stdin": text})
    assert raw_agent.requests == [expected.encode()]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def python_verdict(raw: bytes) -> tuple[int, str] | None:
    """(code, msg) the plugin must give for this stdin when it is not a JSON object, from
    Python's own decoder; None when it is one."""
    prefix = "error decoding the network configuration: "
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return 6, f"{prefix}stdin is not UTF-8 text ({e.reason} at byte {e.start})"
    try:
        doc = json.JSONDecoder(parse_constant=_reject_constant).decode(text)
    except ValueError as e:
        return 6, f"{prefix}{e}"
    if isinstance(doc, dict):
        return None
    names = {list: "list", str: "str", int: "int", float: "float", bool: "bool", type(None): "null"}
    return 6, f"{prefix}expected a JSON object, got {names[type(doc)]}"


ODD_JSON = [
    b"", b"  \n ", b"{", b"}", b"[", b"[1,]", b"[1 2]", b'{"a" 1}', b'{"a": 1,}', b'{"a": 1 "b": 2}', b"{1: 2}",
    b'{"a": 1}}', b"nul", b"nulll", b"tru", b"-", b"-a", b"01", b"1.", b"1.e5", b"1e", b"1e+", b"1E-2x", b"-0",
    b"2.5e-3", b".5", b"+1", b"0x10", b"NaN", b"-Infinity", b"[Infinity]", b"Infinityy", b'"abc', b'"a\\', b'"\\x"',
    b'"\\u12"', b'"\\u12g4"', b'"\\ud800"', b'"\\ud800\\u"', b'"\\ud800\\udc0"', b'"\\ud800\\udc00"',
    b'"\\ud800\\u0041"', b'"tab\there"', b'"nul\x00"', '"é"x'.encode(), '["😀", 1 x]'.encode(),
    '{"é\n": 1,\n "b" 2}'.encode(), b"\xef\xbb\xbf{}", b"1" * 4301, b"[" + b"1" * 4300 + b"]", b"-" + b"9" * 4301,
    b"1" * 5000 + b".5", b"\xff", b"\xc3", b"\xe0\x80", b"\xe0\xa0", b"\xed\xa0\x80", b"\xf4\x90", b"\xf0\x9f\x98",
    b"\xc0\xaf", b'"ok" \xf5', b"[] []", b"  true  ", b"null", b'"str"', b"3.25",
]


@pytest.mark.parametrize("raw", ODD_JSON)
def test_json_reader_answers_as_pythons_decoder(plugin, raw):
    verdict = python_verdict(raw)
    assert verdict is not None
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), raw))
    assert (doc["code"], doc["msg"]) == verdict


@pytest.mark.parametrize("depth,nested", [(994, False), (995, True)])
def test_json_nesting_limit(plugin, depth, nested):
    """Where the Python plugin's decoder ran out of recursion; VERSION still answers."""
    raw = b"[" * depth + b"]" * depth
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), raw))
    assert doc["msg"].endswith("JSON nested too deeply" if nested else "expected a JSON object, got list")
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)  # in an object: as deep in all
    proc = run_plugin(plugin, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0", "x": ' + inner + b"}")
    assert json.loads(proc.stdout)["cniVersion"] == ("1.1.0" if nested else "0.4.0")


_TOKENS = ["{", "}", "[", "]", ",", ":", '"', "\\", "\\u", "d800", "dc00", "12", '"a"', '"k"', "1", "-", "0", ".",
           "5", "e", "E", "+", "null", "nul", "true", "false", "NaN", "Infinity", " ", "\n", "\t", "\x01", "é", "😀",
           "\u2028", "/", "x"]


_odd_text = st.text(st.sampled_from("a\\\"/\n\t\x01é😀\u2028\udcff"), max_size=6)
_documents = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _odd_text,
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(_odd_text, c, max_size=3), max_leaves=8)


@st.composite
def damaged_documents(draw) -> bytes:
    """A JSON document, sometimes with a token put in or a few characters taken out."""
    text = json.dumps(draw(_documents), ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(_TOKENS)) + text[at + draw(st.integers(0, 2)):]
    return text.encode("utf-8", "surrogatepass")  # an escaped \udcff stays escaped; a raw one is not UTF-8


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=16).map(lambda t: "".join(t).encode())
       | st.binary(max_size=12) | damaged_documents())
@example(b'{"a": [1, {"b": "\\ud83d\\ude00"}], "c": -1.5e3}')
def test_json_reader_fuzz(plugin, tmp_path_factory, raw):
    verdict = python_verdict(raw)
    if verdict is None:  # an object: point it at no agent, so the plugin goes as far as connecting
        doc = json.loads(raw)
        assume(not isinstance(doc.get("agentSocket"), str) and "agentTimeout" not in doc)
        raw = raw.rstrip()[:-1] + (b", " if doc else b"") + b'"agentSocket": "/nonexistent/podnet.sock"}'
        verdict = (11, "podnet agent not reachable at /nonexistent/podnet.sock: No such file or directory")
    event(verdict[1].split(":")[1][:40] if verdict[0] == 6 else "reached the socket")
    doc = cni_error(run_plugin(plugin, cni_env("ADD"), raw))
    assert (doc["code"], doc["msg"]) == verdict


@pytest.mark.parametrize("reply,status,stdout", [
    (b'{"code": 0, "output": "{\\"ok\\": 1}"}', 0, b'{"ok": 1}\n'),
    (b'{"code": 0, "output": ""}', 0, b""),
    (b'{"code": 0, "output": "done\\n"}', 0, b"done\n"),
    (b'  {"output": "x", "code": -0}  ', 0, b"x\n"),
    (b'{"code": 0, "output": "\\ud800 \\ud83d\\ude00 \\u00e9"}', 0, "? 😀 é\n".encode()),
    (b'{"code": 7, "output": "{\\"code\\": 7, \\"msg\\": \\"m\\"}"}', 1, b'{"code": 7, "msg": "m"}\n'),
])
def test_agent_answers_reach_stdout(plugin, raw_agent, reply, status, stdout):
    raw_agent.reply = reply
    proc = run_plugin(plugin, cni_env("ADD"), json.dumps({"cniVersion": "1.0.0", "agentSocket": raw_agent.path}).encode())
    assert (proc.returncode, proc.stdout) == (status, stdout)


@pytest.mark.parametrize("reply,code,msg", [
    (b'{"code": 7, "output": "  plain failure\\u3000\\n"}', 7, "plain failure"),
    (b'{"code": 7, "output": " \\n "}', 7, "podnet agent failed with code 7"),
    (b'{"code": 12345678901234567890, "output": "big"}', 12345678901234567890, "big"),
    (b'{"code": 3, "output": "{\\"code\\": true}"}', 3, '{"code": true}'),
    (b'{"code": 0, "output": "a", "code": 3}', 3, "a"),  # the last of a name counts, as in a dict
    (b'{"code": 1.0, "output": "x"}', 999, "podnet agent at {path} sent a malformed answer"),
    (b'{"code": true, "output": "x"}', 999, "podnet agent at {path} sent a malformed answer"),
    (b'{"code": 0}', 999, "podnet agent at {path} sent a malformed answer"),
    (b"garbage", 999, "podnet agent at {path} sent a malformed answer"),
    (b'{"code": 0, "output": "\xff"}', 999, "podnet agent at {path} sent a malformed answer"),
    (b"", 11, "podnet agent not reachable at {path}: the agent closed the connection without answering"),
    (None, 11, "podnet agent not reachable at {path}: the agent closed the connection without answering"),
    (b" " * (16 << 20) + b"!", 999, "podnet agent at {path} sent an answer larger than 16777216 bytes"),
])
def test_agent_answers_that_are_not_cni_errors_become_one(plugin, raw_agent, reply, code, msg):
    raw_agent.reply = reply
    proc = run_plugin(plugin, cni_env("DEL"), json.dumps({"cniVersion": "0.4.0", "agentSocket": raw_agent.path}).encode())
    doc = cni_error(proc)
    assert (doc["code"], doc["msg"], doc["cniVersion"]) == (code, msg.replace("{path}", raw_agent.path), "0.4.0")
    assert raw_agent.done.is_set()


# ---------------------------------------------------------------- fuzz

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
_json_scalar = st.none() | st.booleans() | st.integers(-5, 5) | _text
_json_value = st.recursive(_json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
                           max_leaves=8)
_env_value = st.one_of(_text, st.sampled_from(["", "eth0", "pod-a", "fail-b", "x" * 16, "a/b", "/var/run/netns/p",
                                               "IgnoreUnknown=1", "K8S_POD_NAME=a;FOO", "K8S_POD_NAME=web-0"]))


VALID_ENV = {"CNI_CONTAINERID": ["pod-a", "pod-b", "fail-b", "c0ffee"], "CNI_NETNS": ["/var/run/netns/p"],
             "CNI_IFNAME": ["eth0", "net1"], "CNI_PATH": ["/opt/cni/bin"],
             "CNI_ARGS": ["IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0", ""]}


def _mostly(draw, valid, invalid, odds=4):
    """A valid value, or (one time in odds+1) an invalid one. Hypothesis favours small draws, so 0 is valid."""
    return draw(invalid) if draw(st.integers(0, odds)) == odds else draw(st.sampled_from(valid))


@st.composite
def invocations(draw):
    """Mostly well-formed requests with a few things wrong, so every path is reached:
    success, validation errors, dataplane failures (container fail-b) and their cleanup."""
    env = {"CNI_COMMAND": _mostly(draw, ["ADD", "ADD", "ADD", "DEL", "DEL", "CHECK", "STATUS", "GC", "VERSION"],
                                  st.sampled_from(["", "add", "ATTACH"]) | _text, odds=9)}
    for var, valid in VALID_ENV.items():
        if draw(st.integers(0, 9)) < 9:  # mostly present
            env[var] = _mostly(draw, valid, _env_value, odds=6)
    kind = draw(st.integers(0, 9))
    if kind == 9:
        stdin = draw(st.binary(max_size=200))
    elif kind == 8:
        stdin = json.dumps(draw(_json_value)).encode()
    else:
        conf = {"cniVersion": _mostly(draw, SUPPORTED, st.sampled_from(["0.2.0", None, 1])),
                "name": _mostly(draw, ["podnet"], st.sampled_from(["pod/net", "", None]) | _text),
                "type": _mostly(draw, [PLUGIN_NAME], st.sampled_from([None, 3]))}
        extra = draw(st.dictionaries(st.sampled_from(["prevResult", "cni.dev/valid-attachments", "cni.dev/attachments",
                                                      "args", "ipam", "dns"]), _json_value, max_size=1))
        if draw(st.integers(0, 2)) == 2:
            extra["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": "eth0"}
                                                  for c in draw(st.lists(st.sampled_from(["pod-a", "pod-b"])))]
        stdin = json.dumps({k: v for k, v in {**conf, **extra}.items() if v is not None}).encode()
    return env, stdin


def _pin_socket(stdin: bytes, path: str) -> bytes:
    """Point any JSON object at the test agent, never at a real one on this machine."""
    try:
        doc = json.loads(stdin)
    except ValueError:
        return stdin
    if isinstance(doc, dict):
        doc["agentSocket"] = path
        return json.dumps(doc).encode()
    return stdin


@pytest.fixture(scope="module")
def fuzz_agent():
    with tempfile.TemporaryDirectory() as d:
        a = Agent(Path(d))
        a.dataplane.fail_add.add("fail-b")
        yield a
        a.close()


def _request(command: str, cid: str, **extra) -> tuple[dict[str, str], bytes]:
    conf = {"cniVersion": "1.1.0", "name": "podnet", "type": PLUGIN_NAME, **extra}
    return {**cni_env(command, cid=cid)}, json.dumps(conf).encode()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(invocations())
@example(_request("ADD", "pod-a"))  # succeeds
@example(_request("ADD", "fail-b"))  # the dataplane fails: everything must be undone
@example(_request("ADD", "fail-b", cniVersion="0.3.1"))
@example(({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
          _request("GC", "x", **{"cni.dev/valid-attachments": [{"containerID": "pod-b", "ifname": "eth0"}]})[1]))
@example(_request("CHECK", "pod-a", prevResult={"ips": [{"address": "10.244.0.1/32"}]}))
def test_fuzz_any_input_gets_one_json_answer_and_failed_adds_leave_nothing(plugin, fuzz_agent, invocation):
    env, stdin = invocation
    stdin = _pin_socket(stdin, fuzz_agent.socket)
    before = fuzz_agent.state()
    proc = run_plugin(plugin, env, stdin)
    if proc.returncode == 1:
        event(f"{env.get('CNI_COMMAND', '')[:8]!r} failed with code {cni_error(proc)['code']}")
    else:
        event(f"{env.get('CNI_COMMAND', '')[:8]!r} succeeded")
    if proc.returncode == 0 and proc.stdout:
        assert isinstance(json.loads(proc.stdout), dict)
    if env.get("CNI_COMMAND") == "ADD" and proc.returncode == 1:
        assert fuzz_agent.state() <= before, "a failed ADD left records behind"


def test_fuzz_agent_survives(plugin, fuzz_agent):
    """After all that, the agent still serves a normal ADD and DEL."""
    proc = run_plugin(plugin, cni_env("ADD", cid="after-fuzz"), fuzz_agent.config())
    assert proc.returncode == 0, proc.stdout
    assert run_plugin(plugin, cni_env("DEL", cid="after-fuzz"), fuzz_agent.config()).returncode == 0

