"""The TXT registry, in ExternalDNS's format, and the zone as it was read.

Ownership of the records of one type at one name is a TXT record beside them:

    a-web.example.org.  TXT  "heritage=external-dns,external-dns/owner=<id>,external-dns/resource=service/<ns>/<name>"

named `<type>-<first label>` plus the rest of the name (ExternalDNS's "new format",
written since v0.12), with an optional --txt-prefix or --txt-suffix around the first
label (`%{record_type}` in either places the type there instead). ExternalDNS of
today writes only this record; it still reads the old format (the TXT record at the
record's own name, for every type but AAAA), and so does this registry, so a zone
ExternalDNS manages reads the same here. Values are parsed as ExternalDNS does:
`key=value` pairs separated by commas, `heritage=external-dns` required, other keys
under `external-dns/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HERITAGE = "external-dns"
OWNER = "owner"
RESOURCE = "resource"
TYPE_TEMPLATE = "%{record_type}"
# the record types ExternalDNS's name mapper recognises in a TXT record's name
KNOWN_TYPES = ("A", "AAAA", "CNAME", "NS", "MX", "PTR", "SRV", "NAPTR", "TXT", "DNAME")


def format_labels(owner: str, resource: str | None) -> str:
    """The TXT value for these labels (keys sorted, as ExternalDNS serialises them)."""
    labels = {OWNER: owner}
    if resource:
        labels[RESOURCE] = resource
    return ",".join([f"heritage={HERITAGE}"] + [f"{HERITAGE}/{k}={labels[k]}" for k in sorted(labels)])


def parse_labels(text: str) -> dict[str, str] | None:
    """The labels of a registry TXT value; None if it is not one (no heritage=external-dns)."""
    text = text.strip('"')
    labels: dict[str, str] = {}
    found = False
    for token in text.split(","):
        key, sep, value = token.partition("=")
        if not sep:
            continue
        if key == "heritage":
            if value != HERITAGE:
                return None
            found = True
        elif key.startswith(HERITAGE + "/"):
            labels[key[len(HERITAGE) + 1:]] = value
    return labels if found else None


def check_owner_id(owner: str) -> str:
    if not owner:
        raise ValueError("the owner id is empty")
    bad = sorted({c for c in owner if c in ',="\\' or c.isspace() or not c.isprintable()})
    if bad:
        raise ValueError(f"owner id {owner!r} has {''.join(bad)!r}: the TXT format separates fields with ',' and '='")
    return owner


@dataclass(frozen=True)
class NameMapper:
    """ExternalDNS's AffixNameMapper: record name and type <-> registry TXT name."""

    prefix: str = ""
    suffix: str = ""
    wildcard_replacement: str = ""

    def __post_init__(self) -> None:
        if self.prefix and self.suffix:
            raise ValueError("--txt-prefix and --txt-suffix are mutually exclusive")
        object.__setattr__(self, "prefix", self.prefix.lower())
        object.__setattr__(self, "suffix", self.suffix.lower())
        object.__setattr__(self, "wildcard_replacement", self.wildcard_replacement.lower())

    @property
    def _type_in_affix(self) -> bool:
        return TYPE_TEMPLATE in self.prefix or TYPE_TEMPLATE in self.suffix

    def txt_name(self, name: str, rtype: str) -> str:
        first, dot, rest = name.partition(".")
        t = rtype.lower()
        prefix = self.prefix.replace(TYPE_TEMPLATE, t)
        suffix = self.suffix.replace(TYPE_TEMPLATE, t)
        if self.wildcard_replacement and first == "*":
            first = self.wildcard_replacement
        if not self._type_in_affix:
            first = f"{t}-{first}"
        return prefix + first + suffix + (dot + rest if dot else "")

    def endpoint_name(self, txt_name: str) -> tuple[str, str] | None:
        """(record name, type) a registry TXT name stands for; type "" for the old format
        (the TXT at the record's own name); None if the name does not fit the affix."""
        name = txt_name.lower()
        if self.suffix:
            dots = self.suffix.count(".")
            parts = name.split(".", 1 + dots)
            if len(parts) <= dots:
                return None
            head = ".".join(parts[:1 + dots])
            tail = parts[1 + dots] if len(parts) > 1 + dots else ""
            got = self._drop_affix(head)
            if got is None:
                return None
            return (got[0] + ("." + tail if tail else ""), got[1])
        return self._drop_affix(name)

    def _drop_affix(self, name: str) -> tuple[str, str] | None:
        prefix, suffix = self.prefix, self.suffix
        if self._type_in_affix:
            for t in KNOWN_TYPES:
                p, s = prefix.replace(TYPE_TEMPLATE, t.lower()), suffix.replace(TYPE_TEMPLATE, t.lower())
                if not suffix and name.startswith(p):
                    return self._wildcard(name[len(p):]), t
                if suffix and name.endswith(s):
                    return self._wildcard(name[:len(name) - len(s)]), t
            prefix, suffix = prefix.replace(TYPE_TEMPLATE, ""), suffix.replace(TYPE_TEMPLATE, "")
        if not suffix:
            if not name.startswith(prefix):
                return None
            stripped = name[len(prefix):]
        else:
            if not name.endswith(suffix):
                return None
            stripped = name[:len(name) - len(suffix)]
        head, sep, rest = stripped.partition("-")
        for t in KNOWN_TYPES:
            if sep and head == t.lower():
                return self._wildcard(rest), t
        return stripped, ""

    def _wildcard(self, name: str) -> str:
        if self.wildcard_replacement:
            first, dot, rest = name.partition(".")
            if first == self.wildcard_replacement:
                return "*" + dot + rest
        return name


