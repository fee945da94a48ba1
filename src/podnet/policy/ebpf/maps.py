"""The policy compiler's state as the contents of native/bpf/policy.c's maps (pure).

    pods    every local pod's address -> (ingress group, egress group); 0: not isolated.
            A local pod is always present: the program drops a local address it lacks.
    groups  group -> its rules in order: the rules of every policy chain of the group
            (the pods selected by the same policies share one, as in nftables)
    peers   peer set -> prefixes: a pod selector's pod addresses (/32), an ipBlock's
            cidr minus its excepts as prefixes
    ports   named-port set -> (address, port) of the pods that define the name

Sets and groups are numbered by a 64-bit hash of the compiler's names for them (which
are themselves hashes of content or identity), so the numbering is the same in every
agent process: a restarted agent finds its maps already right and changes nothing.
Keys and values are packed here exactly as the C structs lay them out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from podnet.policy.compiler import EGRESS, INGRESS, PolicyState, Rule, SetDef

INGRESS_SLOT, EGRESS_SLOT = 0, 1  # POL_INGRESS, POL_EGRESS: the index into a pod's groups
ANY_PEER, ANY_PORT, RANGE, NAMED = 0x01, 0x02, 0x04, 0x08
PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
MAX_RULES = 65536  # POL_MAX_RULES: the program walks no more of one group

# the C structs (native/bpf/policy.c), little-endian as the BPF target on this host
POD_KEY = struct.Struct("<4s")  # __u32 addr, network order
POD_VALUE = struct.Struct("<QQ")  # struct pol_pod
GROUP_KEY = struct.Struct("<Q")
GROUP_VALUE = struct.Struct("<II")  # struct pol_group: count, gen
RULE_KEY = struct.Struct("<QII")  # struct pol_rule_key: group, gen, index
RULE_VALUE = struct.Struct("<QQHHBBH")  # struct pol_rule
PEER_KEY = struct.Struct("<III4s")  # struct pol_peer_key: prefixlen, set_lo, set_hi, addr
PORT_KEY = struct.Struct("<Q4s2sH")  # struct pol_port_key: set, addr, port (network order), pad
FLAG_VALUE = struct.Struct("<I")  # the value of peers and ports: present
SET_BITS = 64
SERVICE_CIDRS_SET = 0  # POL_SERVICE_CIDRS: compiled sets are numbered by object_id, never 0


@lru_cache(maxsize=1 << 16)
def object_id(name: str) -> int:
    """The map number of a compiled set or group; never 0 (0 is "no group")."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1


