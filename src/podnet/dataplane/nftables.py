"""A typed nftables layer: tables, chains, sets, maps, rules and elements as objects,
and verbs on them collected in a Transaction (after kubernetes-sigs/knftables).

One definition, three forms:

- `Transaction.script()`: the `nft -f` text (structure, and what logs show);
- `Transaction.batch()`: the same transaction as one netlink batch when it only adds or
  deletes elements of sets whose types this module encodes (no `nft` process);
- `read_ruleset()`: what the kernel holds, read back with netlink dumps, in the same
  stable form (`Ruleset.dump()`) that the in-memory fake of the tests produces.

Every name and every piece of text is checked when an operation is queued: identifiers
are plain words, rule and element text cannot end a statement or start a comment, and
comments are sanitised. Text that comes from user objects must not be put in rules at
all: derive identifiers from it (hashes) instead.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from typing import NamedTuple

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nft import NftError, nft_apply

__all__ = [
    "Chain", "Chains", "Elements", "Map", "NftRunner", "Rule", "Ruleset", "Set", "Table", "Transaction",
    "read_ruleset",
]

VERBS = ("add", "create", "insert", "replace", "delete", "flush")
# an identifier as nft's scanner reads one unquoted (letters, digits, `/ - _ .`; kube-proxy's
# chains are named `service-<hash>-<namespace>/<name>/<protocol>/<port>`)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]{0,255}")
# rule text: no statement separator, newline, comment or string (nothing can be smuggled in)
UNSAFE_CHARS = "\n\r\0;#\"\\"


def unsafe_text(text: str) -> bool:
    """Whether text holds a character rule text must not (a substring test per character:
    over a table's thousands of rules joined, 20x faster than a regex character class)."""
    return any(c in text for c in UNSAFE_CHARS)


ELEMENT_TEXT = re.compile(r"[A-Za-z0-9_.:/, \-]*")
CHUNK = 2000  # elements per `add element` line


class NftDefinitionError(NftError, ValueError):
    """An object or operation that cannot be rendered safely."""


_CHECKED: set[str] = set()  # names already found plain (checked once, then a set lookup)


def check_name(name: str, what: str = "name") -> str:
    if name in _CHECKED:
        return name
    if not NAME.fullmatch(name):
        raise NftDefinitionError(f"nftables {what} {name!r} is not a plain identifier")
    if len(_CHECKED) < 1 << 16:
        _CHECKED.add(name)
    return name


def comment_text(text: str) -> str:
    """A comment as nft can hold it: quotes and control characters replaced, at most 128 bytes."""
    clean = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in text)
    return clean.encode()[:128].decode(errors="ignore")


def _comment(c: str | None) -> str:
    return f' comment "{comment_text(c)}"' if c else ""


# ------------------------------------------------------------------ objects


@dataclass(frozen=True)
class Table:
    name: str
    family: str = "ip"
    comment: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "table")
        if self.family not in ("ip", "ip6", "inet", "arp", "bridge", "netdev"):
            raise NftDefinitionError(f"unknown nftables family {self.family!r}")

    @property
    def ref(self) -> str:
        return f"{self.family} {self.name}"


_NAMES = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_./\-]{0,255}\n)*")


def check_names(names: Iterable[str], what: str = "name") -> list[str]:
    """check_name for many names at once (one pass over them all)."""
    todo = [n for n in names if n not in _CHECKED]
    if todo and not _NAMES.fullmatch("\n".join(todo) + "\n"):
        for n in todo:
            check_name(n, what)  # raises, naming the first bad one
    if len(_CHECKED) < 1 << 16:
        _CHECKED.update(todo)
    return todo


class _ChainFields(NamedTuple):
    name: str
    type: str | None = None
    hook: str | None = None
    priority: str | int | None = None
    policy: str | None = None
    comment: str | None = None