@dataclass(frozen=True)
class RRset:
    """ttl and sorted values (A/AAAA: the address; CNAME, SRV: the target without its dot;
    TXT and others: the rdata text, exactly as the server has it); for TXT, `texts` holds
    each value's strings joined, in the same order."""

    ttl: int
    values: tuple[str, ...]
    texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ownership:
    """Who owns (name, type), and the registry TXT record that says so, as read: its
    RRset is what an UPDATE's prerequisite requires, unchanged."""

    owner: str
    resource: str | None
    txt_name: str
    txt_rrset: tuple[str, ...]  # every TXT rdata at txt_name, as read (rdata text)
    value: str  # the registry record among them (rdata text) ...
    text: str  # ... and its string
    old_format: bool = False  # the TXT at the record's own name


@dataclass
class ZoneView:
    """A zone's records by (name, type) and the ownership of each (name, type) found in it."""

    zone: str
    records: dict[tuple[str, str], RRset] = field(default_factory=dict)
    owners: dict[tuple[str, str], Ownership] = field(default_factory=dict)
    old_owners: dict[str, Ownership] = field(default_factory=dict)  # old-format TXT by record name
    serial: int | None = None

    def names(self) -> set[str]:
        return {n for n, _ in self.records} | {n for n, _ in self.owners}


def read_zone(zone: str, rrsets: dict[tuple[str, str], RRset], mapper: NameMapper,
              serial: int | None = None) -> ZoneView:
    """The view of a zone from its RRsets (as an AXFR gives them): registry TXT records
    become the ownership of what they name (the new format first, else the old one except
    for AAAA, as ExternalDNS reads them); every other record stays a record."""
    view = ZoneView(zone, serial=serial)
    new: dict[tuple[str, str], Ownership] = {}
    old: dict[str, Ownership] = {}
    for (name, rtype), rrset in rrsets.items():
        view.records[(name, rtype)] = rrset
        if rtype != "TXT":
            continue
        for value, text in zip(rrset.values, rrset.texts, strict=True):
            labels = parse_labels(text)
            if labels is None or OWNER not in labels:
                continue
            target = mapper.endpoint_name(name)
            if target is None:
                continue
            own = Ownership(labels[OWNER], labels.get(RESOURCE), name, rrset.values, value, text,
                            old_format=target[1] == "")
            if target[1]:
                new.setdefault(target, own)
            else:
                old.setdefault(name, own)
            break
    view.owners.update(new)
    view.old_owners.update(old)
    for (name, rtype) in list(view.records):
        if rtype in ("TXT",) or (name, rtype) in view.owners or rtype == "AAAA":
            continue
        if name in old:
            view.owners[(name, rtype)] = old[name]
    return view
