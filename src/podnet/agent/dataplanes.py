"""The agent's dataplanes that read the local cache: routes, NAT, NetworkPolicy, and
node DNS (fed by events). Services live in agent/services.py. Each implements the
contract of agent/contract.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyroute2 import IPRoute

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import ALL_KEYS, AllKeys, Dataplane, HoldsBlocks, kind_of
from podnet.agent.view import (
    BlockRecord,
    PoolIndex,
    block_routing,
    compact_block,
    nat_config,
    node_addresses,
    vxlan_in_use,
)
from podnet.dataplane.localdns import DNS_TABLE, DnsAddresses
from podnet.dataplane.nat import NatProgrammer
from podnet.dataplane.routes import RouteProgrammer
from podnet.dataplane.routing import VXLAN_OVERHEAD, DesiredRouting, Route, desired_routing
from podnet.dataplane.ruledigest import differing, read_table_digests
from podnet.errors import PodnetError
from podnet.model.objects import KINDS, IPPool, Node
from podnet.policy.model import LiveInputs, PodInfo
from podnet.store.objects import ObjectEvent, object_key, split_object_key

log = logging.getLogger("podnet.agent")


class RoutesDataplane(HoldsBlocks, Dataplane):
    """Cross-node routes, the VXLAN device and its neighbour/FDB entries (on a node that
    runs BGP, direct pools' cross-node routes are BIRD's: agent/bgp.py).

    Each block's share of the routes is computed when that block changes (a new block
    on another node: one share, one route), and all of them again only when the pools
    or the nodes' addresses change. Between full resyncs the programmer sends only the
    difference from what it applied; a full resync reads the kernel back and repairs."""

    name = "routes"
    kinds = frozenset({"Node", "IPPool", "Block"})

    def __init__(self, node: str, cache: ObjectCache, programmer: RouteProgrammer):
        self.node = node
        self.cache = cache  # Nodes and IPPools
        self.programmer = programmer
        self.mtu = 1500
        self._lock = threading.Lock()
        self._blocks: dict[str, BlockRecord] = {}  # every block, compact (event-fed)
        self._dirty_blocks: set[str] = set()
        # each block's routes and VTEP entries, as tuples: a frozenset is 216 bytes even for
        # the one route of another node's block (two per block, 5 000 blocks)
        self._shares: dict[str, tuple[tuple[Route, ...], tuple[tuple[str, str], ...]]] = {}
        self._inputs: tuple | None = None  # the pools and node addresses the shares were computed with
        self.bgp = False  # this node runs BGP: direct pools' cross-node routes are BIRD's

    def on_event(self, ev: ObjectEvent) -> bool:
        kind = kind_of(ev.key)
        if kind == "Block":
            record = compact_block(ev.raw) if ev.raw is not None else None
            with self._lock:
                if record is None:
                    self._blocks.pop(ev.key, None)
                else:
                    self._blocks[ev.key] = record
                self._dirty_blocks.add(ev.key)
        return kind in self.kinds

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        if listed is ALL_KEYS:  # the first list: nothing held before it
            return
        with self._lock:
            for key in [k for k in self._blocks if k not in listed]:
                del self._blocks[key]
                self._dirty_blocks.add(key)

    def sync(self, full: bool) -> str:
        pools = self.cache.list(IPPool)
        nodes = self.cache.list(Node)
        node_ips = node_addresses(nodes)
        vxlan = vxlan_in_use(pools)
        # A node that runs BGP leaves direct pools' cross-node routes to BIRD (agent/bgp.py).
        self.bgp = any(n.name == self.node and n.spec.bgp is not None for n in nodes)
        inputs = (sorted(pools, key=lambda p: p.name), node_ips, vxlan, self.bgp)
        with self._lock:
            dirty, self._dirty_blocks = self._dirty_blocks, set()
            everything = full or inputs != self._inputs
            blocks = dict(self._blocks) if everything else {k: self._blocks.get(k) for k in dirty}
        try:
            if everything:
                _, underlay_mtu = self.programmer.underlay()
                self.mtu = underlay_mtu - VXLAN_OVERHEAD if vxlan else underlay_mtu
                index = PoolIndex(pools)
                self._shares = {key: self._share(b, index, node_ips, vxlan) for key, b in blocks.items()}
                self._inputs = inputs
            elif dirty:
                index = PoolIndex(pools)
                for key, b in blocks.items():
                    if b is None:
                        self._shares.pop(key, None)
                    else:
                        self._shares[key] = self._share(b, index, node_ips, vxlan)
            desired = DesiredRouting(frozenset().union(*(r for r, _ in self._shares.values())),
                                     frozenset().union(*(v for _, v in self._shares.values())), vxlan)
            changes = self.programmer.apply(desired, full=full)
        except BaseException:
            self._inputs = None  # recompute every share next time
            raise
        if changes.errors:
            self._inputs = None
            raise PodnetError("; ".join(changes.errors[:5]) + (
                f" (+{len(changes.errors) - 5} more)" if len(changes.errors) > 5 else ""))
        for line in changes.added:
            log.debug("added %s", line)
        for line in changes.removed:
            log.debug("removed %s", line)
        return f"+{len(changes.added)} -{len(changes.removed)} routing entries" if changes.count else ""

    def _share(self, block: BlockRecord, pools: PoolIndex, node_ips: dict[str, str], vxlan: bool,
               ) -> tuple[tuple[Route, ...], tuple[tuple[str, str], ...]]:
        owner, borrowed = block_routing(block, pools)
        d = desired_routing(self.node, [owner] if owner else [], borrowed, node_ips, vxlan,
                            local_ip=self.programmer.node_ip, bgp=self.bgp)
        return tuple(d.routes), tuple(d.vteps)

    def verify(self) -> list[str]:
        return self.programmer.drift()


class NatDataplane(Dataplane):
    """natOutgoing: a small table rewritten whole when the pools change or it drifted."""

    name = "nat"
    kinds = frozenset({"IPPool"})

    def __init__(self, cache: ObjectCache, programmer: NatProgrammer | None = None):
        self.cache = cache
        self.programmer = programmer or NatProgrammer()

    def sync(self, full: bool) -> str:
        return "table updated" if self.programmer.apply(nat_config(self.cache.list(IPPool))) else ""

    def verify(self) -> list[str]:
        drift = self.programmer.drift()
        if drift:
            self.programmer.applied = None  # the next apply reads the kernel again and rewrites
        return drift


class PolicyDataplane(Dataplane):
    """NetworkPolicy sets and chains, from Pods, Namespaces and NetworkPolicies kept in
    compact form (policy.model.LiveInputs) as events arrive: a change is compiled from
    what it touches. A drifted table is rewritten whole in one transaction (delete +
    full table), so isolated pods stay isolated. `programmer`: the nftables one by
    default, or policy.ebpf's (the same calls, maps and tc programs instead)."""

    name = "policy"
    kinds = frozenset(LiveInputs.KINDS)

    def __init__(self, node: str, programmer=None):
        from podnet.policy.applier import PolicyProgrammer

        self.node = node
        self.live = LiveInputs(node)
        self.programmer = programmer or PolicyProgrammer()
        self._watch = None

    def on_event(self, ev: ObjectEvent) -> bool:
        parts = split_object_key(ev.key)
        if parts is None or parts[0] not in self.kinds:
            return False
        kind, namespace, name = parts
        obj = ev.object
        if isinstance(obj, PodInfo):
            key = obj.key  # one string for the record and its place in the inputs
        else:
            key = name if kind == "Namespace" else f"{namespace or 'default'}/{name}"
        return self.live.on_event(kind, key, obj)

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        if listed is not ALL_KEYS:  # (the first list: nothing held before it)
            self.live.end_reload(listed)

    def snapshot(self) -> object:
        # the compiler's indexes too: compiling 150 000 pods' worth of selectors again is
        # most of a restarted agent's first policy sync
        compiler = getattr(self.programmer, "compiler", None)
        return {"live": self.live.snapshot(), "compiler": compiler.snapshot() if compiler is not None else None}

    def restore(self, state: object) -> None:
        compiled = state["compiler"]  # type: ignore[index]
        compiler = getattr(self.programmer, "compiler", None)
        if compiled is not None and compiler is not None:
            compiler.restore(compiled)
        self.live.restore(state["live"], compiled=compiled is not None and compiler is not None)  # type: ignore[index]

    def sync(self, full: bool) -> str:
        ch = self.programmer.sync_live(self.live)
        if ch.errors and not ch.full:
            raise PodnetError("; ".join(ch.errors))
        return "" if ch.empty else ch.summary()

    def verify(self) -> list[str]:
        diffs = self.programmer.verify()
        return [] if diffs == ["nothing applied yet"] else diffs

    def supervise(self, wake: Callable[[], None]) -> None:
        """eBPF: call `wake` as soon as netlink shows a policy filter gone from a pod veth
        (or a new pod veth), so the next sync re-attaches between resyncs."""
        if not hasattr(self.programmer, "in_doubt"):
            return  # nftables: its table is checked by the resync
        from podnet.policy.ebpf.watch import AttachmentWatch

        def changed(ifindexes: frozenset[int] | None) -> None:
            self.programmer.in_doubt(ifindexes)
            wake()

        self._watch = AttachmentWatch(self.programmer.attached_indexes, changed).start()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()


