"""The store records that say which pod holds which ENI address of a node.

    /podnet-alloc/eni/<node>/addresses/<address>   {handle, eni, at}  or  {eni, coolingUntil}
    /podnet-alloc/eni/<node>/handles/<handle>      {address}

An ADD creates both in one transaction, the address key expected missing or cooling at
the revision read: two pods can never hold one address, whatever the pool's memory says
(after a restart, or with two agents by mistake). A DEL deletes the handle and turns the
address record into a cooling one, so a restarted agent keeps the cooldown. The cloud says
which addresses the node holds; these records say which of them are taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from podnet.store.base import KeyValueStore, Op, Record
from podnet.store.layout import ALLOC

ENI = ALLOC + "eni/"


def node_prefix(node: str) -> str:
    return f"{ENI}{node}/"


def address_key(node: str, address: str) -> str:
    return f"{ENI}{node}/addresses/{address}"


def handle_key(node: str, handle: str) -> str:
    return f"{ENI}{node}/handles/{quote(handle, safe='')}"


@dataclass(frozen=True)
class AddressRecord:
    address: str
    handle: str | None
    eni: str | None
    cooling_until: float | None  # wall-clock seconds
    at: float | None
    revision: int


@dataclass(frozen=True)
class NodeRecords:
    addresses: dict[str, AddressRecord]
    handles: dict[str, str]  # handle -> address


def read(kv: KeyValueStore, node: str) -> NodeRecords:
    records, _ = kv.list(node_prefix(node))
    addresses: dict[str, AddressRecord] = {}
    handles: dict[str, str] = {}
    a_prefix, h_prefix = f"{ENI}{node}/addresses/", f"{ENI}{node}/handles/"
    for r in records:
        if r.key.startswith(a_prefix):
            addresses[r.key[len(a_prefix):]] = _address(r, r.key[len(a_prefix):])
        elif r.key.startswith(h_prefix):
            handles[unquote(r.key[len(h_prefix):])] = r.value.get("address", "")
    return NodeRecords(addresses, handles)


def _address(r: Record, address: str) -> AddressRecord:
    v = r.value
    return AddressRecord(address, v.get("handle"), v.get("eni"), v.get("coolingUntil"), v.get("at"), r.revision)


def get_address(kv: KeyValueStore, node: str, address: str) -> AddressRecord | None:
    r = kv.get(address_key(node, address))
    return None if r is None else _address(r, address)


def get_handle(kv: KeyValueStore, node: str, handle: str) -> str | None:
    r = kv.get(handle_key(node, handle))
    return None if r is None else r.value.get("address")


def assign_ops(node: str, handle: str, address: str, eni: str, current: AddressRecord | None) -> list[Op]:
    value = {"handle": handle, "eni": eni, "at": time.time()}
    akey = address_key(node, address)
    return [Op.create(handle_key(node, handle), {"address": address}),
            Op.create(akey, value) if current is None else Op.update(akey, value, current.revision)]


def release_ops(node: str, handle: str, address: str, eni: str | None, cooldown: float) -> list[Op]:
    return [Op.delete(handle_key(node, handle)),
            Op.put(address_key(node, address), {"eni": eni, "coolingUntil": time.time() + cooldown})]
