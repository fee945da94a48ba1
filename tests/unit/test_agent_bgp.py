"""The BGP dataplane without a kernel: which events wake it, what it hands BIRD, a refused text,
health and metrics (BIRD replaced by a recorder, its sessions by a list)."""

import pytest

from podnet.agent import bgp as agent_bgp
from podnet.agent.bgp import BgpDataplane
from podnet.agent.cache import ObjectCache
from podnet.bgp.bird import ConfigRefused
from podnet.bgp.status import Session
from podnet.ipam.keys import BLOCKS
from podnet.model.objects import IPPool, Node
from podnet.store.base import Event
from podnet.store.objects import ObjectEvent, key_of, stored_form


class FakeBird:
    def __init__(self, tmp_path):
        self.texts = []
        self.running = False
        self.stops = 0
        self.refuse = False
        self.log_file = str(tmp_path / "bird.log")
        self.ctl = str(tmp_path / "bird.ctl")
        self.conf = tmp_path / "bird.conf"

    def apply(self, text):
        if self.refuse:
            raise ConfigRefused("BIRD refused the rendered configuration: syntax error")
        if self.running and self.texts and self.texts[-1] == text:
            return ""
        self.texts.append(text)
        done = "reloaded" if self.running else "started"
        self.running = True
        return done

    def stop(self):
        was, self.running = self.running, False
        self.stops += was
        return was

    def pid(self):
        return 4242 if self.running else None

    def loaded_digest(self):
        return None


def node(name, ip, bgp=True):
    return Node.model_validate({"metadata": {"name": name}, "spec": {"bgp": {}} if bgp else {},
                                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


def put(cache, dp, obj):
    ev = cache.apply(Event("ADDED", key_of(obj), stored_form(obj), 1))
    return dp.on_event(ev)


def block_event(cidr, owner, borrowed=()):
    allocations = [None] * 64
    attributes = []
    for ordinal, holder in borrowed:
        allocations[ordinal] = len(attributes)
        attributes.append({"secondary": {"node": holder}})
    raw = {"cidr": cidr, "pool": "pods", "affinity": f"host:{owner}", "allocations": allocations,
           "attributes": attributes}
    return ObjectEvent("ADDED", None, f"{BLOCKS}{cidr.replace('/', '-')}", 1, raw=raw)


@pytest.fixture
def dp(tmp_path):
    cache = ObjectCache()
    d = BgpDataplane("a", cache, FakeBird(tmp_path))
    for n in (node("a", "10.0.0.11"), node("b", "10.0.0.12")):
        put(cache, d, n)
    put(cache, d, IPPool.model_validate({"metadata": {"name": "pods"},
                                         "spec": {"cidr": "10.244.0.0/16", "encapsulation": "None"}}))
    return d


def test_only_blocks_that_concern_the_node_wake_it(dp):
    assert dp.on_event(block_event("10.244.1.0/26", "a"))
    assert not dp.on_event(block_event("10.244.2.0/26", "b"))  # another node's block: nothing to render
    assert dp.on_event(block_event("10.244.3.0/26", "b", borrowed=[(4, "a")]))  # a borrowed address here
    dp.end_reload(set())  # a relist that listed none of them
    assert dp._blocks == {}


def test_sync_starts_then_reloads_only_on_change(dp):
    dp.on_event(block_event("10.244.1.0/26", "a"))
    assert dp.sync(False).startswith("BIRD started: 1 peers, 1 blocks")
    assert "route 10.244.1.0/26 blackhole;" in dp.bird.texts[-1]
    assert dp.sync(True) == ""  # same text: nothing
    dp.on_event(block_event("10.244.1.64/26", "a"))
    assert dp.sync(False).startswith("BIRD reloaded")
    assert len(dp.bird.texts) == 2


def test_refused_text_fails_the_sync_and_is_not_tried_again(dp, monkeypatch):
    dp.bird.refuse = True
    with pytest.raises(ConfigRefused, match="syntax error"):
        dp.sync(False)
    calls = []
    monkeypatch.setattr(dp.bird, "apply", lambda text: calls.append(text))
    with pytest.raises(ConfigRefused):
        dp.sync(False)  # the same text again: BIRD's answer stands, BIRD is not asked
    assert calls == []


def test_node_losing_spec_bgp_stops_bird(dp):
    dp.sync(False)
    put(dp.cache, dp, node("a", "10.0.0.11", bgp=False))
    assert dp.sync(False) == "BIRD stopped: this node has no spec.bgp"
    assert dp.bird.stops == 1 and dp.health() is None and dp.verify() == []


def test_health_and_metrics(dp, monkeypatch):
    dp.sync(False)
    found = [Session("Mesh_10_0_0_12", "Established", "2026-01-01 00:00:00", "10.0.0.12", 64512, 3, 1, 3),
             Session("Global_10_0_0_1", "Active", "2026-01-01 00:00:00", "10.0.0.1", 65000,
                     last_error="Socket: Connection refused")]
    monkeypatch.setattr(agent_bgp, "sessions", lambda ctl, timeout: found)
    assert dp.health() == ("BIRD is not ready: BGP not established with 10.0.0.1 (Active: Socket: "
                           "Connection refused)")
    text = metrics_text(dp)
    assert sample(text, "podnet_bgp_sessions", state="established") == 1
    assert sample(text, "podnet_bgp_session_established", peer="10.0.0.1", protocol="Global_10_0_0_1") == 0
    assert sample(text, "podnet_bgp_routes", peer="10.0.0.12", direction="imported") == 3
    assert sample(text, "podnet_bgp_bird_up") == 1
    found.pop()
    dp._status = (0.0, None, None)
    assert dp.health() is None


def metrics_text(dp):
    """The dataplane's metrics in Prometheus' text format."""
    if hasattr(dp, "render_metrics"):
        return dp.render_metrics()
    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self):
            return dp.metric_families()

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def sample(text, name, **labels):
    """The value of the one sample of `name` carrying these labels (others may be there too)."""
    found = []
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        have = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            found.append(float(value))
    assert len(found) == 1, (name, labels, text)
    return found[0]


def test_verify_reports_a_dead_bird(dp):
    dp.sync(False)
    dp.bird.running = False
    assert dp.verify() == ["BIRD is not running"]
