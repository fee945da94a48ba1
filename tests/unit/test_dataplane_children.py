"""Programs the agent starts for the kernel (nft) die with it, even when it is killed
with -9: a large `nft -f` left behind holds the namespace's teardown."""

import os
import signal
import subprocess
import sys
import time

import pytest

from podnet.dataplane.nft import dies_with_parent

PARENT = """
import subprocess, sys
from podnet.dataplane.nft import dies_with_parent
child = subprocess.Popen(dies_with_parent(["sleep", "120"]))
print(child.pid, flush=True)
child.wait()
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


@pytest.mark.skipif(dies_with_parent(["x"]) == ["x"], reason="setpriv is not installed")
def test_a_child_started_for_the_kernel_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while command(child) != "sleep":  # setpriv has set the death signal once it runs the command
            assert alive(child) and time.monotonic() < deadline, "the child did not start"
            time.sleep(0.01)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
