"""The bpffs where podnet keeps its pins, one directory per agent:

    /sys/fs/bpf/podnet/<instance>/maps/<map>                   maps (libbpf pins them by name)
    /sys/fs/bpf/podnet/<instance>/progs/<object>-<digest>/<prog>   the programs of one build

<instance> is the node's name and its network namespace's inode: two agents (lab
nodes, parallel tests) never share a pin, and an agent restarted in the same
namespace finds its own again. Pins outlive the agent: that is what lets a restart
keep every connection (the programs stay attached, the maps keep their entries).

Which bpffs (pin_root()): $PODNET_BPFFS if set, else /run/podnet/bpf if a bpffs is
mounted there, else /sys/fs/bpf. The second exists for processes started with
`ip netns exec` (the lab's agents, the tests' drivers): it gives them a /sys of their
own, without the host's /sys/fs/bpf, and a bpffs they mounted themselves would be
theirs alone; the host side mounts /run/podnet/bpf once (ensure_shared_bpffs) and
every process started after sees that same bpffs. A DaemonSet mounts the host's
/sys/fs/bpf, as for every eBPF dataplane.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from podnet.errors import PodnetError

BPFFS = "/sys/fs/bpf"
SHARED_BPFFS = "/run/podnet/bpf"
ROOT = "podnet"
BPF_FS_MAGIC = "bpf"


class BpffsError(PodnetError):
    pass


def is_bpffs(path: str) -> bool:
    """path is the mount point of a bpffs (read from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == real and fields[sep + 1] == BPF_FS_MAGIC:
                return True
    return False


def ensure_bpffs(path: str = BPFFS) -> str:
    """Mount a bpffs at path unless one is there (systemd mounts it on most hosts)."""
    if is_bpffs(path):
        return path
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
    if proc.returncode != 0 and not is_bpffs(path):
        raise BpffsError(f"cannot mount a bpffs at {path}: {proc.stderr.strip()}")
    return path


def pin_root() -> str:
    """The bpffs this process keeps its pins in (see the module's doc)."""
    env = os.environ.get("PODNET_BPFFS")
    if env:
        return ensure_bpffs(env)
    if is_bpffs(SHARED_BPFFS):
        return SHARED_BPFFS
    return ensure_bpffs(BPFFS)


def ensure_shared_bpffs() -> str:
    """Mount the bpffs at /run/podnet/bpf that processes started by `ip netns exec`
    after this call share (called on the host side: the lab, the tests)."""
    return ensure_bpffs(SHARED_BPFFS)


def instance_name(node: str) -> str:
    """This agent's pin directory name: the node and its network namespace's inode (bpffs
    refuses a name with a dot)."""
    ino = os.stat("/proc/self/ns/net").st_ino
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', node)}-{ino}"


@dataclass(frozen=True)
class PinDir:
    """One agent's pins."""

    root: Path

    @classmethod
    def for_instance(cls, instance: str, bpffs: str | None = None) -> PinDir:
        d = cls(Path(bpffs and ensure_bpffs(bpffs) or pin_root()) / ROOT / instance)
        d.maps.mkdir(parents=True, exist_ok=True)
        d.progs.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def maps(self) -> Path:
        return self.root / "maps"

    @property
    def progs(self) -> Path:
        return self.root / "progs"

    def map_path(self, name: str) -> str:
        return str(self.maps / name)

    def unpin_object(self, name: str, maps: Iterable[str]) -> None:
        """Unpin one object's maps and every pinned build of its programs (programs still
        attached or linked stay so until detached: the kernel holds its own reference)."""
        for m in maps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.map_path(m))
        for d in self.progs.glob(f"{name}-*"):
            shutil.rmtree(d, ignore_errors=True)

    def remove(self) -> None:
        """Unpin everything of this instance (a program still attached stays attached
        until detached: tc holds its own reference)."""
        shutil.rmtree(self.root, ignore_errors=True)


def mounted_pin_roots() -> list[Path]:
    """The `podnet` directories of the bpffs mounts an agent may have pinned in (see
    pin_root), those that exist, without mounting anything: for what agents left behind."""
    bases = dict.fromkeys((os.environ.get("PODNET_BPFFS") or SHARED_BPFFS, SHARED_BPFFS, BPFFS))
    return [Path(base) / ROOT for base in bases if (Path(base) / ROOT).is_dir() and is_bpffs(base)]


def existing_pin_dir(instance: str) -> PinDir | None:
    """The instance's pins where an earlier agent left them (an agent that runs no eBPF
    dataplane looks for what one left behind)."""
    for root in mounted_pin_roots():
        if (root / instance).is_dir():
            return PinDir(root / instance)
    return None


def remove_netns_pins(netns_inode: int, bpffs: str | None = None) -> list[str]:
    """Unpin every agent instance of a network namespace about to be deleted (the lab's
    nodes): their programs go with the namespace's interfaces, the pins would stay."""
    gone = []
    root = Path(bpffs or pin_root()) / ROOT
    if root.is_dir():
        for d in root.glob(f"*-{netns_inode}"):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone
