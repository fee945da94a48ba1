"""Running a delegate executable as libcni does: its configuration on stdin, its answer on
stdout, a plugin that hangs killed at the timeout (no root: small scripts stand in for
plugins)."""

from __future__ import annotations

import os
import stat

import pytest

from podnet.cni.errors import CNIError
from podnet.multinet.invoke import Invocation, run_plugin


def plugin(tmp_path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def invocation(tmp_path, timeout: float = 30.0) -> Invocation:
    return Invocation("c1", "/run/netns/p", "net1", "IgnoreUnknown=1", (str(tmp_path),), timeout)


def test_the_plugin_reads_its_configuration_and_environment_and_its_answer_is_the_result(tmp_path):
    # echoes the configuration it read and two CNI variables back as the result
    plugin(tmp_path, "echo", 'conf=$(cat); printf \'{"conf": %s, "cmd": "%s", "ifname": "%s"}\' '
                             '"$conf" "$CNI_COMMAND" "$CNI_IFNAME"\n')
    conf = {"type": "echo", "name": "n", "big": "x" * 200_000}  # larger than a pipe's buffer
    out = run_plugin(conf, "ADD", invocation(tmp_path))
    assert out == {"conf": conf, "cmd": "ADD", "ifname": "net1"}


def test_a_failing_plugin_gives_its_error_document_or_its_stderr(tmp_path):
    plugin(tmp_path, "coded", 'cat >/dev/null; echo \'{"code": 11, "msg": "busy", "details": "later"}\'; exit 1\n')
    plugin(tmp_path, "crash", 'cat >/dev/null; echo "panic: nil map" >&2; exit 2\n')
    with pytest.raises(CNIError) as e:
        run_plugin({"type": "coded"}, "ADD", invocation(tmp_path))
    assert (e.value.code, e.value.msg, e.value.details) == (11, "busy", "later")
    with pytest.raises(CNIError) as e:
        run_plugin({"type": "crash"}, "DEL", invocation(tmp_path))
    assert "exited with status 2" in e.value.msg and "panic: nil map" in e.value.details


def test_a_plugin_that_does_not_answer_is_killed_at_the_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    plugin(tmp_path, "hang", f'echo $$ > {pidfile}; exec sleep 60\n')
    with pytest.raises(CNIError) as e:
        run_plugin({"type": "hang"}, "ADD", invocation(tmp_path, timeout=2.0))
    assert "did not answer within 2s (killed)" in e.value.msg
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(pidfile.read_text()), 0)
