"""Sync metrics, conntrack sizing and the health check server (no root needed)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from podnet.dataplane.ctnetlink import Entry, Tuple
from podnet.model.objects import EndpointSlice
from podnet.services.conntrack import (
    ConntrackSizing,
    StaleMatcher,
    apply_conntrack_sizing,
    conntrack_max,
    delete_stale_flows,
)
from podnet.services.health import HealthCheckServer
from podnet.services.metrics import SYNC_BUCKETS, ServiceMetrics
from podnet.services.model import Backend, Frontend, HealthCheck, StaleFlow


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {sample} {labels} in:\n{text}")


def test_sync_histogram_has_kube_proxy_buckets_and_podnet_names_by_default():
    assert len(SYNC_BUCKETS) == 15 and SYNC_BUCKETS[0] == 0.001 and SYNC_BUCKETS[-1] == 0.001 * 2**14
    m = ServiceMetrics()
    m.record_sync(0.0015, changed=7, now=1700000000.0)
    m.record_sync(100.0, ok=False)
    text = m.render()
    assert families(text)["podnet_service_sync_duration_seconds"].type == "histogram"
    h = "podnet_service_sync_duration_seconds"
    assert value(text, h + "_bucket", le="0.001") == 0
    assert value(text, h + "_bucket", le="0.002") == 1
    assert value(text, h + "_bucket", le="+Inf") == 2
    assert value(text, h + "_count") == 2
    assert value(text, "podnet_service_sync_last_timestamp_seconds") == 1700000000.0
    assert value(text, "podnet_service_sync_failures_total") == 1
    assert value(text, "podnet_service_elements_changed_total") == 7
    assert families(text)["podnet_service_network_programming_duration_seconds"].type == "histogram"
    assert all(name.startswith("podnet_") for name in families(text))


def test_kube_proxy_names_as_an_option():
    m = ServiceMetrics()
    m.record_sync(0.0015, changed=3, now=1700000000.0)
    m.record_sync(0.5, ok=False)
    text = m.render(kube_proxy_names=True)
    names = set(families(text))
    assert {"kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures"} <= names
    assert value(text, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert value(text, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="0.002") == 1
    assert value(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == 1700000000.0
    assert value(text, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 1
    assert value(text, "podnet_service_elements_changed_total") == 3  # no kube-proxy counterpart
    assert not any(n.startswith("podnet_service_sync") for n in names)
    iptables = m.render(kube_proxy_names=True, proxy="iptables")
    assert value(iptables, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1


def test_network_programming_latency_once_per_change():
    sl = EndpointSlice.model_validate({
        "metadata": {"name": "web-1", "annotations": {
            "endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"}},
        "addressType": "IPv4", "endpoints": []})
    m = ServiceMetrics()
    t0 = 1704067200.0  # 2024-01-01T00:00:00Z
    assert m.record_network_programming([sl], now=t0 + 1.2) == 1
    assert m.record_network_programming([sl], now=t0 + 5) == 0  # the same change is not counted twice
    text = m.render()
    assert value(text, "podnet_service_network_programming_duration_seconds_bucket", le="1.0") == 0
    assert value(text, "podnet_service_network_programming_duration_seconds_bucket", le="2.0") == 1


def test_network_programming_latency_of_changes_known_to_be_new():
    m = ServiceMetrics()
    t0 = 1704067200.0
    assert m.observe_programming({}, now=t0) == 0
    assert m.observe_programming({"default/web-1": t0, "default/web-2": t0 + 1}, now=t0 + 1.5) == 2
    text = m.render()
    assert value(text, "podnet_service_network_programming_duration_seconds_bucket", le="0.5") == 1
    assert value(text, "podnet_service_network_programming_duration_seconds_bucket", le="2.0") == 2
    assert m.observe_programming({"default/web-3": t0 + 10}, now=t0) == 1  # clock skew: never negative
    assert value(m.render(), "podnet_service_network_programming_duration_seconds_sum") == 1.5 + 0.5 + 0.0


def test_network_programming_latency_tells_changes_under_100_ms():
    m = ServiceMetrics()
    t0 = 1704067200.0
    m.observe_programming({"default/web-1": t0, "default/web-2": t0 + 0.02}, now=t0 + 0.08)  # 80 and 60 ms
    m.observe_programming({"default/web-3": t0}, now=t0 + 0.18)  # 180 ms
    text = m.render(kube_proxy_names=True)
    h = "kubeproxy_network_programming_duration_seconds_bucket"
    assert value(text, h, le="0.05") == 0
    assert value(text, h, le="0.075") == 1
    assert value(text, h, le="0.1") == 2
    assert value(text, h, le="0.2") == 3
    assert value(text, h, le="0.25") == 3  # kube-proxy's buckets are all still there
    assert value(text, h, le="300.0") == 3


def test_conntrack_sizing_formula_and_never_lowering(tmp_path):
    assert conntrack_max(2) == 131072  # the minimum wins on small nodes
    assert conntrack_max(8) == 8 * 32768
    assert conntrack_max(8, ConntrackSizing(max_per_core=0)) == 0
    path = tmp_path / "nf_conntrack_max"
    path.write_text("65536\n")
    assert apply_conntrack_sizing(ConntrackSizing(), cores=16, path=str(path)) == 16 * 32768
    assert path.read_text() == str(16 * 32768)
    assert apply_conntrack_sizing(ConntrackSizing(), cores=2, path=str(path)) is None  # already larger


def _entry(dst: str, dport: int, reply_src: str, reply_sport: int, proto: int = 17) -> Entry:
    client = socket.inet_aton("10.0.0.1")
    return Entry(socket.AF_INET, Tuple(client, socket.inet_aton(dst), proto, 40000, dport),
                 Tuple(socket.inet_aton(reply_src), client, proto, reply_sport, 40000), 0, 7)


def test_stale_flows_match_their_entries_only():
    fe = Frontend("10.96.0.10", "udp", 53)
    m = StaleMatcher([StaleFlow(fe, Backend("10.1.0.5", 5353)), StaleFlow(Frontend("10.96.0.11", "udp", 53), None),
                      StaleFlow(Frontend(None, "udp", 30053), None),
                      StaleFlow(Frontend("10.96.0.12", "tcp", 80), None)])  # not UDP: never cleaned
    assert m.matches(_entry("10.96.0.10", 53, "10.1.0.5", 5353))
    assert not m.matches(_entry("10.96.0.10", 53, "10.1.0.6", 5353))  # another endpoint: still valid
    assert not m.matches(_entry("10.96.0.10", 53, "10.1.0.5", 5354))
    assert not m.matches(_entry("10.96.0.10", 53, "10.1.0.5", 5353, proto=6))  # TCP
    assert m.matches(_entry("10.96.0.11", 53, "10.96.0.11", 53))  # had no endpoints: every flow
    assert not m.matches(_entry("10.96.0.11", 54, "10.96.0.11", 54))
    assert m.matches(_entry("192.168.1.5", 30053, "10.1.0.9", 8053))  # a NodePort, on any address
    assert not m.matches(_entry("10.96.0.12", 80, "10.96.0.12", 80))
    assert m.kernel_filter() == (None, None)
    one = StaleMatcher([StaleFlow(fe, Backend("10.1.0.5", 5353)), StaleFlow(fe, Backend("10.1.0.6", 5353))])
    assert one.kernel_filter() == (socket.inet_aton("10.96.0.10"), 53)
    assert StaleMatcher([StaleFlow(Frontend(None, "udp", 30053), None)]).kernel_filter() == (None, 30053)
    assert not StaleMatcher([StaleFlow(Frontend("10.96.0.12", "tcp", 80), None)])


class FakeConntrack:
    def __init__(self, entries):
        self.entries, self.dumps, self.deleted = entries, [], []

    def dump(self, family, *, proto=None, dst=None, dport=None, select=None):
        self.dumps.append((family, proto, dst, dport))
        return iter([e for e in self.entries
                     if select(e.orig.proto, e.orig.dst, e.orig.dport, e.reply.src, e.reply.sport)])

    def delete(self, entries):
        self.deleted += list(entries)
        return len(self.deleted), 0


def test_delete_stale_flows_dumps_once_and_deletes_the_matches():
    stale, valid = _entry("10.96.0.10", 53, "10.1.0.5", 5353), _entry("10.96.0.10", 53, "10.1.0.6", 5353)
    ct = FakeConntrack([stale, valid])
    flow = StaleFlow(Frontend("10.96.0.10", "udp", 53), Backend("10.1.0.5", 5353))
    assert delete_stale_flows([flow], ct) == 1
    assert ct.dumps == [(socket.AF_INET, 17, socket.inet_aton("10.96.0.10"), 53)]
    assert ct.deleted == [stale]
    assert delete_stale_flows([], ct) == 0 and len(ct.dumps) == 1  # nothing to do: no dump


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int) -> tuple[int, dict]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3)
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_check_server_answers_by_local_endpoint_count():
    port = _free_port()
    server = HealthCheckServer("127.0.0.1")
    try:
        server.sync([HealthCheck(port, "shop", "web", 2)])
        assert _get(port) == (200, {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
                                    "serviceProxyHealthy": True})
        server.sync([HealthCheck(port, "shop", "web", 0)])
        assert _get(port)[0] == 503
        server.sync([])
        assert server.ports() == []
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # closed
    finally:
        server.close()