class Chain(_ChainFields):
    """A chain; with a hook it is a base chain (type, hook and priority required).
    (An immutable tuple: tables hold thousands of chains and rules.)"""

    __slots__ = ()

    def __new__(cls, name: str, type: str | None = None, hook: str | None = None,
                priority: str | int | None = None, policy: str | None = None, comment: str | None = None):
        if type is None and hook is None and priority is None and policy is None:  # a regular chain
            if name not in _CHECKED:
                check_name(name, "chain")
            return tuple.__new__(cls, (name, None, None, None, None, comment))
        check_name(name, "chain")
        if hook is not None or type is not None or priority is not None:
            if hook is None or type is None or priority is None:
                raise NftDefinitionError(f"chain {name}: a base chain needs type, hook and priority, "
                                         "a regular chain none of them")
            check_name(type, "chain type")
            check_name(hook, "hook")
            priority_value(priority)
        if policy not in (None, "accept", "drop"):
            raise NftDefinitionError(f"chain {name}: policy {policy!r}")
        return tuple.__new__(cls, (name, type, hook, priority, policy, comment))

    @classmethod
    def regular(cls, names: Iterable[str]) -> list[Chain]:
        """Regular chains by name, checked together."""
        names = list(names)
        check_names(names, "chain")
        none = repeat(None)
        return list(map(tuple.__new__, repeat(cls), zip(names, none, none, none, none, none, strict=False)))

    def spec(self) -> str:
        if self.hook is None:
            return ""
        policy = f" policy {self.policy};" if self.policy else ""
        return f"type {self.type} hook {self.hook} priority {self.priority};{policy}"


class _RuleFields(NamedTuple):
    chain: str
    rule: str
    comment: str | None = None
    handle: int | None = None  # replace/delete a rule, or add after / insert before it


class Rule(_RuleFields):
    """One rule of a chain, as nft text (an immutable tuple, checked when made)."""

    __slots__ = ()

    def __new__(cls, chain: str, rule: str, comment: str | None = None, handle: int | None = None):
        if chain not in _CHECKED:
            check_name(chain, "chain")
        if not rule or unsafe_text(rule):
            raise NftDefinitionError(f"rule text {rule!r} in chain {chain} is not safe to render")
        return tuple.__new__(cls, (chain, rule, comment, handle))

    @classmethod
    def many(cls, chain: str, rules: Iterable[str]) -> list[Rule]:
        """Rules of one chain, checked together (a chain's rules, in order)."""
        return cls.bulk((chain, text) for text in rules)

    @classmethod
    def bulk(cls, rules: Iterable[tuple[str, str]]) -> list[Rule]:
        """(chain, rule text) pairs, checked together, as rules."""
        pairs = list(rules)
        chains = [c for c, _ in pairs]
        check_names(set(chains), "chain")
        texts = [text for _, text in pairs]
        if not all(texts) or unsafe_text(" ".join(texts)):
            for chain, text in pairs:
                cls(chain, text)  # raises, naming the rule
        return list(map(tuple.__new__, repeat(cls), zip(chains, texts, repeat(None), repeat(None))))


class _SetFields(NamedTuple):
    name: str
    type: str | None = None
    typeof: str | None = None
    flags: tuple[str, ...] = ()
    size: int | None = None
    timeout: str | None = None  # e.g. "3h"
    comment: str | None = None


_CHECKED_DECLS: set[tuple[str, str]] = set()


class Set(_SetFields):
    """A named set; `type` (e.g. "ipv4_addr . inet_service") or `typeof` (expressions).
    (An immutable tuple, checked when made.)"""

    __slots__ = ()
    kind = "set"

    def __new__(cls, name: str, type: str | None = None, typeof: str | None = None, flags: tuple[str, ...] = (),
                size: int | None = None, timeout: str | None = None, comment: str | None = None):
        check_name(name, cls.kind)
        if (type is None) == (typeof is None):
            raise NftDefinitionError(f"{cls.kind} {name}: give type or typeof")
        decl = type or typeof or ""
        if (cls.kind, decl) not in _CHECKED_DECLS:
            if unsafe_text(decl) or "{" in decl or "}" in decl:
                raise NftDefinitionError(f"{cls.kind} {name}: type {decl!r} is not safe to render")
            if cls.kind == "map" and " : " not in decl:
                raise NftDefinitionError(f"map {name}: the type needs a ' : ' between key and value")
            if cls.kind == "set" and " : " in decl:
                raise NftDefinitionError(f"set {name}: a type with a value is a map")
            _CHECKED_DECLS.add((cls.kind, decl))
        flags = tuple(flags)
        for f in flags:
            if f not in ("constant", "dynamic", "interval", "timeout"):
                raise NftDefinitionError(f"{cls.kind} {name}: unknown flag {f!r}")
        if timeout is not None:
            seconds(timeout)
        if size is not None:
            size = int(size)
        return tuple.__new__(cls, (name, type, typeof, flags, size, timeout, comment))

    @classmethod
    def named(cls, names: Iterable[str], **decl) -> list[Set]:
        """Sets (or maps) of one declaration under many names, checked together."""
        names = list(names)
        if not names:
            return []
        first = cls(names[0], **decl)
        check_names(names, cls.kind)
        new, rest = tuple.__new__, first[1:]
        return [first, *(new(cls, (name, *rest)) for name in names[1:])]

    def decl(self) -> str:
        return _decl(self[1:])

    @property
    def interval(self) -> bool:
        return "interval" in self.flags


