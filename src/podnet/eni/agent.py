"""The agent's ENI part: pod addresses from the cloud on a node a CloudNetwork selects.

    EniAgent.for_node()  the node's CloudNetwork (none: the node keeps podnet's own IPAM)
    start()              builds the pool on a thread of its own, again and again while the
                         cloud refuses (a missing subnet, refused credentials, an endpoint
                         that is down: logged naming the object, field or call and its
                         code); the node's existing pods keep working meanwhile, and an
                         ADD answers "try again later" with that reason
    ipam_factory         the CNI handler's IPAM (eni/ipam.py) once the pool runs
    pod_dataplane()      the pod dataplane: shared mode adds the pod's rule to its ENI's
                         table after the veth; exclusive mode moves the ENI into the pod
    dataplane            the agent contract's dataplane: ENI links, tables and pod rules
                         reconciled with the pool on every resync (drift heals); it also
                         watches the node's CloudNetwork and hands a change to the running
                         pool (watermarks, batching, cooldown, rate limits, subnets, security
                         groups: setup.reconfigure), on its own worker thread since new
                         subnets and groups are checked with the cloud first
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from podnet.agent.contract import Dataplane, kind_of
from podnet.cni.attachments import attachment_key
from podnet.eni import records as rec
from podnet.eni.errors import PoolUnavailable, SetupError
from podnet.eni.ipam import EniIPAM
from podnet.eni.pool import EniPool
from podnet.eni.setup import PoolOptions, build_pool, select
from podnet.ipam.allocator import Allocation
from podnet.model.objects import CloudNetwork, Node
from podnet.store.base import KeyValueStore
from podnet.store.objects import ObjectEvent, ObjectStore

log = logging.getLogger("podnet.eni")

RETRY_FIRST = 1.0
RETRY_MAX = 30.0


def attachment_exists(node: str) -> Callable[[KeyValueStore, str], bool]:
    return lambda kv, handle: kv.get(attachment_key(node, handle)) is not None


class EniAgent:
    def __init__(self, node: Node, network: CloudNetwork, kv_factory: Callable[[], KeyValueStore],
                 options: PoolOptions | None = None):
        self.node = node
        self.network = network
        self.kv_factory = kv_factory
        self.options = options or PoolOptions()
        self.pool: EniPool | None = None
        self.problem: str | None = f"the ENI pool of node {node.name} ({network.ref}) is starting"
        self._stop = threading.Event()
        self._started = threading.Event()
        self.tried = threading.Event()  # set once the first attempt to start ended, either way
        self._thread: threading.Thread | None = None
        self.routing: Any = None
        self.dataplane = EniDataplane(self)
        self.config_problem: str | None = None  # why the last CloudNetwork change was not taken
        self._pending: CloudNetwork | None = None  # a change the next sync takes
        self._pending_lock = threading.Lock()

    @classmethod
    def for_node(cls, objects: ObjectStore, node_name: str, kv_factory: Callable[[], KeyValueStore],
                 options: PoolOptions | None = None) -> EniAgent | None:
        node = objects.get(Node, node_name)
        if node is None:
            return None
        network = select(objects.list(CloudNetwork), node)
        if network is None:
            return None
        log.info("node %s: pod addresses from %s (%s mode, %s)", node_name, network.ref, network.spec.mode,
                 network.spec.region)
        return cls(node, network, kv_factory, options)

    @property
    def mode(self) -> str:
        return self.network.spec.mode

    def start(self) -> EniAgent:
        self._thread = threading.Thread(target=self._start_loop, name="eni-start", daemon=True)
        self._thread.start()
        return self

    def wait_started(self, timeout: float) -> bool:
        return self._started.wait(timeout)

    def _start_loop(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                pool = build_pool(self.network, self.node, self.kv_factory, self.options,
                                  attachment_exists(self.node.name))
            except SetupError as e:
                self.problem = f"the ENI pool of node {self.node.name} cannot start: {e}"
                self.tried.set()
                log.error("%s (trying again in %.0f s)", self.problem, delay)
                if self._stop.wait(delay):
                    return
                delay = min(RETRY_MAX, delay * 2)
                continue
            except Exception as e:  # never let the agent's other work stop for it
                self.problem = f"the ENI pool of node {self.node.name} cannot start: {type(e).__name__}: {e}"
                self.tried.set()
                log.exception("%s", self.problem)
                if self._stop.wait(delay):
                    return
                delay = min(RETRY_MAX, delay * 2)
                continue
            if self._stop.is_set():
                pool.stop()
                return
            self.pool = pool
            self.problem = None
            self._started.set()
            self.tried.set()
            log.info("node %s: ENI pool ready: %s, %s", self.node.name, pool.cfg.limits.describe(), pool.counts())
            self.dataplane.mark()
            return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.pool is not None:
            self.pool.stop()
        if self.routing is not None:
            self.routing.close()

    # ------------------------------------------------------------ a changed CloudNetwork

    def changed(self, network: CloudNetwork) -> bool:
        """The watch saw the node's CloudNetwork (again); True if the next sync must take it."""
        if network.name != self.network.name or network.spec == self.network.spec:
            return False
        with self._pending_lock:
            self._pending = network
        return True

    def take_change(self) -> str:
        """Apply the pending CloudNetwork to the pool (or, before it runs, to its next start);
        what changed. A change the cloud refuses is logged and leaves everything as it was."""
        from podnet.eni.setup import reconfigure

        with self._pending_lock:
            new, self._pending = self._pending, None
        if new is None or new.spec == self.network.spec:
            return ""
        pool = self.pool
        if pool is None:  # the start loop's next attempt builds the pool from it
            self.network, self.config_problem = new, None
            return f"{new.ref} changed (the pool is not running yet)"
        try:
            changed, later = reconfigure(pool, self.network, new)
        except SetupError as e:
            self.config_problem = str(e)
            log.error("node %s: the change of %s is not taken, the pool keeps its settings: %s", self.node.name,
                      new.ref, e)
            return ""
        self.config_problem = None
        self.network = new if not later else _with_fields_of(new, self.network, later)
        for f in later:
            log.warning("node %s: %s: field %s changed: it takes effect when the agent restarts", self.node.name,
                        new.ref, f)
        if changed:
            log.info("node %s: %s changed: %s", self.node.name, new.ref, "; ".join(changed))
        return "; ".join(changed)

    # ------------------------------------------------------------ CNI

    def ipam_factory(self, kv: KeyValueStore) -> AgentIPAM:
        return AgentIPAM(kv, self)

    def pod_dataplane(self, pods: Any) -> Any:
        from podnet.eni.pods import EniPods, ExclusivePods

        if self.mode == "exclusive":
            return ExclusivePods(self, pods)
        return EniPods(self, pods)


