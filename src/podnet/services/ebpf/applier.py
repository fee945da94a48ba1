"""Keeping the Service program's maps equal to a desired ServiceState.

    applier = EbpfServiceApplier(node="n1")
    result = applier.apply(state)               # the map entries that changed
    result = applier.apply(state, resync=True)  # read the maps back first (healing)

On first use the applier loads native/bpf/services.o once (or adopts the programs and
maps an earlier agent pinned), attaches its two programs to every pod interface at the
layout of podnet.ebpf.attach, and reads the maps back: an agent restarted (even killed
with -9) finds every entry right and sends nothing, the programs never left the
interfaces, and the connections they track go on. Then it removes the nftables Service
table of the previous dataplane, if any. If the programs do not load, nothing of the
kernel is touched and ProgramLoadError says why (the agent then keeps nftables).

Each frontend (address, protocol, port) gets a service id; each of its endpoints a
backend id of its own (a removed endpoint's id is deleted, so flows and affinity
entries that pointed at it choose again, and are deleted from ct/affinity at once).
A change writes only the entries that differ, with the batch call of hash maps:
backends and slots before the frontend that counts them, and deletions last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from pyroute2 import IPRoute

from podnet.dataplane.nft import NftError, nft_apply
from podnet.dataplane.pods import HOST_PREFIX
from podnet.ebpf import attach
from podnet.ebpf.bpffs import PinDir, instance_name
from podnet.ebpf.build import object_path
from podnet.ebpf.programs import LoadedObject, load_object
from podnet.ebpf.syscall import BpfError, Map, obj_pin
from podnet.services.applier import SyncResult
from podnet.services.ebpf import maps as m
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import Backend, Frontend, FrontendRule, ServiceState

log = logging.getLogger("podnet.services")

NFT_TABLE = "podnet-svc"  # the nftables backend's table: removed once eBPF programs Services
REJECT_TABLE = "podnet-svc-ebpf"
# Packets the program marks for rejection get a TCP reset or an ICMP port unreachable
# (as from the nftables backend): generating those replies in the program would be a
# packet builder of its own; the kernel's reject does it right.
REJECT_SCRIPT = f"""table ip {REJECT_TABLE} {{}}
delete table ip {REJECT_TABLE}
table ip {REJECT_TABLE} {{
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    meta mark & {m.REJECT_MARK:#x} == {m.REJECT_MARK:#x} goto refuse
  }}
  chain input {{
    type filter hook input priority -10; policy accept;
    meta mark & {m.REJECT_MARK:#x} == {m.REJECT_MARK:#x} goto refuse
  }}
}}
"""


def pod_interfaces(prefix: str = HOST_PREFIX) -> dict[str, int]:
    """This node's pod interfaces (host side): name -> ifindex."""
    with IPRoute() as ipr:
        out = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if name.startswith(prefix) and kind == "veth":
                out[name] = link["index"]
        return out


