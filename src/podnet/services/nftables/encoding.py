"""Service elements in the kernel's binary layout, sent as netlink batches
(podnet.dataplane.nfnetlink) on a short path from the rules (`encode_item`, byte for
byte what the typed layer's own encoder makes of the same element text, as the unit
tests check), and the table's digest: one element, a 64-bit XOR over frontends of a hash
of each frontend's encoded elements, kept in step with every change.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections import defaultdict
from collections.abc import Iterable

from podnet.dataplane import nfnetlink as nl
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState
from podnet.services.nftables.elements import (
    Elements,
    Item,
    changed_rules,
    frontend_of,
    is_large,
    item_text,
    large_slot_changes,
    rule_items,
)
from podnet.services.nftables.layout import (
    DIGEST,
    KEY_MAPS,
    LARGE_SLOT_MAP_OF,
    LARGE_SLOT_MAPS,
    SLOT_MAPS,
    TABLE,
    TEXT_ONLY,
    large_chain_of,
    slot_map_of,
)

_PROTO = {"tcp": bytes((6, 0, 0, 0)), "udp": bytes((17, 0, 0, 0)), "sctp": bytes((132, 0, 0, 0))}
_PORT = struct.Struct("!H2x")  # inet_service, padded to a 32-bit register
_SLOT = struct.Struct("=I")  # numgen's result: host byte order


def _frontend_bytes(fe: Frontend) -> bytes:
    """A frontend's key bytes (a rule's items share them: _rule_encoded makes them once).
    Not cached: a cache of every frontend held ~10 MiB at 50 000 Services on every agent,
    to save ~0.6 us per rule encoded."""
    port = _PORT.pack(fe.port)
    return _PROTO[fe.proto] + port if fe.ip is None else socket.inet_aton(fe.ip) + _PROTO[fe.proto] + port


_SLOT_VALUE = nl.attr(nl.DATA_VALUE, bytes(8))[:4]  # the header of an 8-byte value: address, port


_SLOT_HEADS = {width: nl.element_heads(width + 4, 12) for width in (8, 12)}  # slot element: key, value attr
# A slot element in one pack: headers, frontend key, slot (host order), the value's headers,
# address, port (network order: htons'ed into a native "H").
_SLOT_ELEMENT = {width: (struct.Struct(f"={len(k)}s{width}sI{len(d) + len(_SLOT_VALUE)}s4sH2x"), k,
                         d + _SLOT_VALUE) for width, (k, d) in _SLOT_HEADS.items()}
_ADDRESS_HEAD = nl.element_heads(4, -1)[0]  # an element whose key is one address (cluster_ips)


def encode_item(item: Item, with_value: bool = True) -> bytes:
    """One element's netlink encoding (with_value False: the key alone, as a deletion needs)."""
    return _encode(item, _frontend_bytes(item[1]), with_value)


def _encode(item: Item, key: bytes, with_value: bool = True) -> bytes:
    """encode_item with the frontend's key bytes given (one frontend's items share them)."""
    _, fe, extra, value = item
    if extra is not None:
        if type(extra) is int:
            if with_value and type(value) is Backend:  # a slot with its backend: most of a full load
                packer, head_key, head_data = _SLOT_ELEMENT[len(key)]
                return packer.pack(head_key, key, extra, head_data, socket.inet_aton(value.ip),
                                   socket.htons(value.port))
            key += _SLOT.pack(extra)
        elif not extra:  # the frontend's address alone (cluster_ips)
            return _ADDRESS_HEAD + socket.inet_aton(fe.ip)  # type: ignore[arg-type]
        else:  # a source range: the interval of a concatenation is a key and a key end
            net, _, plen = extra.partition("/")
            first = int.from_bytes(socket.inet_aton(net), "big")
            last = first | ((1 << (32 - int(plen or 32))) - 1)
            return nl.element(key + first.to_bytes(4, "big"), key_end=key + last.to_bytes(4, "big"))
    if value is None or not with_value:
        return nl.element(key)
    if isinstance(value, str):
        return nl.element(key, nl.verdict(value))
    if type(value) is int:
        return nl.element(key, nl.value(_SLOT.pack(value)))  # a mark: host byte order
    return nl.element(key, _SLOT_VALUE + socket.inet_aton(value.ip) + _PORT.pack(value.port))


