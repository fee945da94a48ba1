"""`podnet lab` without root: lab selection, one-line errors, the pod server and probe client."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from podnet.cli.main import main
from podnet.lab.connectivity import Row, format_table
from podnet.lab.state import LabState, proc_starttime


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PODNET_LAB_ROOT", str(tmp_path / "labs"))
    return tmp_path / "labs"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_down_with_nothing_up_is_a_success(root, capsys):
    assert run(capsys, "lab", "down") == (0, "no lab to take down\n", "")
    assert run(capsys, "lab", "down", "--name", "ghost")[0] == 0


def test_status_and_exec_need_a_lab(root, capsys):
    code, _, err = run(capsys, "lab", "status")
    assert code == 1 and err.startswith("error: no lab is up")
    LabState.create("a", root).unlock()
    LabState.create("b", root).unlock()
    code, _, err = run(capsys, "lab", "exec", "web", "--", "true")
    assert code == 1 and "several labs are up (a, b): choose one with --name" in err
    code, _, err = run(capsys, "lab", "status", "--name", "c")
    assert code == 1 and "no lab named 'c'" in err
    code, out, _ = run(capsys, "lab", "--name", "a", "status", "-o", "json")
    assert code == 0 and json.loads(out)["name"] == "a"


def test_up_reports_lab_file_errors_in_one_line(root, tmp_path, capsys):
    f = tmp_path / "lab.yaml"
    f.write_text("apiVersion: podnet.io/v1\nkind: Lab\nmetadata: {name: x}\n"
                 "spec: {underlay: {cidr: 10.99.0.0/24}, nodes: [{name: n1}], pods: [{name: p, node: n2}]}\n")
    code, _, err = run(capsys, "lab", "up", str(f))
    assert code == 1
    assert err.strip() == (f"error: {f} (Lab/x): field spec.pods[0].node: node 'n2' is not a lab node: "
                           "expected one of n1")
    assert not (root / "x").exists()


def wait_for_line(path, timeout: float = 10.0) -> str:
    """The file's first complete line, once its writer has written it (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n"):
            return text
        assert time.monotonic() < deadline, f"{path} was not written within {timeout} s"
        time.sleep(0.01)


def kill_if_ours(st: LabState, entry: dict) -> None:
    pid = st.process_pid(entry)  # PID and start time: never someone else's process
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def test_state_records_processes_and_recognises_them(tmp_path):
    st = LabState.create("p", tmp_path)
    entry = st.start_process("sleeper", [sys.executable, "-c", "import time; time.sleep(60)", str(st.dir)])
    try:
        assert st.process_pid(entry) == entry["pid"] and entry["starttime"] == proc_starttime(entry["pid"])
        saved = json.loads((st.dir / "state.json").read_text())
        assert saved["processes"][0]["pid"] == entry["pid"]
        # Written by the child itself, before it execs the command: wait for it.
        assert int(wait_for_line(st.dir / "sleeper.pid")) == entry["pid"]
        # Same PID with another start time is someone else.
        assert st.process_pid({**entry, "starttime": entry["starttime"] + 1}) is None
        assert st.stop_process(entry) and st.process_pid(entry) is None
        assert not st.stop_process(entry)
    finally:
        kill_if_ours(st, entry)
        st.unlock()


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pod_server_answers_tcp_and_udp_with_its_name(tmp_path):
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    ready = tmp_path / "ready"
    server = subprocess.Popen([sys.executable, "-m", "podnet.lab.podserver", "--name", "web-1",
                               "--port", f"tcp:{tcp}", "--port", f"udp:{udp}", "--port", "sctp:9",
                               "--bind", "127.0.0.1", "--ready-file", str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.05)
        out = subprocess.run([sys.executable, "-m", "podnet.lab.probe", "--timeout", "1",
                              f"tcp:127.0.0.1:{tcp}", f"udp:127.0.0.1:{udp}", f"tcp:127.0.0.1:{free_port(socket.SOCK_STREAM)}"],
                             capture_output=True, text=True, check=True).stdout
        t, u, closed = json.loads(out)
        assert (t["ok"], t["name"], t["peer"]) == (True, "web-1", "127.0.0.1")
        assert (u["ok"], u["name"], u["peer"]) == (True, "web-1", "127.0.0.1")
        assert not closed["ok"] and closed["error"]
        # A plain client that only reads gets the name.
        with socket.create_connection(("127.0.0.1", tcp), timeout=2) as s:
            assert s.recv(100) == b"web-1\n"
    finally:
        server.terminate()
        server.wait(10)


def test_connectivity_table():
    rows = [Row("a/x", "a/y", "same-node", True, True, "answered by y", "tcp/10.0.0.2:80"),
            Row("a/x", "external", "external", False, False, "answered by external", "tcp/1.2.3.4:80")]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["SRC", "DST", "PATH", "EXPECT", "RESULT", "DETAIL"]
    assert "blocked" in lines[2] and "FAIL" in lines[2]
    assert lines[-1] == "2 probes: 1 as expected, 1 not"
    wide = format_table(rows, wide=True).splitlines()
    assert wide[0].split() == ["SRC", "DST", "TARGET", "PATH", "EXPECT", "RESULT", "DETAIL"]
    assert "tcp/10.0.0.2:80" in wide[1]
    assert rows[0].as_dict()["kind"] == "same-node"
    assert os.linesep not in rows[0].detail