class EbpfServiceApplier:
    """podnet's tc eBPF Service dataplane (ServiceApplier)."""

    def __init__(self, node: str = "node", *, pins: PinDir | None = None,
                 interfaces: Callable[[], dict[str, int]] = pod_interfaces, object_file: str | None = None,
                 nft: Callable[[str], None] = nft_apply, metrics: ServiceMetrics | None = None):
        self.node = node
        self.pins = pins
        self.interfaces = interfaces
        self.object_file = object_file or str(object_path(m.OBJECT))
        self.nft = nft
        self.metrics = metrics
        self.obj: LoadedObject | None = None
        self.maps: dict[str, Map] = {}
        self.applied: dict[str, dict[bytes, bytes]] | None = None  # what the maps hold, as far as podnet knows
        self.attached: dict[int, str] = {}  # ifindex -> name of the interfaces our programs are on
        self.sids: dict[Frontend, int] = {}
        self.bids: dict[tuple[Frontend, Backend], int] = {}
        self._next_sid = self._next_bid = 1
        self._rendered: dict[FrontendRule, dict[str, dict[bytes, bytes]]] = {}
        self.unsupported: dict[str, int] = {}  # frontend kinds not programmed yet -> how many
        self.last_delta: tuple[dict, dict] = ({}, {})

    # -- loading and attaching

    def load(self) -> LoadedObject:
        """Load (or adopt) the programs and open the maps: raises ProgramLoadError, touching nothing."""
        if self.obj is None:
            pins = self.pins or PinDir.for_instance(instance_name(self.node))
            obj = load_object(self.object_file, pins)
            self.pins = pins
            self.maps = {name: obj.map(name) for name in m.ALL}
            self.obj = obj
        return self.obj

    def _attach_all(self, check: bool) -> int:
        """Attach to every pod interface not yet done (check: look at every one's filters).
        Returns how many were (re)attached."""
        obj = self.load()
        links = self.interfaces()
        current = set(links.values())
        for gone in [i for i in self.attached if i not in current]:
            del self.attached[gone]
        n = 0
        names = {d: obj.filter_name(p) for d, p in (("ingress", m.FROM_POD), ("egress", m.TO_POD))}
        with IPRoute() as ipr:
            for ifname, idx in links.items():
                if idx in self.attached and not check:
                    continue
                if check and idx in self.attached:
                    ing = attach.attached(ipr, idx, "ingress").get(attach.hook("services", "ingress").prio)
                    eg = attach.attached(ipr, idx, "egress").get(attach.hook("services", "egress").prio)
                    if ing == names["ingress"] and eg == names["egress"]:
                        continue
                try:
                    attach.attach(ipr, idx, "services", "ingress", obj.fd(m.FROM_POD), names["ingress"])
                    attach.attach(ipr, idx, "services", "egress", obj.fd(m.TO_POD), names["egress"])
                except attach.AttachError as e:
                    if ifname in self.interfaces():  # not just gone meanwhile
                        raise
                    log.debug("services: %s went while attaching: %s", ifname, e)
                    continue
                self.attached[idx] = ifname
                n += 1
        obj.prune_other_builds()
        return n

    def _repin(self) -> list[str]:
        """Pins deleted behind podnet's back: pin the maps and programs it holds again."""
        assert self.obj is not None and self.pins is not None
        fixed = []
        for name, mp in self.maps.items():
            path = self.pins.map_path(name)
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                obj_pin(mp.fd, path)
                fixed.append(f"map {name} unpinned")
        d = self.obj.prog_dir
        for prog, fd in self.obj.programs.items():
            if not (d / prog).exists():
                d.mkdir(parents=True, exist_ok=True)
                obj_pin(fd, str(d / prog))
                fixed.append(f"program {prog} unpinned")
        return fixed

    # -- rendering

    def _sid(self, fe: Frontend) -> int:
        sid = self.sids.get(fe)
        if sid is None:
            sid = self.sids[fe] = self._next_sid
            self._next_sid += 1
        return sid

    def _bid(self, fe: Frontend, b: Backend) -> int:
        bid = self.bids.get((fe, b))
        if bid is None:
            bid = self.bids[(fe, b)] = self._next_bid
            self._next_bid += 1
        return bid

    def _render_rule(self, r: FrontendRule) -> dict[str, dict[bytes, bytes]]:
        fe = r.frontend
        sid = self._sid(fe)
        backends = weighted_slots(r.backends, r.weights) if r.scheduler == "wrr" else r.backends
        flags = (F_DROP if r.no_endpoints == "drop" else 0) | (m.F_AFFINITY if r.affinity_timeout else 0) | \
            (m.SCHEDULERS[r.scheduler or "random"] << m.SCHED_SHIFT)
        out: dict[str, dict[bytes, bytes]] = {m.FRONTENDS: {}, m.SLOTS: {}, m.BACKENDS: {}, m.CLUSTER_IPS: {}}
        out[m.FRONTENDS][m.frontend_key(fe)] = m.frontend_value(sid, len(backends), flags, r.affinity_timeout or 0,
                                                                 r.affinity_key)
        for slot, b in enumerate(backends):
            bid = self._bid(fe, b)
            out[m.SLOTS][m.slot_key(sid, slot)] = m.u32(bid)
            out[m.BACKENDS][m.u32(bid)] = m.backend_value(b, fe.proto)
        if r.owns_cluster_ip:
            out[m.CLUSTER_IPS][m.address_key(fe.ip)] = b"\x01"  # type: ignore[arg-type]
        return out

    def render(self, state: ServiceState) -> dict[str, dict[bytes, bytes]]:
        """The entries of every desired map for state (a rule unchanged since the last
        render costs a dict lookup)."""
        desired: dict[str, dict[bytes, bytes]] = {name: {} for name in m.DESIRED}
        rendered: dict[FrontendRule, dict[str, dict[bytes, bytes]]] = {}
        unsupported: dict[str, int] = {}
        for r in state.frontends.values():
            why = _unsupported(r)
            if why:
                unsupported[why] = unsupported.get(why, 0) + 1
                if r.owns_cluster_ip:  # the address stays allocated: its other ports reject
                    desired[m.CLUSTER_IPS][m.address_key(r.frontend.ip)] = b"\x01"  # type: ignore[arg-type]
                continue
            part = self._rendered.get(r) or self._render_rule(r)
            rendered[r] = part
            for name, entries in part.items():
                desired[name].update(entries)
        for cidr in state.service_cidrs:
            desired[m.CIDRS][m.cidr_key(cidr)] = b"\x01"
        self._rendered = rendered
        if unsupported != self.unsupported and unsupported:
            log.warning("services: the eBPF dataplane does not program yet: %s",
                        ", ".join(f"{n} {why}" for why, n in sorted(unsupported.items())))
        self.unsupported = unsupported
        self._forget_ids(rendered)
        return desired

    def _forget_ids(self, rendered: dict[FrontendRule, dict]) -> None:
        live = {r.frontend for r in rendered}
        for fe in [fe for fe in self.sids if fe not in live]:
            del self.sids[fe]
        keep = {(r.frontend, b) for r in rendered for b in r.backends}
        for k in [k for k in self.bids if k not in keep]:
            del self.bids[k]

    # -- reading back

    def read_maps(self) -> dict[str, dict[bytes, bytes]]:
        out = {name: self.maps[name].items() for name in m.DESIRED}
        out[m.CONNS] = self.maps[m.CONNS].items()
        return out

    def _adopt_ids(self, kernel: dict[str, dict[bytes, bytes]]) -> None:
        """Take the ids the maps use (after a restart) so that nothing right is rewritten."""
        backends = {m.decode_u32(k): m.decode_backend_value(v)[0] for k, v in kernel[m.BACKENDS].items()}
        slots: dict[int, list[tuple[int, int]]] = {}
        for k, v in kernel[m.SLOTS].items():
            sid, slot = m.decode_slot_key(k)
            slots.setdefault(sid, []).append((slot, m.decode_u32(v)))
        self.sids.clear()
        self.bids.clear()
        self._rendered.clear()
        top_sid = top_bid = 0
        for k, v in kernel[m.FRONTENDS].items():
            fe = m.decode_frontend_key(k)
            sid = m.decode_frontend_value(v)[0]
            self.sids[fe] = sid
            top_sid = max(top_sid, sid)
            for _, bid in slots.get(sid, ()):
                b = backends.get(bid)
                if b is not None:
                    self.bids.setdefault((fe, b), bid)
        top_bid = max([top_bid, *backends, *(bid for s in slots.values() for _, bid in s)])
        self._next_sid = max(self._next_sid, top_sid + 1)
        self._next_bid = max(self._next_bid, top_bid + 1)

    # -- applying

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        started = time.monotonic()
        result = SyncResult()
        try:
            self._apply(state, resync, result)
        except BaseException:
            if self.metrics:
                self.metrics.record_sync(time.monotonic() - started, ok=False)
            raise
        result.seconds = time.monotonic() - started
        if self.metrics:
            self.metrics.record_sync(result.seconds, ok=True, changed=result.added + result.removed)
        return result

    def _apply(self, state: ServiceState, resync: bool, result: SyncResult) -> None:
        first = self.applied is None  # (the programs may be loaded already: load() alone)
        self.load()
        if first or resync:
            fixed = self._repin()
            if fixed:
                log.warning("services: %s; pinned again", ", ".join(fixed))
            self.nft(REJECT_SCRIPT)
        self._attach_all(check=first or resync)
        current = self.applied
        if current is None or resync:
            current = self.read_maps()
            result.read_back = True
            if self.applied is None:
                self._adopt_ids(current)
        desired = self.render(state)
        added: dict[str, dict[bytes, bytes]] = {}
        removed: dict[str, list[bytes]] = {}
        for name in m.DESIRED:
            have, want = current.get(name, {}), desired[name]
            upd = {k: v for k, v in want.items() if have.get(k) != v}
            if upd:
                added[name] = upd
            dels = [k for k in have if k not in want]
            if dels:
                removed[name] = dels
        # a counter for every new backend id; the programs count, podnet never overwrites
        have_conns = current.get(m.CONNS, {})
        new_conns = {k: m.conns_value() for k in desired[m.BACKENDS] if k not in have_conns}
        gone_conns = [k for k in have_conns if k not in desired[m.BACKENDS]]
        for name in m.DESIRED:  # backends and slots before the frontends that count them
            if name in added:
                self.maps[name].update_many(added[name])
        if new_conns:
            self.maps[m.CONNS].update_many(new_conns)
        for name in reversed(m.DESIRED):  # frontends (their counts) before the slots they counted
            if name in removed:
                self.maps[name].delete_many(removed[name])
        if gone_conns:
            self.maps[m.CONNS].delete_many(gone_conns)
        gone_bids = {m.decode_u32(k) for k in removed.get(m.BACKENDS, ())}
        if gone_bids:
            result.stale_flows = self._delete_entries(m.CT, gone_bids, m.ct_backend_id)
            result.affinity_cleared = self._delete_entries(m.AFFINITY, gone_bids, m.affinity_backend_id)
        conns = dict(have_conns)
        conns.update(new_conns)
        for k in gone_conns:
            conns.pop(k, None)
        self.applied = {**desired, m.CONNS: conns}
        result.added = sum(len(v) for v in added.values())
        result.removed = sum(len(v) for v in removed.values())
        result.sent = bool(added or removed)
        result.full = first and current is not None and not any(current.get(n) for n in m.DESIRED)
        if result.full:
            result.reason = "maps empty"
        self.last_delta = (added, removed)
        if first:
            self._remove_nftables_table()

    def _delete_entries(self, name: str, bids: set[int], backend_of: Callable[[bytes], int]) -> int:
        """Entries of a program-kept map (ct, affinity) that point at removed backend ids."""
        mp = self.maps[name]
        stale = [k for k, v in mp.items().items() if backend_of(v) in bids]
        return mp.delete_many(stale)

    def _remove_nftables_table(self) -> None:
        try:
            self.nft(f"table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n")
        except NftError as e:
            log.warning("services: cannot remove the nftables Service table: %s", e)

    # -- the contract's other calls

    def verify(self) -> str | None:
        """What differs from what was applied, or None: pins, filters, map entries (the
        agent owns the desired maps: read back in a few batch calls)."""
        if self.applied is None or self.obj is None or self.pins is None:
            return "never applied"
        for name in m.ALL:
            if not os.path.exists(self.pins.map_path(name)):
                return f"map {name} is not pinned"
        for prog in self.obj.programs:
            if not (self.obj.prog_dir / prog).exists():
                return f"program {prog} is not pinned"
        with IPRoute() as ipr:
            for idx, ifname in self.attached.items():
                try:
                    have = attach.attached(ipr, idx, "ingress").get(attach.hook("services", "ingress").prio)
                except Exception:  # the interface went: the next sync forgets it
                    continue
                if have != self.obj.filter_name(m.FROM_POD):
                    return f"interface {ifname}: the Service program is not attached"
        for name in m.DESIRED:
            try:
                have = self.maps[name].items()
            except BpfError as e:
                return str(e)
            if have != self.applied[name]:
                return f"map {name} holds {len(have)} entries, {len(self.applied[name])} expected" \
                    if len(have) != len(self.applied[name]) else f"map {name} has entries changed"
        return None

    def slot_orders(self) -> dict:
        return {}

    def remove(self) -> None:
        """Detach from every interface, unpin everything, drop the reject table."""
        with IPRoute() as ipr:
            for idx in list(self.attached):
                for d in ("ingress", "egress"):
                    try:
                        attach.detach(ipr, idx, "services", d)
                    except attach.AttachError:
                        pass
        self.attached.clear()
        for mp in self.maps.values():
            mp.close()
        self.maps.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        if self.pins is not None:
            for name in m.ALL:
                try:
                    os.unlink(self.pins.map_path(name))
                except FileNotFoundError:
                    pass
            for d in self.pins.progs.glob(f"{m.OBJECT}-*"):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        try:
            self.nft(f"table ip {REJECT_TABLE} {{}}\ndelete table ip {REJECT_TABLE}\n")
        except NftError:
            pass
        self.applied = None


F_DROP = m.F_NO_EP_DROP
MAX_WEIGHTED_SLOTS = 4096  # a wrr frontend's slots at most (weights scaled down beyond)


def weighted_slots(backends: tuple[Backend, ...], weights: tuple[tuple[str, int], ...]) -> tuple[Backend, ...]:
    """wrr: each backend repeated by its weight (the program picks a slot at random, so a
    backend gets new flows in proportion to its weight; weight 0: none)."""
    w = dict(weights)
    counts = [w.get(b.ip, 1) for b in backends]
    total = sum(counts)
    if total > MAX_WEIGHTED_SLOTS:
        counts = [max(1, c * MAX_WEIGHTED_SLOTS // total) if c else 0 for c in counts]
    return tuple(b for b, c in zip(backends, counts, strict=True) for _ in range(c))


def _unsupported(r: FrontendRule) -> str:
    """Why this frontend is not programmed by the eBPF dataplane yet ("" if it is)."""
    fe = r.frontend
    if fe.proto not in m.PROTOS:
        return f"{fe.proto.upper()} frontends"
    if fe.ip is None:
        return "NodePorts"
    if r.masquerade or r.short_circuit or r.source_ranges:
        return f"{r.kind} frontends that masquerade or filter sources"
    return ""