def item_of(name: str, key: str, value: str | None) -> Item:
    """An element's text form (as in Elements) -> the item it encodes."""
    if name == "cluster_ips":
        return name, Frontend(key, "tcp", 0), "", None
    parts = key.split(" . ")
    nodeport = name.endswith("_nodeports") or name.startswith(("np_bit", SLOT_MAPS[True]))
    width = 2 if nodeport else 3
    fe = frontend_of(" . ".join(parts[:width]), nodeport)
    extra: int | str | None = None
    if len(parts) > width:
        extra = int(parts[width]) if slot_map_of(name) else parts[width]
    backend: Backend | str | int | None = value
    if value is not None and slot_map_of(name):
        ip, _, port = value.partition(" . ")
        backend = Backend(ip, int(port))
    elif value is not None and name in KEY_MAPS:
        backend = int(value, 0)
    return name, fe, extra, backend


def encode_element(name: str, key: str, value: str | None) -> bytes:
    """One element in the text form of `elements()` -> its netlink encoding (value None:
    the key alone, as a deletion needs)."""
    return encode_item(item_of(name, key, value))


def _checked(item: Item, with_value: bool) -> bytes:
    try:
        return encode_item(item, with_value)
    except (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error) as e:
        key, value = item_text(item)
        raise ValueError(f"set {item[0]}: element {key!r} ({value!r}) cannot be encoded: {e}") from e


def _rule_encoded(rule: FrontendRule, large_slots: bool = True) -> list[tuple[str, bytes]]:
    try:
        key = _frontend_bytes(rule.frontend)  # every item of a rule is its frontend's
        return [(item[0], _encode(item, key)) for item in rule_items(rule, large_slots)]
    except (ValueError, KeyError, IndexError, OSError, OverflowError, struct.error):
        for item in rule_items(rule, large_slots):
            _checked(item, True)  # raises, naming the element
        raise


def rule_hash(encoded: list[tuple[str, bytes]]) -> int:
    """A frontend's share of the digest: one hash over its elements (sets and encodings)."""
    h = hashlib.blake2b("\0".join([name for name, _ in encoded]).encode(), digest_size=8)
    for _, e in encoded:
        h.update(e)
    return int.from_bytes(h.digest(), "little")


def _slot_hash(name: str, encoded: bytes) -> int:
    """A large frontend's slot's share of the digest (each slot on its own, so that a change
    of a few slots costs a few hashes)."""
    return int.from_bytes(hashlib.blake2b(name.encode() + b"\0" + encoded, digest_size=8).digest(), "little")


def _share(rule: FrontendRule, encoded: list[tuple[str, bytes]]) -> int:
    """A frontend's share of the digest, from its encoded elements: rule_hash over them, but a
    large frontend's slots each add their own hash (see _slot_hash)."""
    if not is_large(rule):
        return rule_hash(encoded)
    share = 0
    head = []
    for name, e in encoded:
        if name in LARGE_SLOT_MAP_OF:
            share ^= _slot_hash(name, e)
        else:
            head.append((name, e))
    return share ^ rule_hash(head)


def rule_share(rule: FrontendRule) -> int:
    return _share(rule, _rule_encoded(rule))


def digest_element(digest: int) -> bytes:
    return nl.element(digest.to_bytes(8, "little"))


def state_batch(state: ServiceState) -> tuple[nl.Batch, int]:
    """Every element of a state (the text-only sets aside) as one netlink batch, made
    from the rules directly (what a full load sends), and the state's digest."""
    batch = nl.Batch()
    per_set: defaultdict[str, list[bytes]] = defaultdict(list)
    digest = 0
    for rule in state.rules:
        encoded = _rule_encoded(rule)
        digest ^= _share(rule, encoded)
        for name, e in encoded:
            per_set[name].append(e)
    for name, elements in per_set.items():
        batch.add_elements(TABLE, name, elements)
    batch.add_elements(TABLE, DIGEST, [digest_element(digest)])
    return batch, digest


