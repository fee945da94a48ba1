"""`lab down` after a crash: an `up` killed with SIGKILL, or state written but half-done."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from podnet.lab import topology
from podnet.lab.cluster import down_by_name
from podnet.lab.state import LabState, proc_starttime

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs root and the reference CNI plugins in /usr/lib/cni"),
]


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="pnlk-"))
    yield d
    for name in os.listdir(d):
        down_by_name(name, d)
    shutil.rmtree(d, ignore_errors=True)


def alive(entry: dict) -> bool:
    pid = entry.get("pid")
    return bool(pid) and proc_starttime(pid) == entry.get("starttime") and \
        "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1]


def test_down_after_up_was_killed_midway(root):
    name = f"crash-{secrets.token_hex(3)}"
    lab = {"apiVersion": "podnet.io/v1", "kind": "Lab", "metadata": {"name": name},
           "spec": {"underlay": {"cidr": "10.99.0.0/24"}, "external": {"address": "10.98.0.10/24"},
                    "nodes": [{"name": "node-1"}, {"name": "node-2"}], "cni": {"plugin": "bridge"},
                    "pods": [{"name": f"p{i}", "node": f"node-{i % 2 + 1}", "ports": [{"containerPort": 80}]}
                             for i in range(12)]}}
    f = root.parent / f"{name}.yaml"
    f.write_text(yaml.safe_dump(lab))
    env = {**os.environ, "PODNET_LAB_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "podnet.cli.main", "lab", "up", str(f)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = root / name / "state.json"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                state = json.loads(state_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                state = {}
            if sum(1 for p in state.get("pods", []) if p.get("attempted")) >= 3:
                break
            assert proc.poll() is None, "up finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("up never got to its third CNI ADD")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        f.unlink()
    state = json.loads(state_file.read_text())
    assert state["phase"] == "starting"
    prefix = f"pnl-{state['id']}-"
    assert topology.netns_list(prefix)  # the half-built lab is there
    procs = state["processes"]
    assert any(alive(p) for p in procs)  # and so are its servers

    env_down = subprocess.run([sys.executable, "-m", "podnet.cli.main", "lab", "down"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert env_down.returncode == 0, env_down.stderr
    assert f"lab {name} is down" in env_down.stdout
    assert topology.netns_list(prefix) == []
    assert not any(alive(p) for p in procs)
    assert not (root / name).exists()
    again = subprocess.run([sys.executable, "-m", "podnet.cli.main", "lab", "down"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "no lab to take down" in again.stdout


def test_down_with_partial_state_kills_only_its_own_processes(root):
    name = f"partial-{secrets.token_hex(3)}"
    st = LabState.create(name, root)
    made, never = st.netns_name("ul"), st.netns_name("1")
    st.record_netns(made)
    topology.create_netns(made)
    st.record_netns(never)  # recorded, then "crashed" before creating it
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)", str(st.dir)]
    ours = st.start_process("ours", sleeper)
    # Crashed between fork and saving the PID: only the pidfile (written by the child) knows it.
    orphan = subprocess.Popen(sleeper, start_new_session=True)
    (st.dir / "orphan.pid").write_text(f"{orphan.pid}\n")
    st.data["processes"].append({"key": "orphan", "argv": sleeper, "pidfile": str(st.dir / "orphan.pid"),
                                 "pid": None, "starttime": None})
    # A recorded PID that now belongs to someone else must survive.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    st.data["processes"].append({"key": "reused", "argv": sleeper, "pidfile": str(st.dir / "reused.pid"),
                                 "pid": stranger.pid, "starttime": None})
    st.save()
    st.unlock()
    try:
        assert down_by_name(name, root) == [name]
        assert orphan.wait(10) is not None
        assert stranger.poll() is None
        assert not alive(ours)
        assert topology.netns_list(f"pnl-{st.id}-") == []
        assert not (root / name).exists()
    finally:
        for p in (orphan, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()
        topology.delete_netns(made)


def test_down_of_a_lab_that_crashed_before_its_first_save(root):
    (root / "early").mkdir()
    assert down_by_name("early", root) == ["early"]
    assert not (root / "early").exists()
    assert down_by_name(None, root) == []
    assert down_by_name("never-existed", root) == []
