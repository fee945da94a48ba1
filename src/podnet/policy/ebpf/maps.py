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
from dataclasses import dataclass

from podnet.policy.compiler import EGRESS, INGRESS, PolicyState, Rule

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


@dataclass(frozen=True)
class MapState:
    pods: dict[str, tuple[int, int]]  # address -> (ingress group, egress group)
    groups: dict[int, tuple[MapRule, ...]]
    peers: dict[int, frozenset[str]]  # set -> "a.b.c.d/len"
    ports: dict[int, frozenset[tuple[str, int]]]  # set -> (address, port)
    names: dict[int, str]  # set or group number -> the compiler's name (for messages)

    def entry_count(self) -> int:
        return (len(self.pods) + len(self.groups) + sum(len(r) for r in self.groups.values())
                + sum(len(p) for p in self.peers.values()) + sum(len(p) for p in self.ports.values()))


EMPTY_MAPS = MapState({}, {}, {}, {}, {})


def prefixes(element: str) -> list[str]:
    """A cidr set's element (`a.b.c.d/len` or `first-last`) as prefixes."""
    if "-" not in element:
        return [str(ipaddress.ip_network(element, strict=False))]
    first, last = element.split("-", 1)
    return [str(n) for n in ipaddress.summarize_address_range(ipaddress.IPv4Address(first),
                                                               ipaddress.IPv4Address(last))]


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


def map_state(state: PolicyState, local_ips: frozenset[str] | set[str]) -> MapState:
    """The maps for `state` on a node whose pods have `local_ips`."""
    names: dict[int, str] = {}
    groups: dict[int, tuple[MapRule, ...]] = {}
    for name, g in state.groups.items():
        gid = object_id(name)
        names[gid] = name
        groups[gid] = tuple(map_rule(r) for c in g.policy_chains for r in state.policy_chains[c].rules)
    ing, eg = state.dispatch[INGRESS], state.dispatch[EGRESS]
    pods = {ip: (object_id(ing[ip]) if ip in ing else 0, object_id(eg[ip]) if ip in eg else 0)
            for ip in (*local_ips, *ing, *eg)}
    peers: dict[int, frozenset[str]] = {}
    ports: dict[int, frozenset[tuple[str, int]]] = {}
    for name, s in state.sets.items():
        sid = object_id(name)
        names[sid] = name
        if s.kind == "addr":
            peers[sid] = frozenset(f"{ip}/32" for ip in s.elements)
        elif s.kind == "cidr":
            peers[sid] = frozenset(p for e in s.elements for p in prefixes(e))
        else:  # "addrport": "a.b.c.d . port"
            ports[sid] = frozenset((ip, int(port)) for ip, _, port in (e.partition(" . ") for e in s.elements))
    return MapState(pods, groups, peers, ports, names)


# ------------------------------------------------------------------ keys and values


def pod_key(ip: str) -> bytes:
    return POD_KEY.pack(socket.inet_aton(ip))


def pod_value(groups: tuple[int, int]) -> bytes:
    return POD_VALUE.pack(*groups)


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
