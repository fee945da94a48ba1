"""Store faults that need a file system of their own: a full disk (a 512 KiB tmpfs) and a
read-only file system, each mounted in a private mount namespace (`unshare -m`), so
nothing outside the test sees them. `podnet apply` reports SQLite's own error in one line
(not "cannot rollback - no transaction is active", nor a traceback), and a CNI ADD answers
code 11, try again later, with the cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare for a private mount namespace")

UNIT_TESTS = Path(__file__).resolve().parent.parent / "unit"

# Runs inside the mount namespace with the tmpfs at argv[1]: makes a store with a pool,
# breaks the file system (argv[2]: full or ro), then tries `podnet apply` and a CNI ADD.
SCRIPT = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[4])
from cni_doubles import RecordingDataplane
from podnet.cni.handler import CNIHandler
from podnet.model.objects import IPPool
from podnet.store import open_store
from podnet.store.objects import ObjectStore

mnt, mode, manifest = sys.argv[1], sys.argv[2], sys.argv[3]
url = f"sqlite://{mnt}/podnet.db"
kv = open_store(url)
ObjectStore(kv).apply([IPPool.model_validate({
    "apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "main"},
    "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
if mode == "full":
    fd = os.open(f"{mnt}/filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    os.close(fd)
else:
    kv.close()
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
out = {}
run = subprocess.run([sys.executable, "-m", "podnet.cli.main", "--store", url, "apply", "-f", manifest],
                     capture_output=True, text=True)
out["apply"] = [run.returncode, run.stderr]
if mode == "full":
    handler = CNIHandler(kv, "node-1", RecordingDataplane(), verify_netns=lambda path: None)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee01", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_NETNS": "/var/run/netns/x"}
    out["add"] = handler.handle(env, json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni"}))
print(json.dumps(out))
"""


def broken_store(tmp_path: Path, mode: str) -> dict:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "faults.py"
    script.write_text(SCRIPT)
    manifest = tmp_path / "svc.yaml"  # a 100 KB annotation: more than the full disk's WAL can take
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default, annotations: "
                        f"{{big: {'x' * 100_000}}}}}\nspec: {{ports: [{{port: 80}}]}}\n")
    run = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size=512k tmpfs "$1" && exec "$2" "$3" "$1" {mode} "$4" "$5"', "sh",
         str(mnt), sys.executable, str(script), str(manifest), str(UNIT_TESTS)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_full_disk_reports_sqlites_error_in_one_line_and_cni_says_try_again(tmp_path):
    out = broken_store(tmp_path, "full")
    code, stderr = out["apply"]
    db = tmp_path / "mnt" / "podnet.db"
    assert code == 1
    assert stderr.splitlines() == [f"error: store {db}: database or disk is full"], stderr
    code, output = out["add"]
    doc = json.loads(output)
    assert (code, doc["code"]) == (11, 11), doc
    assert f"store {db}: database or disk is full" in doc["msg"], doc
    assert "rollback" not in output


def test_read_only_file_system_is_named_in_one_line(tmp_path):
    out = broken_store(tmp_path, "ro")
    code, stderr = out["apply"]
    assert code == 1
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: cannot open store {tmp_path / 'mnt' / 'podnet.db'}: ")
    assert stderr.rstrip().endswith("(the file system holding it is mounted read-only)"), stderr
