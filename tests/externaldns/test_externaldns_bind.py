"""`podnet external-dns` against a real BIND (Debian's named): a primary of a dynamic test
zone on loopback, a TSIG key that may update and transfer it (tests/support/bind.py).

Every answer checked here comes from named itself (TCP queries), after the event that
should have produced it: the controller's status file naming the store revision it
has synced, or the in-process sync returning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.rcode
import pytest
from tests.support.bind import Named, have_named

from podnet.externaldns.controller import Controller, Settings, follow, sync_once
from podnet.externaldns.plan import DomainFilter
from podnet.externaldns.registry import NameMapper, format_labels
from podnet.externaldns.rfc2136 import DNSServerError, RFC2136Provider, ServerConfig
from podnet.externaldns.source import ServiceSource
from podnet.model.objects import EndpointSlice, Node, Service
from podnet.store.objects import ObjectStore
from podnet.store.url import open_store

pytestmark = [pytest.mark.bind, pytest.mark.skipif(not have_named(), reason="named (bind9) is not installed")]

ZONE = "example.test"
H = "external-dns.kubernetes.io/"
PODNET = [sys.executable, "-m", "podnet.cli.main"]


# ---------------------------------------------------------------- objects


def lb(name: str, host: str, ip: str | list[str] | None, ns: str = "prod", **ann: str) -> Service:
    ips = [ip] if isinstance(ip, str) else (ip or [])
    annotations = {H + "hostname": host, **{H + k.replace("_", "-"): v for k, v in ann.items()}}
    return Service.model_validate({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": i} for i in ips]}}})


def headless(name: str, host: str, ns: str = "prod") -> Service:
    return Service.model_validate({
        "metadata": {"name": name, "namespace": ns, "annotations": {H + "hostname": host}},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}], "selector": {"app": name}}})


def slice_of(svc: str, eps: list[tuple[str, str | None]], ns: str = "prod") -> EndpointSlice:
    return EndpointSlice.model_validate({
        "metadata": {"name": f"{svc}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, **({"hostname": h} if h else {})}
                      for ip, h in eps]})


def node_port(name: str, host: str, port: int, ns: str = "prod") -> Service:
    return Service.model_validate({
        "metadata": {"name": name, "namespace": ns, "annotations": {H + "hostname": host}},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "ports": [{"port": 80, "nodePort": port}]}})


def a_node(name: str, ip: str) -> Node:
    return Node.model_validate({"metadata": {"name": name},
                                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def named():
    n = Named(zones=[ZONE], records=[
        f"manual.{ZONE}. 300 IN A 192.0.2.99",
        f"manual.{ZONE}. 300 IN TXT \"v=spf1 -all\"",
    ])
    n.start()
    try:
        yield n
    finally:
        n.cleanup()


def new_store(path: Path) -> tuple[str, ObjectStore]:
    url = f"sqlite:///{path}"
    return url, ObjectStore(open_store(url))


def provider_for(named: Named, **kw) -> RFC2136Provider:
    cfg = dict(host=named.host, zones=(ZONE,), port=named.port, keyname=named.key_name, secret=named.secret,
               timeout=5.0)
    cfg.update(kw)
    return RFC2136Provider(ServerConfig(**cfg))


def once(url: str, named: Named, owner: str = "ctl-a", **settings) -> object:
    batch = settings.pop("batch_size", 50)
    return sync_once(url, Settings(owner_id=owner, **settings), provider_for(named, batch_size=batch))


def txt_of(owner: str, resource: str) -> list[str]:
    return [format_labels(owner, resource)]


def absent(named: Named, name: str) -> bool:
    return named.query(name, "ANY").rcode() == dns.rcode.NXDOMAIN


class ControllerProcess:
    """`podnet external-dns` as its own process, stopped by its PID."""

    def __init__(self, url: str, named: Named, tmp: Path, *extra: str, owner: str = "ctl-a", secret: str | None = None):
        self.status = tmp / f"status-{owner}.json"
        self.log = tmp / f"controller-{owner}.log"
        env = dict(os.environ, EXTERNAL_DNS_RFC2136_TSIG_SECRET=secret or named.secret)
        cmd = [*PODNET, "--store", url, "external-dns", "--rfc2136-host", named.host, "--rfc2136-port",
               str(named.port), "--rfc2136-zone", ZONE, "--rfc2136-tsig-keyname", named.key_name,
               "--txt-owner-id", owner, "--interval", "30s", "--min-event-sync-interval", "0.05s",
               "--rfc2136-timeout", "2s", "--status-file", str(self.status), *extra]
        self.out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env)

    def wait(self, pred, timeout: float = 30.0) -> dict:
        """The first status (written after each sync) that satisfies pred."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"controller exited: {self.log.read_text()}"
            try:
                last = json.loads(self.status.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                last = None
            if last is not None and pred(last):
                return last
            time.sleep(0.02)
        raise AssertionError(f"no such status in {timeout}s; last {last}; log:\n{self.log.read_text()[-3000:]}")

    def synced(self, revision: int, timeout: float = 30.0) -> dict:
        return self.wait(lambda s: s["revision"] >= revision and s["error"] is None, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()


@pytest.fixture
def controllers():
    started: list[ControllerProcess] = []
    yield started
    for c in started:
        c.stop()


# ---------------------------------------------------------------- records follow Services


def test_records_appear_change_and_disappear_within_one_sync(named, tmp_path, controllers):
    url, store = new_store(tmp_path / "podnet.db")
    rev, _ = store.apply([a_node("n1", "10.0.0.1"), a_node("n2", "10.0.0.2")])
    ctl = ControllerProcess(url, named, tmp_path)
    controllers.append(ctl)
    ctl.synced(rev)
    # one object per store transaction: the status's revision then names every event up to it
    for obj in (lb("web", f"web.{ZONE}", "192.0.2.10", ttl="2m"), headless("db", f"db.{ZONE}"),
                slice_of("db", [("10.244.1.5", "db-0"), ("10.244.2.5", None)]), node_port("np", f"np.{ZONE}", 30080)):
        rev, _ = store.apply([obj])
    ctl.synced(rev)  # the sync that reflects this revision is done: the zone must show it now
    assert named.values(f"web.{ZONE}", "A") == ["192.0.2.10"]
    assert named.ttl(f"web.{ZONE}", "A") == 120
    assert named.values(f"a-web.{ZONE}", "TXT") == txt_of("ctl-a", "service/prod/web")
    assert named.values(f"db.{ZONE}", "A") == ["10.244.1.5", "10.244.2.5"]
    assert named.values(f"db-0.db.{ZONE}", "A") == ["10.244.1.5"]
    assert named.values(f"np.{ZONE}", "A") == ["10.0.0.1", "10.0.0.2"]

    serial = named.serial(ZONE)
    store.apply([lb("web", f"web.{ZONE}", ["192.0.2.11", "192.0.2.12"], ttl="2m")])
    rev, _ = store.apply([slice_of("db", [("10.244.1.5", "db-0")])])
    status = ctl.synced(rev)
    assert named.values(f"web.{ZONE}", "A") == ["192.0.2.11", "192.0.2.12"]
    assert named.values(f"db.{ZONE}", "A") == ["10.244.1.5"]
    assert named.serial(ZONE) - serial <= 2  # one UPDATE per sync at most (a zone read changes nothing)
    assert status["conflicts"] == [] and status["problems"] == {}

    store.delete(Service, "web", "prod")
    rev = store.kv.revision()
    ctl.synced(rev)
    assert absent(named, f"web.{ZONE}") and absent(named, f"a-web.{ZONE}")
    assert named.values(f"db.{ZONE}", "A") == ["10.244.1.5"]  # the others stay
    # a hand-made record beside them was never touched
    assert named.values(f"manual.{ZONE}", "A") == ["192.0.2.99"]


# ---------------------------------------------------------------- ownership


def test_two_owners_race_for_one_name_exactly_one_wins(named, tmp_path):
    """Two clusters' controllers (owners a and b) want the same names at the same moment:
    both read the zone empty, plan a create and send it through a barrier, so the
    UPDATEs reach named together. Each name ends up with exactly one owner's records and
    TXT, the loser reports the winner, and later syncs never take it over."""
    names = [f"race{i}.{ZONE}" for i in range(6)]
    urls = {}
    for owner, ip in (("a", "192.0.2.1"), ("b", "198.51.100.1")):
        url, store = new_store(tmp_path / f"{owner}.db")
        store.apply([lb(f"race{i}", n, ip, ns=owner) for i, n in enumerate(names)])
        urls[owner] = url
    barrier = threading.Barrier(2, timeout=20)
    reports: dict[str, object] = {}
    errors: list[BaseException] = []

    def racer(owner: str) -> None:
        try:
            prov = provider_for(named, batch_size=1)
            send = prov._send

            def send_together(msg):  # every UPDATE of both owners leaves at the same moment
                barrier.wait()
                return send(msg)

            prov._send = send_together
            reports[owner] = sync_once(urls[owner], Settings(owner_id=owner), prov)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=racer, args=(o,)) for o in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    won = {"a": 0, "b": 0}
    for i, n in enumerate(names):
        [txt] = named.values(f"a-{n}", "TXT")
        winner = "a" if "owner=a," in txt else "b"
        won[winner] += 1
        assert named.values(n, "A") == (["192.0.2.1"] if winner == "a" else ["198.51.100.1"])
        assert txt == format_labels(winner, f"service/{winner}/race{i}")
        loser = "b" if winner == "a" else "a"
        # both had read the zone empty: the loser was stopped by its UPDATE's prerequisite, not by its plan
        assert any(c.startswith(f"{n} A: wanted by service/{loser}/race{i} but owned by owner {winner!r}")
                   and "since the zone was read" in c and f"this controller is owner {loser!r}" in c
                   for c in reports[loser].conflicts), reports[loser].conflicts
    assert won["a"] + won["b"] == len(names)
    assert reports["a"].created + reports["b"].created == len(names)
    # afterwards each keeps to its own: full resyncs change nothing and report the other owner
    for owner in ("a", "b"):
        again = once(urls[owner], named, owner=owner)
        assert (again.created, again.updated, again.deleted) == (0, 0, 0)
        assert len(again.conflicts) == won["b" if owner == "a" else "a"]


def test_hand_made_records_are_never_modified_or_deleted(named, tmp_path, caplog):
    url, store = new_store(tmp_path / "podnet.db")
    # a Service wants the name a person made (A and an SPF TXT): reported, not touched
    store.apply([lb("manual", f"manual.{ZONE}", "192.0.2.1"), lb("web", f"web.{ZONE}", "192.0.2.10")])
    with caplog.at_level(logging.WARNING, logger="podnet.externaldns"):
        report = once(url, named)
    assert report.created == 1
    assert [c for c in report.conflicts if c.startswith(f"manual.{ZONE} A")] == [
        f"manual.{ZONE} A: wanted by service/prod/manual but held by records no owner claims (made outside "
        "ExternalDNS); this controller is owner 'ctl-a': not touched"]
    assert "conflict: manual.example.test A" in caplog.text
    assert named.values(f"manual.{ZONE}", "A") == ["192.0.2.99"]

    # a person adds a TXT beside this owner's record, and a record at a name after the
    # controller read the zone: the controller's next (event) sync works from its copy,
    # and the prerequisites stop it from overwriting what it did not see
    source = ServiceSource()
    follower, _ = follow(url, source)
    ctl = Controller(Settings(owner_id="ctl-a"), provider_for(named), source)
    ctl.sync(full=True)
    assert named.update(ZONE, lambda u: u.add(f"late.{ZONE}.", 300, "A", "192.0.2.77")) == dns.rcode.NOERROR
    assert named.update(ZONE, lambda u: u.add(f"web.{ZONE}.", 300, "TXT", '"site-verification=abc"')) == 0
    store.apply([lb("late", f"late.{ZONE}", "192.0.2.2")])
    with open_store(url, create=False) as kv:
        follower.relist(kv)  # the source learns of the Service; the controller keeps its copy of the zone
    late = ctl.sync(full=False)
    assert late.created == 0
    assert late.conflicts == sorted(late.conflicts) and any(
        c.startswith(f"late.{ZONE} A: wanted by service/prod/late but held by records no owner claims")
        and "since the zone was read" in c for c in late.conflicts), late.conflicts
    assert named.values(f"late.{ZONE}", "A") == ["192.0.2.77"]
    # the Services go: only this owner's records go with them
    store.delete(Service, "late", "prod")
    store.delete(Service, "web", "prod")
    store.delete(Service, "manual", "prod")
    gone = once(url, named)
    assert gone.deleted == 1
    assert absent(named, f"a-web.{ZONE}") and named.values(f"web.{ZONE}", "A") == []
    assert named.values(f"web.{ZONE}", "TXT") == ["site-verification=abc"]
    assert named.values(f"late.{ZONE}", "A") == ["192.0.2.77"]
    assert named.values(f"manual.{ZONE}", "A") == ["192.0.2.99"]
    assert named.values(f"manual.{ZONE}", "TXT") == ["v=spf1 -all"]


def test_a_zone_externaldns_wrote_reads_the_same(named, tmp_path):
    """Records ExternalDNS left: its new-format TXT of another owner (not touched), and an
    old-format TXT of this owner (taken over: the new-format record is added beside it,
    and both go when the record goes)."""
    assert named.update(ZONE, lambda u: (
        u.add(f"theirs.{ZONE}.", 300, "A", "203.0.113.5"),
        u.add(f"a-theirs.{ZONE}.", 300, "TXT", '"' + format_labels("other", "service/x/theirs") + '"'),
        u.add(f"legacy.{ZONE}.", 300, "A", "203.0.113.6"),
        u.add(f"legacy.{ZONE}.", 300, "TXT", '"' + format_labels("ctl-a", "service/prod/legacy") + '"'),
    )) == dns.rcode.NOERROR
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("theirs", f"theirs.{ZONE}", "192.0.2.5"), lb("legacy", f"legacy.{ZONE}", "203.0.113.6")])
    report = once(url, named)
    assert [c.split(":")[0] for c in report.conflicts] == [f"theirs.{ZONE} A"]
    assert "owned by owner 'other' (service/x/theirs)" in report.conflicts[0]
    assert named.values(f"theirs.{ZONE}", "A") == ["203.0.113.5"]
    assert report.updated == 1  # the migration: the new-format TXT written
    assert named.values(f"a-legacy.{ZONE}", "TXT") == txt_of("ctl-a", "service/prod/legacy")
    store.delete(Service, "legacy", "prod")
    assert once(url, named).deleted == 1
    assert absent(named, f"legacy.{ZONE}") and absent(named, f"a-legacy.{ZONE}")


