"""`podnet external-dns`: keeps the zones of a DNS server in step with the Services in the
store, as ExternalDNS does, without ever touching a name this owner does not hold.

The store is followed by the agent's informer (StoreFollower: one list, then one
watch) feeding the Service source. A sync takes the desired records, reads each zone,
plans (plan.py) and sends the changes (rfc2136.py):

- on start, and every --interval, each zone is read afresh by AXFR (a full resync:
  what someone changed by hand is seen and repaired or reported);
- a change in the store syncs at most every --min-event-sync-interval, against the
  zone as this controller last read and changed it (no AXFR: one changed Service
  costs one small UPDATE, whatever the size of the zone). The prerequisites keep
  this safe when the copy is behind: a change that finds the zone different from the
  copy is refused by the server, reported, and the zone is read again next time;
- a server that cannot be reached, refuses the key or fails is reported in one line
  and retried (1 s, doubling up to --interval); nothing is half-applied meanwhile.

A name wanted here but held by another owner, or by records no owner claims, is
reported once (naming both owners) and then each time who holds it changes. With
--status-file the outcome of every sync is written there as JSON (the revision of
the store it reflects, the changes, conflicts and problems), which tests wait on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from podnet.agent.cache import ObjectCache
from podnet.agent.follow import StoreFollower
from podnet.errors import PodnetError
from podnet.externaldns.endpoint import Endpoint, check_dns_name
from podnet.externaldns.plan import DomainFilter, Policy, calculate
from podnet.externaldns.registry import NameMapper, ZoneView, read_zone
from podnet.externaldns.rfc2136 import DNSServerError, RFC2136Provider, effect
from podnet.externaldns.source import ServiceSource
from podnet.model.objects import KINDS
from podnet.store import open_store
from podnet.store.objects import OBJECTS_PREFIX

log = logging.getLogger("podnet.externaldns")

RETRY_FIRST = 1.0


@dataclass(frozen=True)
class Settings:
    owner_id: str = "default"
    policy: Policy = "sync"
    domain_filter: DomainFilter = DomainFilter()
    managed_types: tuple[str, ...] = ("A", "AAAA", "CNAME")
    mapper: NameMapper = NameMapper()
    min_ttl: int = 0
    interval: float = 60.0
    min_event_sync_interval: float = 5.0
    dry_run: bool = False


@dataclass
class SyncReport:
    revision: int = 0
    full: bool = False
    created: int = 0
    updated: int = 0
    deleted: int = 0
    held_back: int = 0  # changes the policy did not allow
    messages: int = 0
    seconds: float = 0.0
    records: int = 0  # desired records in the zones
    conflicts: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # changes the server would not take
    problems: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("revision", "full", "created", "updated", "deleted", "held_back",
                                              "messages", "seconds", "records", "conflicts", "failed", "problems",
                                              "error")}


class Controller:
    """Plans and applies one sync at a time; keeps each zone as it last read and changed it."""

    def __init__(self, settings: Settings, provider: RFC2136Provider, source: ServiceSource):
        self.settings = settings
        self.provider = provider
        self.source = source
        self.views: dict[str, ZoneView] = {}
        self.stale: set[str] = set(provider.zones)
        self._conflicts_told: dict[tuple[str, str], str] = {}
        self._failed_told: dict[tuple[str, str], str] = {}
        self._problems_told: dict[str, list[str]] = {}

    def sync(self, full: bool = False) -> SyncReport:
        """Bring every zone to the desired records; DNSServerError if a server failed (the
        zones it concerned are read afresh next time)."""
        t0 = time.perf_counter()
        s = self.settings
        rev, endpoints, problems = self.source.snapshot()
        report = SyncReport(revision=rev, full=full)
        by_zone: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in endpoints:
            if not s.domain_filter.match(ep.name) or ep.type not in s.managed_types:
                continue
            zone = self.provider.zone_for(ep.name)
            if zone is None:
                problems.setdefault(ep.resource, []).append(
                    f"hostname {ep.name} is in none of the zones ({', '.join(self.provider.zones)})")
                continue
            txt = s.mapper.txt_name(ep.name, ep.type)
            try:
                if "*" in txt:
                    raise ValueError(f"would be named {txt}: set --txt-wildcard-replacement for wildcard names")
                check_dns_name(txt)
            except ValueError as e:
                problems.setdefault(ep.resource, []).append(f"hostname {ep.name}: its ownership record {e}")
                continue
            by_zone[zone].append(ep)
        self._tell_problems(problems)
        report.problems = problems
        held = set(problems)
        conflicts_now: dict[tuple[str, str], str] = {}
        failed_now: dict[tuple[str, str], str] = {}
        try:
            for zone in self.provider.zones:  # every zone read before any is changed
                if full or zone not in self.views or zone in self.stale:
                    self.views[zone] = self.provider.read(zone, s.mapper)
                    self.stale.discard(zone)
            for zone in self.provider.zones:
                view = self.views[zone]
                wanted = [ep for ep in by_zone.get(zone, ()) if ep.resource not in held]
                report.records += len(wanted)
                plan = calculate(wanted, view, owner_id=s.owner_id, mapper=s.mapper, policy=s.policy,
                                 domain_filter=s.domain_filter, managed_types=s.managed_types,
                                 hold=held.__contains__, min_ttl=s.min_ttl)
                report.held_back += plan.held_back
                for c in plan.conflicts:
                    conflicts_now[(c.name, c.type)] = c.describe(s.owner_id)
                if not plan.changes:
                    continue
                if s.dry_run:
                    for ch in plan.changes:
                        log.info("dry run: would %s", ch.describe())
                    continue
                try:
                    result = self.provider.apply(zone, plan.changes)
                except DNSServerError:
                    self.stale.add(zone)  # some changes may have landed: read it again
                    raise
                report.messages += result.messages
                rrsets = dict(view.records)
                for ch in result.applied:
                    log.info("%s", ch.describe())
                    effect(rrsets, ch)
                done = [ch.action for ch in result.applied]
                report.created += done.count("create")
                report.updated += done.count("update")
                report.deleted += done.count("delete")
                self.views[zone] = read_zone(zone, rrsets, s.mapper, view.serial)
                if result.lost or result.failed:
                    self.stale.add(zone)  # the zone is not what was read: read it again next time
                for ch, holder in result.lost:
                    conflicts_now[(ch.name, ch.type)] = (
                        f"{ch.name} {ch.type}: wanted by {ch.resource} but {holder} since the zone was read; "
                        f"this controller is owner {s.owner_id!r}: not touched")
                for ch, why, _ in result.failed:
                    failed_now[(ch.name, ch.type)] = f"{ch.describe()} for {ch.resource}: the server refused it: {why}"
        except DNSServerError as e:
            report.error = str(e)
            raise
        finally:
            self._tell_conflicts(conflicts_now)
            self._tell_failed(failed_now)
            report.conflicts = sorted(conflicts_now.values())
            report.failed = sorted(failed_now.values())
            report.seconds = round(time.perf_counter() - t0, 4)
        return report

    def _tell_conflicts(self, now: dict[tuple[str, str], str]) -> None:
        for key, text in now.items():
            if self._conflicts_told.get(key) != text:
                log.warning("conflict: %s", text)
        self._conflicts_told = now

    def _tell_failed(self, now: dict[tuple[str, str], str]) -> None:
        for key, text in now.items():
            if self._failed_told.get(key) != text:
                log.error("%s", text)
        self._failed_told = now

    def _tell_problems(self, problems: dict[str, list[str]]) -> None:
        for resource, msgs in problems.items():
            if self._problems_told.get(resource) != msgs:
                for m in msgs:
                    log.error("%s: %s; its records are left as they are", _service_ref(resource), m)
        for resource in set(self._problems_told) - set(problems):
            log.info("%s: its annotations parse again", _service_ref(resource))
        self._problems_told = problems


def _service_ref(resource: str) -> str:
    kind, _, rest = resource.partition("/")
    return f"Service {rest}" if kind == "service" else resource


def write_status(path: Path | None, report: SyncReport, owner: str) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"owner": owner, "time": time.time(), **report.to_json()}, indent=1) + "\n")
    os.replace(tmp, path)


def follow(url: str | None, source: ServiceSource) -> tuple[StoreFollower, int]:
    """The agent's follower feeding `source`, after its first list; the revision listed."""
    # Pods and slices come as their compact records (no model validation); Services as the
    # model: the source reads their annotations
    follower = StoreFollower(ObjectCache(unkept=KINDS, records=("Pod", "EndpointSlice")), [source], source.on_change,
                             prefix=OBJECTS_PREFIX)
    kv = open_store(url, create=False)
    try:
        rev = follower.relist(kv)
    finally:
        kv.close()
    return follower, rev