@lru_cache(maxsize=256)
def _decl(fields: tuple) -> str:
    """A set's declaration from its fields after the name (sets of one shape share it)."""
    type_, typeof, flags, size, timeout, comment = fields
    parts = [f"type {type_};" if type_ else f"typeof {typeof};"]
    if flags:
        parts.append(f"flags {','.join(flags)};")
    if size is not None:
        parts.append(f"size {size};")
    if timeout is not None:
        parts.append(f"timeout {timeout};")
    if comment:
        parts.append(f'comment "{comment_text(comment)}";')
    return " ".join(parts)


class Map(Set):
    """A named map: type or typeof is "key : value" (value `verdict` for a verdict map)."""

    __slots__ = ()
    kind = "map"


@dataclass(frozen=True)
class Elements:
    """Elements of one set or map, in nft's syntax: "key" or "key : value" (for a delete the
    value is dropped). `of` carries the set's type, which the netlink form needs."""

    of: Set
    items: Sequence[str]

    def __post_init__(self) -> None:
        if not isinstance(self.of, Set):
            raise NftDefinitionError("Elements need the Set or Map object they belong to")


class _ChainsFields(NamedTuple):
    chains: tuple[tuple[Chain, tuple[str, ...]], ...]


class Chains(_ChainsFields):
    """Chains with their rules as one object, for a table's fixed structure (thousands of
    chains and rules: one object, one check of all the rule text, one pass to render).
    All the chains are added first, then all the rules in order, so jumps resolve
    whatever the order of the chains. (An immutable tuple, checked when made.)"""

    __slots__ = ()

    def __new__(cls, chains: Iterable[tuple[Chain, Iterable[str]]]):
        made = tuple((c, tuple(rules)) for c, rules in chains)
        if not all(isinstance(c, Chain) for c, _ in made):  # (a Chain checked its name when made)
            raise NftDefinitionError("Chains are made of Chain objects and their rules")
        texts = [r for _, rules in made for r in rules]
        if not all(texts) or unsafe_text(" ".join(texts)):
            for c, rules in made:
                Rule.many(c.name, rules)  # raises, naming the rule
        return tuple.__new__(cls, (made,))

    def rules(self) -> list[Rule]:
        """The rules as Rule objects (in order)."""
        return Rule.bulk((c.name, r) for c, rules in self.chains for r in rules)


Object = Table | Chain | Rule | Set | Elements | Chains


# ------------------------------------------------------------------ the transaction