# ---------------------------------------------------------------- policies


def test_upsert_only_never_deletes_and_create_only_never_updates(named, tmp_path):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("keep", f"keep.{ZONE}", "192.0.2.1"), lb("chg", f"chg.{ZONE}", "192.0.2.2")])
    assert once(url, named).created == 2
    store.delete(Service, "keep", "prod")
    store.apply([lb("chg", f"chg.{ZONE}", "192.0.2.20"), lb("new", f"new.{ZONE}", "192.0.2.3")])

    r = once(url, named, policy="create-only")
    assert (r.created, r.updated, r.deleted, r.held_back) == (1, 0, 0, 2)
    assert named.values(f"chg.{ZONE}", "A") == ["192.0.2.2"]  # not updated
    assert named.values(f"keep.{ZONE}", "A") == ["192.0.2.1"]  # not deleted
    assert named.values(f"new.{ZONE}", "A") == ["192.0.2.3"]

    r = once(url, named, policy="upsert-only")
    assert (r.created, r.updated, r.deleted, r.held_back) == (0, 1, 0, 1)
    assert named.values(f"chg.{ZONE}", "A") == ["192.0.2.20"]
    assert named.values(f"keep.{ZONE}", "A") == ["192.0.2.1"]  # still not deleted

    r = once(url, named, policy="sync")
    assert (r.created, r.updated, r.deleted) == (0, 0, 1)
    assert absent(named, f"keep.{ZONE}")


