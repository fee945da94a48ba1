"""The agent's Service dataplane fed by watch events (no kernel: a recording applier)."""

from __future__ import annotations

import pytest

from podnet.agent.cache import ObjectCache
from podnet.agent.services import ServiceDataplane
from podnet.model.objects import EndpointSlice, Service
from podnet.services.applier import SyncResult
from podnet.services.model import Backend, Frontend
from podnet.store.base import Record
from podnet.store.objects import ObjectEvent, key_of, split_object_key, stored_form

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


class Applier:
    def __init__(self) -> None:
        self.states: list = []
        self.resyncs: list[bool] = []
        self.fail = False
        self.problem: str | None = None

    def apply(self, state, resync=False):
        if self.fail:
            return SyncResult(errors=["nft: boom"])
        self.states.append(state)
        self.resyncs.append(resync)
        return SyncResult(sent=True, added=1)

    def verify(self) -> str | None:
        return self.problem

    def slot_orders(self) -> dict:
        return {}


class Health:
    def sync(self, checks) -> None:
        self.checks = list(checks)

    def close(self) -> None:
        pass


def svc(name: str, ip: str, rv: str = "1") -> Service:
    return Service.model_validate({"metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
                                   "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80,
                                                                        "targetPort": 8080}]}})


def eps(name: str, service: str, addrs: list[str], rv: str = "1", trigger: str | None = None) -> EndpointSlice:
    meta = {"name": name, "namespace": "default", "resourceVersion": rv,
            "labels": {"kubernetes.io/service-name": service}}
    if trigger:
        meta["annotations"] = {TRIGGER: trigger}
    return EndpointSlice.model_validate({"metadata": meta, "addressType": "IPv4",
                                         "ports": [{"name": "http", "port": 8080}],
                                         "endpoints": [{"addresses": [a]} for a in addrs]})


def added(obj) -> ObjectEvent:
    return ObjectEvent("ADDED", obj, key_of(obj), int(obj.metadata.resource_version or 0))


def deleted(obj) -> ObjectEvent:
    return ObjectEvent("DELETED", None, key_of(obj), 0)


def dataplane() -> tuple[ServiceDataplane, Applier]:
    applier = Applier()
    return ServiceDataplane("n1", "192.168.1.10", ("10.96.0.0/16",), applier=applier, health=Health()), applier


def programmed(dp: ServiceDataplane) -> int:
    """Observations of the network programming latency histogram."""
    return int(next(s.value for f in dp.metrics.programming.collect() for s in f.samples if s.name.endswith("_count")))


def test_events_feed_the_compiler_and_a_sync_costs_the_change():
    dp, applier = dataplane()
    for i in range(1, 11):
        assert dp.on_event(added(svc(f"s{i}", f"10.96.0.{i}")))
        assert dp.on_event(added(eps(f"s{i}-a", f"s{i}", [f"10.1.0.{i}"])))
    assert not dp.on_event(ObjectEvent("DELETED", None, "/podnet/objects/Pod/default/p", 3))
    assert dp.sync() != ""
    one = applier.states[-1]
    assert len(one.frontends) == 10 and dp.compiler.recompiled == 10
    dp.on_event(added(eps("s3-a", "s3", ["10.1.0.33"], rv="2")))
    dp.on_event(deleted(svc("s4", "10.96.0.4")))
    dp.sync()
    two = applier.states[-1]
    assert dp.compiler.recompiled == 1  # s3; s4 is gone
    assert two.changed_since(one) == {Frontend("10.96.0.3", "tcp", 80), Frontend("10.96.0.4", "tcp", 80)}
    assert two.rule(Frontend("10.96.0.3", "tcp", 80)).backends == (Backend("10.1.0.33", 8080),)
    dp.on_event(deleted(eps("s3-a", "s3", [])))
    dp.sync()
    assert applier.states[-1].rule(Frontend("10.96.0.3", "tcp", 80)).backends == ()
    # a replayed object at the version held costs nothing
    dp.on_event(added(svc("s5", "10.96.0.5")))
    dp.on_event(added(eps("s5-a", "s5", ["10.1.0.5"])))
    dp.sync()
    assert dp.compiler.recompiled == 0


def test_network_programming_latency_only_for_slices_that_changed():
    dp, applier = dataplane()
    dp.on_event(added(svc("web", "10.96.0.10")))
    dp.on_event(added(eps("web-1", "web", ["10.1.0.1"], trigger="2024-01-01T00:00:00Z")))
    dp.on_event(added(eps("web-2", "web", ["10.1.0.2"])))  # no trigger time: nothing to observe
    dp.sync()
    assert programmed(dp) == 1
    dp.on_event(added(eps("web-1", "web", ["10.1.0.1"], rv="5", trigger="2024-01-01T00:00:00Z")))
    dp.sync()
    assert programmed(dp) == 1  # a new version with the same trigger time is not a new change
    dp.on_event(added(eps("web-1", "web", ["10.1.0.3"], rv="6", trigger="2024-01-01T00:00:09Z")))
    applier.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        dp.sync()
    assert programmed(dp) == 1  # not programmed yet
    applier.fail = False
    dp.sync()
    assert programmed(dp) == 2