class Transaction:
    """Operations on one table, applied together or not at all."""

    def __init__(self, table: Table):
        self.table = table
        self.ops: list[tuple[str, Object]] = []

    def __len__(self) -> int:
        return len(self.ops)

    def _op(self, verb: str, obj: Object) -> None:
        if verb == "add" and (type(obj) is Rule or type(obj) is Chain):  # the common cases first
            self.ops.append((verb, obj))
            return
        if isinstance(obj, Chains) and verb != "add":
            raise NftDefinitionError(f"{verb} does not apply to Chains (add only)")
        if isinstance(obj, Rule):
            if verb in ("replace", "delete") and obj.handle is None:
                raise NftDefinitionError(f"{verb} rule needs the rule's handle")
        elif verb in ("insert", "replace"):
            raise NftDefinitionError(f"{verb} applies to rules only")
        if isinstance(obj, Elements):
            if verb not in ("add", "create", "delete"):
                raise NftDefinitionError(f"{verb} does not apply to elements (flush the set)")
            if not obj.items:
                return
        elif verb == "flush" and isinstance(obj, Rule):
            raise NftDefinitionError("flush applies to tables, chains, sets and maps")
        if isinstance(obj, Table) and obj != self.table:
            raise NftDefinitionError(f"table {obj.ref} in a transaction on {self.table.ref}")
        self.ops.append((verb, obj))

    def add(self, obj: Object) -> None:
        """Make obj exist (no error if it does); a rule is appended (after `handle` if given)."""
        self._op("add", obj)

    def add_all(self, objs: Iterable[Object]) -> None:
        if isinstance(objs, list) and set(map(type, objs)) <= _PLAIN:  # checked already: no per-op check
            self.ops.extend(zip(repeat("add"), objs))
            return
        ops = self.ops
        for obj in objs:
            if type(obj) is Rule or type(obj) is Chain or type(obj) is Set or type(obj) is Map:
                ops.append(("add", obj))
            else:
                self._op("add", obj)

    def create(self, obj: Object) -> None:
        """Like add, but it is an error if obj exists already."""
        self._op("create", obj)

    def insert(self, rule: Rule) -> None:
        """A rule at the start of its chain (before `handle` if given)."""
        self._op("insert", rule)

    def replace(self, rule: Rule) -> None:
        self._op("replace", rule)

    def delete(self, obj: Object) -> None:
        self._op("delete", obj)

    def flush(self, obj: Table | Chain | Set) -> None:
        self._op("flush", obj)

    def remove(self) -> None:
        """Delete the table if it exists (no error if there is none: it is added first)."""
        self.add(self.table)
        self.delete(self.table)

    def recreate(self) -> None:
        """Remove the table if it exists and create it empty (the rest of the transaction
        fills it): the whole table is replaced atomically."""
        self.remove()
        self.add(self.table)

    # ---- forms

    def script(self) -> str:
        """The transaction as `nft -f` text."""
        t = self.table.ref
        out: list[str] = []
        for verb, obj in self.ops:
            if type(obj) is Rule:
                chain, rule, comment, handle = obj
                if handle is None and comment is None and verb != "delete":  # most rules: one format
                    out.append(f"{verb} rule {t} {chain} {rule}")
                    continue
                where = f" handle {handle}" if handle is not None else ""
                if verb == "delete":
                    out.append(f"delete rule {t} {obj.chain}{where}")
                elif obj.comment:
                    out.append(f"{verb} rule {t} {obj.chain}{where} {obj.rule}{_comment(obj.comment)}")
                else:
                    out.append(f"{verb} rule {t} {obj.chain}{where} {obj.rule}")
            elif type(obj) is Chain:
                out.append(_chain_line(verb, t, obj))
            elif type(obj) is Chains:
                out += [_chain_line(verb, t, c) for c, _ in obj.chains]
                add = f"{verb} rule {t} "
                out += [f"{add}{c.name} {r}" for c, rules in obj.chains for r in rules]
            elif isinstance(obj, Elements):
                items = obj.items if verb != "delete" else [i.partition(" : ")[0] for i in obj.items]
                for i in range(0, len(items), CHUNK):
                    body = ", ".join(items[i:i + CHUNK])
                    if not ELEMENT_TEXT.fullmatch(body):
                        raise NftDefinitionError(f"elements of {obj.of.name} are not safe to render")
                    out.append(f"{verb} element {t} {obj.of.name} {{ {body} }}")
            elif isinstance(obj, Set):
                if verb in ("add", "create"):
                    out.append(f"{verb} {obj.kind} {t} {obj.name} {{ {obj.decl()} }}")
                else:
                    out.append(f"{verb} {obj.kind} {t} {obj.name}")
            elif isinstance(obj, Chain):
                out.append(_chain_line(verb, t, obj))
            else:
                extra = f' {{ comment "{comment_text(obj.comment)}"; }}' if obj.comment and verb in (
                    "add", "create") else ""
                out.append(f"{verb} table {t}{extra}")
        return "\n".join(out) + "\n" if out else ""

    def elements_only(self) -> bool:
        return bool(self.ops) and all(isinstance(o, Elements) for _, o in self.ops)

    def batch(self) -> nl.Batch | None:
        """The transaction as one netlink batch, if it only adds and deletes elements of
        sets whose types are encodable here (None otherwise: send the script)."""
        if not self.elements_only() or self.table.family != "ip":
            return None
        batch = nl.Batch()
        for verb, obj in self.ops:
            assert isinstance(obj, Elements)
            types = set_types(obj.of)
            if types is None:
                return None
            if verb == "delete":
                batch.delete_elements(self.table.name, obj.of.name, (encode_element(types, i, False)
                                                                     for i in obj.items))
            else:
                batch.add_elements(self.table.name, obj.of.name, (encode_element(types, i) for i in obj.items))
        return batch


