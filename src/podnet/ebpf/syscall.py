"""bpf(2) through ctypes: pinned maps opened, looked up, updated, deleted, walked.

No maintained PyPI library updates BPF maps (bcc needs its own build of LLVM and is
not on PyPI; the pure-Python ones stopped years ago), and the calls are few: each is
one `union bpf_attr` laid out as the kernel's include/uapi/linux/bpf.h does, passed
to syscall(SYS_bpf). Keys and values are bytes; podnet's map modules pack them with
`struct` to mirror the C structs of their programs. Errors name the map and errno.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

SYS_BPF = 321  # x86_64

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_ENABLE_STATS = 32
BPF_LINK_DETACH = 34
BPF_STATS_RUN_TIME = 0

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

MAP_TYPES = {1: "hash", 2: "array", 9: "lru_hash", 11: "lpm_trie", 5: "percpu_hash", 6: "percpu_array"}
BATCHABLE = {1, 9}  # hash and lru_hash: the batch ops are implemented for them

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed: which call, on what, and the errno by name."""

    def __init__(self, err: int, what: str):
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{what}: {name} ({os.strerror(err)})")


class _Attr(ctypes.Structure):
    # bpf_attr is a union of per-command structs; 128 bytes is more than any of ours
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


def _call(cmd: int, fields: list[tuple[int, int, int]], what: str) -> int:
    """bpf(cmd, attr) with attr's fields given as (offset, size, value)."""
    attr = _Attr()
    buf = ctypes.addressof(attr)
    for off, size, value in fields:
        ctypes.memmove(buf + off, value.to_bytes(size, "little"), size)
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return ret


def _addr(b: ctypes.Array | None) -> int:
    return ctypes.addressof(b) if b is not None else 0


def obj_get(path: str) -> int:
    """A file descriptor of the object pinned at path (BPF_OBJ_GET)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _call(BPF_OBJ_GET, [(0, 8, _addr(p))], f"opening pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _call(BPF_OBJ_PIN, [(0, 8, _addr(p)), (8, 4, fd)], f"pinning at {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """A bpf_link of the program to the target (a cgroup's fd): attached while the link
    is pinned or a descriptor of it is open; others' programs at the hook stay (multi)."""
    return _call(BPF_LINK_CREATE, [(0, 4, prog_fd), (4, 4, target_fd), (8, 4, attach_type)], what)


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    """The link runs prog_fd from now on (one atomic swap: no moment without a program)."""
    _call(BPF_LINK_UPDATE, [(0, 4, link_fd), (4, 4, prog_fd)], what)


def link_detach(link_fd: int, what: str) -> None:
    """Detach the link from its hook now (the link itself stays, defunct)."""
    _call(BPF_LINK_DETACH, [(0, 4, link_fd)], what)


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    cgroup_id: int  # cgroup links: 0 once detached
    attach_type: int


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 32, "reading a link's info")  # struct bpf_link_info: type, id, prog_id, cgroup {id, type}
    u32 = [int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8, 24)]
    return LinkInfo(u32[0], u32[1], u32[2], int.from_bytes(raw[16:24], "little"), u32[3])


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str
    run_time_ns: int = 0  # counted only while run-time statistics are on (enable_stats)
    run_cnt: int = 0


def _info(fd: int, size: int, what: str) -> bytes:
    buf = (ctypes.c_uint8 * size)()
    _call(BPF_OBJ_GET_INFO_BY_FD, [(0, 4, fd), (4, 4, size), (8, 8, _addr(buf))], what)
    return bytes(buf)


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88, "reading a map's info")  # struct bpf_map_info's first fields
    u32 = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 24, 4)]
    return MapInfo(u32[0], u32[1], u32[2], u32[3], u32[4], u32[5], raw[24:40].split(b"\0")[0].decode())


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 208, "reading a program's info")  # struct bpf_prog_info up to run_cnt
    return ProgInfo(int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little"),
                    raw[8:16].hex(), raw[64:80].split(b"\0")[0].decode(),
                    int.from_bytes(raw[192:200], "little"), int.from_bytes(raw[200:208], "little"))


