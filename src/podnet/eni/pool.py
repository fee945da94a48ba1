"""The pool manager of one node: keeps idle addresses between the watermarks.

A CNI ADD takes an idle address at once (`acquire`, no cloud call). With none idle it
waits: the manager gathers the requests that arrive within the batch window and asks the
cloud for all of them (plus the low watermark's top-up) in AssignPrivateIpAddresses calls
of at most `batch` addresses each; N concurrent ADDs make ceil(N / batch) calls, not N.
A freed address cools down before another pod gets it; above the high watermark idle
addresses go back to the cloud, in batches too.

Limits are the instance type's (DescribeInstanceTypes), enforced here before any call:
never more ENIs than the type takes, never more addresses on an ENI than it holds. When
the ENIs are full a new one is made (CreateNetworkInterface in the subnet with the most
free addresses, AttachNetworkInterface at the lowest free device index). Each API has a
token bucket (cloud.py); a throttled call (locally or by the cloud's RequestLimitExceeded)
backs off exponentially, and a pod that waits on an empty pool while the API is throttled
past its wait is told so at once (TryLater, CNI code 11) instead of hanging.

Every cloud call happens on the manager's own thread; CNI threads only touch the
in-memory state under the lock and wait on their request's event. The manager also runs
the periodic reconcile (reconcile.py).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from podnet.eni import watermarks
from podnet.eni.cloud import (
    MANAGED_BY,
    TAG_CREATED,
    TAG_INSTANCE,
    TAG_MANAGED,
    TAG_NETWORK,
    TAG_NODE,
    CloudClient,
)
from podnet.eni.errors import CloudError, PoolExhausted, PoolUnavailable
from podnet.eni.limits import InstanceLimits
from podnet.eni.metrics import allocation_wait
from podnet.eni.model import EniSlot, PoolCounts, PoolState
from podnet.eni.subnets import SubnetChooser

log = logging.getLogger("podnet.eni")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 20.0


@dataclass
class PoolConfig:
    node: str
    network: str  # the CloudNetwork's name
    mode: str  # shared | exclusive
    instance_id: str
    limits: InstanceLimits
    subnets: list[str]  # the CloudNetwork's subnets in the node's zone
    subnet_cidrs: dict[str, str] = field(default_factory=dict)  # subnet ID -> CIDR (routing, gateways)
    security_groups: list[str] = field(default_factory=list)
    min_idle: int = 2
    max_idle: int = 10
    batch: int = 10
    window: float = 0.1  # seconds requests are gathered for one batch
    cooldown: float = 30.0
    leak_grace: float = 300.0
    wait: float = 20.0  # how long an ADD waits for an address
    subnet_skip: float = 600.0
    shrink_interval: float = 5.0  # at most one give-back per interval (AWS: 30 s)
    check_interval: float = 5.0  # the watermarks are checked at least this often
    reconcile_interval: float = 60.0
    use_primary_eni: bool = True  # shared mode: the instance's own ENI holds pod addresses too
    zone: str = ""  # the instance's: a changed CloudNetwork's subnets are chosen from it
    workers: int = 4  # cloud calls of one round in flight at once


@dataclass
class PoolSettings:
    """What a CloudNetwork change may alter in a running pool (setup.py checks it first)."""

    min_idle: int
    max_idle: int
    batch: int
    window: float
    cooldown: float
    leak_grace: float
    security_groups: list[str]
    subnets: list[str]  # the node's zone's
    subnet_cidrs: dict[str, str]
    rate_limits: dict


@dataclass
class Lease:
    address: str
    eni: str


class _Waiter:
    __slots__ = ("handle", "arrived", "deadline", "event", "address", "error")

    def __init__(self, handle: str, arrived: float, deadline: float):
        self.handle = handle
        self.arrived = arrived
        self.deadline = deadline
        self.event = threading.Event()
        self.address: str | None = None
        self.error: Exception | None = None


class EniPool:
    def __init__(self, cfg: PoolConfig, cloud: CloudClient, state: PoolState | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 reconciler: Callable[[EniPool], None] | None = None):
        self.cfg = cfg
        self.cloud = cloud
        self.state = state or PoolState()
        self.clock = clock
        self.subnets = SubnetChooser(cfg.subnets, cfg.subnet_skip, clock)
        self.reconciler = reconciler
        self._cond = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._executor = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="eni-call")
        self.backoff_until = 0.0
        self._backoff = 0.0
        self.problem: str | None = None  # the last cloud failure, for messages and STATUS
        self._next_shrink = 0.0
        self._next_reconcile = clock() + cfg.reconcile_interval
        self._reconcile_now = False
        self._settled = threading.Event()
        self._want_cooled = False
        self._low_since: float | None = None  # when an ADD took idle below min_idle (batch window)
        self._blocked = False  # no call can add an address (limits, subnets) until something changes
        self._creating: dict[int, float] = {}  # device index -> since when an ENI is being made there
        self.rounds = 0
        self.wait_seconds = allocation_wait()  # podnet_eni_allocation_wait_seconds (eni/metrics.py)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> EniPool:
        self._thread = threading.Thread(target=self._run, name=f"eni-pool-{self.cfg.node}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for w in self._waiters:
                w.error = PoolUnavailable(f"the ENI pool of node {self.cfg.node} is stopping")
                w.event.set()
            self._waiters.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ what CNI threads call

    def acquire(self, handle: str, wait: float | None = None) -> Lease:
        """An address for the pod `handle`: idle at once, else after the next batch."""
        started = time.monotonic()
        lease = self._acquire(handle, wait)
        self.wait_seconds.observe(time.monotonic() - started)
        return lease

    def _acquire(self, handle: str, wait: float | None) -> Lease:
        now = self.clock()
        with self._cond:
            st = self.state
            held = st.handles.get(handle)
            if held is not None:
                return Lease(held, st.eni_of[held])
            if st.idle:
                address = next(iter(st.idle))
                st.assign(address, handle)
                if len(st.idle) < self.cfg.min_idle:
                    if self._low_since is None:
                        self._low_since = now  # the top-up waits for the window too: one call for a burst
                    self._cond.notify_all()
                return Lease(address, st.eni_of[address])
            deadline = now + (self.cfg.wait if wait is None else wait)
            if self.backoff_until > deadline:
                raise PoolUnavailable(self._empty_because(now))
            waiter = _Waiter(handle, now, deadline)
            self._waiters.append(waiter)
            self._settled.clear()
            self._cond.notify_all()
        waiter.event.wait(max(0.0, deadline - self.clock()) + 1.0)
        with self._cond:
            if waiter.address is None and waiter.error is None:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                waiter.error = PoolUnavailable(f"no ENI address for node {self.cfg.node} within "
                                               f"{deadline - now:.0f} s: {self._empty_because(self.clock())}")
            if waiter.error is not None:
                raise waiter.error
            assert waiter.address is not None
            return Lease(waiter.address, self.state.eni_of[waiter.address])

    def release(self, address: str) -> None:
        """The pod is gone: the address cools down, then is idle again."""
        with self._cond:
            self._blocked = False
            if address in self.state.eni_of:
                self.state.free(address, self.clock() + self.cfg.cooldown)
                self._cond.notify_all()

    def cancel(self, lease: Lease) -> None:
        """An ADD took the address but never used it (its record could not be written)."""
        with self._cond:
            st = self.state
            handle = st.assigned.pop(lease.address, None)
            if handle is not None:
                st.handles.pop(handle, None)
                if lease.address in st.eni_of:
                    st.idle[lease.address] = st.eni_of[lease.address]
            self._cond.notify_all()

    def cancel_handle(self, handle: str) -> None:
        """Forget that `handle` was given an address (the address itself was dealt with)."""
        with self._cond:
            address = self.state.handles.pop(handle, None)
            if address is not None and self.state.assigned.get(address) == handle:
                del self.state.assigned[address]
                self.state.idle[address] = self.state.eni_of[address]

    def hold(self, address: str, handle: str, cooling_until: float | None = None) -> None:
        """Mark an address as a pod's (found in the store), or as cooling until a time."""
        with self._cond:
            if address not in self.state.eni_of:
                return
            if cooling_until is not None:
                self.state.idle.pop(address, None)
                self.state.cooling[address] = (self.state.eni_of[address], cooling_until)
            else:
                self.state.assign(address, handle)

    def counts(self) -> PoolCounts:
        with self._cond:
            return self.state.counts(len(self._waiters))

    def wait_settled(self, timeout: float, cooled: bool = False) -> bool:
        """Wait until a round ends with nothing left to do (tests, the benchmark); `cooled`:
        and no address cooling down either."""
        with self._cond:
            self._want_cooled = cooled
            self._settled.clear()
            self._cond.notify_all()
        return self._settled.wait(timeout)

    def reconfigure(self, settings: PoolSettings) -> list[str]:
        """A changed CloudNetwork's settings, taken while running; what changed. The manager
        looks at the watermarks again at once (it may grow or give back now)."""
        cfg = self.cfg
        changed = []
        with self._cond:
            for name in ("min_idle", "max_idle", "batch", "window", "cooldown", "leak_grace", "security_groups"):
                new = getattr(settings, name)
                if getattr(cfg, name) != new:
                    changed.append(f"{name} {getattr(cfg, name)} -> {new}")
                    setattr(cfg, name, new)
            if cfg.subnets != settings.subnets:
                changed.append(f"subnets {', '.join(cfg.subnets)} -> {', '.join(settings.subnets)}")
                cfg.subnets = list(settings.subnets)
                self.subnets.set_subnets(settings.subnets)
            # ENIs in a subnet no longer listed keep their routing until they go
            cfg.subnet_cidrs = {**cfg.subnet_cidrs, **settings.subnet_cidrs}
            if self.cloud.limiter is not None:
                changed += [f"rate limit {api}" for api in self.cloud.limiter.update(settings.rate_limits)]
            self._blocked = False
            self._settled.clear()
            self._cond.notify_all()
        return changed

    def reconcile_soon(self) -> None:
        with self._cond:
            self._reconcile_now = True
            self._cond.notify_all()

    def capacity_problem(self) -> str | None:
        """Why no pod can get an address now, or None."""
        with self._cond:
            st = self.state
            if st.idle or st.cooling:
                return None
            if self._room() == 0 and st.attached() >= self._eni_limit():
                return (f"every pod address of {self.cfg.limits.describe()} is assigned "
                        f"({len(st.assigned)} pods; max pods {self.cfg.limits.max_pods(self.cfg.mode)})")
        return None

    # ------------------------------------------------------------ the manager thread

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = self.clock()
                self._expire(now)
                self._serve()
                self._fail_late(now)
                st = self.state
                waiting = len(self._waiters)
                if waiting and self.backoff_until > now:
                    self._cond.wait(self.backoff_until - now)
                    continue
                if waiting or self._low_since is not None:
                    first = [w.arrived for w in self._waiters] + ([self._low_since] if self._low_since else [])
                    gather_until = min(first) + self.cfg.window
                    if now < gather_until:
                        self._cond.wait(gather_until - now)
                        continue
                self._low_since = None
                need = watermarks.ask(len(st.idle), waiting, self.cfg.min_idle, self.cfg.max_idle, self.cfg.batch)
                short = watermarks.shortfall(len(st.idle), waiting, self.cfg.min_idle)
                over = watermarks.surplus(len(st.idle), len(st.cooling), waiting, self.cfg.max_idle)
                reconcile = self._reconcile_now or now >= self._next_reconcile
                if need and self._blocked and not waiting:
                    need = 0  # the watermark cannot be met now: wait for a release or the next reconcile
                if need and self._creating and short <= self._room() + len(self._creating) * self._per_eni():
                    need = 0  # the ENIs being made will hold it: wait for them
                pending = bool(need or over or self._creating)  # work under way, or waiting for the
                # back-off or the shrink interval
                if need and self.backoff_until > now:
                    need = 0
                if over and now < self._next_shrink:
                    over = 0
            if reconcile:
                self._reconcile()
                continue
            if need:
                self._grow(need, short)
                continue
            if over:
                self._shrink(over)
                continue
            with self._cond:
                if self._stop:
                    return
                if not self._waiters and not pending and not (self._want_cooled and self.state.cooling):
                    self._settled.set()
                self._cond.wait(self._sleep_for(self.clock()))

    def _sleep_for(self, now: float) -> float:
        times = [self.cfg.check_interval, self._next_reconcile - now]
        if self.state.cooling:
            times.append(min(until for _, until in self.state.cooling.values()) - now)
        if self.backoff_until > now:
            times.append(self.backoff_until - now)
        if self._next_shrink > now:
            times.append(self._next_shrink - now)
        return max(0.01, min(times))

    def _expire(self, now: float) -> None:
        st = self.state
        for address in [a for a, (_, until) in st.cooling.items() if until <= now]:
            eni, _ = st.cooling.pop(address)
            st.idle[address] = eni

    def _serve(self) -> None:
        st = self.state
        while self._waiters and st.idle:
            w = self._waiters.pop(0)
            address = next(iter(st.idle))
            st.assign(address, w.handle)
            w.address = address
            w.event.set()

    def _fail_late(self, now: float) -> None:
        """Waiters the pool cannot serve before their deadline learn why now."""
        keep = []
        for w in self._waiters:
            if w.deadline <= now or (self.backoff_until > w.deadline):
                w.error = PoolUnavailable(self._empty_because(now))
                w.event.set()
            else:
                keep.append(w)
        self._waiters = keep

    def _fail_all(self, error: Exception) -> None:
        for w in self._waiters:
            w.error = error
            w.event.set()
        self._waiters = []

    def _empty_because(self, now: float) -> str:
        why = f"the warm pool of node {self.cfg.node} is empty"
        if self.backoff_until > now:
            why += f" and the cloud API is throttled or failing (retry in {self.backoff_until - now:.1f} s)"
        if self.problem:
            why += f": {self.problem}"
        return why + "; try again later"

    # ------------------------------------------------------------ growing

    def _eni_limit(self) -> int:
        return self.cfg.limits.max_enis

    def _per_eni(self) -> int:
        return self.cfg.limits.secondary_per_eni

    def _usable(self, eni: EniSlot) -> bool:
        if self.cfg.mode == "exclusive":
            return False
        if not eni.podnet and not self.cfg.use_primary_eni:
            return False
        return not self.subnets.is_skipped(eni.subnet_id)

    def _room(self) -> int:
        if self.cfg.mode == "exclusive":
            return 0
        return sum(max(0, self._per_eni() - len(e.addresses)) for e in self.state.enis.values() if self._usable(e))

    def _grow(self, need: int, short: int) -> None:
        """Ask for `need` addresses from the ENIs' room; start new ENIs (in the background:
        Create + Attach take seconds, and pods arriving meanwhile start more in parallel
        rather than after) only for what the ENIs and those being made lack of `short`
        (the rounding up to whole batches never costs an ENI)."""
        self.rounds += 1
        if self.cfg.mode == "exclusive":
            self._grow_enis(short)
            return
        indices: list[int] = []
        with self._cond:
            rooms = sorted(((e.device_index, e.id, self._per_eni() - len(e.addresses))
                            for e in self.state.enis.values() if self._usable(e)), key=lambda r: r[0])
            calls = watermarks.split(need, [(eni, room) for _, eni, room in rooms], self.cfg.batch)
            planned = sum(n for _, n in calls)
            creating = len(self._creating)
            in_flight = creating * self._per_eni()
            attached = self.state.attached()
            if short > planned + in_flight and attached + creating < self._eni_limit():
                fresh = min(math.ceil((short - planned - in_flight) / self._per_eni()),
                            self._eni_limit() - attached - creating)
                used = self.state.used_indices() | set(self._creating)
                indices = [i for i in range(1, self._eni_limit()) if i not in used][:fresh]
                for i in indices:
                    self._creating[i] = self.clock()
        for i in indices:
            self._executor.submit(self._make_eni, i)
        log.debug("node %s: grow need %d short %d: %d calls, new ENIs at %s, %d being made", self.cfg.node, need,
                  short, len(calls), indices, creating)
        if not calls and not indices and not creating:
            self._at_limit()
            return
        futures = [self._executor.submit(self._assign, eni, n) for eni, n in calls]
        for f in futures:
            f.result()

    def _make_eni(self, index: int) -> None:
        try:
            self._create_eni(index)
        finally:
            with self._cond:
                self._creating.pop(index, None)
                self._cond.notify_all()  # the next round assigns from its room

    def _assign(self, eni_id: str, count: int) -> None:
        try:
            got = self.cloud.assign(eni_id, count)
        except CloudError as e:
            self._failed(e, eni_id=eni_id)
            return
        with self._cond:
            eni = self.state.enis.get(eni_id)
            if eni is None:
                return
            new = [a for a in got if a != eni.primary_ip and a not in eni.addresses and a not in self.state.eni_of]
            for a in new:
                eni.addresses.add(a)
                self.state.add_idle(a, eni_id)
            self._ok()
            self._serve()
            self._cond.notify_all()

    def _create_enis(self, count: int) -> list[EniSlot]:
        """`count` new ENIs at once (each one's Create + Attach takes seconds: in parallel, a
        cold node waits for one, not for each)."""
        with self._cond:
            used = self.state.used_indices()
        free = [i for i in range(1, self._eni_limit()) if i not in used][:count]
        if len(free) <= 1:
            made = [self._create_eni(i) for i in free]
        else:
            made = list(self._executor.map(self._create_eni, free))
        return [e for e in made if e is not None]

    def _create_eni(self, index: int | None = None) -> EniSlot | None:
        try:
            subnets = self.cloud.describe_subnets(self.subnets.usable()) if self.subnets.usable() else []
        except CloudError as e:
            self._failed(e)
            return None
        subnet = self.subnets.choose({s.id: s.free for s in subnets})
        if subnet is None:
            with self._cond:
                self.problem = "every subnet of the node's zone is full or skipped: " + ", ".join(self.cfg.subnets)
            return None
        if index is None:
            with self._cond:
                used = self.state.used_indices()
            index = next((i for i in range(1, self._eni_limit()) if i not in used), None)
            if index is None:
                return None
        tags = {TAG_MANAGED: MANAGED_BY, TAG_NODE: self.cfg.node, TAG_INSTANCE: self.cfg.instance_id,
                TAG_CREATED: str(int(time.time())), TAG_NETWORK: self.cfg.network}
        try:
            made = self.cloud.create_eni(subnet, self.cfg.security_groups, tags, f"podnet pods of {self.cfg.node}")
        except CloudError as e:
            self._failed(e, subnet=subnet)
            return None
        try:
            attachment = self.cloud.attach_eni(made.id, self.cfg.instance_id, index)
        except CloudError as e:
            self._failed(e)
            try:  # never leave an ENI nobody holds; reconcile deletes it after the grace period otherwise
                self.cloud.delete_eni(made.id)
            except CloudError as e2:
                log.warning("ENI %s of node %s could not be deleted after a failed attach: %s", made.id,
                            self.cfg.node, e2)
            return None
        slot = EniSlot(made.id, made.subnet_id, index, made.primary_ip, attachment, made.mac, True)
        with self._cond:
            self.state.enis[slot.id] = slot
            if self.cfg.mode == "exclusive":
                self.state.add_idle(slot.primary_ip, slot.id)
                self._serve()
            self._ok()
        log.info("node %s: ENI %s attached at device %d in %s", self.cfg.node, made.id, index, subnet)
        return slot

    def _grow_enis(self, need: int) -> None:
        with self._cond:
            room = self._eni_limit() - self.state.attached()
        if room <= 0:
            self._at_limit()
            return
        self._create_enis(min(need, room))

    def _at_limit(self) -> None:
        """No call can add an address: hand waiting pods cooling addresses early (an address
        stuck in cooldown must not keep a pod from starting, aws-vpc-cni #1160), then say why."""
        with self._cond:
            self._blocked = True
            st = self.state
            while self._waiters and st.cooling:
                address = min(st.cooling, key=lambda a: st.cooling[a][1])
                st.cooling.pop(address)
                w = self._waiters.pop(0)
                st.assign(address, w.handle)
                w.address = address
                w.event.set()
                log.info("node %s: at its limit, %s handed out before its cooldown ended", self.cfg.node, address)
            if self._waiters:
                full = self.cfg.mode == "exclusive" or all(
                    len(e.addresses) >= self._per_eni() for e in st.enis.values() if e.podnet or self.cfg.use_primary_eni)
                if not full or st.attached() < self._eni_limit():
                    reason = self.problem or "every subnet of the node's zone is out of addresses"
                    self._fail_all(PoolUnavailable(f"the warm pool of node {self.cfg.node} is empty: {reason}; "
                                                   "try again later"))
                else:
                    self._fail_all(PoolExhausted(self.cfg.node, f"every pod address of "
                                                 f"{self.cfg.limits.describe()} is assigned ({len(st.assigned)} pods;"
                                                 f" max pods {self.cfg.limits.max_pods(self.cfg.mode)})"))
            self._settled.set()

    # ------------------------------------------------------------ shrinking

    def _shrink(self, over: int) -> None:
        self.rounds += 1
        with self._cond:
            self._next_shrink = self.clock() + self.cfg.shrink_interval
            st = self.state
            # newest idle first: the oldest stay (they have cooled longest)
            chosen = list(st.idle)[-over:]
            for a in chosen:
                st.idle.pop(a, None)
            by_eni: dict[str, list[str]] = {}
            for a in chosen:
                by_eni.setdefault(st.eni_of[a], []).append(a)
        if self.cfg.mode == "exclusive":
            for eni_id in by_eni:
                self._delete_eni(eni_id)
            return
        for eni_id, addresses in by_eni.items():
            for i in range(0, len(addresses), self.cfg.batch):
                part = addresses[i:i + self.cfg.batch]
                try:
                    self.cloud.unassign(eni_id, part)
                except CloudError as e:
                    self._failed(e)
                    with self._cond:
                        for a in part:
                            if a in st.eni_of and a not in st.assigned:
                                st.idle[a] = eni_id
                    continue
                with self._cond:
                    for a in part:
                        st.forget(a)
                    self._ok()

    def _delete_eni(self, eni_id: str) -> None:
        with self._cond:
            slot = self.state.enis.get(eni_id)
        if slot is None:
            return
        try:
            if slot.attachment_id:
                self.cloud.detach_eni(slot.attachment_id)
            self.cloud.delete_eni(eni_id)
        except CloudError as e:
            self._failed(e)
            with self._cond:
                if slot.primary_ip in self.state.eni_of and slot.primary_ip not in self.state.assigned:
                    self.state.idle[slot.primary_ip] = eni_id
            return
        with self._cond:
            self.state.forget(slot.primary_ip)
            self.state.enis.pop(eni_id, None)
            self._ok()

    # ------------------------------------------------------------ reconcile and failures

    def _reconcile(self) -> None:
        with self._cond:
            self._blocked = False
            self._reconcile_now = False
            # jittered (+-20%): thousands of nodes started together do not describe at the same second
            self._next_reconcile = self.clock() + self.cfg.reconcile_interval * random.uniform(0.8, 1.2)
        if self.reconciler is None:
            return
        try:
            self.reconciler(self)
        except CloudError as e:
            self._failed(e)

    def _ok(self) -> None:
        self._backoff = 0.0
        self.backoff_until = 0.0
        self.problem = None

    def _failed(self, e: CloudError, *, eni_id: str | None = None, subnet: str | None = None) -> None:
        # podnet's own bucket holding a call back is the plan working: not worth a warning
        log.log(logging.DEBUG if e.code == "LocallyThrottled" else logging.WARNING, "node %s: %s", self.cfg.node, e)
        with self._cond:
            self.problem = str(e)
            if e.code == "InsufficientFreeAddressesInSubnet":
                sub = subnet or (self.state.enis[eni_id].subnet_id if eni_id in self.state.enis else None)
                if sub:
                    self.subnets.skip(sub)
                return
            if e.code in ("PrivateIpAddressLimitExceeded", "AttachmentLimitExceeded"):
                self._reconcile_now = True  # the view of the ENIs is stale
                return
            if e.code == "LocallyThrottled":
                wait = self.cloud.limiter.wait_time(_bucket_of(e.api)) if self.cloud.limiter else BACKOFF_FIRST
                self.backoff_until = max(self.backoff_until, self.clock() + max(wait, 0.01))
            else:  # throttled by the cloud, or the cloud failing: back off exponentially
                self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
                self.backoff_until = self.clock() + self._backoff
            self._fail_late(self.clock())


def _bucket_of(api: str) -> str:
    from podnet.eni.cloud import BUCKET

    return BUCKET.get(api, "describe")
