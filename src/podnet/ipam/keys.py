"""Where IPAM keeps its records in the store (values are JSON objects; see
podnet.store.layout for why blocks and the rest live under different roots).

  /podnet/ipam/blocks/<cidr, '/' as '-'>                block record (see block.py)
  /podnet-alloc/ipam/affinities/<node>/<block name>     {state: "confirmed"|"pending", pool}
  /podnet-alloc/ipam/handles/<handle, %-quoted>         {blocks: {cidr: count}}
  /podnet-alloc/ipam/leaks/<block name>/<ordinal>       a leaked allocation seen by `release --leaked`
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from podnet.ipam.block import cidr_of_key_name, key_name
from podnet.store.layout import ALLOC, SHARED

BLOCKS = SHARED + "ipam/blocks/"  # every node routes by them
AFFINITIES = ALLOC + "ipam/affinities/"
HANDLES = ALLOC + "ipam/handles/"
LEAKS = ALLOC + "ipam/leaks/"


def block_key(cidr: str) -> str:
    return BLOCKS + key_name(cidr)


def node_affinities(node: str) -> str:
    return f"{AFFINITIES}{node}/"


def affinity_key(node: str, cidr: str) -> str:
    return f"{AFFINITIES}{node}/{key_name(cidr)}"


def parse_affinity_key(key: str) -> tuple[str, str]:
    """(node, block cidr) of an affinity key."""
    node, _, name = key[len(AFFINITIES):].partition("/")
    return node, cidr_of_key_name(name)


def handle_key(handle: str) -> str:
    return HANDLES + quote(handle, safe="")


def handle_of_key(key: str) -> str:
    return unquote(key[len(HANDLES):])


def leak_key(cidr: str, ordinal: int) -> str:
    return f"{LEAKS}{key_name(cidr)}/{ordinal}"