def test_a_reload_deletes_what_the_new_list_does_not_name():
    dp, applier = dataplane()
    dp.on_event(added(svc("a", "10.96.0.1")))
    dp.on_event(added(svc("b", "10.96.0.2")))
    dp.on_event(added(eps("a-1", "a", ["10.1.0.1"])))
    dp.on_event(added(eps("b-1", "b", ["10.1.0.2"])))
    dp.sync()
    dp.replace([svc("a", "10.96.0.1")], [eps("a-1", "a", ["10.1.0.9"], rv="7")])
    dp.sync()
    state = applier.states[-1]
    assert set(state.frontends) == {Frontend("10.96.0.1", "tcp", 80)}
    assert state.rule(Frontend("10.96.0.1", "tcp", 80)).backends == (Backend("10.1.0.9", 8080),)
    assert dp.compiler.slice_keys() == [("default", "a-1")]


def test_the_cache_hands_on_unkept_kinds_without_storing_them():
    cache = ObjectCache(unkept=("Service", "EndpointSlice"))
    s = svc("web", "10.96.0.10")
    records = [Record(key_of(s), stored_form(s), 4, 4)]
    seen: list[ObjectEvent] = []
    assert cache.load(records, seen.append) == []
    assert records == []  # consumed
    assert [e.object.name for e in seen] == ["web"] and seen[0].object.metadata.resource_version == "4"
    with pytest.raises(LookupError):
        cache.list(Service)
    assert split_object_key(key_of(s)) == ("Service", "default", "web")
    assert split_object_key("/podnet/objects/Node/n1") == ("Node", None, "n1")


def test_after_a_compacted_watch_services_and_dns_reload_and_forget_what_is_gone(tmp_path):
    import threading

    from podnet.agent.daemon import EVENT_FED
    from podnet.agent.dataplanes import DnsDataplane
    from podnet.agent.follow import StoreFollower
    from podnet.dns.index import ClusterIndex
    from podnet.store import open_store
    from podnet.store.objects import ObjectStore

    url = f"sqlite://{tmp_path}/podnet.db"
    kv = open_store(url)
    store = ObjectStore(kv)
    store.apply([svc("a", "10.96.0.1"), svc("b", "10.96.0.2"), eps("a-1", "a", ["10.1.0.1"]),
                 eps("b-1", "b", ["10.1.0.2"])])
    services, applier = dataplane()
    index = ClusterIndex(node_name="n1")
    dns = DnsDataplane(index)  # no node addresses: the index alone
    reloads: list[int] = []
    reloaded = threading.Event()

    def on_change(rev, dirty):
        if len(dirty) == 2:  # every dataplane: a (re)list
            reloads.append(rev)
            if len(reloads) == 2:
                reloaded.set()

    follower = StoreFollower(ObjectCache(unkept=EVENT_FED), [services, dns], on_change)
    rev = follower.relist(kv)
    services.sync()
    assert {fe.ip for fe in applier.states[-1].frontends} == {"10.96.0.1", "10.96.0.2"}
    assert index.lookup("b.default.svc.cluster.local").records()[0][3] == "10.96.0.2"

    # while the follower is away: b goes, a's endpoints change, and the history is compacted
    store.delete(Service, "b", "default")
    store.delete(EndpointSlice, "b-1", "default")
    store.apply([eps("a-1", "a", ["10.1.0.9"])])
    kv.compact(kv.list("/podnet/")[1])

    watcher = threading.Thread(target=follower.watch, args=(lambda: open_store(url), rev + 1), daemon=True)
    watcher.start()
    assert reloaded.wait(10), "the compacted watch was not reloaded"
    follower.stop()
    store.apply([svc("c", "10.96.0.3")])  # an event, so that the watch notices it should stop
    watcher.join(10)
    services.sync()
    state = applier.states[-1]
    assert Frontend("10.96.0.2", "tcp", 80) not in state.frontends
    assert state.rule(Frontend("10.96.0.1", "tcp", 80)).backends == (Backend("10.1.0.9", 8080),)
    assert ("default", "b-1") not in services.compiler.slice_keys()
    assert index.lookup("b.default.svc.cluster.local").rcode == 3  # NXDOMAIN: deleted during the gap
    assert index.lookup("a.default.svc.cluster.local").records()[0][3] == "10.96.0.1"


def test_periodic_full_syncs_reread_the_kernel_only_when_the_layout_check_fails_or_rarely():
    from podnet.agent.services import DEEP_RESYNC_EVERY

    applier = Applier()
    dp = ServiceDataplane("n1", "10.0.0.1", ("10.96.0.0/16",), applier=applier, health=Health())
    dp.sync(full=False)
    dp.sync(full=True)
    assert applier.resyncs == [False, False]  # the table's chains are all there: no element read-back
    applier.problem = "chain svc_t is missing"
    assert dp.verify() == ["chain svc_t is missing"]  # the agent verifies before each full sync
    dp.sync(full=True)
    assert applier.resyncs[-1] is True
    applier.problem = None
    for _ in range(DEEP_RESYNC_EVERY):
        dp.sync(full=True)
    assert applier.resyncs[-DEEP_RESYNC_EVERY:].count(True) == 1  # a deep read-back now and then


