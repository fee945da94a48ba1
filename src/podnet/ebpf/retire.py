"""A node switched from an eBPF dataplane back to nftables (or iptables).

What the eBPF dataplane left keeps acting after its agent is gone: tc holds the filters
on the pods' veths and the node's interfaces, the pinned links keep the socket programs
on the cgroup2 root, and all of them read maps nobody writes any more (a Service's old
backends, an old policy). So an agent that runs the other dataplane removes them at
start, before it programs the node: the filters at that dataplane's prios of the hook
layout (attach.LAYOUT) that are podnet's, its pinned links, maps and program builds.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.ebpf import attach
from podnet.ebpf.bpffs import PinDir, existing_pin_dir, instance_name
from podnet.errors import PodnetError

log = logging.getLogger(__name__)


def left_behind(pins: PinDir, objects: Iterable[str]) -> bool:
    return any(any(pins.progs.glob(f"{obj}-*")) for obj in objects)


def detach_owner(owner: str) -> list[str]:
    """Detach podnet's filters at the prios `owner` holds in the layout (its own and those
    of owners named `<owner>-...`, e.g. policy's guard), on every interface of this
    namespace; what was detached."""
    hooks = {(h.direction, h.prio) for h in attach.LAYOUT if h.owner == owner or h.owner.startswith(f"{owner}-")}
    done = []
    with IPRoute() as ipr:
        for f in attach.podnet_filters(ipr):
            if (f.direction, f.prio) in hooks and attach.detach_prio(ipr, f.ifindex, f.direction, f.prio):
                done.append(f"{f.ifname} {f.direction} {f.name}")
    return done


def retire(node: str, owner: str, objects: dict[str, Iterable[str]], pin_dirs: Iterable[str] = ()) -> list[str]:
    """Remove what an eBPF dataplane of this node (`owner` in the hook layout) left, if its
    programs are pinned: filters, the named subdirectories of the pins (links), the
    objects' maps and builds. What was removed ([] if nothing was left)."""
    pins = existing_pin_dir(instance_name(node))
    if pins is None or not left_behind(pins, objects):
        return []
    done = detach_owner(owner)
    for sub in pin_dirs:  # pinned links: unpinning the last reference detaches the program
        if (pins.root / sub).is_dir():
            shutil.rmtree(pins.root / sub, ignore_errors=True)
            done.append(f"pins {pins.root / sub}")
    for obj, maps in objects.items():
        pins.unpin_object(obj, maps)
        done.append(f"object {obj} (maps and programs)")
    log.warning("the eBPF %s dataplane this node ran before is removed: %s", owner, "; ".join(done))
    return done


def retire_quietly(what: str, run: Callable[[], list[str]]) -> None:
    """The agent's start goes on when removing them fails: say what is left and how to go."""
    try:
        run()
    except (PodnetError, OSError, NetlinkError) as e:
        log.warning("the %s this node ran before could not be removed (%s): it may still act on the node's "
                    "traffic with what it last knew; `podnet node cleanup` removes it", what, e)