def sync_once(url: str | None, settings: Settings, provider: RFC2136Provider,
              source: ServiceSource | None = None) -> SyncReport:
    """List the store once and make one full sync (what --once does)."""
    source = source or ServiceSource()
    follow(url, source)
    return Controller(settings, provider, source).sync(full=True)


def run(url: str | None, settings: Settings, provider: RFC2136Provider, source: ServiceSource, *,
        once: bool = False, status_file: Path | None = None, stopping: threading.Event | None = None) -> int:
    """Follow the store and keep the zones in step until `stopping` is set (with `once`:
    one full sync, then return; its error is raised)."""
    stopping = stopping or threading.Event()
    ctl = Controller(settings, provider, source)
    follower, rev = follow(url, source)
    if once:
        try:
            report = ctl.sync(full=True)
        except DNSServerError as e:
            write_status(status_file, SyncReport(revision=rev, full=True, error=str(e)), settings.owner_id)
            raise
        write_status(status_file, report, settings.owner_id)
        _summary(report)
        return 0
    watcher = threading.Thread(target=follower.watch, args=(lambda: open_store(url, create=False), rev + 1),
                               name="watch", daemon=True)
    watcher.start()
    stop_waker = threading.Thread(target=lambda: (stopping.wait(), source.wake()), daemon=True)
    stop_waker.start()
    try:
        _loop(ctl, settings, source, status_file, stopping)
    finally:
        follower.stop()
    return 0


