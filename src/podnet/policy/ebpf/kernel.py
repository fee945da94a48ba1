"""The kernel side of the eBPF policy backend, on the shared eBPF foundation
(podnet.ebpf): its pinned maps, its programs (build/bpf/policy.o) and the pod veths
they are attached to at policy's hooks of the one layout (ebpf/attach.py).

Maps are pinned by name in the agent's pin directory and outlive the agent: a
restarted agent adopts the pinned programs, finds the maps as it left them (and the
flow table with every admitted connection) and the filters still attached.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from podnet.ebpf import attach as tc
from podnet.ebpf.bpffs import PinDir
from podnet.ebpf.build import object_path
from podnet.ebpf.programs import LoadedObject, load_object
from podnet.ebpf.syscall import BpfError, Map
from podnet.errors import PodnetError

OBJECT = "policy"
MAPS = ("podnet_pol_pods", "podnet_pol_groups", "podnet_pol_rules", "podnet_pol_peers", "podnet_pol_ports",
        "podnet_pol_flows", "podnet_pol_verdicts", "podnet_pol_epoch")
EPOCH_KEY = (0).to_bytes(4, "little")
FROM_POD, TO_POD, GUARD = "podnet_pol_from_pod", "podnet_pol_to_pod", "podnet_pol_guard"
PROGRAMS = {"ingress": FROM_POD, "egress": TO_POD}  # tc direction on the host-side veth -> program
# (owner in the layout, tc direction, program), in attach order: policy before its guard, so
# a veth being attached drops at most (the guard alone), never passes unjudged
FILTERS = (("policy", "ingress", FROM_POD), ("policy", "egress", TO_POD),
           ("policy-guard", "ingress", GUARD), ("policy-guard", "egress", GUARD))
POD_ALIAS_PREFIX = "podnet:"  # dataplane/pods.py marks every host-side veth it makes


class EbpfPolicyError(PodnetError):
    pass


@dataclass(frozen=True)
class MapOp:
    map: str
    key: bytes
    value: bytes | None  # None: delete


class PolicyMaps:
    """The policy object of one agent: its pinned maps and programs."""

    def __init__(self, pins: PinDir, object_file: str | os.PathLike | None = None):
        self.pins = pins
        self.object_file = object_file or object_path(OBJECT)
        self.loaded: LoadedObject | None = None

    def missing(self) -> list[str]:
        return [m for m in MAPS if not os.path.exists(self.pins.map_path(m))]

    def dump(self, name: str) -> dict[bytes, bytes]:
        try:
            with Map.pinned(self.pins.map_path(name)) as mp:
                return mp.items()
        except BpfError as e:
            raise EbpfPolicyError(str(e)) from None

    def apply(self, ops: Iterable[MapOp]) -> int:
        """Runs `ops` in their order; the count done. A failure stops there (the caller
        then reads the maps back)."""
        opened: dict[str, Map] = {}
        n = 0
        try:
            run: list[MapOp] = []
            for op in [*ops, None]:
                # consecutive writes to one map go as one batch, in order
                if run and (op is None or op.map != run[0].map or (op.value is None) != (run[0].value is None)):
                    mp = opened.get(run[0].map) or opened.setdefault(
                        run[0].map, Map.pinned(self.pins.map_path(run[0].map)))
                    if run[0].value is None:
                        for d in run:
                            mp.delete(d.key)
                    else:
                        mp.update_many([(w.key, w.value) for w in run if w.value is not None])
                    n += len(run)
                    run = []
                if op is not None:
                    run.append(op)
        except BpfError as e:
            raise EbpfPolicyError(f"policy maps not fully written ({n} changes landed): {e}") from None
        finally:
            for mp in opened.values():
                mp.close()
        return n

    def bump_epoch(self) -> None:
        """Retire every cached verdict (the program caches them under the current epoch)."""
        try:
            with Map.pinned(self.pins.map_path("podnet_pol_epoch")) as mp:
                now = int.from_bytes(mp.lookup(EPOCH_KEY) or bytes(4), "little")
                mp.update(EPOCH_KEY, ((now + 1) & 0xFFFFFFFF).to_bytes(4, "little"))
        except BpfError as e:
            raise EbpfPolicyError(str(e)) from None

    def load(self) -> bool:
        """Loads or adopts the programs; True if they are new (every filter must then be
        replaced). A map whose pin is gone makes a fresh load: the pinned programs
        still hold the old map, which nothing can write any more."""
        if self.loaded is not None and not self.missing():
            return False
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        if self.missing():
            for d in self.pins.progs.glob(f"{OBJECT}-*"):
                shutil.rmtree(d, ignore_errors=True)
        try:
            self.loaded = load_object(self.object_file, self.pins)
        except PodnetError as e:
            raise EbpfPolicyError(str(e)) from None
        self.loaded.prune_other_builds()
        return not self.loaded.adopted

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None


# ------------------------------------------------------------------ attachments


def pod_interfaces() -> dict[str, int]:
    """This namespace's host-side pod veths (those dataplane/pods.py made): name -> index."""
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()
                if str(link.get_attr("IFLA_IFALIAS") or "").startswith(POD_ALIAS_PREFIX)}


def attachment_problems(ipr: IPRoute, ifname: str, ifindex: int, loaded: LoadedObject) -> list[str]:
    """What is wrong with the policy filters of one interface ([] if all are this build's)."""
    out = []
    held = {d: tc.attached(ipr, ifindex, d) for d in PROGRAMS}
    for owner, direction, prog in FILTERS:
        prio = tc.hook(owner, direction).prio
        have = held[direction].get(prio)
        if have != loaded.filter_name(prog):
            out.append(f"{ifname}: {direction} prio {prio} holds {have or 'no filter'}, "
                       f"not {loaded.filter_name(prog)}")
    return out


def attach_policy(ipr: IPRoute, ifindex: int, loaded: LoadedObject) -> None:
    for owner, direction, prog in FILTERS:
        tc.attach(ipr, ifindex, owner, direction, loaded.fd(prog), loaded.filter_name(prog))


def retire_left_behind(node: str) -> list[str]:
    """This node ran `--policy-dataplane ebpf` before and nftables now: the policy filters
    and the guard, its maps and builds go (ebpf/retire.py)."""
    from podnet.ebpf.retire import retire

    return retire(node, "policy", {OBJECT: MAPS})
