"""Many processes allocating against one store at once: no address is ever given twice.

20 worker processes start together; each allocates its own handles on 3 nodes,
all of them also allocate the same "shared" handles (so concurrent allocations
of one handle must agree), and each releases some of its handles again. Then the
store is checked: one address per handle, no address twice, block records agree
with handle records and with what the workers were told, and no block is affine
to two nodes. Runs on SQLite always, and on a 3-member etcd cluster.
"""

from __future__ import annotations

import json
import selectors
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from podnet.ipam import block as blk
from podnet.ipam import keys
from podnet.ipam.audit import DANGLING_AFFINITY, EMPTY_HANDLE, NO_HANDLE, check
from podnet.model.objects import IPPool, Node
from podnet.store import open_store
from podnet.store.objects import ObjectStore

WORKERS = 20
PER_WORKER = 25
SHARED = 5
NODES = ("n1", "n2", "n3")

WORKER = r"""
import json, sys
from podnet.ipam import IPAM
from podnet.store import open_store

url, wid, count, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
nodes = sys.argv[5].split(",")
kv = open_store(url)
ipam = IPAM(kv)
print("ready", flush=True)  # imported and connected
sys.stdin.readline()  # the start signal: every worker is ready
got, released, shared_got = {}, [], {}
for j in range(count):
    node = nodes[(wid + j) % len(nodes)]
    handle = f"net.w{wid}-{j}.eth0"
    got[handle] = ipam.allocate(handle, node, namespace="ns", pod=f"w{wid}-{j}").address
    if j < shared:
        h = f"net.shared-{j}.eth0"
        shared_got[h] = ipam.allocate(h, nodes[j % len(nodes)]).address
    if j % 5 == 4:  # release every fifth handle again
        victim = f"net.w{wid}-{j - 2}.eth0"
        assert ipam.release(victim) == [got[victim]], victim
        assert ipam.release(victim) == []
        released.append(victim)
print(json.dumps({"got": got, "released": released, "shared": shared_got}))
"""


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite://{tmp_path / 'ipam.db'}"


@pytest.fixture
def etcd_url(tmp_path):
    etcd_server = pytest.importorskip("tests.support.etcd")
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed")
    with etcd_server.EtcdCluster(3, base_dir=str(tmp_path / "etcd"), die_with_parent=True) as cluster:
        yield cluster.url


def wait_ready(p: subprocess.Popen, deadline: float) -> None:
    """Block until the worker prints "ready" (or fail naming why, at the deadline)."""
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            raise AssertionError("a worker did not get ready in time")
    line = p.stdout.readline()
    if line != "ready\n":
        p.wait()
        raise AssertionError(f"a worker failed to start: {p.stderr.read()[-2000:]}")


def run_workers(url: str, tmp_path, workers: int = WORKERS, per_worker: int = PER_WORKER) -> list[dict]:
    with open_store(url) as kv:
        ObjectStore(kv).apply([
            IPPool.model_validate({"metadata": {"name": "p"}, "spec": {"cidr": "10.20.0.0/20", "blockSize": 27}}),
            *(Node.model_validate({"metadata": {"name": n}}) for n in NODES),
        ])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(w), str(per_worker), str(SHARED), ",".join(NODES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for w in range(workers)
    ]
    try:
        for p in procs:  # each says when it has imported and connected ...
            wait_ready(p, deadline=time.monotonic() + 120)
        for p in procs:  # ... then all start together
            p.stdin.write("go\n")
            p.stdin.flush()
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    return results


def verify(url: str, results: list[dict]) -> None:
    expected: dict[str, str] = {}
    for r in results:
        for h, a in r["got"].items():
            if h not in r["released"]:
                expected[h] = a
    # Every worker asking for a shared handle got the same address.
    shared: dict[str, set[str]] = {}
    for r in results:
        for h, a in r["shared"].items():
            shared.setdefault(h, set()).add(a)
    assert all(len(v) == 1 for v in shared.values()), shared
    expected.update({h: next(iter(v)) for h, v in shared.items()})
    assert len(set(expected.values())) == len(expected), "an address was handed out twice"

    with open_store(url) as kv:
        blocks, _ = kv.list(keys.BLOCKS)
        in_blocks: dict[str, str] = {}
        per_handle: Counter[str] = Counter()
        for rec in blocks:
            assert blk.check_consistent(rec.value) == [], rec.value["cidr"]
            for o, attrs in blk.allocations(rec.value):
                a = blk.address(rec.value["cidr"], o)
                assert a not in in_blocks
                in_blocks[a] = attrs["handle_id"]
                per_handle[attrs["handle_id"]] += 1
        # The store holds exactly what the workers were told, one address per handle.
        assert {h: a for a, h in in_blocks.items()} == expected
        assert set(per_handle.values()) == {1}
        handles, _ = kv.list(keys.HANDLES)
        assert {keys.handle_of_key(r.key) for r in handles} == set(expected)
        for r in handles:
            h = keys.handle_of_key(r.key)
            cidr = next(b.value["cidr"] for b in blocks if blk.ordinals_of(b.value, h))
            assert r.value["blocks"] == {cidr: 1}
        # Each block has one owner, and owners' affinity records match.
        owners = {}
        for aff in kv.list(keys.AFFINITIES)[0]:
            node, cidr = keys.parse_affinity_key(aff.key)
            assert cidr not in owners, f"block {cidr} affine to {owners.get(cidr)} and {node}"
            owners[cidr] = node
        assert owners == {b.value["cidr"]: blk.affinity_node(b.value) for b in blocks}
        # 20 workers x 3 nodes should not need more than a few blocks per node.
        per_node = Counter(owners.values())
        assert max(per_node.values()) <= 8, per_node
        bad = [f for f in check(kv) if f.kind in (EMPTY_HANDLE, NO_HANDLE, DANGLING_AFFINITY)]
        assert bad == []


@pytest.mark.timeout(300)
def test_concurrent_allocation_sqlite(sqlite_url, tmp_path):
    verify(sqlite_url, run_workers(sqlite_url, tmp_path))


@pytest.mark.etcd
@pytest.mark.timeout(300)
def test_concurrent_allocation_etcd(etcd_url, tmp_path):
    verify(etcd_url, run_workers(etcd_url, tmp_path))