class DnsDataplane(Dataplane):
    """Node DNS: the cluster index is fed straight from events (answers change at once,
    no sync needed); the kernel part is the DNS addresses on `lo` and the NOTRACK table,
    which verify() checks and sync() restores. Without an index (the agent's
    `--dns-server separate`: a DNS process of its own answers) only the kernel part is
    kept; without addresses (that DNS process) only the index."""

    name = "dns"
    kinds = frozenset({"Service", "EndpointSlice", "Pod", "Namespace"})

    def __init__(self, index, addresses: list[str] | None = None,
                 ensure: Callable[[], None] | None = None):
        self.index = index
        self.addresses = addresses or []
        self._ensure = ensure or (DnsAddresses(self.addresses).ensure if self.addresses else None)
        self._ensured = False
        self._rules = None  # the NOTRACK rules' digests right after podnet wrote them

    def on_event(self, ev: ObjectEvent) -> bool:
        if self.index is None:
            return False
        kind = kind_of(ev.key)
        if kind not in self.kinds:
            return False
        self.index.apply_event(ev)
        return False  # answered from the index: nothing to program

    def end_reload(self, listed: frozenset[str] | set[str] | AllKeys) -> None:
        if self.index is None or listed is ALL_KEYS:  # (the first list: nothing held before it)
            return
        for kind, ns, name in self.index.keys():
            if object_key(KINDS[kind], name, ns) not in listed:
                self.index.remove_key(kind, ns, name)

    def snapshot(self) -> object:
        return self.index.snapshot() if self.index is not None else None

    def restore(self, state: object) -> None:
        if self.index is not None and state is not None:
            self.index.restore(state)

    def sync(self, full: bool) -> str:
        if self._ensure is None or (self._ensured and not full):
            return ""
        if self._ensured and not self._drift():
            return ""
        repair = self._ensured
        self._ensure()
        self._ensured = True
        if self.addresses:
            self._rules = read_table_digests(DNS_TABLE)
        return "addresses and NOTRACK rules restored" if repair else ""

    def verify(self) -> list[str]:
        return self._drift() if self._ensured else []

    def _drift(self) -> list[str]:
        if not self.addresses:
            return []
        out = []
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
        out += [f"address {a} missing from lo" for a in self.addresses if a not in have]
        rules = read_table_digests(DNS_TABLE) or {}
        counts = {chain: d.rules for chain, d in rules.items()}
        if counts.get("prerouting") != 1 or counts.get("output") != 2:
            out.append(f"table {DNS_TABLE} is not as podnet wrote it")
        elif self._rules is not None:  # a rule replaced in place keeps the counts
            out += differing(self._rules, rules)
        return out
