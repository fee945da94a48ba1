"""A desired DNS record (ExternalDNS's "endpoint") and the syntax of what users type:
DNS names, TTLs and durations.

Names are kept lowercase, without the trailing dot. A name is accepted when every
label is 1-63 of a-z, 0-9, '-' and '_' (not starting or ending with '-'), the first
label may be '*', and the whole is at most 253 characters; anything else (spaces,
'!', non-ASCII, empty labels) is refused with the reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_NAME = 253
MAX_LABEL = 63
TTL_MAX = 2**31 - 1  # RFC 2181

_LABEL = re.compile(r"\A[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\Z")


@dataclass(frozen=True, order=True)
class Endpoint:
    """Records of one type at one name, wanted by one resource (`service/<ns>/<name>`).

    targets: sorted, canonical (IPs as ipaddress prints them; CNAME/SRV targets without
    the trailing dot); ttl None when the Service sets none (the default is then used,
    and a record's TTL is never compared)."""

    name: str
    type: str
    targets: tuple[str, ...]
    ttl: int | None
    resource: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.type)


def record_type(target: str) -> str:
    """A for an IPv4 address, AAAA for IPv6, CNAME for anything else (ExternalDNS's SuitableType)."""
    try:
        ip = ipaddress.ip_address(target)
    except ValueError:
        return "CNAME"
    return "A" if ip.version == 4 else "AAAA"


def canonical_target(target: str) -> str:
    try:
        return str(ipaddress.ip_address(target))
    except ValueError:
        return target.lower().rstrip(".")


def check_dns_name(name: str, *, wildcard: bool = True) -> str:
    """The name, lowercase and without a trailing dot; ValueError saying what is wrong."""
    if not name:
        raise ValueError("the name is empty")
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r} has non-ASCII characters: write an internationalised name in its "
                         "xn-- (punycode) form") from None
    low = name.lower()
    if low.endswith("."):
        low = low[:-1]
    if len(low) > MAX_NAME:
        raise ValueError(f"{name!r} is {len(low)} characters long: at most {MAX_NAME}")
    labels = low.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and wildcard and len(labels) > 1:
            continue
        if not label:
            raise ValueError(f"{name!r} has an empty label")
        if len(label) > MAX_LABEL:
            raise ValueError(f"{name!r}: label {label[:20]!r}... is {len(label)} characters long: at most {MAX_LABEL}")
        if not _LABEL.fullmatch(label):
            bad = sorted({c for c in label if not (c.isalnum() or c in "-_")})
            what = f"character {''.join(bad)!r} is" if bad else "labels may not start or end with '-'"
            raise ValueError(f"{name!r}: label {label!r}: " + (f"{what} not allowed (expected a-z, 0-9, '-', '_')"
                                                                 if bad else what))
    return low


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of a Go duration ("90s", "1m30s", "1.5h") or a plain number of seconds."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0 or value != value:
            raise ValueError(f"{text!r} is not a duration: expected seconds or e.g. 30s, 5m, 1h")
        return value
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a duration: expected seconds or e.g. 30s, 5m, 1h30m")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"{text!r} is not a duration: expected seconds or e.g. 30s, 5m, 1h30m")
    return total


def parse_ttl(text: str) -> int:
    """A TTL annotation: whole seconds ("300") or a Go duration ("5m"), 1 to 2^31-1."""
    try:
        seconds = int(parse_duration(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a TTL: expected seconds (300) or a duration (5m, 1h)") from None
    if not 1 <= seconds <= TTL_MAX:
        raise ValueError(f"{text!r} is out of range: a TTL is 1 to {TTL_MAX} seconds")
    return seconds