def state_digest(state: ServiceState, counts: dict[str, int] | None = None) -> int:
    """The digest of a state's elements; `counts` (if given) is filled with the number of
    elements of each set."""
    digest = 0
    for rule in state.rules:
        encoded = _rule_encoded(rule)
        digest ^= _share(rule, encoded)
        if counts is not None:
            for name, _ in encoded:
                counts[name] = counts.get(name, 0) + 1
    return digest


def digest_delta(digest: int, old: ServiceState, new: ServiceState) -> int:
    """The digest after going from `old` to `new`: the changed frontends' old shares leave,
    their new ones come (a large frontend's: the slots that changed)."""
    for b, a in changed_rules(old, new):
        if b is None or a is None or not (is_large(b) or is_large(a)):
            for rule in (b, a):
                if rule is not None:
                    digest ^= rule_share(rule)
            continue
        digest ^= rule_hash(_rule_encoded(b, False)) ^ rule_hash(_rule_encoded(a, False))
        for pair in large_slot_changes(b, a):
            for item in pair:
                if item is not None:
                    digest ^= _slot_hash(item[0], _checked(item, True))
    return digest


def _parsed(name: str, key: str, value: str | None) -> Item:
    try:
        return item_of(name, key, value)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"set {name}: element {key!r} ({value!r}) cannot be encoded: {e}") from e


def large_chain_expressions(nodeport: bool, short: bool, n: int) -> list[bytes]:
    """The one rule of a large chain (layout.large_chain_rule), as the expressions nft makes of
    it when it loads the table: the frontend's key and a random slot in consecutive
    registers, looked up in the slot map, and the address and port found DNATed to."""
    regs = iter((nl.REG_1, nl.REG32(1), nl.REG32(2), nl.REG32(3)))  # the key's fields, one register each
    exprs = [] if nodeport else [nl.payload_load(nl.PAYLOAD_NETWORK, 16, 4, next(regs))]  # ip daddr
    exprs.append(nl.meta_load(nl.META_L4PROTO, next(regs)))
    exprs.append(nl.payload_load(nl.PAYLOAD_TRANSPORT, 2, 2, next(regs)))  # th dport
    exprs.append(nl.numgen_random(n, next(regs)))
    exprs.append(nl.map_lookup(LARGE_SLOT_MAPS[nodeport, short], nl.REG_1, nl.REG_1))
    exprs.append(nl.dnat_ipv4(nl.REG_1, nl.REG32(1)))  # the value found: address, then port
    return exprs


def element_batch(gone: Elements, come: Elements, digest: tuple[int | None, int] | None = None,
                  new_chains: Iterable[str] = (), old_chains: Iterable[str] = ()) -> nl.Batch:
    """The delta as one netlink transaction: the large chains it needs added first, then
    deletions, then additions (a changed value is a deletion and an addition), the large
    chains nothing points to any more deleted last, and the digest replaced (old, new) if
    given. The text-only sets are not included."""
    batch = nl.Batch()
    for name in new_chains:
        which = large_chain_of(name)
        if which is None:
            raise ValueError(f"{name} is not a large chain")
        batch.add_chain(TABLE, name)
        batch.add_rule(TABLE, name, large_chain_expressions(*which))
    if digest is not None and digest[0] != digest[1]:
        if digest[0] is not None:
            batch.delete_elements(TABLE, DIGEST, [digest_element(digest[0])])
        batch.add_elements(TABLE, DIGEST, [digest_element(digest[1])])
    for verb, part in (("delete", gone), ("add", come)):
        for name in part:
            kv = part[name]
            if not kv or name in TEXT_ONLY:
                continue
            encoded = (_checked(_parsed(name, k, v), verb == "add") for k, v in kv.items())
            if verb == "delete":
                batch.delete_elements(TABLE, name, encoded)
            else:
                batch.add_elements(TABLE, name, encoded)
    for name in old_chains:
        batch.delete_chain(TABLE, name)
    return batch


