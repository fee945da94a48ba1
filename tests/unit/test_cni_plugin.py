"""The installed podnet-cni executable, run as the runtime runs it (a subprocess with CNI_*
variables and the configuration on stdin), against a real CNIServer + CNIHandler on a temp
socket and a temp SQLite store. Whatever the input: exit 0 or 1, one JSON document, no traceback."""

from __future__ import annotations

import ast
import json
import os
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cni_doubles import RecordingDataplane
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from podnet.cni.attachments import ATTACHMENTS_PREFIX
from podnet.cni.handler import CNIHandler
from podnet.cni.install import PLUGIN_NAME, install_plugin, plugin_source
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


# ---------------------------------------------------------------- installation


def test_install_writes_an_isolated_executable(tmp_path):
    path = install_plugin(str(tmp_path / "bin"), python="/usr/bin/python3")
    assert path == str(tmp_path / "bin" / PLUGIN_NAME)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    text = Path(path).read_text()
    first, rest = text.split("\n", 1)
    assert first == "#!/usr/bin/python3 -IS"  # one argument: the kernel passes the rest of the line as one
    assert rest == plugin_source()
    assert not [p for p in os.listdir(tmp_path / "bin") if p != PLUGIN_NAME]  # no temp file left


def test_install_module_entry_point(tmp_path):
    venv_python = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    proc = subprocess.run([str(venv_python), "-m", "podnet.cni.install", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / PLUGIN_NAME)
    assert Path(proc.stdout.strip()).read_text().startswith(f"#!{venv_python} -IS\n")


def test_plugin_imports_only_cheap_standard_modules():
    tree = ast.parse(plugin_source())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"_json", "_socket", "posix", "json", "os", "socket"}, imported


def test_plugin_runs_without_site_packages(plugin):
    """-IS: no site-packages, no PYTHONPATH; VERSION still answers."""
    proc = run_plugin(plugin, {"CNI_COMMAND": "VERSION", "PYTHONPATH": "/nonexistent"}, b"{}")
    assert proc.returncode == 0 and json.loads(proc.stdout)["supportedVersions"] == SUPPORTED


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