def test_domain_filter(named, tmp_path):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("a", f"a.team1.{ZONE}", "192.0.2.1"), lb("b", f"b.team2.{ZONE}", "192.0.2.2")])
    r = once(url, named, domain_filter=DomainFilter((f"team1.{ZONE}",)))
    assert r.created == 1
    assert named.values(f"a.team1.{ZONE}", "A") == ["192.0.2.1"] and absent(named, f"b.team2.{ZONE}")


# ---------------------------------------------------------------- errors


def _once_cli(url: str, named: Named, *flags: str, secret: str | None = None, keyname: str | None = None):
    env = dict(os.environ)
    env.pop("EXTERNAL_DNS_RFC2136_TSIG_SECRET", None)
    cmd = [*PODNET, "--store", url, "external-dns", "--once", "--rfc2136-host", named.host,
           "--rfc2136-port", str(named.port), "--rfc2136-zone", ZONE, "--rfc2136-timeout", "3s", *flags]
    if keyname is not None:
        cmd += ["--rfc2136-tsig-keyname", keyname]
    if secret is not None:
        cmd += ["--rfc2136-tsig-secret", secret]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(("case", "expect"), [
    ("wrong secret", "(BADSIG): --rfc2136-tsig-secret is not the server's secret for that key"),
    ("unknown key", "the server does not know TSIG key 'nobody' with algorithm hmac-sha256 (BADKEY)"),
    ("wrong algorithm", "the server does not know TSIG key 'podnet-test-key' with algorithm hmac-sha512 (BADKEY)"),
    ("unsigned", "failed with REFUSED: the server refused it: unsigned requests (--rfc2136-insecure) are not allowed"),
    ("no key name", "--rfc2136-tsig-keyname is required (or --rfc2136-insecure to send unsigned updates)"),
    ("not base64", "--rfc2136-tsig-secret is not base64"),
    ("other zone", "zone transfer (AXFR) of other.test failed with NOTAUTH"),
])
def test_wrong_tsig_configuration_is_one_clear_line(named, tmp_path, case, expect):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("web", f"web.{ZONE}", "192.0.2.10")])
    good, key = named.secret, named.key_name
    args = {
        "wrong secret": dict(secret="AAAA" + good[4:], keyname=key),
        "unknown key": dict(secret=good, keyname="nobody"),
        "wrong algorithm": dict(secret=good, keyname=key),
        "unsigned": dict(),
        "no key name": dict(secret=good),
        "not base64": dict(secret="not base64!", keyname=key),
        "other zone": dict(secret=good, keyname=key),
    }[case]
    flags = {"unsigned": ["--rfc2136-insecure"], "wrong algorithm": ["--rfc2136-tsig-secret-alg", "hmac-sha512"],
             "other zone": ["--rfc2136-zone", "other.test"]}.get(case, [])
    r = _once_cli(url, named, *flags, **args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert absent(named, f"web.{ZONE}")  # nothing was written


def test_bad_annotations_name_the_service_and_do_not_stop_others(named, tmp_path, caplog):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("ok", f"ok.{ZONE}", "192.0.2.1"), lb("was-fine", f"fine.{ZONE}", "192.0.2.2")])
    assert once(url, named).created == 2
    store.apply([
        lb("odd", f"we b!.{ZONE}", "192.0.2.3"),
        lb("ttl", f"ttl.{ZONE}", "192.0.2.4", ttl="ten"),
        lb("was-fine", f"fine.{ZONE}", "192.0.2.20", ttl="soon"),  # broken later: its records stay as they were
        lb("outside", "web.elsewhere.test", "192.0.2.5"),
        lb("new", f"new.{ZONE}", "192.0.2.6"),
    ])
    with caplog.at_level(logging.ERROR, logger="podnet.externaldns"):
        r = once(url, named)
    assert r.created == 1 and r.deleted == 0 and r.updated == 0
    assert named.values(f"new.{ZONE}", "A") == ["192.0.2.6"]
    assert named.values(f"ok.{ZONE}", "A") == ["192.0.2.1"]
    assert named.values(f"fine.{ZONE}", "A") == ["192.0.2.2"]
    assert absent(named, f"ttl.{ZONE}")
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert ("Service prod/odd: annotation external-dns.kubernetes.io/hostname: 'we b!.example.test': label 'we b!': "
            "character ' !' is not allowed (expected a-z, 0-9, '-', '_'); its records are left as they are") in errors
    assert ("Service prod/ttl: annotation external-dns.kubernetes.io/ttl: 'ten' is not a TTL: expected seconds (300) "
            "or a duration (5m, 1h); its records are left as they are") in errors
    assert any(e.startswith("Service prod/was-fine: annotation external-dns.kubernetes.io/ttl") for e in errors)
    assert any(e.startswith("Service prod/outside: hostname web.elsewhere.test is in none of the zones")
               for e in errors)
    assert set(r.problems) == {"service/prod/odd", "service/prod/ttl", "service/prod/was-fine",
                               "service/prod/outside"}