def _loop(ctl: Controller, s: Settings, source: ServiceSource, status_file: Path | None,
          stopping: threading.Event) -> None:
    next_full = 0.0  # a full sync first
    last = -1e9
    retry = RETRY_FIRST
    failing = False
    while not stopping.is_set():
        now = time.monotonic()
        if now < next_full:
            if not source.wait(next_full - now, stopping):
                continue  # woken by the stop, or the time has come: look again
            pause = last + s.min_event_sync_interval - time.monotonic()
            if pause > 0 and stopping.wait(pause):
                return
        full = time.monotonic() >= next_full
        last = time.monotonic()
        try:
            report = ctl.sync(full=full)
        except DNSServerError as e:
            write_status(status_file, SyncReport(revision=source.revision, full=full, error=str(e)), s.owner_id)
            log.error("%s; retrying in %gs", e, retry)
            failing = True
            if stopping.wait(retry):
                return
            retry = min(retry * 2, max(s.interval, RETRY_FIRST))
            next_full = 0.0  # read every zone afresh once it answers again
            continue
        if failing:
            log.info("the DNS server answers again")
            failing = False
        retry = RETRY_FIRST
        if full:
            next_full = time.monotonic() + s.interval
        write_status(status_file, report, s.owner_id)
        _summary(report)


def _summary(report: SyncReport) -> None:
    if report.created or report.updated or report.deleted:
        log.info("synced store revision %d%s: %d created, %d updated, %d deleted in %d UPDATE message%s (%.0f ms)",
                 report.revision, " (full)" if report.full else "", report.created, report.updated, report.deleted,
                 report.messages, "" if report.messages == 1 else "s", report.seconds * 1000)


__all__ = ["Controller", "PodnetError", "Settings", "SyncReport", "run"]
