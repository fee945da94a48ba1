"""BIRD supervised in a network namespace: checked before use, reloaded only on change, a refused
configuration never loaded, restarted after a crash, adopted by a new supervisor."""

import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from podnet.bgp.bird import Bird, ConfigRefused
from podnet.bgp.control import command
from tests.kernel.nsutil import namespaces
from tests.support.bgp import wait_until

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]


def conf(router_id: str, statics: list[str]) -> str:
    routes = "".join(f"  route {r} blackhole;\n" for r in statics)
    return (f"router id {router_id};\nprotocol device {{ }}\n"
            f"protocol static podnet_routes {{\n  ipv4;\n{routes}}}\n")


def static_routes(bird: Bird) -> set[str]:
    reply = command(bird.ctl, "show route protocol podnet_routes")
    return {text.split()[0] for code, text in reply if code == 1007 and text and text[0].isdigit()}


@pytest.fixture
def bird():
    with namespaces() as ns:
        name = ns.new("bird")
        d = tempfile.mkdtemp(prefix="pnbird-")
        os.chmod(d, 0o755)  # BIRD's user passes through to its own directory
        b = Bird(Path(d) / "run", netns=name)
        try:
            yield b
        finally:
            b.stop()
            shutil.rmtree(d, ignore_errors=True)


def test_start_reload_only_on_change_and_refused_text_never_loaded(bird):
    one = conf("10.0.0.1", ["10.244.1.0/26"])
    assert bird.apply(one) == "started"
    pid = bird.pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid = pwd.getpwnam("bird").pw_uid
    assert bird.user == "bird" and f"Uid:\t{uid}\t{uid}" in status  # dropped to BIRD's user
    cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff")).split()[1], 16)
    assert cap_eff & ~((1 << 10) | (1 << 11) | (1 << 12) | (1 << 13)) == 0  # NET_BIND/BROADCAST/ADMIN/RAW only
    assert static_routes(bird) == {"10.244.1.0/26"}

    assert bird.apply(one) == ""  # same text: no reload
    two = conf("10.0.0.1", ["10.244.1.0/26", "10.244.2.0/26"])
    assert bird.apply(two) == "reloaded"
    assert bird.pid() == pid and static_routes(bird) == {"10.244.1.0/26", "10.244.2.0/26"}

    with pytest.raises(ConfigRefused, match="syntax error") as err:
        bird.apply(two + "protocol bgp broken {\n")
    assert "kept the running one" in str(err.value)
    assert bird.pid() == pid and static_routes(bird) == {"10.244.1.0/26", "10.244.2.0/26"}
    assert bird.conf.read_text() == two  # the refused text went aside, not over the running one
    assert "broken" in bird.refused.read_text()
    # a reload by hand (as SIGHUP would) still finds the good text
    assert command(bird.ctl, "configure")[-1][1] == "Reconfigured"


def test_restart_after_kill_and_adoption(bird):
    text = conf("10.0.0.2", ["10.244.3.0/26"])
    bird.apply(text)
    pid = bird.pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: bird.pid() is None, "BIRD gone after SIGKILL", timeout=10)
    assert not bird.running()
    assert bird.apply(text) == "started"  # a dead BIRD is started again, on the same text
    new_pid = bird.pid()
    assert new_pid and new_pid != pid

    adopter = Bird(bird.dir, netns=bird.netns)  # e.g. a restarted agent
    assert adopter.running() and adopter.apply(text) == ""
    assert adopter.pid() == new_pid
    assert adopter.stop() and bird.pid() is None