def test_server_restart_and_outage_are_retried(named, tmp_path, controllers):
    url, store = new_store(tmp_path / "podnet.db")
    rev, _ = store.apply([lb("web", f"web.{ZONE}", "192.0.2.10")])
    ctl = ControllerProcess(url, named, tmp_path)
    controllers.append(ctl)
    ctl.synced(rev)
    named.stop()  # the server goes away; a change comes meanwhile
    rev, _ = store.apply([lb("api", f"api.{ZONE}", "192.0.2.11")])
    down = ctl.wait(lambda s: s["error"] is not None)
    assert "connection refused" in down["error"] or "no answer" in down["error"]
    named.start()  # same port, same zone files and journal
    ctl.synced(rev, timeout=60)
    assert named.values(f"api.{ZONE}", "A") == ["192.0.2.11"]
    assert named.values(f"web.{ZONE}", "A") == ["192.0.2.10"]
    log = ctl.log.read_text()
    assert "retrying in" in log and "the DNS server answers again" in log


def test_a_name_the_server_will_not_take_is_reported_and_the_others_land(named, tmp_path):
    """BIND takes at most max-records-per-type (100) records of a type at a name: a
    headless Service with 150 ready endpoints cannot be published; the others are."""
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([headless("big", f"big.{ZONE}"),
                 slice_of("big", [(f"10.244.{i // 250}.{i % 250 + 1}", None) for i in range(150)]),
                 lb("web", f"web.{ZONE}", "192.0.2.10")])
    r = once(url, named)
    assert r.created == 1 and named.values(f"web.{ZONE}", "A") == ["192.0.2.10"]
    [failed] = r.failed
    assert failed.startswith(f"create big.{ZONE} A 10.244.0.1,10.244.0.10,10.244.0.100,10.244.0.101,... (150 in "
                             "all) (ttl 300) for service/prod/big: the server refused it: SERVFAIL: 150 records")
    assert "max-records-per-type" in failed
    assert absent(named, f"big.{ZONE}") and absent(named, f"a-big.{ZONE}")
    store.delete(Service, "web", "prod")
    r = once(url, named)
    assert r.deleted == 1 and len(r.failed) == 1
    with pytest.raises(DNSServerError, match="failed with SERVFAIL"):  # nothing else it could do: the sync fails
        once(url, named)


