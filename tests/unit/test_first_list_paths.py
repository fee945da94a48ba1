"""The agent's first list takes short paths (each key's kind found once and handed on, the
common shapes of Pods and EndpointSlices read directly, a slice's endpoint columns built
in one pass): what reaches the dataplanes must be what the watch path delivers, and the
compact records what their fields say, also for the shapes off the short path."""

from __future__ import annotations

import logging

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane
from podnet.agent.follow import StoreFollower
from podnet.model.records import slice_record
from podnet.services.compiler import LOCAL, READY, SERVING, TERMINATING, SliceInfo
from podnet.services.model import Backend
from podnet.store import open_store
from podnet.store.base import Event

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "prod", "labels": {"app": "a"}},
       "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
       "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-x", "namespace": "prod", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.9", "10.1.0.10"]}, {"addresses": ["10.1.0.8"]}]}
STORED = [
    ("/podnet/ipam/blocks/10.1.0.0-26", {"cidr": "10.1.0.0/26"}),
    ("/podnet/objects/EndpointSlice/prod/web-x", SLICE),
    ("/podnet/objects/Frobnicator/prod/x", {"kind": "Frobnicator"}),  # a kind this version does not know
    ("/podnet/objects/Namespace/prod", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
    ("/podnet/objects/Pod/prod/bad", {"apiVersion": "v1", "kind": "Pod", "spec": {}}),  # no metadata
    ("/podnet/objects/Pod/prod/p", POD),
    ("/podnet/other/thing", {"a": 1}),
]


RECORDS = ("PodInfo", "SliceRecord", "ServiceRecord")


class Recorder(Dataplane):
    def __init__(self, name: str, kinds: frozenset[str]):
        self.name, self.kinds, self.seen = name, kinds, []

    def on_event(self, ev) -> bool:
        obj = ev.object  # a record by its fields (records do not compare by value), a model as it is
        state = {k: getattr(obj, k) for k in type(obj).__slots__} if type(obj).__name__ in RECORDS else obj
        self.seen.append((ev.type, ev.key, ev.revision, type(obj).__name__, state, ev.raw))
        return True


def _recorders() -> list[Recorder]:
    return [Recorder("all", frozenset()), Recorder("pods", frozenset({"Pod", "Namespace"})),
            Recorder("blocks", frozenset({"Block"})), Recorder("slices", frozenset({"EndpointSlice"}))]


def test_the_list_hands_every_dataplane_what_the_watch_would(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    kv = open_store(f"sqlite://{tmp_path}/store.db")
    try:
        for key, value in STORED:
            kv.put(key, value)
        listed = _recorders()
        StoreFollower(ObjectCache(unkept={"Pod", "EndpointSlice"}, records=True), listed).relist(kv)
        records, _ = kv.list("/podnet/")
    finally:
        kv.close()
    watched = _recorders()
    follower = StoreFollower(ObjectCache(unkept={"Pod", "EndpointSlice"}, records=True), watched)
    for r in records:
        follower.apply(Event("ADDED", r.key, r.value, r.revision))
    for a, b in zip(listed, watched, strict=True):
        assert a.seen == b.seen, a.name
    by_name = {d.name: [(t, k) for t, k, *_ in d.seen] for d in listed}
    assert by_name["blocks"] == [("ADDED", "/podnet/ipam/blocks/10.1.0.0-26")]
    assert by_name["pods"] == [("ADDED", "/podnet/objects/Namespace/prod"), ("DELETED", "/podnet/objects/Pod/prod/bad"),
                               ("ADDED", "/podnet/objects/Pod/prod/p")]
    assert by_name["slices"] == [("ADDED", "/podnet/objects/EndpointSlice/prod/web-x")]
    assert len(by_name["all"]) == len(STORED)
    assert "skipping /podnet/objects/Pod/prod/bad" in caplog.text and "'Frobnicator'" in caplog.text


def test_a_pod_with_two_addresses_keeps_both():
    ev = ObjectCache(records=True).apply_change("ADDED", "/podnet/objects/Pod/prod/p", POD, 7)
    pod = ev.object
    assert (pod.ip, pod.ips, pod.node, pod.named_ports) == ("10.1.0.5", ("10.1.0.5", "fd00::5"), "node-1",
                                                            (("http", "TCP", 80),))


def test_a_slices_endpoints_are_read_whatever_their_shape():
    rec = slice_record({**SLICE, "endpoints": [
        {"addresses": ["10.1.0.9", "10.1.0.10"], "conditions": {}},
        {"addresses": ["10.1.0.8"], "conditions": {"ready": False, "serving": True, "terminating": True},
         "nodeName": "node-1", "hostname": "web-0", "targetRef": {"kind": "Pod", "name": "p8"}},
        {"addresses": ["10.1.0.7"]}]}, "5")
    assert rec.endpoints == (
        (("10.1.0.9", "10.1.0.10"), None, None, None, None, None, None),
        (("10.1.0.8",), False, True, True, "node-1", "web-0", (None, "p8")),
        (("10.1.0.7",), None, None, None, None, None, None))


def _slice(endpoints: list[dict], ports: list[dict] | None = None) -> SliceInfo:
    body = {**SLICE, "endpoints": endpoints, **({"ports": ports} if ports is not None else {})}
    return SliceInfo(slice_record(body, "1"), "node-1")


def test_a_slices_endpoints_are_ordered_flagged_and_referenced():
    sl = _slice([
        {"addresses": ["10.1.0.20"], "targetRef": {"name": "b", "namespace": "other"}},
        {"addresses": ["10.1.0.3"], "conditions": {"ready": False, "serving": True, "terminating": True},
         "nodeName": "node-1", "targetRef": {"name": "a"}},
        {"addresses": ["fd00::1"]},  # not IPv4: not a backend
        {"addresses": ["10.1.0.20"], "nodeName": "node-2"},
    ])
    assert sl.backends == (Backend("10.1.0.3", 0), Backend("10.1.0.20", 0), Backend("10.1.0.20", 0))
    assert all(type(b) is Backend for b in sl.backends)
    assert sl.flags == bytes([SERVING | TERMINATING | LOCAL, READY | SERVING, READY | SERVING])
    assert sl.refs == (("prod", "a"), ("other", "b"), None)  # only a slice without ports keeps them
    assert not sl.plain  # one endpoint not ready, one address twice


def test_a_slice_is_plain_only_with_every_endpoint_ready_and_each_address_once():
    ports = [{"name": "http", "port": 8080}]
    ready = _slice([{"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.1"]}], ports)
    assert ready.plain and ready.refs is None
    assert ready.backends == (Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080))
    assert not _slice([{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.1"]}], ports).plain
    empty = _slice([], ports)
    assert (empty.backends, empty.flags, empty.refs, empty.plain) == ((), b"", None, True)