def enable_stats() -> int:
    """Turn on the kernel's per-program run-time statistics until the returned file
    descriptor is closed (BPF_ENABLE_STATS: nothing to restore, unlike the sysctl)."""
    return _call(BPF_ENABLE_STATS, [(0, 4, BPF_STATS_RUN_TIME)], "enabling run-time statistics")


class Map:
    """One BPF map by file descriptor (usually opened from its pin): bytes in, bytes out."""

    def __init__(self, fd: int, name: str = ""):
        self.fd = fd
        self.info = map_info(fd)
        self.name = name or self.info.name
        self._key = (ctypes.c_uint8 * self.info.key_size)()
        self._next = (ctypes.c_uint8 * self.info.key_size)()
        self._value = (ctypes.c_uint8 * self.info.value_size)()

    @classmethod
    def pinned(cls, path: str) -> Map:
        return cls(obj_get(path), os.path.basename(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_key(self, key: bytes) -> None:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, the map's are {self.info.key_size}")
        ctypes.memmove(self._key, key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        self._set_key(key)
        try:
            _call(BPF_MAP_LOOKUP_ELEM, [(0, 4, self.fd), (8, 8, _addr(self._key)), (16, 8, _addr(self._value))],
                  f"map {self.name}: lookup")
        except BpfError as e:
            if e.errno == _errno.ENOENT:
                return None
            raise
        return bytes(self._value)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._set_key(key)
        if len(value) != self.info.value_size:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, the map's are {self.info.value_size}")
        ctypes.memmove(self._value, value, len(value))
        _call(BPF_MAP_UPDATE_ELEM, [(0, 4, self.fd), (8, 8, _addr(self._key)), (16, 8, _addr(self._value)),
                                    (24, 8, flags)], f"map {self.name}: update")

    def delete(self, key: bytes) -> bool:
        """Delete key; False if it was not there."""
        self._set_key(key)
        try:
            _call(BPF_MAP_DELETE_ELEM, [(0, 4, self.fd), (8, 8, _addr(self._key))], f"map {self.name}: delete")
        except BpfError as e:
            if e.errno == _errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (BPF_MAP_GET_NEXT_KEY from none). A key deleted meanwhile restarts the
        kernel's walk from the beginning of its bucket, as for every user of this call."""
        first = True
        while True:
            try:
                _call(BPF_MAP_GET_NEXT_KEY, [(0, 4, self.fd), (8, 8, 0 if first else _addr(self._key)),
                                             (16, 8, _addr(self._next))], f"map {self.name}: next key")
            except BpfError as e:
                if e.errno == _errno.ENOENT:
                    return
                raise
            first = False
            ctypes.memmove(self._key, self._next, self.info.key_size)
            yield bytes(self._next)

    def items(self) -> dict[bytes, bytes]:
        """The whole map: BPF_MAP_LOOKUP_BATCH for hash maps (a few syscalls for
        thousands of entries), a key walk for the others."""
        if self.info.type in BATCHABLE:
            try:
                return self._lookup_batch()
            except BpfError as e:
                if e.errno not in (_errno.EINVAL, _errno.ENOTSUPP if hasattr(_errno, "ENOTSUPP") else 524):
                    raise
        out = {}
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                out[k] = v
        return out

    def _lookup_batch(self, chunk: int = 4096) -> dict[bytes, bytes]:
        ks, vs = self.info.key_size, self.info.value_size
        keys = (ctypes.c_uint8 * (ks * chunk))()
        values = (ctypes.c_uint8 * (vs * chunk))()
        # hash maps' batch token is a bucket index (u32); 8 bytes leave room
        in_b, out_b = (ctypes.c_uint8 * 8)(), (ctypes.c_uint8 * 8)()
        out: dict[bytes, bytes] = {}
        first = True
        while True:
            attr = _Attr()
            base = ctypes.addressof(attr)
            done = False
            for off, size, value in ((0, 8, 0 if first else _addr(in_b)), (8, 8, _addr(out_b)),
                                     (16, 8, _addr(keys)), (24, 8, _addr(values)), (32, 4, chunk),
                                     (36, 4, self.fd)):
                ctypes.memmove(base + off, value.to_bytes(size, "little"), size)
            ret = _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_BATCH, ctypes.byref(attr), ctypes.sizeof(attr))
            n = int.from_bytes(bytes(attr.raw[32:36]), "little")
            if ret < 0:
                err = ctypes.get_errno()
                if err != _errno.ENOENT:
                    raise BpfError(err, f"map {self.name}: batch lookup")
                done = True  # ENOENT: the last (possibly partial) batch
            kb, vb = bytes(keys), bytes(values)
            for i in range(n):
                out[kb[i * ks:(i + 1) * ks]] = vb[i * vs:(i + 1) * vs]
            if done:
                return out
            ctypes.memmove(in_b, out_b, 8)
            first = False

    def update_many(self, entries: dict[bytes, bytes] | list[tuple[bytes, bytes]], chunk: int = 8192) -> int:
        """Write entries: BPF_MAP_UPDATE_BATCH for hash maps (one syscall per chunk),
        one update each otherwise. Returns how many were written."""
        if not entries:
            return 0
        if self.info.type not in BATCHABLE:
            for k, v in (entries.items() if isinstance(entries, dict) else entries):
                self.update(k, v)
            return len(entries)
        if isinstance(entries, dict) and len(entries) <= chunk:
            # (the common case: keys and values joined straight from the dict, no pairs made)
            self._update_batch(len(entries), b"".join(entries), b"".join(entries.values()))
            return len(entries)
        pairs = list(entries.items()) if isinstance(entries, dict) else list(entries)
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]
            self._update_batch(len(part), b"".join([k for k, _ in part]), b"".join([v for _, v in part]))
        return len(pairs)

    def _update_batch(self, n: int, keys: bytes, values: bytes) -> None:
        if len(keys) != n * self.info.key_size or len(values) != n * self.info.value_size:
            raise ValueError(f"map {self.name}: a key or value of the wrong size in a batch")
        # the kernel only reads them: the bytes objects' own buffers, no copy
        kp = ctypes.cast(ctypes.c_char_p(keys), ctypes.c_void_p).value or 0
        vp = ctypes.cast(ctypes.c_char_p(values), ctypes.c_void_p).value or 0
        _call(BPF_MAP_UPDATE_BATCH, [(16, 8, kp), (24, 8, vp), (32, 4, n), (36, 4, self.fd)],
              f"map {self.name}: batch update")

    def delete_many(self, keys: list[bytes]) -> int:
        """Delete keys (missing ones are skipped); how many were there. Hash maps:
        BPF_MAP_DELETE_BATCH, which stops at a missing key (ENOENT) with the count done
        before it; the rest goes on after that key. Others: one delete each."""
        keys = list(keys)
        if self.info.type not in BATCHABLE:
            return sum(self.delete(k) for k in keys)
        ks = self.info.key_size
        if any(len(k) != ks for k in keys):
            raise ValueError(f"map {self.name}: a key of the wrong size in a batch")
        n = start = 0
        while start < len(keys):
            part = keys[start:]
            kb = ctypes.create_string_buffer(b"".join(part), len(part) * ks)
            attr = _Attr()
            base = ctypes.addressof(attr)
            for off, size, value in ((16, 8, _addr(kb)), (32, 4, len(part)), (36, 4, self.fd)):
                ctypes.memmove(base + off, value.to_bytes(size, "little"), size)
            ret = _libc.syscall(SYS_BPF, BPF_MAP_DELETE_BATCH, ctypes.byref(attr), ctypes.sizeof(attr))
            done = int.from_bytes(bytes(attr.raw[32:36]), "little")
            n += done
            if ret >= 0:
                break
            err = ctypes.get_errno()
            if err != _errno.ENOENT:
                raise BpfError(err, f"map {self.name}: batch delete")
            start += done + 1  # the missing key skipped
        return n
