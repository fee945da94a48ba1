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
from collections.abc import Callable, Hashable

from pyroute2 import IPRoute

from podnet.dataplane.nft import NftError, nft_apply
from podnet.dataplane.nftables import Chain, Table, Transaction
from podnet.dataplane.nftables import Rule as NftRule
from podnet.dataplane.pods import HOST_PREFIX
from podnet.ebpf import attach
from podnet.ebpf.bpffs import PinDir, instance_name
from podnet.ebpf.build import object_path
from podnet.ebpf.cgroup import CgroupError
from podnet.ebpf.programs import LoadedObject, ProgramLoadError, load_object
from podnet.ebpf.syscall import BpfError, Map, obj_pin
from podnet.services.applier import SyncResult
from podnet.services.ebpf import maps as m
from podnet.services.ebpf.sock import DROP_MARK, NodeSocketHooks
from podnet.services.metrics import ServiceMetrics
from podnet.services.model import Backend, FrontendRule, ServiceState
from podnet.services.nftables.elements import changed_rules
from podnet.services.weights import slot_counts, weighted_slots

log = logging.getLogger("podnet.services")

NFT_TABLE = "podnet-svc"  # the nftables backend's table: removed once eBPF programs Services
REJECT_TABLE = "podnet-svc-ebpf"


# Packets the program marks for rejection get a TCP reset or an ICMP port unreachable
# (as from the nftables backend) in prerouting, before a route is looked up for an address
# nothing answers: generating those replies in the program would be a packet builder of
# its own; the kernel's reject does it right.
def _reject_table() -> Transaction:
    """The reject table, replacing whatever is there (one transaction)."""
    tx = Transaction(Table(REJECT_TABLE))
    tx.recreate()
    tx.add(Chain("refuse"))
    tx.add_all(NftRule.many("refuse", ["meta l4proto tcp reject with tcp reset", "reject"]))
    for chain, rule in (
        (Chain("prerouting", type="filter", hook="prerouting", priority=-10, policy="accept"),
         f"meta mark & {m.REJECT_MARK:#x} == {m.REJECT_MARK:#x} goto refuse"),
        (Chain("output", type="filter", hook="output", priority=-10, policy="accept"),
         f"meta mark & {DROP_MARK:#x} == {DROP_MARK:#x} drop"),
        (Chain("nat_out", type="nat", hook="postrouting", priority="srcnat", policy="accept"),
         f"meta mark & {m.MASQ_MARK:#x} == {m.MASQ_MARK:#x} masquerade"),
    ):
        tx.add(chain)
        tx.add(NftRule(chain.name, rule))
    return tx


def _removal(table: str) -> str:
    """Delete a table (no error if there is none)."""
    tx = Transaction(Table(table))
    tx.remove()
    return tx.script()


REJECT_SCRIPT = _reject_table().script()


def pod_interfaces(ipr: IPRoute, prefix: str = HOST_PREFIX) -> dict[str, int]:
    """This node's pod interfaces (host side): name -> ifindex."""
    out = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME") or ""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if name.startswith(prefix) and kind == "veth":
            out[name] = link["index"]
    return out


def underlay_interfaces(ipr: IPRoute, node_ips: tuple[str, ...]) -> dict[str, int]:
    """The interfaces that hold one of the node's addresses (not loopback): name -> ifindex."""
    wanted = set(node_ips)
    idx = {a["index"] for a in ipr.get_addr(family=2) if a.get_attr("IFA_ADDRESS") in wanted}
    idx.discard(1)
    return {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links() if link["index"] in idx}


