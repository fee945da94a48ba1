"""The kernel side of the eBPF policy backend: its pinned maps and programs, and the
pod veths it is attached to.

Layout under the pin directory (a bpffs):

    maps/podnet_pol_{pods,groups,rules,peers,ports,flows}
    progs/podnet_pol_from_pod, progs/podnet_pol_to_pod

Pinned maps outlive the agent: a restarted agent loads nothing new, finds the maps as
it left them (and the flow table with every admitted connection) and the programs still
attached. Maps are written and read with bpftool (one process per batch of commands,
JSON dumps): no maintained PyPI library updates BPF maps, and bpftool is the kernel's
own tool, installed by the set-up script with clang.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from podnet.errors import PodnetError

MAPS = ("podnet_pol_pods", "podnet_pol_groups", "podnet_pol_rules", "podnet_pol_peers", "podnet_pol_ports",
        "podnet_pol_flows")
FROM_POD, TO_POD = "podnet_pol_from_pod", "podnet_pol_to_pod"
# the hook layout on a pod's host-side veth: (program, tc direction, priority)
HOOKS = ((FROM_POD, "ingress", 2), (TO_POD, "egress", 1))
FILTER_HANDLE = "0x1"
OBJECT = Path(__file__).resolve().parents[4] / "build" / "bpf" / "policy.o"
POD_ALIAS_PREFIX = "podnet:"  # dataplane/pods.py marks every host-side veth it makes


class EbpfPolicyError(PodnetError):
    pass


def _run(args: list[str], input: str | None = None) -> str:
    try:
        out = subprocess.run(args, input=input, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EbpfPolicyError(f"{args[0]}: {e}") from None
    if out.returncode != 0:
        raise EbpfPolicyError(f"{' '.join(args[:4])}...: {(out.stderr or out.stdout).strip()[:400]}")
    return out.stdout


def _hex(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class MapOp:
    map: str
    key: bytes
    value: bytes | None  # None: delete


class PolicyMaps:
    """The pinned maps of one agent."""

    def __init__(self, pin_dir: str | Path):
        self.pin_dir = Path(pin_dir)
        self.maps_dir = self.pin_dir / "maps"
        self.progs_dir = self.pin_dir / "progs"

    def path(self, name: str) -> Path:
        return self.maps_dir / name

    def missing(self) -> list[str]:
        return [m for m in MAPS if not self.path(m).exists()]

    def dump(self, name: str) -> dict[bytes, bytes]:
        out = json.loads(_run(["bpftool", "-j", "map", "dump", "pinned", str(self.path(name))]) or "[]")
        return {bytes(int(b, 16) for b in e["key"]): bytes(int(b, 16) for b in e["value"]) for e in out}

    def apply(self, ops: Iterable[MapOp]) -> int:
        """Runs `ops` in order, in one bpftool process; the count done. A failing
        command stops the batch there (the caller then reads the maps back)."""
        lines = []
        for op in ops:
            p = self.path(op.map)
            if op.value is None:
                lines.append(f"map delete pinned {p} key hex {_hex(op.key)}")
            else:
                lines.append(f"map update pinned {p} key hex {_hex(op.key)} value hex {_hex(op.value)}")
        if not lines:
            return 0
        _run(["bpftool", "batch", "file", "-"], input="\n".join(lines) + "\n")
        return len(lines)

    # ---- programs

    def ensure_loaded(self) -> bool:
        """Loads the programs with the pinned maps (made and pinned when missing); True if
        it loaded anything (the attachments must then be replaced). Programs already
        pinned with every map present are kept: a restart changes nothing."""
        missing = self.missing()
        if not missing and all((self.progs_dir / p).exists() for p, _, _ in HOOKS):
            return False
        if not OBJECT.exists():
            raise EbpfPolicyError(f"{OBJECT} missing: run scripts/setup.sh (make setup) to build the BPF programs")
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        staging = self.pin_dir / "progs_new"  # bpffs refuses dots in names
        for stale in (staging,):
            _rmtree(stale)
        args = ["bpftool", "prog", "loadall", str(OBJECT), str(staging), "type", "classifier"]
        for m in MAPS:
            if m not in missing:
                args += ["map", "name", m[:15], "pinned", str(self.path(m))]
        _run(args)
        if missing:  # pin the maps the load made, found through the program that uses them
            info = json.loads(_run(["bpftool", "-j", "prog", "show", "pinned", str(staging / FROM_POD)]))
            for map_id in info.get("map_ids", []):
                m = json.loads(_run(["bpftool", "-j", "map", "show", "id", str(map_id)]))
                name = next((n for n in missing if n[:15] == m.get("name")), None)
                if name is not None:
                    _run(["bpftool", "map", "pin", "id", str(map_id), str(self.path(name))])
        _rmtree(self.progs_dir)
        os.rename(staging, self.progs_dir)
        return True

    def unpin(self) -> None:
        """Removes every pin (the programs stay while attached somewhere)."""
        for d in (self.progs_dir, self.maps_dir, self.pin_dir / "progs_new"):
            _rmtree(d)


def _rmtree(d: Path) -> None:
    if not d.exists():
        return
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


# ------------------------------------------------------------------ attachments


def pod_interfaces() -> list[str]:
    """This namespace's host-side pod veths (those dataplane/pods.py made)."""
    links = json.loads(_run(["ip", "-j", "link", "show", "type", "veth"]) or "[]")
    return sorted(link["ifname"] for link in links if str(link.get("ifalias", "")).startswith(POD_ALIAS_PREFIX))


def attached(ifname: str, maps: PolicyMaps) -> list[str]:
    """What is wrong with the policy filters on `ifname` ([] if both are ours and current)."""
    out = []
    want = {p: _prog_id(maps, p) for p, _, _ in HOOKS}
    for prog, direction, prio in HOOKS:
        try:
            filters = json.loads(_run(["tc", "-j", "filter", "show", "dev", ifname, direction]) or "[]")
        except EbpfPolicyError:
            filters = []
        ids = [f["options"].get("prog", {}).get("id") for f in filters
               if f.get("pref") == prio and f.get("kind") == "bpf" and "options" in f]
        if want[prog] not in ids:
            out.append(f"{ifname}: {direction} policy program not attached")
    return out


def _prog_id(maps: PolicyMaps, prog: str) -> int | None:
    try:
        return json.loads(_run(["bpftool", "-j", "prog", "show", "pinned", str(maps.progs_dir / prog)]))["id"]
    except (EbpfPolicyError, KeyError, ValueError):
        return None


def attach(ifname: str, maps: PolicyMaps) -> None:
    """Puts both policy programs on `ifname` (replacing what holds their place)."""
    subprocess.run(["tc", "qdisc", "add", "dev", ifname, "clsact"], capture_output=True)
    for prog, direction, prio in HOOKS:
        _run(["tc", "filter", "replace", "dev", ifname, direction, "prio", str(prio), "handle", FILTER_HANDLE,
              "bpf", "da", "pinned", str(maps.progs_dir / prog)])
