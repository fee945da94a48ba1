"""SQLiteStore shared by many processes: compare-and-swap loses nothing, creates never collide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from podnet.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(180)

PROCESSES = 8

COUNTER_WORKER = """
import json, sys
from podnet.store.base import Conflict
from podnet.store.sqlite import SQLiteStore
path, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SQLiteStore(path)
print("ready", flush=True)
sys.stdin.readline()  # start line: every worker begins at once
done = conflicts = 0
while done < n:
    rec = store.get(key)
    try:
        store.update(key, {"n": rec.value["n"] + 1}, rec.revision)
        done += 1
    except Conflict:
        conflicts += 1
print(json.dumps({"done": done, "conflicts": conflicts}), flush=True)
"""

CREATE_WORKER = """
import json, sys
from podnet.store.base import AlreadyExists
from podnet.store.sqlite import SQLiteStore
path, me, n, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
store = SQLiteStore(path)  # every worker opens (and may initialise) the file at once
won = []
for i in range(n):
    store.create(f"/own/{me}/{i:04d}", {"by": me, "i": i})
    if i < shared:
        try:
            store.create(f"/claim/{i:04d}", {"by": me})
            won.append(i)
        except AlreadyExists:
            pass
print(json.dumps({"won": won}), flush=True)
"""


def run_workers(code: str, argv_for: list[list[str]], timeout: float = 90) -> list[dict]:
    """Start one process per argv, release them together, return each one's JSON result."""
    procs: list[subprocess.Popen] = []
    try:
        for argv in argv_for:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by PID
                p.wait()


def test_cas_counter_across_processes(tmp_path):
    path = str(tmp_path / "store.db")
    per_process = 40
    with SQLiteStore(path) as store:
        start = store.create("/counter", {"n": 0})
    results = run_workers(COUNTER_WORKER, [[path, "/counter", str(per_process)] for _ in range(PROCESSES)])
    total = sum(r["done"] for r in results)
    assert total == PROCESSES * per_process
    with SQLiteStore(path) as store:
        assert store.get("/counter").value == {"n": total}
        # Every successful update saw its predecessor: the history counts 1, 2, ..., total.
        history = []
        for event in store.watch("/counter", start + 1):
            history.append(event)
            if len(history) == total:
                break
        assert [e.value["n"] for e in history] == list(range(1, total + 1))
        assert store.revision() == start + total


def test_concurrent_creates_across_processes(tmp_path):
    path = str(tmp_path / "fresh" / "store.db")  # not created yet: the workers race to initialise it
    per_process, shared = 30, 20
    results = run_workers(CREATE_WORKER, [[path, str(w), str(per_process), str(shared)] for w in range(PROCESSES)])
    with SQLiteStore(path) as store:
        own, _ = store.list("/own/")
        assert sorted((r.value["by"], r.value["i"]) for r in own) == [
            (w, i) for w in range(PROCESSES) for i in range(per_process)
        ]
        claims, rev = store.list("/claim/")
        assert [r.key for r in claims] == [f"/claim/{i:04d}" for i in range(shared)]
        # Each claim was won by exactly one process, the one whose value is stored.
        winners = {i: w for w, r in enumerate(results) for i in r["won"]}
        assert sum(len(r["won"]) for r in results) == shared
        assert {int(r.key.rsplit("/", 1)[1]): r.value["by"] for r in claims} == winners
        assert rev == PROCESSES * per_process + shared  # one revision per successful write
