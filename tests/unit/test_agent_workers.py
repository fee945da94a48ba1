"""The dataplane contract as the agent drives it: one worker per dataplane, coalesced
syncs, retries, drift found by verify() and repaired by a full sync, and the store
revision the node is programmed up to (no kernel: recording dataplanes)."""

from __future__ import annotations

import threading

from podnet.agent.contract import Dataplane, DataplaneMetrics, kind_of
from podnet.agent.worker import DataplaneWorker, SyncProgress
from podnet.ipam.keys import BLOCKS, HANDLES


class Recording(Dataplane):
    def __init__(self, name: str, kinds=()):
        self.name = name
        self.kinds = frozenset(kinds)
        self.syncs: list[bool] = []
        self.synced = threading.Event()
        self.fail = 0  # fail this many syncs
        self.drift: list[str] = []
        self.gate: threading.Event | None = None  # when set, sync waits for it

    def sync(self, full: bool) -> str:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("kernel said no")
        self.syncs.append(full)
        self.synced.set()
        drift, self.drift = self.drift, []
        return "repaired" if drift else ("changed" if not full else "")

    def verify(self) -> list[str]:
        return list(self.drift)


def workers(*dps, resync=3600.0):
    progress = SyncProgress()
    metrics = DataplaneMetrics(dp.name for dp in dps)
    ws = [DataplaneWorker(dp, progress, metrics, min_interval=0.01, resync_interval=resync, retry_interval=0.01)
          for dp in dps]
    return progress, metrics, ws


def test_a_change_syncs_only_the_dataplanes_it_concerns_and_the_synced_revision_follows():
    routes, policy = Recording("routes"), Recording("policy")
    progress, _, (wr, wp) = workers(routes, policy)
    for w in (wr, wp):
        assert w.run_once(full=True)
    progress.saw(10)
    assert progress.synced_rev() == 10
    for w in (wr, wp):
        w.start()
    try:
        policy.synced.clear()
        progress.saw(11, [wp])
        assert policy.synced.wait(5)
        assert routes.syncs == [True] and policy.syncs == [True, False]
    finally:
        for w in (wr, wp):
            w.stop()
    assert progress.synced_rev() == 11


def test_a_slow_dataplane_does_not_hold_back_another():
    slow, fast = Recording("routes"), Recording("services")
    progress, _, (ws, wf) = workers(slow, fast)
    for w in (ws, wf):
        w.run_once(full=True)
        w.start()
    try:
        slow.gate = threading.Event()  # the routes sync hangs until released
        fast.synced.clear()
        progress.saw(5, [ws, wf])
        assert fast.synced.wait(5), "a Service change waited behind a routing sync"
        assert progress.synced_rev() < 5  # routes are not programmed yet: the node is not at 5
        slow.synced.clear()
        slow.gate.set()
        assert slow.synced.wait(5)
    finally:
        for w in (ws, wf):
            w.stop()
    assert progress.synced_rev() == 5


def test_a_failed_sync_is_reported_retried_and_holds_the_revision():
    dp = Recording("policy")
    progress, metrics, (w,) = workers(dp)
    w.run_once(full=True)
    dp.fail = 2
    dp.synced.clear()
    w.start()
    try:
        progress.saw(7, [w])
        assert dp.synced.wait(5)
    finally:
        w.stop()
    assert w.error is None and progress.synced_rev() == 7
    text = metrics.render()
    assert 'podnet_dataplane_syncs_total{dataplane="policy",result="error"} 2' in text
    assert 'podnet_dataplane_last_sync_error{dataplane="policy"} 0' in text


def test_drift_found_by_verify_is_repaired_by_the_periodic_full_sync_and_counted():
    dp = Recording("nat")
    progress, metrics, (w,) = workers(dp, resync=0.2)
    w.run_once(full=True)
    dp.drift = ["table podnet-nat differs from the pools"]
    dp.synced.clear()
    w.start()
    try:
        assert dp.synced.wait(5)
    finally:
        w.stop()
    assert dp.syncs[-1] is True and dp.drift == []
    assert 'podnet_dataplane_drift_repaired_total{dataplane="nat"} 1' in metrics.render()


def test_keys_name_their_kind():
    assert kind_of("/podnet/objects/Service/default/web") == "Service"
    assert kind_of("/podnet/objects/Node/n1") == "Node"
    assert kind_of(BLOCKS + "10.0.0.0-26") == "Block"
    assert kind_of(HANDLES + "x") is None
