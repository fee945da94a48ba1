"""Reading the podnet-svc table back from the kernel with netlink dumps (`nft list` would
load every element of the table into its cache first: 26 s at 50 000 Services), and
judging what was read: is it our layout, intact?
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from podnet.dataplane import nfnetlink as nl
from podnet.dataplane.nftables import decode_intervals
from podnet.services.model import Backend, Frontend
from podnet.services.nftables.elements import Elements, frontend_of
from podnet.services.nftables.encoding import _PORT, _PROTO, _SLOT
from podnet.services.nftables.layout import (
    ADDRESS_SETS,
    DIGEST,
    DYNAMIC,
    KEY_MAPS,
    LARGE_SLOT_MAPS,
    MIN_CAPACITY,
    NOT_ELEMENTS,
    TABLE,
    Layout,
    _addr,
    dynamic_chain_rules,
    is_dynamic_chain,
    slot_map_of,
)

_PROTO_NAMES = {v[0]: k for k, v in _PROTO.items()}


def _frontend_text(raw: bytes, nodeport: bool) -> tuple[str, int]:
    """Key bytes -> (frontend text, bytes used): the inverse of _frontend_bytes."""
    if nodeport:
        return f"{_PROTO_NAMES[raw[0]]} . {_PORT.unpack_from(raw, 4)[0]}", 8
    return f"{socket.inet_ntoa(raw[:4])} . {_PROTO_NAMES[raw[4]]} . {_PORT.unpack_from(raw, 8)[0]}", 12


def decode_element(name: str, el: nl.DumpedElement) -> tuple[str, str | None]:
    """A dumped element -> its text form (key, value): the inverse of encode_item."""
    if name in ADDRESS_SETS:
        return socket.inet_ntoa(el.key), None
    slots = slot_map_of(name)
    nodeport = slots[0] if slots else (name.endswith("_nodeports") or name.startswith("np_bit"))
    fe, used = _frontend_text(el.key, nodeport)
    if slots:
        value = None
        if isinstance(el.data, bytes):
            value = f"{socket.inet_ntoa(el.data[:4])} . {_PORT.unpack_from(el.data, 4)[0]}"
        return f"{fe} . {_SLOT.unpack_from(el.key, used)[0]}", value
    if name == "lb_source_ranges":
        first = int.from_bytes(el.key[used:used + 4], "big")
        last = int.from_bytes((el.key_end or el.key)[used:used + 4], "big")
        plen = 32 - (last - first + 1).bit_length() + 1
        return f"{fe} . {_addr(f'{socket.inet_ntoa(el.key[used:used + 4])}/{plen}')}", None
    if name in KEY_MAPS and isinstance(el.data, bytes):
        return fe, f"0x{_SLOT.unpack_from(el.data)[0]:08x}"
    return fe, el.data if isinstance(el.data, str) else None


@dataclass
class KernelTable:
    chains: dict[str, int]  # chain -> number of rules
    sets: set[str]
    elements: Elements | None  # None: not read
    sizes: dict[str, int]  # set -> declared capacity (sets that have one)
    digest: int | None = None  # the digest element, if there is one


def read_table(link: nl.Netlink, elements: bool = True) -> KernelTable | None:
    """The table as the kernel holds it (None: there is none), read with netlink dumps: `nft
    list` would load every element of the table into its cache first (26 s at 50 000 Services).
    elements=False: the structure and the digest only."""
    try:
        declared = link.sets(TABLE)
        names = link.chains(TABLE)
    except OSError:
        return None
    if not names and not declared:
        return None
    chains = {name: 0 for name in names}
    chains.update(link.rule_counts(TABLE))
    digest = None
    if DIGEST in declared:
        found = link.elements(TABLE, DIGEST)
        if len(found) == 1 and len(found[0].key) == 8:
            digest = int.from_bytes(found[0].key, "little")
    sizes = {k: v for k, v in declared.items() if v is not None}
    if not elements:
        return KernelTable(chains, set(declared), None, sizes, digest)
    els: Elements = {}
    for name in declared:
        if name in NOT_ELEMENTS or name.startswith("__"):  # "__set<N>": a rule's anonymous set
            continue
        dumped = link.elements(TABLE, name)
        if name == "service_cidrs":
            els[name] = {c: None for c in decode_intervals(dumped)}
        else:
            els[name] = dict(decode_element(name, e) for e in dumped)
    return KernelTable(chains, set(declared), els, sizes, digest)


def check_layout(layout: Layout, table: KernelTable) -> str | None:
    """Why the kernel table is not ours as expected (None: it is)."""
    for name in (*layout.sets(), DYNAMIC):
        if name not in table.sets:
            return f"set/map {name} is missing"
    expected = layout.chain_rule_counts()
    for name, count in expected.items():
        if name not in table.chains:
            return f"chain {name} is missing"
        if table.chains[name] != count:
            return f"chain {name} has {table.chains[name]} rules, expected {count}"
    for name, count in table.chains.items():
        if name in expected:
            continue
        if name.startswith("layout_"):
            return f"layout marker {name} is from another version"
        if not is_dynamic_chain(name):
            return f"chain {name} is not part of the layout"
        if count != len(dynamic_chain_rules(name)):
            return f"chain {name} has {count} rules, expected {len(dynamic_chain_rules(name))}"
    return None


def read_counts(link: nl.Netlink, names: Iterable[str]) -> dict[str, int]:
    """How many elements each of these sets holds (counted, not decoded: a cheap check that
    no element went missing behind podnet's back; -1: the set is missing)."""
    out = {}
    for name in names:
        try:
            out[name] = link.element_count(TABLE, name)
        except OSError:
            out[name] = -1
    return out


def read_slot_orders(link: nl.Netlink) -> dict[Frontend, tuple[tuple[Backend, ...], tuple[Backend, ...]]]:
    """The large frontends' endpoints in the kernel, in slot order: frontend -> (its own
    endpoints, its short-circuit endpoints). What the compiler keeps the slots of after an
    agent restart, so that a table that is right stays as it is."""
    slots: dict[Frontend, tuple[dict[int, Backend], dict[int, Backend]]] = {}
    for (nodeport, short), name in LARGE_SLOT_MAPS.items():
        try:
            dumped = link.elements(TABLE, name)
        except OSError:
            continue
        for e in dumped:
            key, value = decode_element(name, e)
            if value is None:
                continue
            fe_text, _, index = key.rpartition(" . ")
            ip, _, port = value.partition(" . ")
            fe = frontend_of(fe_text, nodeport)
            slots.setdefault(fe, ({}, {}))[short][int(index)] = Backend(ip, int(port))
    return {fe: (tuple(own[i] for i in sorted(own)), tuple(sc[i] for i in sorted(sc)))
            for fe, (own, sc) in slots.items()}


def read_affinity(link: nl.Netlink) -> list[tuple[str, str]]:
    """The dynamic affinity map's entries as (client . affinity key, backend) text pairs."""
    out = []
    for e in link.elements(TABLE, DYNAMIC):
        if isinstance(e.data, bytes) and len(e.key) >= 8:
            backend = f"{socket.inet_ntoa(e.data[:4])} . {_PORT.unpack_from(e.data, 4)[0]}"
            out.append((f"{socket.inet_ntoa(e.key[:4])} . 0x{_SLOT.unpack_from(e.key, 4)[0]:08x}", backend))
    return out


def affinity_delete_batch(keys: Iterable[str]) -> nl.Batch:
    """Deleting affinity entries (keys as read_affinity gives them)."""
    encoded = []
    for key in keys:
        client, _, mark = key.partition(" . ")
        encoded.append(nl.element(socket.inet_aton(client) + _SLOT.pack(int(mark, 0))))
    batch = nl.Batch()
    batch.delete_elements(TABLE, DYNAMIC, encoded)
    return batch


def kernel_layout(mark: int, table: KernelTable) -> Layout:
    """The capacity of a table read back (to adopt it when it fits)."""
    return Layout(mark, table.sizes.get("service_ips", MIN_CAPACITY))

