"""Store faults reach the user as one line naming the store, and the CNI runtime as code 11
(try again later) with the cause: a writer lock held by another process, here. A full disk
and a read-only file system need a mount of their own: tests/kernel/test_store_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cni_doubles import RecordingDataplane

from podnet.cni.handler import CNIHandler
from podnet.model.objects import IPPool
from podnet.store import open_store
from podnet.store import sqlite as sqlite_store
from podnet.store.objects import ObjectStore

POOL = "apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: main}\nspec: {cidr: 10.244.0.0/16}\n"
HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def db_path(tmp_path):
    path = str(tmp_path / "podnet.db")
    kv = open_store("sqlite://" + path)
    ObjectStore(kv).apply([IPPool.model_validate(
        {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "main"},
         "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})])
    kv.close()
    return path


@pytest.fixture
def lock_held(db_path):
    """Another process holds SQLite's writer lock on the store until the test ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield db_path
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_apply_against_a_held_lock_is_one_line_after_a_bounded_wait(lock_held, tmp_path):
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL.replace("main", "second").replace("10.244", "10.245"))
    env = {**os.environ, "PODNET_STORE_BUSY_TIMEOUT": "1"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "podnet.cli.main", "--store", "sqlite://" + lock_held,
                          "apply", "-f", str(manifest)], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"error: store {lock_held} is locked by another writer "
                                               "(waited 1 s; PODNET_STORE_BUSY_TIMEOUT sets how long)"]
    assert elapsed < 10


def test_cni_add_and_del_against_a_held_lock_answer_try_again_later(lock_held, monkeypatch):
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.3, raising=False)
    kv = open_store("sqlite://" + lock_held)
    handler = CNIHandler(kv, "node-1", RecordingDataplane(), verify_netns=lambda path: None)
    conf = json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni"})
    try:
        for command in ("ADD", "DEL"):
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee01", "CNI_IFNAME": "eth0",
                   "CNI_PATH": "/opt/cni/bin", "CNI_NETNS": "/var/run/netns/x"}
            code, output = handler.handle(env, conf)
            doc = json.loads(output)
            assert (code, doc["code"]) == (11, 11), (command, doc)
            assert f"store {lock_held} is locked by another writer" in doc["msg"], doc
    finally:
        handler.close()
        kv.close()


def test_a_failed_write_is_rolled_back_once_and_reports_its_own_error(db_path):
    """A write SQLite refuses reports SQLite's error and leaves no transaction open."""
    kv = open_store("sqlite://" + db_path)
    try:
        kv._db.execute("PRAGMA query_only=1")  # every write now fails in SQLite, as on a read-only file
        with pytest.raises(sqlite_store.StoreUnavailable, match=f"store {db_path}: attempt to write a readonly"):
            kv.put("/k", {"v": 1})
        assert not kv._db.in_transaction
        kv._db.execute("PRAGMA query_only=0")
        assert kv.put("/k", {"v": 1}) > 0
    finally:
        kv.close()