@dataclass(frozen=True, slots=True)
class MapRule:
    peer_set: int  # 0 with ANY_PEER
    port_set: int  # a named port's set, else 0
    lo: int
    hi: int
    proto: int
    flags: int

    def pack(self) -> bytes:
        return RULE_VALUE.pack(self.peer_set, self.port_set, self.lo, self.hi, self.proto, self.flags, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> MapRule:
        peer, port, lo, hi, proto, flags, _ = RULE_VALUE.unpack(raw)
        return cls(peer, port, lo, hi, proto, flags)


@lru_cache(maxsize=1 << 14)
def prefixes(element: str) -> tuple[str, ...]:
    """A cidr set's element (`a.b.c.d/len` or `first-last`) as prefixes."""
    if "-" not in element:
        return (str(ipaddress.ip_network(element, strict=False)),)
    first, last = element.split("-", 1)
    return tuple(str(n) for n in ipaddress.summarize_address_range(ipaddress.IPv4Address(first),
                                                                   ipaddress.IPv4Address(last)))


def map_rule(rule: Rule) -> MapRule:
    peer = object_id(rule.peer_set) if rule.peer_set is not None else 0
    flags = 0 if rule.peer_set is not None else ANY_PEER
    pm = rule.port
    if pm is None:
        return MapRule(peer, 0, 0, 0, 0, flags | ANY_PORT)
    proto = PROTOCOL_NUMBERS[pm.protocol]
    if pm.named_set is not None:
        return MapRule(peer, object_id(pm.named_set), 0, 0, proto, flags | NAMED)
    if pm.lo is None:
        return MapRule(peer, 0, 0, 0, proto, flags)
    return MapRule(peer, 0, pm.lo, pm.hi if pm.hi is not None else pm.lo, proto, flags | RANGE)


def set_entries(s: SetDef) -> tuple[str, dict[bytes, bytes]]:
    """The map a compiled set goes to and its entries there."""
    sid = object_id(s.name)
    flag = FLAG_VALUE.pack(1)
    if s.kind == "addr":
        return "podnet_pol_peers", {peer_key(sid, f"{ip}/32"): flag for ip in s.elements}
    if s.kind == "cidr":
        return "podnet_pol_peers", {peer_key(sid, p): flag for e in s.elements for p in prefixes(e)}
    # "addrport": "a.b.c.d . port"
    return "podnet_pol_ports", {port_key(sid, ip, int(port)): flag
                                for ip, _, port in (e.partition(" . ") for e in s.elements)}


@dataclass
class Desired:
    """The maps' contents for a compiled state, before generations are given: every
    local pod's entry, each group's packed rules, each set's elements (peer and
    named-port entries), and what differs from the build before it."""

    pods: dict[bytes, bytes]
    groups: dict[int, tuple[bytes, ...]]
    sets: dict[str, tuple[str, dict[bytes, bytes]]]  # set name -> (its map, its entries)
    names: dict[int, str]  # group number -> the compiler's name (for messages)
    # against the build before: set name -> (its map and entries then, its map and entries
    # now; None where it was or is not), and the groups added, changed or gone (the
    # programmer writes only these when the maps hold that build)
    changed_sets: dict[str, tuple[tuple[str, dict[bytes, bytes]] | None, tuple[str, dict[bytes, bytes]] | None]] \
        = field(default_factory=dict)
    changed_groups: frozenset[int] = frozenset()

    def entries(self, map_name: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for kind, entries in self.sets.values():
            if kind == map_name:
                out.update(entries)
        return out

    @cached_property
    def peers(self) -> dict[bytes, bytes]:
        return self.entries("podnet_pol_peers")

    @cached_property
    def ports(self) -> dict[bytes, bytes]:
        return self.entries("podnet_pol_ports")

    def entry_count(self) -> int:
        return (len(self.pods) + len(self.groups) + sum(len(r) for r in self.groups.values())
                + sum(len(e) for _, e in self.sets.values()))


class MapContents:
    """Builds `Desired` from compiled states. The compiler hands back the same set and
    chain objects while they do not change, so each set's entries and each group's
    rules are kept by the identity of the objects they came from: a label change
    converts the sets it touched, not every set, and says which ones it touched.
    `extra_sets`: set name -> (map, entries) written along with every state (the
    Service CIDRs)."""

    def __init__(self, extra_sets: dict[str, tuple[str, dict[bytes, bytes]]] | None = None) -> None:
        self.extra_sets = dict(extra_sets or {})
        self._sets: dict[str, tuple[object, str, dict[bytes, bytes]]] = {}  # name -> (source, map, entries)
        self._groups: dict[str, tuple[tuple, tuple[bytes, ...]]] = {}

    def build(self, state: PolicyState, local_ips: frozenset[str] | set[str]) -> Desired:
        groups: dict[int, tuple[bytes, ...]] = {}
        names: dict[int, str] = {}
        kept_groups = {}
        changed_groups = set()
        for name, g in state.groups.items():
            chains = tuple(state.policy_chains[c] for c in g.policy_chains)
            cached = self._groups.get(name)
            if cached is None or len(cached[0]) != len(chains) or any(
                    a is not b for a, b in zip(cached[0], chains, strict=True)):
                cached = (chains, tuple(map_rule(r).pack() for c in chains for r in c.rules))
                changed_groups.add(object_id(name))
            kept_groups[name] = cached
            gid = object_id(name)
            groups[gid] = cached[1]
            names[gid] = name
        changed_groups.update(object_id(n) for n in self._groups.keys() - kept_groups.keys())
        self._groups = kept_groups
        sets: dict[str, tuple[str, dict[bytes, bytes]]] = {}
        changed_sets: dict = {}
        kept_sets = {}
        sources = [(name, s, None) for name, s in state.sets.items()]
        sources += [(name, entries, kind) for name, (kind, entries) in self.extra_sets.items()]
        for name, source, kind in sources:
            cached_set = self._sets.get(name)
            if cached_set is None or cached_set[0] is not source:
                fresh = (source, *(set_entries(source) if kind is None else (kind, source)))
                if cached_set is None or cached_set[1:] != fresh[1:]:
                    changed_sets[name] = (cached_set[1:] if cached_set else None, fresh[1:])
                cached_set = fresh
            kept_sets[name] = cached_set
            sets[name] = (cached_set[1], cached_set[2])
        for name in self._sets.keys() - kept_sets.keys():
            changed_sets[name] = (self._sets[name][1:], None)
        self._sets = kept_sets
        ing, eg = state.dispatch[INGRESS], state.dispatch[EGRESS]
        pods = {pod_key(ip): POD_VALUE.pack(object_id(ing[ip]) if ip in ing else 0,
                                            object_id(eg[ip]) if ip in eg else 0)
                for ip in (*local_ips, *ing, *eg)}
        return Desired(pods, groups, sets, names, changed_sets, frozenset(changed_groups))


EMPTY = Desired({}, {}, {}, {})


def service_cidr_entries(cidrs: tuple[str, ...] | list[str]) -> dict[bytes, bytes]:
    """The Service CIDRs as peer set 0: the program drops an isolated pod's egress to an
    address in them (one it sees untranslated, as behind nftables Services)."""
    return {peer_key(SERVICE_CIDRS_SET, str(ipaddress.ip_network(c, strict=False))): FLAG_VALUE.pack(1)
            for c in cidrs if ipaddress.ip_network(c, strict=False).version == 4}


# ------------------------------------------------------------------ keys and values


def pod_key(ip: str) -> bytes:
    return POD_KEY.pack(socket.inet_aton(ip))


def group_value(count: int, gen: int) -> bytes:
    return GROUP_VALUE.pack(count, gen)


def rule_key(group: int, gen: int, index: int) -> bytes:
    return RULE_KEY.pack(group, gen, index)


def peer_key(set_id: int, prefix: str) -> bytes:
    addr, _, length = prefix.partition("/")
    return PEER_KEY.pack(SET_BITS + int(length or 32), set_id & 0xFFFFFFFF, set_id >> 32, socket.inet_aton(addr))


def port_key(set_id: int, ip: str, port: int) -> bytes:
    return PORT_KEY.pack(set_id, socket.inet_aton(ip), port.to_bytes(2, "big"), 0)


def parse_pod_key(raw: bytes) -> str:
    return socket.inet_ntoa(raw[:4])


def parse_peer_key(raw: bytes) -> tuple[int, str]:
    length, lo, hi, addr = PEER_KEY.unpack(raw)
    return lo | hi << 32, f"{socket.inet_ntoa(addr)}/{length - SET_BITS}"


def parse_port_key(raw: bytes) -> tuple[int, str, int]:
    set_id, addr, port, _ = PORT_KEY.unpack(raw)
    return set_id, socket.inet_ntoa(addr), int.from_bytes(port, "big")
