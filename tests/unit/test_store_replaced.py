"""A store file deleted or replaced under a running agent: the agent's CNI handler stops
serving ADDs (code 11 with the reason) and STATUS says the node cannot take them, instead
of some requests writing to the deleted file and others to a new one at its path. Commands
other than `podnet apply` refuse a missing store file instead of creating an empty one."""

from __future__ import annotations

import json
import os

import pytest
from cni_doubles import RecordingDataplane

from podnet.agent.daemon import Agent, AgentConfig
from podnet.cli.main import main
from podnet.cni.handler import CNIHandler
from podnet.errors import PodnetError
from podnet.store import open_store

POOL = ("apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: main}\n"
        "spec: {cidr: 10.244.0.0/16, blockSize: 26}\n")
CONF = json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni"})


def add(handler: CNIHandler, cid: str) -> tuple[int, dict]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_NETNS": "/var/run/netns/x"}
    code, output = handler.handle(env, CONF)
    return code, json.loads(output)


def status(handler: CNIHandler) -> tuple[int, str]:
    return handler.handle({"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, CONF)


def remove_store(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


@pytest.fixture
def store(tmp_path, capsys):
    path = str(tmp_path / "podnet.db")
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL)
    assert main(["--store", "sqlite://" + path, "apply", "-f", str(manifest)]) == 0
    capsys.readouterr()
    return path, str(manifest)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "concurrent"])
def test_agent_stops_serving_adds_when_its_store_is_replaced(store, capsys, busy):
    path, manifest = store
    kv = open_store("sqlite://" + path)
    handler = CNIHandler(kv, "node-1", RecordingDataplane(), verify_netns=lambda p: None)
    try:
        code, first = add(handler, "c0ffee01")
        assert code == 0, first
        assert status(handler) == (0, "")
        # The file goes, and the pools are applied again: a new store at the same path.
        remove_store(path)
        assert main(["--store", "sqlite://" + path, "apply", "-f", manifest]) == 0
        capsys.readouterr()
        if busy:  # another request holds the agent's first connection: this one opens its own
            with handler._sessions.session():
                code, doc = add(handler, "c0ffee02")
        else:
            code, doc = add(handler, "c0ffee02")
        assert (code, doc["code"]) == (11, 11), doc
        assert "was replaced" in doc["msg"] and path in doc["msg"], doc
        code, output = status(handler)
        assert code == 50 and "replaced" in json.loads(output)["msg"], output
        # Nothing was allocated in either store for the refused pod.
        fresh = open_store("sqlite://" + path)
        assert not any("c0ffee02" in r.key + json.dumps(r.value) for r in fresh.list("/podnet/")[0])
        fresh.close()
    finally:
        handler.close()
        kv.close()


def test_agent_stops_serving_adds_when_its_store_is_deleted(store):
    path, _ = store
    kv = open_store("sqlite://" + path)
    handler = CNIHandler(kv, "node-1", RecordingDataplane(), verify_netns=lambda p: None)
    try:
        remove_store(path)
        code, doc = add(handler, "c0ffee01")
        assert (code, doc["code"]) == (11, 11), doc
        assert f"store {path} was deleted" in doc["msg"], doc
        assert not os.path.exists(path)
    finally:
        handler.close()
        kv.close()


@pytest.mark.parametrize("argv", [["get", "pods", "-A"], ["ipam", "show"], ["delete", "pod", "x"],
                                  ["ipam", "check"]])
def test_commands_other_than_apply_refuse_a_missing_store(tmp_path, capsys, argv):
    path = str(tmp_path / "podnet.db")
    assert main(["--store", "sqlite://" + path, *argv]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: store {path} does not exist (`podnet apply` creates it; --store or "
                                "$PODNET_STORE names another)"]
    assert not os.path.exists(path)


def test_agent_refuses_a_missing_store(tmp_path):
    path = str(tmp_path / "podnet.db")
    with pytest.raises(PodnetError, match=f"store {path} does not exist"):
        Agent(AgentConfig(node="node-1", store_url="sqlite://" + path))
    assert not os.path.exists(path)