def test_conntrack_sizing_is_applied_when_configured_and_a_read_only_value_is_only_logged(tmp_path, caplog):
    from podnet.agent.services import size_conntrack
    from podnet.services.conntrack import ConntrackSizing

    path = tmp_path / "nf_conntrack_max"
    path.write_text("65536\n")
    assert size_conntrack(ConntrackSizing(max_per_core=0), str(path)) is None  # not configured: untouched
    assert path.read_text() == "65536\n"
    assert size_conntrack(ConntrackSizing(max_per_core=32768, minimum=131072), str(path)) == 131072
    assert path.read_text().strip() == "131072"
    missing = str(tmp_path / "absent" / "nf_conntrack_max")
    assert size_conntrack(ConntrackSizing(max_per_core=32768), missing) is None
    assert "cannot raise nf_conntrack_max" in caplog.text


def test_a_node_address_inside_the_service_cidr_is_said_at_start_with_the_fix(caplog):
    with caplog.at_level("WARNING", logger="podnet.agent"):
        ServiceDataplane("n1", "10.99.0.11", ("10.96.0.0/12",), applier=Applier(), health=Health())
    (message,) = [r.getMessage() for r in caplog.records if "Service CIDR" in r.getMessage()]
    assert "10.99.0.11" in message and "10.96.0.0/12" in message and "outside the Service CIDRs" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="podnet.agent"):
        ServiceDataplane("n1", "192.168.0.11", ("10.96.0.0/12",), applier=Applier(), health=Health())
    assert not [r for r in caplog.records if "Service CIDR" in r.getMessage()]


def fallbacks(dp: ServiceDataplane) -> float:
    return next(s.value for f in dp.metrics.scheduler_fallbacks.collect() for s in f.samples)


def annotated(service: Service, rv: str, **annotations: str) -> Service:
    body = service.model_dump(by_alias=True, exclude_none=True)
    body["metadata"].update(resourceVersion=rv, annotations={f"podnet.io/{k}": v for k, v in annotations.items()})
    return Service.model_validate(body)


@pytest.mark.parametrize("proxy", ["nftables", "iptables"])
def test_a_scheduler_the_backend_cannot_do_is_said_once_counted_and_balanced_at_random(proxy, caplog):
    applier = Applier()
    dp = ServiceDataplane("n1", "192.168.1.10", ("10.96.0.0/16",), applier=applier, health=Health(), proxy=proxy)
    dp.on_event(added(annotated(svc("lc", "10.96.0.1"), "1", scheduler="lc")))
    dp.on_event(added(eps("lc-a", "lc", ["10.1.0.1", "10.1.0.2"])))
    dp.on_event(added(annotated(svc("w", "10.96.0.2"), "1", scheduler="wrr", weights="10.1.0.3=3")))
    dp.on_event(added(eps("w-a", "w", ["10.1.0.3", "10.1.0.4"])))
    with caplog.at_level("WARNING", logger="podnet.agent"):
        assert dp.sync() != ""  # the sync goes on
    said = [r.getMessage() for r in caplog.records if "podnet.io/scheduler" in r.getMessage()]
    assert said == [f"services: default/lc:http: podnet.io/scheduler lc is not available on the {proxy} backend ("
                    + ("nftables" if proxy == "nftables" else "iptables")
                    + " keeps no count of the connections each endpoint holds); balanced at random "
                    "(--service-proxy ebpf has it)"]
    assert fallbacks(dp) == 1  # wrr is done by both
    assert set(dp.scheduler_fallbacks) == {Frontend("10.96.0.1", "tcp", 80)}
    assert len(applier.states[-1].rule(Frontend("10.96.0.1", "tcp", 80)).backends) == 2  # still balanced
    # another change elsewhere: nothing said again; the annotation removed: no fallback left
    caplog.clear()
    dp.on_event(added(eps("w-a", "w", ["10.1.0.3"], rv="2")))
    dp.sync()
    assert not [r for r in caplog.records if "podnet.io/scheduler" in r.getMessage()]
    dp.on_event(added(annotated(svc("lc", "10.96.0.1"), "2")))
    dp.sync()
    assert dp.scheduler_fallbacks == {} and fallbacks(dp) == 0


def test_the_ebpf_backend_has_every_scheduler():
    applier = Applier()
    dp = ServiceDataplane("n1", "192.168.1.10", ("10.96.0.0/16",), applier=applier, health=Health(), proxy="ebpf")
    dp.on_event(added(annotated(svc("lc", "10.96.0.1"), "1", scheduler="lc")))
    dp.on_event(added(eps("lc-a", "lc", ["10.1.0.1"])))
    dp.sync()
    assert dp.scheduler_fallbacks == {}