_PLAIN = {Rule, Chain, Set, Map}


def _chain_line(verb: str, t: str, c: Chain) -> str:
    if c.hook is None and not c.comment or verb not in ("add", "create"):
        return f"{verb} chain {t} {c.name}"
    spec = c.spec()
    inner = " ".join(p for p in (spec, f'comment "{comment_text(c.comment)}";' if c.comment else "") if p)
    return f"{verb} chain {t} {c.name} {{ {inner} }}"


# ------------------------------------------------------------------ running it


class NftRunner:
    """Runs transactions in the network namespace of the calling thread: element-only
    ones as a netlink batch, everything else as one `nft -f` (both all or nothing)."""

    def __init__(self, run: Callable[[str], None] = nft_apply, commit: Callable[[nl.Batch], None] | None = None):
        self.run_script = run
        # element-only transactions go by netlink, without an nft process; a substituted
        # `run` (tests, dry runs) gets every transaction as text unless `commit` is given too
        self.commit = commit or (self._netlink_commit if run is nft_apply else None)
        self._netlink: nl.Netlink | None = None

    def _netlink_commit(self, batch: nl.Batch) -> None:
        if self._netlink is None:
            self._netlink = nl.Netlink()  # in the network namespace of the first use
        self._netlink.commit(batch)

    def apply(self, tx: Transaction) -> str:
        """"netlink", "nft", or "" for an empty transaction."""
        if not tx.ops:
            return ""
        batch = tx.batch() if self.commit is not None else None
        if batch is not None:
            self.commit(batch)
            return "netlink"
        self.run_script(tx.script())
        return "nft"


# ------------------------------------------------------------------ types and element encoding


PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
VERDICT_TYPE = 0xFFFFFF00
TYPE_BITS = 6


def priority_value(p: str | int | None) -> int:
    """A chain priority as a number: "raw" -300, "filter - 1" -1, "srcnat + 10" 110, "-110"."""
    if isinstance(p, int):
        return p
    m = re.fullmatch(r"\s*([a-z]+|-?\d+)\s*(?:([+-])\s*(\d+))?\s*", p or "")
    if not m or (not m.group(1).lstrip("-").isdigit() and m.group(1) not in PRIORITIES):
        raise NftDefinitionError(f"chain priority {p!r}")
    base = PRIORITIES[m.group(1)] if m.group(1) in PRIORITIES else int(m.group(1))
    if m.group(2):
        base += int(m.group(3)) * (1 if m.group(2) == "+" else -1)
    return base


def seconds(text: str) -> int:
    """An nft time ("3h", "1h30m", "60s", "2d") in seconds."""
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not text:
        raise NftDefinitionError(f"time {text!r}")
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


@dataclass(frozen=True)
class FieldType:
    name: str
    id: int  # nft's datatype id
    size: int  # bytes in a key (each field of a concatenation is padded to 4)
    encode: Callable[[str], bytes]
    decode: Callable[[bytes], str]


def _int_host(text: str) -> bytes:
    return struct.pack("=I", int(text, 0))


def _proto(text: str) -> bytes:
    return bytes((PROTOCOLS[text] if text in PROTOCOLS else int(text),))


