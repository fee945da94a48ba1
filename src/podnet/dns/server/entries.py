"""Rendered zone answers: the entries of the index's response table.

The slow path renders an entry once per question (lower-cased name, type,
class) from the index's Answer; the fast path serves it by splicing the
query's ID and question between a precomputed header and the rendered sections.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from podnet.dns import wire
from podnet.dns.index import Answer
from podnet.dns.server.query import fast_safe
from podnet.dns.wire import AA, CD, NXDOMAIN, QR, RA, RD

# kinds of rendered zone answers; SLOW_ONLY is added for those the fast path must not serve
FINAL, CHASE, AUTOPATH, SLOW_ONLY = 0, 1, 2, 8
OPT_PLAIN = wire.opt_rr(False)
OPT_DO = wire.opt_rr(True)


class Counts(NamedTuple):
    """The rcode and section counts of a rendered answer (shared between entries)."""

    rcode: int
    an: int
    ns: int
    ar: int


# Not a NamedTuple: the UDP fast path reads these fields for every packet, and CPython
# specialises reads of slots (as fast as tuple indexing) but not of NamedTuple fields.
@dataclass(slots=True, eq=False)
class ZoneEntry:
    """A rendered zone answer, the value of the index's response table for one question."""

    kind: int  # FINAL, CHASE or AUTOPATH, plus SLOW_ONLY when the fast path must not serve it
    hdrs: tuple[bytes, ...]  # header variants after the ID: RD = i & 1, CD = i & 2, our OPT counted = i & 4
    body: bytes  # the sections after the question, compressed against the lower-case name
    extra: bytes | str | None  # CHASE: the CNAME target to resolve; AUTOPATH: the namespace whose pods search
    meta: Counts
    stat: int = 0  # where the fast path counts an answer from it (wire.answer_stat)


_SHARED: dict[tuple, tuple] = {}  # identical headers / counts are shared between cached entries


def _shared(value: tuple) -> tuple:
    if len(_SHARED) > 100_000:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def entry_from_answer(ans: Answer, lname: bytes, typeclass: bytes) -> ZoneEntry:
    """The rendered zone answer for the index's Answer to a lower-case name and type/class bytes."""
    body, _ = wire.render(lname, ans.answer, ans.authority, ans.additional)
    an, ns, ar = len(ans.answer), len(ans.authority), len(ans.additional)
    base = QR | AA | RA | ans.rcode
    meta = _shared(Counts(ans.rcode, an, ns, ar))
    hdrs = _SHARED.get(("hdrs", *meta))
    if hdrs is None:
        hdrs = tuple(struct.pack("!HHHHH", base | (RD if i & 1 else 0) | (CD if i & 2 else 0), 1, an, ns,
                                 ar + (1 if i & 4 else 0)) for i in range(8))
        _SHARED[("hdrs", *meta)] = hdrs
    slow = 0 if fast_safe(typeclass) else SLOW_ONLY
    stat = wire.answer_stat(ans.rcode, typeclass)
    if ans.chase is not None:
        return ZoneEntry(CHASE + slow, hdrs, body, ans.chase, meta, stat)
    if ans.rcode == NXDOMAIN and ans.autopath_ns is not None:
        return ZoneEntry(AUTOPATH + slow, hdrs, body, ans.autopath_ns, meta, stat)
    return ZoneEntry(FINAL + slow, hdrs, body, None, meta, stat)
