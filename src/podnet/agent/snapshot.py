"""The agent's restart snapshot: what its dataplanes were fed, kept on the node across a
restart, so that a restarted agent does not list and decode the whole cluster again.

A node agent of a 5 000-node cluster holds every Pod, Service and endpoint of the cluster
in compact records; building them from a full list is most of its start (bench_cluster:
~8 s of CPU at that size, and on etcd every restart reads ~150 MiB from the store; a
DaemonSet rollout does it on every node at once). On SIGTERM (a rollout, a node drain)
the agent writes here what each dataplane holds and the store revision it is current
to; the next start on the node loads it (~1 s), programs the kernel from it (adopting
the tables that already say the same), and watches the store from that revision on.

When a snapshot is used, and when not (a full list then, as on a new node):
- it is written only by a clean stop, after the watch ended (the records are exactly
  those of its revision) and only once the agent had programmed the node;
- it is used once: a start removes it before using it. An agent killed (-9, OOM) leaves
  none, so a snapshot is never older than what the kernel was last programmed with: a
  start from one never programs an older policy than the node already had;
- its header must match: the format, this build of podnet (a digest of its sources and
  the Python and pydantic versions: the records are pickled classes), the agent's
  configuration (node, addresses, proxy, DNS, ...), the dataplanes it holds, and the
  store (its identity, and a revision not ahead of the store's); a store whose history
  no longer reaches the revision makes the watch relist (follow.py), as after any gap;
- the file must be the agent's own (owned by its user, not writable by others): loading
  a pickle runs code, so a file anyone else could have written is refused;
- a file that does not read back whole (a checksum over the payload) is refused.
A refused snapshot is reported in the log with the reason and removed; the start lists.

The file is `<socket>.snapshot` beside the agent's lock and .synced files: the same
host directory, private to the node, and removed by `podnet node cleanup`.
"""

from __future__ import annotations

import contextlib
import copyreg
import hashlib
import json
import logging
import os
import pickle
import stat
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("podnet.agent")

FORMAT = 1
SUFFIX = ".snapshot"
# A start replays the store's changes since the snapshot one by one: past this many
# revisions a fresh list is cheaper (and the snapshot that old is stale anyway).
MAX_REVISIONS_BEHIND = 200_000


def _mappingproxy(d: dict) -> types.MappingProxyType:
    return types.MappingProxyType(d)


# Records share read-only mappings (an empty weights mapping); pickle knows no mappingproxy.
copyreg.pickle(types.MappingProxyType, lambda m: (_mappingproxy, (dict(m),)))


@dataclass
class Snapshot:
    revision: int
    cache: Any  # ObjectCache.snapshot_state()
    dataplanes: dict[str, Any]  # dataplane name -> its snapshot()


_BUILD: str | None = None


def build_digest() -> str:
    """This build of podnet: its sources, Python's and pydantic's versions (what decides
    whether pickled records load as the same classes with the same fields)."""
    global _BUILD
    if _BUILD is None:
        import pydantic

        import podnet

        h = hashlib.sha256(f"{FORMAT} {sys.version} {pydantic.VERSION}".encode())
        root = Path(podnet.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes())
        _BUILD = h.hexdigest()
    return _BUILD


def fingerprint(config: dict[str, Any]) -> str:
    """A digest of what the held records depend on beyond the store (the agent's settings)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode()).hexdigest()


def write(path: str, snap: Snapshot, config: str, store: str) -> int:
    """Write the snapshot (atomically: a reader sees the old file or the whole new one);
    the bytes written."""
    payload = pickle.dumps((snap.cache, snap.dataplanes), protocol=pickle.HIGHEST_PROTOCOL)
    header = {"format": FORMAT, "build": build_digest(), "config": config, "store": store,
              "revision": snap.revision, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(payload)


class Refused(Exception):
    """Why a snapshot on disk cannot be used."""


def take(path: str, config: str, store: str, store_revision: int) -> Snapshot | None:
    """The snapshot at `path` if there is one and it fits (see the module's doc), else None
    (the reason logged). The file is removed either way: a snapshot is used once."""
    try:
        data = _read_own(path)
    except FileNotFoundError:
        return None
    except (OSError, Refused) as e:
        log.warning("not starting from %s: %s; listing the store", path, e)
        remove(path)
        return None
    remove(path)
    try:
        return _check(data, config, store, store_revision)
    except Refused as e:
        log.warning("not starting from %s: %s; listing the store", path, e)
        return None


def _read_own(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise Refused(f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: only a file of "
                          f"uid {os.geteuid()} that no one else can write is loaded")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _check(data: bytes, config: str, store: str, store_revision: int) -> Snapshot:
    line, _, payload = data.partition(b"\n")
    try:
        header = json.loads(line)
        revision = int(header["revision"])
    except (ValueError, KeyError, TypeError) as e:
        raise Refused(f"its header does not read ({e})") from None
    if header.get("format") != FORMAT:
        raise Refused(f"format {header.get('format')!r}, this agent reads {FORMAT}")
    if header.get("build") != build_digest():
        raise Refused("written by another build of podnet")
    if header.get("config") != config:
        raise Refused("written with other agent settings")
    if header.get("store") != store:
        raise Refused("written from another store")
    if revision > store_revision:
        raise Refused(f"at revision {revision}, ahead of the store's {store_revision} (a store restored or replaced)")
    if store_revision - revision > MAX_REVISIONS_BEHIND:
        raise Refused(f"{store_revision - revision} revisions behind the store")
    if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise Refused("its contents do not match their checksum (cut short or damaged)")
    try:
        cache, dataplanes = pickle.loads(payload)
    except Exception as e:  # a damaged payload can fail in many ways: each is a refusal
        raise Refused(f"its contents do not load ({type(e).__name__}: {e})") from None
    return Snapshot(revision, cache, dataplanes)


def remove(path: str) -> None:
    """Remove the snapshot at `path`, if any."""
    with contextlib.suppress(OSError):
        os.unlink(path)
