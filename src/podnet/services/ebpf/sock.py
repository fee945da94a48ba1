"""The Service programs for the node's own processes (native/bpf/sock.c): cgroup socket
hooks on the cgroup2 root, acting only for sockets of the agent's network namespace.

    hooks = NodeSocketHooks(pins)   # the agent's pin directory, shared with services.o
    hooks.ensure()                  # load or adopt, attach, repair: what it did
    hooks.verify()                  # what differs, or None

The object shares the Service maps with services.o (libbpf reuses them by name under
the agent's maps/), so the agent writes each entry once for both. Each program is
attached with a bpf_link (BPF_LINK_CREATE: other programs at the same hook of the same
cgroup keep running) pinned at <pins>/links/<program>: a pinned link stays attached
while the agent is down or killed, a restarted agent adopts it (no gap) and moves it to
a new build with BPF_LINK_UPDATE (one atomic swap), and unpinning it (podnet node
cleanup, the lab's node removal, a test's cleanup remove the pin directory) detaches it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from podnet.ebpf.bpffs import PinDir
from podnet.ebpf.build import object_path
from podnet.ebpf.cgroup import cgroup2_root, cgroup_id
from podnet.ebpf.programs import LoadedObject, load_object, program_id
from podnet.ebpf.syscall import BpfError, Map, link_create, link_info, link_update, obj_get, obj_pin

OBJECT = "sock"
# program -> its bpf_attach_type (include/uapi/linux/bpf.h)
PROGRAMS = {
    "podnet_sock_connect4": 10,      # BPF_CGROUP_INET4_CONNECT
    "podnet_sock_sendmsg4": 14,      # BPF_CGROUP_UDP4_SENDMSG
    "podnet_sock_recvmsg4": 19,      # BPF_CGROUP_UDP4_RECVMSG
    "podnet_sock_getpeername4": 29,  # BPF_CGROUP_INET4_GETPEERNAME
}
NETNS = "podnet_sock_netns"  # [0] -> the cookie of the network namespace the programs act for
REV = "podnet_sock_rev"      # (socket cookie, backend) -> frontend, written by the programs
MAPS = (NETNS, REV)
LINKS = "links"  # the pins' subdirectory of the programs' cgroup links
DROP_MARK = 0x00800000       # SOCK_DROP_MARK: a socket to an unused Service address
SO_NETNS_COOKIE = 71         # (not in Python's socket module)
_ZERO = (0).to_bytes(4, "little")


def netns_cookie() -> int:
    """The cookie of this process's network namespace (as bpf_get_netns_cookie() gives it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


class NodeSocketHooks:
    def __init__(self, pins: PinDir, cgroup_root: str | None = None, object_file: str | None = None):
        self.pins = pins
        self.cgroup_root_option = cgroup_root
        self.object_file = object_file or str(object_path(OBJECT))
        self.obj: LoadedObject | None = None
        self.maps: dict[str, Map] = {}
        self.cgroup: str | None = None
        self.cgroup_id = 0
        self.cookie = netns_cookie()
        self.links: dict[str, int] = {}  # program -> link fd

    @property
    def links_dir(self) -> Path:
        return self.pins.root / LINKS

    def ensure(self) -> list[str]:
        """Load (or adopt) the programs, keep the namespace's cookie in its map and every
        program linked to the cgroup2 root; what had to be done. Raises ProgramLoadError,
        CgroupError or BpfError (the caller keeps the tc dataplane going)."""
        done = []
        if self.cgroup is None:
            self.cgroup = cgroup2_root(self.cgroup_root_option)
            self.cgroup_id = cgroup_id(self.cgroup)
        if self.obj is None:
            self.obj = load_object(self.object_file, self.pins)
            self.maps = {name: self.obj.map(name) for name in MAPS}
        for name, mp in self.maps.items():  # unpinned behind podnet's back: the programs still use it
            path = self.pins.map_path(name)
            if not os.path.exists(path):
                obj_pin(mp.fd, path)
                done.append(f"map {name} pinned again")
        for prog, fd in self.obj.programs.items():  # likewise a program's pin (a restart adopts it there)
            path = self.obj.prog_dir / prog
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                obj_pin(fd, str(path))
                done.append(f"program {prog} pinned again")
        netns = self.maps[NETNS]
        if netns.lookup(_ZERO) != self.cookie.to_bytes(8, "little"):
            netns.update(_ZERO, self.cookie.to_bytes(8, "little"))
            done.append("network namespace cookie written")
        self.links_dir.mkdir(parents=True, exist_ok=True)
        for prog, attach_type in PROGRAMS.items():
            what = self._ensure_link(prog, attach_type)
            if what:
                done.append(f"{prog}: {what}")
        self.obj.prune_other_builds()
        return done

    def _ensure_link(self, prog: str, attach_type: int) -> str:
        assert self.obj is not None and self.cgroup is not None
        path = self.links_dir / prog
        want = program_id(self.obj.fd(prog))
        fd = self.links.pop(prog, None)
        what = ""
        if fd is None and path.exists():
            try:
                fd = obj_get(str(path))  # a pin of an earlier agent: adopted
            except BpfError:
                path.unlink(missing_ok=True)
        if fd is not None:
            info = link_info(fd)
            if info.cgroup_id != self.cgroup_id or info.attach_type != attach_type:
                os.close(fd)  # detached behind podnet's back (or not ours): a new link
                fd = None
                path.unlink(missing_ok=True)
                what = "was detached, linked again"
            elif info.prog_id != want:
                link_update(fd, self.obj.fd(prog), f"moving the {prog} link to this build")
                what = "moved to this build"
        if fd is None:
            cg = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fd = link_create(self.obj.fd(prog), cg, attach_type, f"linking {prog} to the cgroup {self.cgroup}")
            finally:
                os.close(cg)
            what = what or "linked"
        if not path.exists():
            obj_pin(fd, str(path))
            what = what or "pinned again"
        self.links[prog] = fd
        return what

    def verify(self) -> str | None:
        """What differs from the programs attached for this namespace, or None."""
        if self.obj is None:
            return "socket programs not loaded"
        for name in MAPS:
            if not os.path.exists(self.pins.map_path(name)):
                return f"map {name} is not pinned"
        for prog in self.obj.programs:
            if not (self.obj.prog_dir / prog).exists():
                return f"program {prog} is not pinned"
        if self.maps[NETNS].lookup(_ZERO) != self.cookie.to_bytes(8, "little"):
            return f"map {NETNS} does not hold this network namespace's cookie"
        for prog, attach_type in PROGRAMS.items():
            if not (self.links_dir / prog).exists():
                return f"link {prog} is not pinned"
            fd = self.links.get(prog)
            if fd is None:
                return f"link {prog} is not held"
            try:
                info = link_info(fd)
            except BpfError as e:
                return str(e)
            if info.cgroup_id != self.cgroup_id or info.attach_type != attach_type:
                return f"link {prog} is detached from {self.cgroup}"
            if info.prog_id != program_id(self.obj.fd(prog)):
                return f"link {prog} runs another program"
        return None

    def remove(self) -> None:
        """Unpin and close the links (detaching the programs), the programs and own maps."""
        for fd in self.links.values():
            os.close(fd)
        self.links.clear()
        for prog in PROGRAMS:
            (self.links_dir / prog).unlink(missing_ok=True)
        for mp in self.maps.values():
            mp.close()
        self.maps.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        self.pins.unpin_object(OBJECT, MAPS)
        try:
            self.links_dir.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
