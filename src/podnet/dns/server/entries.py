"""Rendered zone answers: the entries of the index's response table.

The slow path renders an entry once per question (lower-cased name, type,
class) from the index's Answer; the fast path serves it by splicing the
query's ID and question between a precomputed header and the rendered sections.
"""

from __future__ import annotations

import struct

from podnet.dns import wire
from podnet.dns.index import Answer
from podnet.dns.server.query import fast_safe
from podnet.dns.wire import AA, CD, NXDOMAIN, QR, RA, RD

# kinds of rendered zone answers; SLOW_ONLY is added for those the fast path must not serve
FINAL, CHASE, AUTOPATH, SLOW_ONLY = 0, 1, 2, 8
OPT_PLAIN = wire.opt_rr(False)
OPT_DO = wire.opt_rr(True)

_SHARED: dict[tuple, tuple] = {}  # identical headers / counts are shared between cached entries


def _shared(value: tuple) -> tuple:
    if len(_SHARED) > 100_000:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def entry_from_answer(ans: Answer, lname: bytes, typeclass: bytes) -> tuple:
    """A rendered zone answer: (kind, header variants, sections, extra, (rcode, an, ns, ar)).

    Header variant i: RD = i & 1, CD = i & 2, one more additional record (our OPT) = i & 4.
    """
    body, _ = wire.render(lname, ans.answer, ans.authority, ans.additional)
    an, ns, ar = len(ans.answer), len(ans.authority), len(ans.additional)
    base = QR | AA | RA | ans.rcode
    meta = _shared((ans.rcode, an, ns, ar))
    hdrs = _SHARED.get(("hdrs", *meta))
    if hdrs is None:
        hdrs = tuple(struct.pack("!HHHHH", base | (RD if i & 1 else 0) | (CD if i & 2 else 0), 1, an, ns,
                                 ar + (1 if i & 4 else 0)) for i in range(8))
        _SHARED[("hdrs", *meta)] = hdrs
    slow = 0 if fast_safe(typeclass) else SLOW_ONLY
    if ans.chase is not None:
        return (CHASE + slow, hdrs, body, ans.chase, meta)
    if ans.rcode == NXDOMAIN and ans.autopath_ns is not None:
        return (AUTOPATH + slow, hdrs, body, ans.autopath_ns, meta)
    return (FINAL + slow, hdrs, body, None, meta)