def _with_fields_of(new: CloudNetwork, running: CloudNetwork, later: list[str]) -> CloudNetwork:
    """`new` with the fields a running pool cannot take kept as they run (so the next change
    is compared with what runs)."""
    from podnet.eni.setup import RESTART_FIELDS

    keep = {attr: getattr(running.spec, attr) for attr, f in RESTART_FIELDS if f in later}
    return new.model_copy(update={"spec": new.spec.model_copy(update=keep)})


class AgentIPAM:
    """EniIPAM once the pool runs; before that, "try again later" with the reason (and DEL,
    CHECK and lookups answered from the store records alone)."""

    def __init__(self, kv: KeyValueStore, agent: EniAgent):
        self.kv = kv
        self.agent = agent

    def _ipam(self) -> EniIPAM | None:
        pool = self.agent.pool
        return EniIPAM(self.kv, pool) if pool is not None else None

    def allocate(self, handle: str, node: str, **kw: Any) -> Allocation:
        ipam = self._ipam()
        if ipam is None:
            raise PoolUnavailable(f"{self.agent.problem}; try again later")
        return ipam.allocate(handle, node, **kw)

    def release(self, handle: str) -> None:
        ipam = self._ipam()
        if ipam is not None:
            ipam.release(handle)
            self.agent.dataplane.mark()  # the pod's rule goes
            return
        node = self.agent.node.name
        address = rec.get_handle(self.kv, node, handle)
        if address is not None:  # the pool adopts the cooling record when it starts
            r = rec.get_address(self.kv, node, address)
            self.kv.txn(rec.release_ops(node, handle, address, r.eni if r else None,
                                        self.agent.network.spec.cooldown_seconds))

    def lookup(self, handle: str) -> Allocation | None:
        node = self.agent.node.name
        address = rec.get_handle(self.kv, node, handle)
        if address is None:
            return None
        r = rec.get_address(self.kv, node, address)
        return Allocation(address, 32, self.agent.network.name, (r.eni if r else "") or "", handle)

    def capacity_problem(self, node: str) -> str | None:
        pool = self.agent.pool
        if pool is None:
            return self.agent.problem
        return pool.capacity_problem()


class EniDataplane(Dataplane):
    """ENI links, tables and pod rules (shared mode), reconciled with the pool."""

    name = "eni"
    kinds = frozenset({"CloudNetwork"})

    def __init__(self, agent: EniAgent):
        self.agent = agent
        self._mark: Callable[[], None] | None = None

    def on_mark(self, mark: Callable[[], None]) -> None:
        self._mark = mark

    def mark(self) -> None:
        if self._mark is not None:
            self._mark()

    def _routing(self):
        from podnet.eni.routing import EniRouting

        if self.agent.routing is None:
            self.agent.routing = EniRouting()
        return self.agent.routing

    def on_event(self, ev: ObjectEvent) -> bool:
        if kind_of(ev.key) != "CloudNetwork" or not isinstance(ev.object, CloudNetwork):
            return False  # a deleted CloudNetwork: the pool runs on until the agent restarts
        return self.agent.changed(ev.object)

    def sync(self, full: bool) -> str:
        taken = self.agent.take_change()
        pool = self.agent.pool
        if pool is None or self.agent.mode != "shared":
            return taken
        from podnet.eni.pods import desired_routing, pod_handles

        routing = self._routing()
        enis, rules = desired_routing(pool)
        changes = ([taken] if taken else []) + [c for c in routing.sync(enis, rules) if not c.startswith("waiting")]
        if full:  # a pod's host route is the pod dataplane's; it has no resync of its own
            changes += routing.host_routes(pod_handles(pool), repair=True)
        return "; ".join(changes)

    def verify(self) -> list[str]:
        pool, routing = self.agent.pool, self.agent.routing
        if pool is None or routing is None or self.agent.mode != "shared":
            return []
        from podnet.eni.pods import desired_routing, pod_handles

        enis, rules = desired_routing(pool)
        have = routing.pod_rules()
        problems = [f"rules of {a} (from it lookup {t}) are missing" for a, t in rules.items() if have.get(a) != t]
        for eni in enis:
            problems += routing.table_problems(eni)
        return problems + [f"{m} is missing" for m in routing.host_routes(pod_handles(pool), repair=False)]

    def close(self) -> None:
        pass