class EbpfServiceApplier:
    """podnet's tc eBPF Service dataplane (ServiceApplier)."""

    def __init__(self, node: str = "node", *, pins: PinDir | None = None,
                 interfaces: Callable[[IPRoute], dict[str, int]] = pod_interfaces,
                 underlay: Callable[[IPRoute, tuple[str, ...]], dict[str, int]] | None = None,
                 object_file: str | None = None,
                 nft: Callable[[str], None] = nft_apply, metrics: ServiceMetrics | None = None,
                 node_sockets: bool = True, cgroup_root: str | None = None, fast_path: bool = False):
        self.node = node
        # The fast path (docs/ebpf.md): flows between two pods of this node skip the node's
        # netfilter, so nftables NetworkPolicy would not see them. Only the caller knows
        # whether any runs: on only when NetworkPolicy is eBPF's (or there is none).
        self.fast_path = fast_path
        self.pins = pins
        self.interfaces = interfaces  # this node's pods' interfaces
        self.underlay = underlay or underlay_interfaces  # where other clients arrive (by the node's addresses)
        self.object_file = object_file or str(object_path(m.OBJECT))
        self.nft = nft
        self.metrics = metrics
        self.obj: LoadedObject | None = None
        self._ipr: IPRoute | None = None  # one rtnetlink socket, in the namespace of the first sync
        self._underlay: dict[str, int] = {}
        self._underlay_for: tuple[str, ...] | None = None
        self.maps: dict[str, Map] = {}
        self.applied: dict[str, dict[bytes, bytes]] | None = None  # what the maps hold, as far as podnet knows
        self.applied_state: ServiceState | None = None  # the state they hold (None: read them back next)
        self.attached: dict[int, str] = {}  # ifindex -> name of the interfaces our programs are on
        self._local: dict[bytes, bytes] | None = None  # what the map LOCAL holds (None: read it)
        self._local_for: frozenset[int] | None = None  # the pod interfaces it was made for
        # ids per view of a frontend (the Frontend itself, or ("external", Frontend): see _views)
        self.sids: dict[Hashable, int] = {}
        self.bids: dict[Hashable, dict[Backend, int]] = {}  # per view: endpoint -> backend id
        self._next_sid = self._next_bid = 1
        self._rendered: dict[FrontendRule, dict[str, dict[bytes, bytes]]] = {}
        self.unsupported: dict[str, int] = {}  # frontend kinds not programmed yet -> how many
        self.last_delta: tuple[dict, dict] = ({}, {})
        # the node's own processes: socket programs on the cgroup2 root (sock.py)
        self.node_sockets = node_sockets
        self.cgroup_root = cgroup_root
        self.sockets: NodeSocketHooks | None = None
        self.sockets_error = ""  # why they are not there (logged once per new reason)

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

    def _attach_all(self, check: bool, node_ips: tuple[str, ...] = ()) -> int:
        """Attach to every pod interface and to the interfaces holding the node's addresses
        (NodePorts, external IPs: clients arriving there; their replies leave there) not yet
        done (check: look at every one's filters). Returns how many were (re)attached."""
        obj = self.load()
        ipr = self.ipr()
        if check or node_ips != self._underlay_for:
            self._underlay = self.underlay(ipr, node_ips)
            self._underlay_for = node_ips
        pods = self.interfaces(ipr)
        links = {**self._underlay, **pods}
        current = set(links.values())
        for gone in [i for i in self.attached if i not in current]:
            del self.attached[gone]
            self.maps[m.IFACES].delete(m.u32(gone))
        if check or frozenset(pods.values()) != self._local_for:
            self._sync_local_pods(ipr, pods)
        n = 0
        names = {d: obj.filter_name(p) for d, p in (("ingress", m.FROM_POD), ("egress", m.TO_POD))}
        redirect = obj.filter_name(m.REDIRECT)
        for ifname, idx in links.items():
            if idx in self.attached and not check:
                continue
            role = m.ROLE_POD if ifname in pods else m.ROLE_UNDERLAY
            self.maps[m.IFACES].update(m.u32(idx), bytes((role,)))  # before the program can meet it
            if check and idx in self.attached:
                ing = attach.attached(ipr, idx, "ingress")
                eg = attach.attached(ipr, idx, "egress").get(attach.hook("services", "egress").prio)
                if ing.get(attach.hook("services", "ingress").prio) == names["ingress"] and eg == names["egress"] \
                        and (role != m.ROLE_POD or ing.get(attach.hook("services-redirect", "ingress").prio) == redirect):
                    continue
            try:
                attach.attach(ipr, idx, "services", "ingress", obj.fd(m.FROM_POD), names["ingress"])
                attach.attach(ipr, idx, "services", "egress", obj.fd(m.TO_POD), names["egress"])
                if role == m.ROLE_POD:  # (only a pod's packets are ever marked for the fast path)
                    attach.attach(ipr, idx, "services-redirect", "ingress", obj.fd(m.REDIRECT), redirect)
            except attach.AttachError as e:
                if ifname in self.interfaces(ipr):  # not just gone meanwhile
                    raise
                log.debug("services: %s went while attaching: %s", ifname, e)
                continue
            self.attached[idx] = ifname
            n += 1
        if n:
            obj.prune_other_builds()
        return n

    def _sync_local_pods(self, ipr: IPRoute, pods: dict[str, int]) -> None:
        """The map LOCAL: each pod address this node routes to a pod interface (its /32 route,
        as dataplane/pods.py makes it) -> that interface; the fast path's only targets."""
        ours = set(pods.values())
        want = {}
        for r in ipr.get_routes(family=2, table=254):
            oif = r.get_attr("RTA_OIF")
            if r["dst_len"] == 32 and oif in ours and not r.get_attr("RTA_GATEWAY"):
                want[m.address_key(r.get_attr("RTA_DST"))] = m.local_pod_value(oif)
        mp = self.maps[m.LOCAL]
        have = self._local if self._local is not None else mp.items()
        upd = {k: v for k, v in want.items() if have.get(k) != v}
        if upd:
            mp.update_many(upd)
        gone = [k for k in have if k not in want]
        if gone:
            mp.delete_many(gone)
        self._local, self._local_for = want, frozenset(ours)

    def _write_config(self) -> None:
        self.maps[m.CONFIG].update(m.u32(0), m.config_value(self.fast_path))

    def _ensure_sockets(self) -> None:
        """Load, attach or repair the socket programs; if they cannot be, warn and go on:
        the pods' and the underlay's traffic is the tc programs' and keeps working."""
        if not self.node_sockets:
            return
        assert self.pins is not None
        try:
            if self.sockets is None:
                self.sockets = NodeSocketHooks(self.pins, self.cgroup_root)
            done = self.sockets.ensure()
        except (ProgramLoadError, CgroupError, BpfError, OSError) as e:
            if str(e) != self.sockets_error:
                log.warning("services: the socket programs for the node's own traffic are not attached (%s): "
                            "processes of the node reach Services' addresses untranslated (docs/ebpf.md)", e)
            self.sockets_error = str(e)
            return
        self.sockets_error = ""
        if done:
            log.info("services: socket programs: %s", ", ".join(done))

    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

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

    def _sid(self, fe: Hashable) -> int:
        sid = self.sids.get(fe)
        if sid is None:
            sid = self.sids[fe] = self._next_sid
            self._next_sid += 1
        return sid

    def _bid(self, ids: dict[Backend, int], b: Backend) -> int:
        bid = ids.get(b)
        if bid is None:
            bid = ids[b] = self._next_bid
            self._next_bid += 1
        return bid

    def _part(self, r: FrontendRule) -> dict[str, dict[bytes, bytes]]:
        """The map entries of one frontend (each map's keys belong to one frontend only;
        a ClusterIP's cluster_ips entry to its owning frontend)."""
        cached = self._rendered.get(r)
        if cached is not None:
            return cached
        out: dict[str, dict[bytes, bytes]] = {m.FRONTENDS: {}, m.EXTERNAL: {}, m.SLOTS: {}, m.BACKENDS: {},
                                              m.CLUSTER_IPS: {}, m.SRC_RANGES: {}}
        fe = r.frontend
        if r.owns_cluster_ip:  # (also when the frontend itself is not programmed: its other ports reject)
            out[m.CLUSTER_IPS][m.address_key(fe.ip)] = b"\x01"  # type: ignore[arg-type]
        flags = (F_DROP if r.no_endpoints == "drop" else 0) | (m.F_AFFINITY if r.affinity_timeout else 0) | \
            (m.F_MASQ if r.masquerade else 0) | (m.F_SRC_RANGES if r.source_ranges else 0) | \
            (m.SCHEDULERS[r.scheduler or "random"] << m.SCHED_SHIFT)
        for view, name, backends in _views(r):
            sid = self._sid(view)
            for cidr in r.source_ranges:
                out[m.SRC_RANGES][m.src_range_key(sid, cidr)] = b"\x01"
            backends = (weighted_slots(backends, slot_counts(backends, r.weights, MAX_WEIGHTED_SLOTS))
                        if r.scheduler == "wrr" else backends)
            out[name][m.frontend_key(fe)] = m.frontend_value(sid, len(backends), flags, r.affinity_timeout or 0,
                                                             r.affinity_key)
            ids = self.bids.setdefault(view, {})
            slots, values = out[m.SLOTS], out[m.BACKENDS]
            for slot, b in enumerate(backends):  # (the loop of a full load: kept to a few calls)
                bid = ids.get(b) or self._bid(ids, b)
                key = m.u32(bid)
                slots[m.slot_key(sid, slot)] = key
                values[key] = m.backend_value(b, fe.proto)
        self._rendered[r] = out
        return out

    def render(self, state: ServiceState) -> dict[str, dict[bytes, bytes]]:
        """The entries of every desired map for state (a rule rendered before costs a
        dict lookup)."""
        desired: dict[str, dict[bytes, bytes]] = {name: {} for name in m.DESIRED}
        old, self._rendered = self._rendered, {}
        for r in state.frontends.values():
            part = old.get(r)
            if part is not None:
                self._rendered[r] = part
            else:
                part = self._part(r)
            for name, entries in part.items():
                desired[name].update(entries)
        desired[m.CIDRS] = {m.cidr_key(c): b"\x01" for c in state.service_cidrs}
        desired[m.NODE_IPS] = {m.address_key(ip): b"\x01" for ip in state.node_ips}
        self._note_unsupported(state.frontends.values())
        live = {view: backends for r in self._rendered for view, _, backends in _views(r)}
        for view in [v for v in self.sids if v not in live]:
            del self.sids[view]
        for view in [v for v in self.bids if v not in live]:
            del self.bids[view]
        for view, ids in self.bids.items():
            if len(ids) > len(live[view]):  # (an endpoint gone; wrr repeats are one id)
                keep = set(live[view])
                for b in [b for b in ids if b not in keep]:
                    del ids[b]
        return desired

    def _note_unsupported(self, rules) -> None:
        unsupported: dict[str, int] = {}
        for r in rules:
            why = _unsupported(r)
            if why:
                unsupported[why] = unsupported.get(why, 0) + 1
        if unsupported != self.unsupported and unsupported:
            log.warning("services: the eBPF dataplane does not program yet: %s",
                        ", ".join(f"{n} {why}" for why, n in sorted(unsupported.items())))
        self.unsupported = unsupported

    def delta(self, old: ServiceState, new: ServiceState) -> tuple[dict[str, dict[bytes, bytes]],
                                                                  dict[str, list[bytes]], set[bytes]]:
        """(entries to write, keys to delete, the deleted backends of frontends with
        session affinity) from old to new, from the frontends the compiler says changed:
        work in proportion to the change."""
        come: dict[str, dict[bytes, bytes]] = {}
        gone: dict[str, set[bytes]] = {}
        sticky: set[bytes] = set()
        changed = list(changed_rules(old, new))
        for b, a in changed:
            before = self._rendered.pop(b, None) if b is not None else None
            if before is None and b is not None:
                before = self._part(b)
                self._rendered.pop(b, None)
            after = self._part(a) if a is not None else {}
            for name in (m.FRONTENDS, m.EXTERNAL, m.SLOTS, m.BACKENDS, m.CLUSTER_IPS, m.SRC_RANGES):
                was, now = (before or {}).get(name, {}), after.get(name, {})
                for k, v in now.items():
                    if was.get(k) != v:
                        come.setdefault(name, {})[k] = v
                for k in was:
                    if k not in now:
                        gone.setdefault(name, set()).add(k)
                        if name == m.BACKENDS and b is not None and b.affinity_timeout:
                            sticky.add(k)
        for b, a in changed:  # ids of views and endpoints gone
            if b is None:
                continue
            now = {view: backends for view, _, backends in _views(a)} if a is not None else {}
            for view, _, _ in _views(b):
                if view not in now:
                    self.sids.pop(view, None)
                    self.bids.pop(view, None)
                    continue
                ids = self.bids.get(view, {})
                keep = set(now[view])
                for backend in [x for x in ids if x not in keep]:
                    del ids[backend]
        for name, key, was_list, now_list in ((m.CIDRS, m.cidr_key, old.service_cidrs, new.service_cidrs),
                                              (m.NODE_IPS, m.address_key, old.node_ips, new.node_ips)):
            if was_list != now_list:
                was, now = set(map(key, was_list)), set(map(key, now_list))
                if now - was:
                    come[name] = {k: b"\x01" for k in now - was}
                if was - now:
                    gone[name] = was - now
        # a key one frontend gave up and another took in the same change stays
        removed = {name: [k for k in keys if k not in come.get(name, {})] for name, keys in gone.items()}
        return come, {name: keys for name, keys in removed.items() if keys}, sticky - come.get(m.BACKENDS, {}).keys()

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
        for name, external in ((m.FRONTENDS, False), (m.EXTERNAL, True)):
            for k, v in kernel[name].items():
                fe = m.decode_frontend_key(k)
                view: Hashable = ("external", fe) if external else fe
                sid = m.decode_frontend_value(v)[0]
                self.sids[view] = sid
                top_sid = max(top_sid, sid)
                for _, bid in slots.get(sid, ()):
                    b = backends.get(bid)
                    if b is not None:
                        self.bids.setdefault(view, {}).setdefault(b, bid)
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
            self._write_config()
        self._attach_all(first or resync, tuple(state.node_ips))
        if first or resync:
            self._ensure_sockets()
        if self.applied is None or resync or self.applied_state is None:
            # whole: the maps read back and compared with the state
            current = self.read_maps()
            result.read_back = True
            if first:
                self._adopt_ids(current)
            desired = self.render(state)
            added: dict[str, dict[bytes, bytes]] = {}
            removed: dict[str, list[bytes]] = {}
            for name in m.DESIRED:
                have, want = current.get(name, {}), desired[name]
                upd = {k: v for k, v in want.items() if have.get(k) != v} if have else dict(want)
                if upd:
                    added[name] = upd
                dels = [k for k in have if k not in want]
                if dels:
                    removed[name] = dels
            have_conns = current.get(m.CONNS, {})
            gone_conns = [k for k in have_conns if k not in desired[m.BACKENDS]]
            current_backends = current[m.BACKENDS]
            sticky = set(removed.get(m.BACKENDS, ()))  # (whose they were is not known here)
            result.full = first and not any(current.get(n) for n in m.DESIRED)
        else:
            # incremental: the frontends that changed since the state applied last
            desired = self.applied
            added, removed, sticky = self.delta(self.applied_state, state)
            have_conns = self.applied[m.CONNS]
            gone_conns = [k for k in removed.get(m.BACKENDS, ()) if k in have_conns]
            current_backends = self.applied[m.BACKENDS]
        # a counter for every new backend id; the programs count, podnet never overwrites one
        new_conns = {k: m.conns_value() for k in added.get(m.BACKENDS, {}) if k not in have_conns}
        self.applied_state = None  # until the maps are written as below
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
        # Flows and affinity entries of removed endpoints: the programs choose again when they
        # meet one (its backend id is gone); UDP flows (kube-proxy clears those too) and
        # affinity entries are deleted now, so that the count is known and no entry lingers.
        # Each is a walk of a program-kept LRU map (every bucket, even when empty: 0.5 ms at
        # 262 144), so only for what can be there: UDP endpoints, endpoints of sticky frontends.
        gone_udp = {m.decode_u32(k) for k in removed.get(m.BACKENDS, ())
                    if current_backends.get(k, b"")[6:7] == bytes((m.PROTOS["udp"],))}
        gone_sticky = {m.decode_u32(k) for k in sticky}
        if gone_udp:
            result.stale_flows = self._delete_entries(m.CT, gone_udp, m.ct_backend_id)
        if gone_sticky:
            result.affinity_cleared = self._delete_entries(m.AFFINITY, gone_sticky, m.affinity_backend_id)
        if desired is self.applied:
            for name, entries in added.items():
                desired[name].update(entries)
            for name, keys in removed.items():
                for k in keys:
                    desired[name].pop(k, None)
            conns = desired[m.CONNS]
        else:
            conns = dict(have_conns)
            self.applied = {**desired, m.CONNS: conns}
        conns.update(new_conns)
        for k in gone_conns:
            conns.pop(k, None)
        self.applied_state = state
        result.added = sum(len(v) for v in added.values())
        result.removed = sum(len(v) for v in removed.values())
        result.sent = bool(added or removed)
        if result.full:
            result.reason = "maps empty"
        self.last_delta = (added, removed)
        if (first or resync) and any(r.scheduler == "lc" for r in state.frontends.values()):
            recounted = self.recount_open_flows()
            if recounted:
                log.info("services: open-flow counts of %d backends recounted from the flow map", recounted)
        if first:
            self._remove_nftables_table()

    def recount_open_flows(self) -> int:
        """Set each backend's open-flow count (least connection) to the open TCP flows the
        flow map holds for it; returns how many counts changed. The programs count +1 at a
        new flow and -1 at its first FIN or RST, so a flow that ends otherwise (its entries
        evicted from the LRU map, a lost FIN) would stay counted for good. A count that
        moved while the flow map was read is left for the next resync: the programs are
        counting meanwhile, and only a count steady around the read matches it."""
        conns, ct = self.maps[m.CONNS], self.maps[m.CT]
        before = conns.items()
        counted: dict[bytes, int] = {}
        for k, v in ct.items().items():
            bid = m.ct_open_tcp_backend(k, v)
            if bid is not None:
                key = m.u32(bid)
                counted[key] = counted.get(key, 0) + 1
        after = conns.items()
        fixed = {k: m.conns_value(counted.get(k, 0)) for k, v in after.items()
                 if before.get(k) == v and m.decode_conns(v) != counted.get(k, 0)}
        return conns.update_many(fixed)

    def _delete_entries(self, name: str, bids: set[int], backend_of: Callable[[bytes], int]) -> int:
        """Entries of a program-kept map (ct, affinity) that point at removed backend ids."""
        mp = self.maps[name]
        if next(mp.keys(), None) is None:  # empty: one syscall, no walk
            return 0
        stale = [k for k, v in mp.items().items() if backend_of(v) in bids]
        return mp.delete_many(stale)

    def _remove_nftables_table(self) -> None:
        try:
            self.nft(_removal(NFT_TABLE))
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
        ipr = self.ipr()
        for idx, ifname in self.attached.items():
            try:
                have = attach.attached(ipr, idx, "ingress").get(attach.hook("services", "ingress").prio)
            except Exception:  # the interface went: the next sync forgets it
                continue
            if have != self.obj.filter_name(m.FROM_POD):
                return f"interface {ifname}: the Service program is not attached"
        if self.maps[m.CONFIG].lookup(m.u32(0)) != m.config_value(self.fast_path):
            return f"map {m.CONFIG}: the fast path is not {'on' if self.fast_path else 'off'}"
        if self.sockets is not None and not self.sockets_error:
            problem = self.sockets.verify()
            if problem:
                return problem
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
        ipr = self.ipr()
        for idx in list(self.attached):
            for owner, d in (("services", "ingress"), ("services", "egress"), ("services-redirect", "ingress")):
                try:
                    attach.detach(ipr, idx, owner, d)
                except attach.AttachError:
                    pass
        self.attached.clear()
        if self.sockets is not None:
            self.sockets.remove()
            self.sockets = None
        for mp in self.maps.values():
            mp.close()
        self.maps.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        if self.pins is not None:
            self.pins.unpin_object(m.OBJECT, m.ALL)
        try:
            self.nft(_removal(REJECT_TABLE))
        except NftError:
            pass
        self.applied = None
        self.applied_state = None
        self._local = self._local_for = None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


