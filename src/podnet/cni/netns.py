"""The check of CNI_NETNS on ADD and CHECK: is the path a pod's network namespace?

A runtime may hand in a path that is gone, is not a namespace, is another kind of
namespace, or is the node's own network namespace; netns_problem says which, in a sentence
the commands return with code 8 (libcni's ErrInvalidNetNS), and the node is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _node_namespaces() -> list[os.stat_result]:
    """The agent's own network namespace and init's: a pod's namespace is neither."""
    out = []
    for path in ("/proc/self/ns/net", "/proc/1/ns/net"):
        with contextlib.suppress(OSError):
            out.append(os.stat(path))
    return out


def netns_problem(path: str) -> str | None:
    """Why path is not a pod's network namespace, or None if it is one."""
    if not path.startswith("/"):
        return f"CNI_NETNS {path!r} is not an absolute path"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"network namespace {path} does not exist"
    except OSError as e:
        return f"cannot open network namespace {path}: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            return f"{path} is not a network namespace"
        if nstype != CLONE_NEWNET:
            return f"{path} is a namespace, but not a network namespace"
        if any(_same_file(st, own) for own in _node_namespaces()):
            return f"{path} is the node's own network namespace, not a pod's"
    finally:
        os.close(fd)
    return None
