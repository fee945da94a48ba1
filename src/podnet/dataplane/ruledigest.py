"""What a table's rules say, per chain, as a short digest: a rule replaced by another
behind podnet's back (`nft replace rule ... handle N accept` where podnet wrote a drop,
a DNAT pointed elsewhere) leaves every chain's rule count as it was, but not its digest.

The digest is taken over the rules' netlink expressions as the kernel dumps them, with
what the kernel changes by itself masked: a counter's packets and bytes, a quota's
consumed bytes and its depleted flag, `last`'s timestamp (dumped twice around traffic,
nothing else moved; handles and comments are not part of the expressions).

The reference digest is a dump taken right after podnet's own write of the structure,
not one rendered from what podnet wrote: nft, not podnet, turns rule text into
expressions (and names anonymous sets `__setN` as it goes), so only the kernel's own
encoding agrees with a later dump byte for byte.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import NamedTuple

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.netlink import attr_list, attrs

QUOTA_FLAGS, QUOTA_CONSUMED = 2, 4  # NFTA_QUOTA_*
QUOTA_DEPLETED = 0x2  # NFT_QUOTA_F_DEPLETED: set by the kernel once the quota is used up
_LEN = struct.Struct("=I")
_U32 = struct.Struct("!I")


def _quota(data: bytes) -> bytes:
    """A quota's bytes and whether it is inverted (`over`), without what it consumed."""
    out = []
    for k, v in attr_list(data):
        if k == QUOTA_CONSUMED:
            continue
        if k == QUOTA_FLAGS and len(v) == 4:
            v = _U32.pack(_U32.unpack(v)[0] & ~QUOTA_DEPLETED)
        out.append(_LEN.pack(k) + _LEN.pack(len(v)) + v)
    return b"".join(out)


# expression -> what of its data stays while packets pass (counter: nothing of packets and
# bytes; last: nothing of when it last matched)
_VOLATILE = {b"counter": lambda data: b"", b"quota": _quota, b"last": lambda data: b""}
_HINTS = tuple(name + b"\0" for name in _VOLATILE)  # their names as dumped: most rules hold none
assert _HINTS == (b"counter\0", b"quota\0", b"last\0")  # as chain_digests tests them, unrolled


class ChainDigest(NamedTuple):
    rules: int
    digest: bytes


def masked(expressions: bytes) -> bytes:
    """A rule's expressions with what changes without a write left out (a byte string to
    hash, not a netlink message)."""
    if not any(h in expressions for h in _HINTS):
        return expressions  # most rules: no counter, nothing to parse
    out = []
    for _, expr in attr_list(expressions):
        a = attrs(expr)
        name = a.get(nl.EXPR_NAME, b"").split(b"\0", 1)[0]
        if name not in _VOLATILE:
            out.append(_LEN.pack(len(expr)) + expr)
            continue
        kept = _VOLATILE[name](a.get(nl.EXPR_DATA, b""))
        out.append(b"masked " + name + b"\0" + kept)
    return b"".join(out)


def chain_digests(rules: Iterable[tuple[str, bytes]]) -> dict[str, ChainDigest]:
    """(chain, expressions) of every rule, in the kernel's order -> chain -> its digest."""
    bodies: dict[str, list[bytes]] = {}
    for chain, expressions in rules:
        if b"counter\0" in expressions or b"quota\0" in expressions or b"last\0" in expressions:
            expressions = masked(expressions)
        # each rule with its length: two rules are not one rule of both
        bodies.setdefault(chain, []).append(_LEN.pack(len(expressions)) + expressions)
    return {c: ChainDigest(len(b), hashlib.blake2b(b"".join(b), digest_size=16).digest()) for c, b in bodies.items()}


def read_digests(link: nl.Netlink, table: str, chains: Iterable[str] | None = None) -> dict[str, ChainDigest]:
    """One dump of the table's rules (or one per chain of these), as chain digests; chains
    without rules (or not there) are left out. Raises OSError if the table is not there."""
    if chains is None:
        return chain_digests(link.rule_expressions(table))
    out: dict[str, ChainDigest] = {}
    for chain in chains:
        out.update(chain_digests(link.rule_expressions(table, chain)))
    return out


def read_table_digests(table: str, chains: Iterable[str] | None = None) -> dict[str, ChainDigest] | None:
    """The digests of a table of this network namespace, or of these chains of it (None: no
    such table)."""
    link = nl.Netlink()
    try:
        return read_digests(link, table, chains)
    except OSError:
        return None
    finally:
        link.close()


def differing(expected: dict[str, ChainDigest], found: dict[str, ChainDigest] | None,
              chains: Iterable[str] | None = None) -> list[str]:
    """The chains (of `chains`, default: every expected one) whose rules are not the ones
    podnet wrote, each with why."""
    if found is None:
        return ["table missing"]
    out = []
    for name in expected if chains is None else chains:
        want, got = expected.get(name), found.get(name)
        if want is None or got == want:
            continue
        if got is None or got.rules != want.rules:
            out.append(f"chain {name} has {got.rules if got else 0} rules, {want.rules} expected")
        else:
            out.append(f"chain {name}: a rule differs from what podnet wrote")
    return out