F_DROP = m.F_NO_EP_DROP
MAX_WEIGHTED_SLOTS = 4096  # a wrr frontend's slots at most (weights scaled down beyond)


def _views(r: FrontendRule) -> list[tuple[Hashable, str, tuple[Backend, ...]]]:
    """(id key, map, endpoints) of each view of a programmed frontend: the one for this
    node's pods (for an externalIP, LoadBalancer IP or NodePort of an eTP Local Service,
    every endpoint: kube-proxy's short-circuit) and, where it differs, the one for clients
    from the underlay (only this node's endpoints; none: dropped)."""
    if _unsupported(r):
        return []
    if r.short_circuit:
        return [(r.frontend, m.FRONTENDS, r.short_circuit), (("external", r.frontend), m.EXTERNAL, r.backends)]
    return [(r.frontend, m.FRONTENDS, r.backends)]


def _unsupported(r: FrontendRule) -> str:
    """Why this frontend is not programmed by the eBPF dataplane yet ("" if it is)."""
    fe = r.frontend
    if fe.proto not in m.PROTOS:
        return f"{fe.proto.upper()} frontends"
    return ""


def retire_left_behind(node: str) -> list[str]:
    """This node ran `--service-proxy ebpf` before and runs nftables or iptables now: its
    filters, socket links, maps and builds go, and its reject table (ebpf/retire.py)."""
    from podnet.ebpf.retire import retire
    from podnet.services.ebpf import sock

    done = retire(node, "services", {m.OBJECT: m.ALL, sock.OBJECT: sock.MAPS}, pin_dirs=(sock.LINKS,))
    if done:
        try:
            nft_apply(_removal(REJECT_TABLE))
        except NftError:
            pass
    return done
