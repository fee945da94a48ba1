"""The cgroup2 hierarchy's root, where podnet's socket programs attach.

A node with the unified hierarchy has it at /sys/fs/cgroup; a hybrid host (systemd's
legacy layout) at /sys/fs/cgroup/unified. It is found in /proc/self/mountinfo (a mount of
type cgroup2 whose root is the hierarchy's). A process started with `ip netns exec` (the
lab's agents, the tests' drivers) gets a /sys of its own, without the host's cgroup
mounts: then cgroup2 is mounted at /run/podnet/cgroup2 in the process's own mount
namespace (`ip netns exec` made it a slave: the host never sees that mount). Every cgroup2
mount shows the same hierarchy, so the root found either way is the machine's (or the
cgroup namespace's).
"""

from __future__ import annotations

import os
import subprocess

from podnet.errors import PodnetError

OWN_MOUNT = "/run/podnet/cgroup2"


class CgroupError(PodnetError):
    pass


MOUNTINFO = "/proc/self/mountinfo"


def _mounts(mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount point, root within the file system, file system type) in mount order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4].replace("\\040", " "), fields[3], fields[sep + 1]))
    return out


def cgroup2_mounts(mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points of the cgroup2 hierarchy's root, in mount order."""
    return [point for point, root, fstype in _mounts(mountinfo) if fstype == "cgroup2" and root == "/"]


def _fs_type(path: str, mountinfo: str) -> str:
    """The file system type path is on (its longest mount point; the last mount there wins)."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    for point, _, t in _mounts(mountinfo):
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, t
    return fstype


def is_cgroup2_root(path: str) -> bool:
    return os.path.realpath(path) in {os.path.realpath(p) for p in cgroup2_mounts()}


def cgroup2_root(override: str | None = None, mountinfo: str = MOUNTINFO) -> str:
    """The cgroup2 root to attach to: override (--cgroup-root) if given, else the first
    cgroup2 mount, else one mounted at /run/podnet/cgroup2 for this process."""
    if override:
        if not os.path.isdir(override) or _fs_type(override, mountinfo) != "cgroup2":
            raise CgroupError(f"--cgroup-root {override}: not a cgroup2 directory "
                              f"(on {_fs_type(override, mountinfo) or 'nothing mounted'})")
        return override
    mounts = cgroup2_mounts(mountinfo)
    if mounts:
        return mounts[0]
    os.makedirs(OWN_MOUNT, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "cgroup2", "none", OWN_MOUNT], capture_output=True, text=True)
    if proc.returncode != 0 and not is_cgroup2_root(OWN_MOUNT):
        raise CgroupError(f"no cgroup2 hierarchy mounted, and mounting one at {OWN_MOUNT} failed: "
                          f"{proc.stderr.strip() or proc.returncode}")
    return OWN_MOUNT


def cgroup_id(path: str) -> int:
    """The kernel's id of a cgroup (its directory's inode on cgroup2), as link info reports it."""
    return os.stat(path).st_ino
