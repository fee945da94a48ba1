"""The Service program's maps as bytes: each function mirrors one struct of
native/bpf/services.c (addresses and ports in network byte order, the rest in host
order), and decodes what it encodes (the applier reads the maps back after a restart).
"""

from __future__ import annotations

import socket
import struct

from podnet.services.model import Backend, Frontend

OBJECT = "services"
FROM_POD, TO_POD = "podnet_svc_from_pod", "podnet_svc_to_pod"
REDIRECT = "podnet_svc_redirect"  # the fast path's last step (ingress, after policy)

FRONTENDS = "podnet_svc_frontends"
SLOTS = "podnet_svc_slots"
BACKENDS = "podnet_svc_backends"
CONNS = "podnet_svc_conns"
CLUSTER_IPS = "podnet_svc_cluster_ips"
CIDRS = "podnet_svc_cidrs"
NODE_IPS = "podnet_svc_node_ips"
EXTERNAL = "podnet_svc_external"  # a frontend's view for clients from the underlay, where it differs
IFACES = "podnet_svc_ifaces"  # ifindex -> ROLE_POD | ROLE_UNDERLAY
SRC_RANGES = "podnet_svc_src_ranges"  # LPM: (service id, source prefix) -> 1
ROLE_POD, ROLE_UNDERLAY = 1, 2
CONFIG = "podnet_svc_config"  # one entry: CFG_FAST_PATH
LOCAL = "podnet_svc_local"  # this node's pod addresses -> their host-side veth (the fast path's targets)
CFG_FAST_PATH = 0x1
CT = "podnet_svc_ct"
AFFINITY = "podnet_svc_affinity"
# the maps the agent owns (written from the desired state); CT, AFFINITY and the values
# of CONNS are the programs'
DESIRED = (BACKENDS, SLOTS, SRC_RANGES, FRONTENDS, EXTERNAL, CLUSTER_IPS, CIDRS, NODE_IPS)
ALL = (*DESIRED, CONNS, CT, AFFINITY, IFACES, CONFIG, LOCAL)

PROTOS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}

F_NO_EP_DROP = 0x1
F_AFFINITY = 0x2
F_MASQ = 0x4
F_SRC_RANGES = 0x8
MASQ_MARK = 0x00004000  # SVC_MASQ_MARK (kube-proxy's, services/model.py MASQUERADE_MARK)
SCHED_SHIFT = 8
SCHEDULERS = {"random": 0, "lc": 1, "sh": 2, "wrr": 3}
REJECT_MARK = 0x00200000  # SVC_REJECT_MARK

_FE = struct.Struct("=IIIII")
_SLOT = struct.Struct("=II")
_U32 = struct.Struct("=I")
_S64 = struct.Struct("=q")
_CT_VAL = struct.Struct("=4s2sHII")
_AFF_VAL = struct.Struct("=QII")


def frontend_key(fe: Frontend) -> bytes:
    return socket.inet_aton(fe.ip or "0.0.0.0") + fe.port.to_bytes(2, "big") + bytes((PROTOS[fe.proto], 0))


def decode_frontend_key(key: bytes) -> Frontend:
    return Frontend(socket.inet_ntoa(key[:4]), PROTO_NAMES.get(key[6], str(key[6])), int.from_bytes(key[4:6], "big"))


def frontend_value(sid: int, count: int, flags: int, affinity_timeout: int, affinity_key: int) -> bytes:
    return _FE.pack(sid, count, flags, affinity_timeout, affinity_key & 0xFFFFFFFF)


def decode_frontend_value(value: bytes) -> tuple[int, int, int, int, int]:
    return _FE.unpack(value)


def slot_key(sid: int, slot: int) -> bytes:
    return _SLOT.pack(sid, slot)


def decode_slot_key(key: bytes) -> tuple[int, int]:
    return _SLOT.unpack(key)


def u32(n: int) -> bytes:
    return _U32.pack(n)


def decode_u32(b: bytes) -> int:
    return _U32.unpack(b)[0]


_BACKEND = struct.Struct(">4sHBx")  # address and port in network order, protocol, pad


def backend_value(b: Backend, proto: str) -> bytes:
    return _BACKEND.pack(socket.inet_aton(b.ip), b.port, PROTOS[proto])


def decode_backend_value(value: bytes) -> tuple[Backend, str]:
    return (Backend(socket.inet_ntoa(value[:4]), int.from_bytes(value[4:6], "big")),
            PROTO_NAMES.get(value[6], str(value[6])))


def conns_value(n: int = 0) -> bytes:
    return _S64.pack(n)


def decode_conns(value: bytes) -> int:
    return _S64.unpack(value)[0]


def address_key(ip: str) -> bytes:
    return socket.inet_aton(ip)


def cidr_key(cidr: str) -> bytes:
    net, _, plen = cidr.partition("/")
    return _U32.pack(int(plen or 32)) + socket.inet_aton(net)


def src_range_key(sid: int, cidr: str) -> bytes:
    """struct src_range_key: the prefix length covers the id (32 bits) and the CIDR's."""
    net, _, plen = cidr.partition("/")
    return _U32.pack(32 + int(plen or 32)) + _U32.pack(sid) + socket.inet_aton(net)


def config_value(fast_path: bool) -> bytes:
    return _U32.pack(CFG_FAST_PATH if fast_path else 0)


def local_pod_value(ifindex: int) -> bytes:
    """struct local_pod"""
    return _U32.pack(ifindex)


def ct_backend_id(value: bytes) -> int:
    """struct ct_entry's backend_id."""
    return _CT_VAL.unpack(value)[3]


CT_DIR_FWD = 0
CT_F_CLOSED = 0x1  # a FIN or RST was seen: the flow is no longer counted as open
CT_F_FAST = 0x2  # the flow takes the fast path (both ends local pods, no masquerade)


def ct_open_tcp_backend(key: bytes, value: bytes) -> int | None:
    """The backend id of a forward TCP flow the programs count as open (struct ct_key's
    proto and dir, struct ct_entry's flags), else None."""
    if key[12] != PROTOS["tcp"] or key[13] != CT_DIR_FWD:
        return None
    _, _, flags, backend_id, _ = _CT_VAL.unpack(value)
    return None if flags & CT_F_CLOSED else backend_id


def affinity_backend_id(value: bytes) -> int:
    return _AFF_VAL.unpack(value)[1]