TYPES: dict[str, FieldType] = {t.name: t for t in (
    FieldType("ipv4_addr", 7, 4, socket.inet_aton, lambda b: socket.inet_ntoa(b[:4])),
    FieldType("inet_proto", 12, 1, _proto, lambda b: PROTOCOL_NAMES.get(b[0], str(b[0]))),
    FieldType("inet_service", 13, 2, lambda t: struct.pack("!H", int(t)), lambda b: str(int.from_bytes(b[:2], "big"))),
    FieldType("mark", 19, 4, _int_host, lambda b: f"0x{struct.unpack('=I', b[:4])[0]:08x}"),
    FieldType("integer", 4, 4, _int_host, lambda b: str(struct.unpack("=I", b[:4])[0])),
)}
TYPE_NAMES = {t.id: t.name for t in TYPES.values()}
TYPEOF = {  # expressions of `typeof` declarations -> their datatype
    "ip saddr": "ipv4_addr", "ip daddr": "ipv4_addr", "ct original ip saddr": "ipv4_addr",
    "ct original ip daddr": "ipv4_addr", "meta l4proto": "inet_proto", "th dport": "inet_service",
    "th sport": "inet_service", "tcp dport": "inet_service", "udp dport": "inet_service",
    "ct original proto-dst": "inet_service", "meta mark": "mark", "ct mark": "mark",
}


def _typeof(expr: str) -> str:
    if expr.startswith("numgen "):
        return "integer"
    return TYPEOF.get(expr, "?")


@dataclass(frozen=True)
class SetTypes:
    key: tuple[str, ...]
    data: tuple[str, ...] | None  # None: a set; ("verdict",): a verdict map
    interval: bool

    def text(self) -> str:
        key = " . ".join(self.key)
        return key if self.data is None else f"{key} : {' . '.join(self.data)}"


@lru_cache(maxsize=1024)
def declared_types(s: Set) -> SetTypes:
    """A set's key and value types, from `type` or from the expressions of `typeof`."""
    decl = s.type or s.typeof or ""
    key, _, data = decl.partition(" : ")
    if s.type is not None:
        k = tuple(x.strip() for x in key.split(" . "))
        d = tuple(x.strip() for x in data.split(" . ")) if data else None
    else:
        k = tuple(_typeof(x.strip()) for x in key.split(" . "))
        d = tuple(_typeof(x.strip()) for x in data.split(" . ")) if data else None
    return SetTypes(k, d, s.interval)


def set_types(s: Set) -> SetTypes | None:
    """The types if this module can encode the set's elements for netlink (not intervals)."""
    t = declared_types(s)
    if t.interval or any(k not in TYPES for k in t.key):
        return None
    if t.data is not None and t.data != ("verdict",) and any(d not in TYPES for d in t.data):
        return None
    return t


def _encode_fields(names: tuple[str, ...], text: str) -> bytes:
    parts = text.split(" . ")
    if len(parts) != len(names):
        raise NftDefinitionError(f"element {text!r} does not have the fields {' . '.join(names)}")
    if len(names) == 1:
        return TYPES[names[0]].encode(parts[0].strip())
    out = b""
    for name, part in zip(names, parts, strict=True):
        raw = TYPES[name].encode(part.strip())
        out += raw + b"\0" * (-len(raw) & 3)
    return out


def _decode_fields(names: tuple[str, ...], raw: bytes) -> str:
    if len(names) == 1:
        return TYPES[names[0]].decode(raw)
    out, off = [], 0
    for name in names:
        t = TYPES[name]
        out.append(t.decode(raw[off:off + t.size]))
        off += (t.size + 3) & ~3
    return " . ".join(out)


def encode_element(types: SetTypes, text: str, with_value: bool = True) -> bytes:
    """One element ("key" or "key : value") -> its netlink encoding."""
    try:
        key, _, value = text.partition(" : ")
        raw = _encode_fields(types.key, key)
        if types.data is None or not with_value:
            return nl.element(raw)
        if types.data == ("verdict",):
            return nl.element(raw, nl.verdict(value.strip()))
        return nl.element(raw, nl.value(_encode_fields(types.data, value)))
    except (ValueError, KeyError, OSError, struct.error) as e:
        raise NftDefinitionError(f"element {text!r} is not a {types.text()}: {e}") from None


