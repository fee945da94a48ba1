"""Loading a BPF object once per agent, and adopting it after a restart.

The loader is libbpf (Debian's libbpf1, through ctypes): it creates the object's
maps, or reuses the ones pinned by name under the agent's maps directory (BTF maps
with LIBBPF_PIN_BY_NAME and `pin_root_path`, so each agent has its own), relocates
and loads the programs. `bpftool prog loadall` offers no pin root (its maps pinned by
name would all land in /sys/fs/bpf, shared by every agent of the machine), and tc's
loader loads the object again for every filter, one program copy per interface.

Programs are pinned under progs/<object>-<digest of the .o>/: an agent restarted
with the same build finds them there and adopts them (nothing is reloaded, nothing
detached: established connections keep their entries and their path); a new build
is loaded next to the old one, its filters replace the old ones in place (tc
`replace` is atomic per hook), then the old build is unpinned (prune_other_builds).
A program the kernel refuses raises ProgramLoadError with libbpf's and the
verifier's messages; nothing is attached then, the previous dataplane stays.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from podnet.ebpf.bpffs import PinDir
from podnet.ebpf.syscall import BpfError, Map, obj_get, prog_info
from podnet.errors import PodnetError

LIBBPF = "libbpf.so.1"


class ProgramLoadError(PodnetError):
    pass


class _OpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts up to pin_root_path (libbpf takes `sz` and reads no further)
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p), ("relaxed_maps", ctypes.c_bool),
                ("pin_root_path", ctypes.c_char_p)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lock = threading.Lock()  # libbpf's print callback is process-wide: one load at a time
_log: list[str] = []
_lib = None


def _libbpf():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as e:
            raise ProgramLoadError(f"{LIBBPF} not found ({e}): the eBPF dataplane needs libbpf "
                                   "(Debian: libbpf1)") from None
        lib.bpf_object__open_file.restype = ctypes.c_void_p
        lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.POINTER(_OpenOpts)]
        lib.bpf_object__load.argtypes = [ctypes.c_void_p]
        lib.bpf_object__close.argtypes = [ctypes.c_void_p]
        lib.bpf_object__next_program.restype = ctypes.c_void_p
        lib.bpf_object__next_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_program__name.restype = ctypes.c_char_p
        lib.bpf_program__name.argtypes = [ctypes.c_void_p]
        lib.bpf_program__pin.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        libc = ctypes.CDLL(None)
        libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

        def collect(level: int, fmt: bytes, args: int) -> int:
            # format libbpf's message with the C library (va_list stays a pointer)
            buf = ctypes.create_string_buffer(4096)
            libc.vsnprintf(buf, len(buf), fmt, args)
            if level <= 1:  # LIBBPF_WARN, LIBBPF_INFO
                _log.append(buf.value.decode(errors="replace").rstrip())
            return 0

        lib._podnet_print = _PRINT_FN(collect)  # kept alive with the library
        lib.libbpf_set_print.restype = ctypes.c_void_p
        lib.libbpf_set_print.argtypes = [_PRINT_FN]
        lib.libbpf_set_print(lib._podnet_print)
        _lib = lib
    return _lib


@dataclass
class LoadedObject:
    """One object's programs, pinned, with open file descriptors."""

    name: str  # the object's stem: "services", "policy"
    digest: str
    pins: PinDir
    programs: dict[str, int] = field(default_factory=dict)  # program name -> fd
    adopted: bool = False  # found pinned (an agent restart), not loaded now

    @property
    def prog_dir(self) -> Path:
        return self.pins.progs / f"{self.name}-{self.digest}"

    def fd(self, program: str) -> int:
        try:
            return self.programs[program]
        except KeyError:
            raise ProgramLoadError(f"object {self.name} has no program {program!r} "
                                   f"(it has {', '.join(sorted(self.programs))})") from None

    def filter_name(self, program: str) -> str:
        """The name its tc filters carry: program and build, so a filter is known for ours."""
        return f"{program}:{self.digest}"

    def map(self, name: str) -> Map:
        return Map.pinned(self.pins.map_path(name))

    def prune_other_builds(self) -> list[str]:
        """Unpin the other builds of this object (after their filters were replaced)."""
        gone = []
        for d in self.pins.progs.glob(f"{self.name}-*"):
            if d != self.prog_dir and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone

    def close(self) -> None:
        for fd in self.programs.values():
            os.close(fd)
        self.programs.clear()


def object_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_object(path: str | os.PathLike, pins: PinDir) -> LoadedObject:
    """The object's programs, adopted from their pins when this build is pinned already,
    else loaded (maps reused from their pins) and pinned."""
    path = Path(path)
    if not path.is_file():
        raise ProgramLoadError(f"{path}: no such BPF object (run `make setup` to build native/bpf)")
    loaded = LoadedObject(path.stem, object_digest(path), pins)
    if loaded.prog_dir.is_dir() and any(loaded.prog_dir.iterdir()):
        try:
            for pin in sorted(loaded.prog_dir.iterdir()):
                loaded.programs[pin.name] = obj_get(str(pin))
            loaded.adopted = True
            return loaded
        except BpfError:
            loaded.close()
            shutil.rmtree(loaded.prog_dir, ignore_errors=True)  # damaged: load again
    _load_and_pin(path, loaded)
    for pin in sorted(loaded.prog_dir.iterdir()):
        loaded.programs[pin.name] = obj_get(str(pin))
    return loaded


def _load_and_pin(path: Path, loaded: LoadedObject) -> None:
    lib = _libbpf()
    staging = loaded.prog_dir.with_name(f"staging-{loaded.prog_dir.name}-{os.getpid()}")  # bpffs refuses dots
    shutil.rmtree(staging, ignore_errors=True)
    with _lock:
        _log.clear()
        opts = _OpenOpts(ctypes.sizeof(_OpenOpts), None, False, str(loaded.pins.maps).encode())
        obj = lib.bpf_object__open_file(str(path).encode(), ctypes.byref(opts))
        if not obj:
            raise ProgramLoadError(f"{path}: cannot open: {os.strerror(ctypes.get_errno())}"
                                   + _messages())
        try:
            if lib.bpf_object__load(obj) != 0:
                raise ProgramLoadError(f"{path}: the kernel refused to load it: "
                                       f"{os.strerror(ctypes.get_errno())}" + _messages())
            staging.mkdir(parents=True)
            prog = lib.bpf_object__next_program(obj, None)
            while prog:
                name = lib.bpf_program__name(prog).decode()
                if lib.bpf_program__pin(prog, str(staging / name).encode()) != 0:
                    raise ProgramLoadError(f"{path}: cannot pin program {name} at {staging}" + _messages())
                prog = lib.bpf_object__next_program(obj, prog)
            os.rename(staging, loaded.prog_dir)  # the build appears whole or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            lib.bpf_object__close(obj)


def _messages(last: int = 25) -> str:
    lines = [ln for ln in _log if ln]
    if not lines:
        return ""
    return "\n  " + "\n  ".join(lines[-last:])


def program_id(fd: int) -> int:
    return prog_info(fd).id