# ---------------------------------------------------------------- batching


def test_changes_are_batched(named, tmp_path):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb(f"s{i}", f"s{i}.{ZONE}", f"192.0.2.{i}") for i in range(1, 121)])
    serial = named.serial(ZONE)
    r = once(url, named, batch_size=50)
    assert (r.created, r.messages) == (120, 3)
    assert named.serial(ZONE) == serial + 3  # named applied three transactions
    assert named.values(f"s77.{ZONE}", "A") == ["192.0.2.77"]
    store.apply([lb(f"s{i}", f"s{i}.{ZONE}", f"198.51.100.{i}") for i in range(1, 121)])
    r = once(url, named, batch_size=1)
    assert (r.updated, r.messages) == (120, 120)


def test_wildcard_names_need_a_replacement_label(named, tmp_path):
    url, store = new_store(tmp_path / "podnet.db")
    store.apply([lb("apps", f"*.apps.{ZONE}", "192.0.2.30")])
    r = once(url, named)
    assert r.created == 0
    assert r.problems == {"service/prod/apps": [
        f"hostname *.apps.{ZONE}: its ownership record would be named a-*.apps.{ZONE}: set "
        "--txt-wildcard-replacement for wildcard names"]}
    r = once(url, named, mapper=NameMapper(wildcard_replacement="any"))
    assert r.created == 1
    assert named.values(f"anything.apps.{ZONE}", "A") == ["192.0.2.30"]  # the wildcard answers
    assert named.values(f"a-any.apps.{ZONE}", "TXT") == txt_of("ctl-a", "service/prod/apps")
    again = once(url, named, mapper=NameMapper(wildcard_replacement="any"))
    assert (again.created, again.updated, again.deleted, again.conflicts) == (0, 0, 0, [])  # read back as its own
