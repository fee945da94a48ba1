"""The agent's restart snapshot file: used once, and only when it was written by this build,
with these settings, from this store, at a revision the store can go on from; refused
(with the reason logged) when damaged or writable by someone else."""

import logging
import os
import types

import pytest

from podnet.agent import snapshot
from podnet.agent.snapshot import MAX_REVISIONS_BEHIND, Snapshot

CONFIG, STORE = "config-a", "sqlite:/x:1 node 3"


def written(tmp_path, revision: int = 100) -> str:
    path = str(tmp_path / "cni.sock.snapshot")
    state = {"services": ({"k": ("v", types.MappingProxyType({}))},), "policy": None}
    snapshot.write(path, Snapshot(revision, {"Node": {"/n": "node"}}, state), CONFIG, STORE)
    return path


def test_a_snapshot_reads_back_once(tmp_path):
    path = written(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    snap = snapshot.take(path, CONFIG, STORE, store_revision=120)
    assert snap is not None and snap.revision == 100
    assert snap.cache == {"Node": {"/n": "node"}}
    assert snap.dataplanes["services"][0]["k"][1] == {}
    assert not os.path.exists(path)
    assert snapshot.take(path, CONFIG, STORE, store_revision=120) is None


@pytest.mark.parametrize("config, store, store_revision, reason", [
    ("config-b", STORE, 120, "other agent settings"),
    (CONFIG, "sqlite:/x:2 node 3", 120, "another store"),
    (CONFIG, STORE, 99, "ahead of the store's 99"),
    (CONFIG, STORE, 100 + MAX_REVISIONS_BEHIND + 1, "revisions behind the store"),
])
def test_a_snapshot_that_does_not_fit_is_refused_and_removed(tmp_path, caplog, config, store, store_revision, reason):
    path = written(tmp_path)
    with caplog.at_level(logging.WARNING, "podnet.agent"):
        assert snapshot.take(path, config, store, store_revision) is None
    assert reason in caplog.text and path in caplog.text
    assert not os.path.exists(path)


def test_another_build_is_refused(tmp_path, caplog, monkeypatch):
    path = written(tmp_path)
    monkeypatch.setattr(snapshot, "_BUILD", "another")
    with caplog.at_level(logging.WARNING, "podnet.agent"):
        assert snapshot.take(path, CONFIG, STORE, 120) is None
    assert "another build of podnet" in caplog.text


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:-10], "checksum"),
    (lambda data: data[:-10] + bytes(b ^ 0xFF for b in data[-10:]), "checksum"),
    (lambda data: b"not json\n" + data.partition(b"\n")[2], "header does not read"),
])
def test_a_damaged_snapshot_is_refused(tmp_path, caplog, damage, reason):
    path = written(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with caplog.at_level(logging.WARNING, "podnet.agent"):
        assert snapshot.take(path, CONFIG, STORE, 120) is None
    assert reason in caplog.text


def test_a_snapshot_others_could_write_is_not_loaded(tmp_path, caplog):
    path = written(tmp_path)
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, "podnet.agent"):
        assert snapshot.take(path, CONFIG, STORE, 120) is None
    assert "no one else can write" in caplog.text
    assert not os.path.exists(path)


def test_a_symlink_is_not_followed(tmp_path, caplog):
    target = written(tmp_path)
    link = str(tmp_path / "link.snapshot")
    os.symlink(target, link)
    with caplog.at_level(logging.WARNING, "podnet.agent"):
        assert snapshot.take(link, CONFIG, STORE, 120) is None
    assert os.path.exists(target)  # what the link pointed to is left alone
