"""CNI answers that say why: STATUS 50 when the node cannot serve ADD (every pool serving it
exhausted, or a pod MTU no veth takes), and an exhaustion that IPReservations cause names
them. Real IPAM on a temp SQLite store."""

from __future__ import annotations

import json

import pytest
from cni_doubles import RecordingDataplane

from podnet.cni.handler import CNIHandler
from podnet.dataplane.pods import PodDataplane
from podnet.model.objects import IPPool, IPReservation
from podnet.store import open_store
from podnet.store.objects import ObjectStore

CONF = json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni"})


def request(handler: CNIHandler, command: str, cid: str = "") -> tuple[int, dict | None]:
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
    if cid:
        env.update(CNI_CONTAINERID=cid, CNI_IFNAME="eth0", CNI_NETNS="/var/run/netns/no-such-pod")
    code, output = handler.handle(env, CONF)
    return code, json.loads(output) if output else None


@pytest.fixture
def kv(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/podnet.db")
    ObjectStore(store).apply([
        IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "small"},
                               "spec": {"cidr": "10.50.0.0/29", "blockSize": 29}}),
        IPReservation.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPReservation",
                                      "metadata": {"name": "routers"}, "spec": {"reservedCIDRs": ["10.50.0.0/30"]}}),
    ])
    yield store
    store.close()


def test_status_says_50_while_every_pool_is_exhausted_and_names_the_reservations(kv):
    handler = CNIHandler(kv, "node-1", RecordingDataplane(), verify_netns=lambda p: None)
    try:
        assert request(handler, "STATUS") == (0, None)
        for i in range(4):  # 8 addresses, 4 of them reserved
            code, doc = request(handler, "ADD", f"pod{i}")
            assert code == 0, doc
        code, doc = request(handler, "STATUS")
        assert code == 50 and doc["code"] == 50, doc
        assert "node node-1 cannot take new pods" in doc["msg"] and "IPPool small" in doc["msg"], doc
        code, doc = request(handler, "ADD", "pod4")
        assert code == 100, doc
        assert ("IPPool small (10.50.0.0/29) is full: every block is claimed or reserved, and IPReservation "
                "routers hold addresses of it") in doc["msg"], doc
        assert request(handler, "DEL", "pod0")[0] == 0
        assert request(handler, "STATUS") == (0, None)
    finally:
        handler.close()


def test_a_pod_mtu_no_veth_takes_is_refused_naming_the_underlay_interface(kv):
    # The node's address on lo: the underlay MTU is lo's, 65536, one more than a veth takes.
    pods = PodDataplane(65536, node_ip=lambda: "127.0.0.1")
    handler = CNIHandler(kv, "node-1", pods, verify_netns=lambda p: None)
    try:
        expected = ("pod MTU 65536 is outside what a veth takes (68-65535); it comes from the MTU of lo, the "
                    "interface holding the node address 127.0.0.1: put the node's address on its network "
                    "interface, not on the loopback device")
        code, doc = request(handler, "STATUS")
        assert (code, doc["msg"]) == (50, f"node node-1 cannot set up pods: {expected}"), doc
        code, doc = request(handler, "ADD", "pod0")
        assert code == 102 and expected in doc["msg"], doc
        assert "Invalid argument" not in doc["msg"]
    finally:
        handler.close()
        pods.close()