def canonical_element(types: SetTypes, text: str, with_value: bool = True) -> list[str]:
    """An element as it reads back from the kernel (intervals as CIDRs, one per prefix);
    with_value False: the key alone."""
    key, sep, value = text.partition(" : ")
    try:
        if types.interval and types.key == ("ipv4_addr",):
            first, last = _interval(key.strip())
            return [_cidr(n) for n in ipaddress.summarize_address_range(
                ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))]
        if types.interval and types.key[-1] == "ipv4_addr":  # a concatenation ending in a prefix
            head, _, tail = key.rpartition(" . ")
            fields = types.key[:-1]
            return [f"{_decode_fields(fields, _encode_fields(fields, head))} . "
                    f"{_cidr(ipaddress.IPv4Network(tail.strip(), strict=False))}"]
        k = _decode_fields(types.key, _encode_fields(types.key, key))
        if types.data is None or not with_value:
            return [k]
        if types.data == ("verdict",):
            return [f"{k} : {' '.join(value.split())}"]
        return [f"{k} : {_decode_fields(types.data, _encode_fields(types.data, value))}"]
    except (ValueError, KeyError, OSError, struct.error) as e:
        raise NftDefinitionError(f"element {text!r} is not a {types.text()}: {e}") from None


def _interval(text: str) -> tuple[int, int]:
    if "-" in text:
        a, b = text.split("-")
        return int(ipaddress.IPv4Address(a.strip())), int(ipaddress.IPv4Address(b.strip()))
    n = ipaddress.IPv4Network(text, strict=False)
    return int(n.network_address), int(n.broadcast_address)


def _cidr(n: ipaddress.IPv4Network) -> str:
    return str(n.network_address) if n.prefixlen == 32 else str(n)


def decode_intervals(els: Iterable[nl.DumpedElement]) -> list[str]:
    """An interval set of addresses as the kernel holds it (a start, and an end flagged
    element one past the last address, per range) -> CIDRs, a /32 as a plain address."""
    out: list[str] = []
    # at one address an end (of the range before) comes before a start (of the next)
    points = sorted((int.from_bytes(e.key, "big"), not e.flags & nl.SET_ELEM_INTERVAL_END) for e in els)
    start = None
    for v, is_start in points:
        if is_start:
            start = v
        elif start is not None:
            out += [_cidr(n) for n in ipaddress.summarize_address_range(
                ipaddress.IPv4Address(start), ipaddress.IPv4Address(v - 1))]
            start = None
    if start is not None:  # a range running to the end of the address space
        out += [_cidr(n) for n in ipaddress.summarize_address_range(
            ipaddress.IPv4Address(start), ipaddress.IPv4Address("255.255.255.255"))]
    return out


# ------------------------------------------------------------------ the ruleset, read back


def chain_spec(c: Chain) -> str:
    """A chain's declaration in the stable form (priority as a number)."""
    if c.hook is None:
        return ""
    return f"type {c.type} hook {c.hook} priority {priority_value(c.priority)}; policy {c.policy or 'accept'};"


def set_spec(s: Set) -> str:
    """A set's declaration in the stable form (types resolved, flags sorted, time in seconds)."""
    t = declared_types(s)
    flags = set(s.flags) | ({"timeout"} if s.timeout else set())
    parts = [f"type {t.text()};"]
    if flags:
        parts.append(f"flags {','.join(sorted(flags))};")
    if s.size is not None:
        parts.append(f"size {s.size};")
    if s.timeout:
        parts.append(f"timeout {seconds(s.timeout)}s;")
    return " ".join(parts)


@dataclass
class ChainState:
    spec: str  # "" for a regular chain
    rules: list[str] | None  # None when read from the kernel (rule text is not decoded)
    count: int = 0


@dataclass
class SetState:
    kind: str  # "set" or "map"
    spec: str
    elements: set[str] = field(default_factory=set)


@dataclass
class Ruleset:
    """One table as a value: what the fake holds, or what the kernel shows."""

    family: str
    name: str
    chains: dict[str, ChainState] = field(default_factory=dict)
    sets: dict[str, SetState] = field(default_factory=dict)

    def rule_counts(self) -> dict[str, int]:
        return {name: c.count for name, c in self.chains.items()}

    def dump(self, rules: bool = True) -> str:
        """A stable text form: sorted, one line per object, rule and element. rules=False
        gives each chain's rule count instead of the rules (what a kernel read-back has)."""
        t = f"{self.family} {self.name}"
        lines = [f"table {t}"]
        for name in sorted(self.chains):
            spec = self.chains[name].spec
            lines.append(f"chain {t} {name}" + (f" {{ {spec} }}" if spec else ""))
        for name in sorted(self.sets):
            s = self.sets[name]
            lines.append(f"{s.kind} {t} {name} {{ {s.spec} }}")
        for name in sorted(self.chains):
            c = self.chains[name]
            if rules and c.rules is not None:
                lines += [f"rule {t} {name} {r}" for r in c.rules]
            else:
                lines.append(f"rules {t} {name} {c.count}")
        for name in sorted(self.sets):
            lines += [f"element {t} {name} {e}" for e in sorted(self.sets[name].elements)]
        return "\n".join(lines) + "\n"


