"""Desired records x the zone as read -> the changes to make, per (name, type), and the
names this owner may not touch.

    desired, no record, no owner        create   (prerequisite: the RRset and its TXT are absent)
    desired, owned by this owner        update   if the targets, a set TTL or the TXT differ;
                                        create   if the owner TXT is there but the records are gone
    desired, owned by another owner     conflict (reported, never touched)
    desired, records without an owner   conflict (a record made by hand: never touched)
    not desired, owned by this owner    delete
    anything else                       left alone

Policies (ExternalDNS's): sync does all of it; upsert-only never deletes; create-only
only creates. A create at a name where another owner (or a person) holds records of
another managed type is a conflict too, as ExternalDNS plans it. Names outside the
domain filter are never looked at; resources on `hold` (a Service whose annotations do
not parse) keep their records exactly as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from podnet.externaldns.endpoint import Endpoint
from podnet.externaldns.registry import NameMapper, Ownership, RRset, ZoneView, format_labels

Policy = Literal["sync", "upsert-only", "create-only"]
POLICIES: tuple[Policy, ...] = ("sync", "upsert-only", "create-only")
DEFAULT_TTL = 300  # seconds, when the Service sets none


@dataclass(frozen=True)
class Change:
    """One change to one (name, type): the unit an UPDATE makes all or nothing.

    owner_txt: the registry TXT as read (create: None, or this owner's TXT whose records
    are gone), which the UPDATE requires unchanged; txt_name/txt_value: the registry
    record to hold after a create or update."""

    action: Literal["create", "update", "delete"]
    name: str
    type: str
    ttl: int
    targets: tuple[str, ...]  # to hold afterwards (delete: none)
    before: RRset | None
    owner_txt: Ownership | None
    txt_name: str
    txt_value: str | None
    resource: str | None
    also_delete: tuple[tuple[str, str], ...] = ()  # (name, TXT rdata text): this owner's stale registry records

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.type)

    def describe(self) -> str:
        if self.action == "delete":
            return f"delete {self.name} {self.type}"
        shown = ",".join(self.targets[:4]) + (f",... ({len(self.targets)} in all)" if len(self.targets) > 4 else "")
        return f"{self.action} {self.name} {self.type} {shown} (ttl {self.ttl})"


@dataclass(frozen=True)
class Conflict:
    name: str
    type: str
    wanted_by: str  # resource
    owner: str | None  # None: records without an ownership TXT (made by hand)
    owner_resource: str | None = None

    def describe(self, me: str) -> str:
        held = (f"owned by owner {self.owner!r}" + (f" ({self.owner_resource})" if self.owner_resource else "")
                if self.owner is not None else "held by records no owner claims (made outside ExternalDNS)")
        return (f"{self.name} {self.type}: wanted by {self.wanted_by} but {held}; this controller is owner "
                f"{me!r}: not touched")


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    held_back: int = 0  # changes the policy did not allow

    def by_action(self) -> dict[str, int]:
        out = {"create": 0, "update": 0, "delete": 0}
        for c in self.changes:
            out[c.action] += 1
        return out


@dataclass(frozen=True)
class DomainFilter:
    """ExternalDNS's domain filter: a name matches a domain if it is the domain or under
    it ("." first: only under it); no domains match everything; excluded ones never."""

    domains: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @staticmethod
    def _under(name: str, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if d.startswith("."):
            return name.endswith(d)
        return name == d or name.endswith("." + d)

    def match(self, name: str) -> bool:
        if any(self._under(name, d) for d in self.exclude):
            return False
        return not self.domains or any(self._under(name, d) for d in self.domains)


def merge(endpoints: Iterable[Endpoint]) -> dict[tuple[str, str], Endpoint]:
    """One Endpoint per (name, type): Services wanting the same name add their targets to
    the first one by resource name, which owns it (ExternalDNS's service source merge)."""
    out: dict[tuple[str, str], Endpoint] = {}
    for ep in sorted(endpoints, key=lambda e: (e.resource, e.name, e.type)):
        have = out.get(ep.key)
        if have is None:
            out[ep.key] = ep
        elif ep.type != "CNAME":
            out[ep.key] = Endpoint(have.name, have.type, tuple(sorted(set(have.targets) | set(ep.targets))),
                                   have.ttl, have.resource)
    return out


def calculate(desired: Iterable[Endpoint], zone: ZoneView, *, owner_id: str, mapper: NameMapper,
              policy: Policy = "sync", domain_filter: DomainFilter = DomainFilter(),
              managed_types: Iterable[str] = ("A", "AAAA", "CNAME"), hold: Callable[[str], bool] = lambda r: False,
              min_ttl: int = 0) -> Plan:
    """The changes that bring `zone` to the desired records (all in this zone)."""
    managed = frozenset(managed_types)
    wanted = {k: ep for k, ep in merge(desired).items()
              if ep.type in managed and domain_filter.match(ep.name)}
    plan = Plan()
    keys = set(wanted)
    keys |= {k for k in zone.records if k[1] in managed and domain_filter.match(k[0])}
    keys |= {k for k in zone.owners if k[1] in managed and domain_filter.match(k[0])}
    for key in sorted(keys):
        name, rtype = key
        ep = wanted.get(key)
        current = zone.records.get(key)
        own = zone.owners.get(key)
        mine = own is not None and own.owner == owner_id
        if own is not None and own.resource and hold(own.resource):
            continue  # its Service's annotations are broken: leave its records as they are
        if ep is None:
            if mine and (current is not None or not own.old_format):
                _allow(plan, policy, _delete(key, current, own, mapper, zone.old_owners.get(name)))
            continue
        if ep is not None and hold(ep.resource):
            continue
        ttl = max(ep.ttl if ep.ttl is not None else DEFAULT_TTL, min_ttl)
        if own is None and current is None:
            blocker = _other_owner_at(zone, name, rtype, owner_id, managed)
            if blocker is not None:
                plan.conflicts.append(Conflict(name, rtype, ep.resource, *blocker))
                continue
            _allow(plan, policy, Change("create", name, rtype, ttl, ep.targets, None, None,
                                        mapper.txt_name(name, rtype), format_labels(owner_id, ep.resource),
                                        ep.resource))
        elif not mine:
            plan.conflicts.append(Conflict(name, rtype, ep.resource, own.owner if own else None,
                                           own.resource if own else None))
        else:
            assert own is not None
            value = format_labels(owner_id, ep.resource)
            txt_name = mapper.txt_name(name, rtype)
            txt_ok = not own.old_format and own.text == value and own.txt_name == txt_name
            if current is None:
                _allow(plan, policy, Change("create", name, rtype, ttl, ep.targets, None, own, txt_name, value,
                                            ep.resource))
            elif current.values != ep.targets or (ep.ttl is not None and current.ttl != ttl) or not txt_ok:
                _allow(plan, policy, Change("update", name, rtype, ttl if ep.ttl is not None else current.ttl,
                                            ep.targets, current, own, txt_name, value, ep.resource))
    return plan


def _delete(key: tuple[str, str], current: RRset | None, own: Ownership, mapper: NameMapper,
            old: Ownership | None) -> Change:
    """Delete the records and this owner's registry record, and an old-format one of this
    owner at the name too (left from before a migration to the new format)."""
    extra = ((old.txt_name, old.value),) if (old is not None and old is not own and old.owner == own.owner
                                             and key[1] != "AAAA") else ()
    return Change("delete", key[0], key[1], current.ttl if current else 0, (), current, own,
                  mapper.txt_name(*key), None, own.resource, extra)


def _other_owner_at(zone: ZoneView, name: str, rtype: str, owner_id: str,
                    managed: frozenset[str]) -> tuple[str | None, str | None] | None:
    """Another owner's (or nobody's) records of a managed type at `name`, which keep this
    owner from creating there: (owner, resource), or None if the name is free for it."""
    for t in sorted(managed):
        if t == rtype:
            continue
        own = zone.owners.get((name, t))
        if (name, t) in zone.records or own is not None:
            if own is None:
                return (None, None)
            if own.owner != owner_id:
                return (own.owner, own.resource)
    return None


def _allow(plan: Plan, policy: Policy, change: Change) -> None:
    if policy == "sync" or (policy == "upsert-only" and change.action != "delete") or change.action == "create":
        plan.changes.append(change)
    else:
        plan.held_back += 1