def _type_names(type_id: int, length: int) -> tuple[str, ...]:
    names = []
    while True:
        names.append(TYPE_NAMES.get(type_id & ((1 << TYPE_BITS) - 1), f"type{type_id & 63}"))
        type_id >>= TYPE_BITS
        if not type_id:
            break
    names.reverse()
    if len(names) == 1 and names[0] == "integer" and length != 4:
        names[0] = f"integer{length * 8}"
    return tuple(names)


def _decode_dumped(types: SetTypes, e: nl.DumpedElement) -> str:
    try:
        if types.interval and e.key_end is not None and types.key[-1] == "ipv4_addr":
            # a concatenation ending in a prefix: the key holds its first address, key_end its last
            first = int.from_bytes(e.key[-4:], "big")
            last = int.from_bytes(e.key_end[-4:], "big")
            plen = 33 - (last - first + 1).bit_length()
            head = _decode_fields(types.key[:-1], e.key[:-4])
            return f"{head} . {_cidr(ipaddress.IPv4Network((first, plen)))}"
        key = _decode_fields(types.key, e.key)
        if types.data is None:
            return key
        if isinstance(e.data, str):
            return f"{key} : {e.data}"
        return f"{key} : {_decode_fields(types.data, e.data or b'')}"
    except (KeyError, IndexError, struct.error, OSError):
        return f"0x{e.key.hex()}" + (f" : 0x{e.data.hex()}" if isinstance(e.data, bytes) else "")


FLAG_NAMES = ((0x2, "constant"), (0x4, "interval"), (0x10, "timeout"), (0x20, "dynamic"))


def read_ruleset(link: nl.Netlink, table: str, family: str = "ip", elements: bool = True,
                 skip: Iterable[str] = (), rules: bool = True) -> Ruleset | None:
    """One table as the kernel holds it (None: there is none), read with netlink dumps:
    chains with their hooks and rule counts, sets and maps with their elements (those in
    `skip` left empty). rules=False: no dump of rules, every count 0 (for a caller that
    dumps them itself)."""
    try:
        chains = link.chain_specs(table)
        sets = link.set_specs(table)
    except OSError:
        return None
    if not chains and not sets:
        return None
    out = Ruleset(family, table)
    counts = link.rule_counts(table) if rules else {}
    for c in chains:
        spec = ""
        if c.hook is not None:
            hook = HOOKS[c.hook] if c.hook < len(HOOKS) else str(c.hook)
            spec = (f"type {c.type} hook {hook} priority {c.priority}; "
                    f"policy {'accept' if c.policy != 0 else 'drop'};")
        out.chains[c.name] = ChainState(spec, None, counts.get(c.name, 0))
    skipped = set(skip)
    for s in sets:
        key = _type_names(s.key_type, s.key_len)
        data = None
        if s.flags & 0x8:
            data = ("verdict",) if s.data_type == VERDICT_TYPE else _type_names(s.data_type or 0, s.data_len or 0)
        types = SetTypes(key, data, bool(s.flags & 0x4))
        flags = [name for bit, name in FLAG_NAMES if s.flags & bit]
        parts = [f"type {types.text()};"]
        if flags:
            parts.append(f"flags {','.join(sorted(flags))};")
        if s.size is not None:
            parts.append(f"size {s.size};")
        if s.timeout_ms:
            parts.append(f"timeout {s.timeout_ms // 1000}s;")
        state = SetState("map" if data is not None else "set", " ".join(parts))
        if elements and s.name not in skipped:
            dumped = link.elements(table, s.name)
            if types.interval and types.key == ("ipv4_addr",):
                state.elements = set(decode_intervals(dumped))
            else:
                state.elements = {_decode_dumped(types, e) for e in dumped}
        out.sets[s.name] = state
    return out
